"""The approval a person gives in the Prefect UI (or with `zdr approve`), and finding
the paused pipeline run of a replay key so nobody has to look up a flow-run id."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.input import RunInput
from pydantic import Field, model_validator

import zdr
from zdr.errors import NoPausedRun

PIPELINE_FLOW_NAME = "zero-downtime-replay"


class Approval(RunInput):
    """Promote this replay to live, or leave live as it is?"""

    # No default: the form cannot be sent without a choice, so nobody rejects by accident.
    decision: Literal["approve", "reject"] = Field(
        ...,
        description="approve: promote the replay to live now, in one transaction (the "
        "previous copy is kept for rollback). reject: live stays as it is; the replay stays "
        "in dual write (or is removed, if the run was started with remove_on_reject).",
    )
    approver: str = Field(..., min_length=1, description="Who decides (name or handle).")
    comment: str = Field("", description="Why; kept in the run's logs and result.")

    @model_validator(mode="before")
    @classmethod
    def _from_approve(cls, values: Any) -> Any:
        """``approve=True/False``, as the earlier form and ``Approval(approve=...)`` took it."""
        if isinstance(values, dict) and "approve" in values and "decision" not in values:
            values = dict(values)
            values["decision"] = "approve" if values.pop("approve") else "reject"
        return values

    @property
    def approve(self) -> bool:
        """Whether the decision is to promote."""
        return self.decision == "approve"


#: The tag a pipeline run carries for its database (``ReplayManager.database_tag``).
DATABASE_TAG = "zdr-db-{}"
#: The tags a pipeline run carries for its replay key and each projection it rebuilds
#: (the runs list filters by tag).
KEY_TAG = "replay:{}"
PROJECTION_TAG = "projection:{}"


def find_paused_run(
    replay_key: str, *, database_tag: str | None = None, flow_run_id: UUID | None = None
) -> UUID:
    """The id of the paused pipeline run for ``replay_key`` on the database tagged
    ``database_tag`` (the newest if several), or the paused run ``flow_run_id`` if it is
    one for that key (and database). Two environments can share a Prefect server: a
    run of another database is never picked."""
    zdr.names.validate_key(replay_key)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW_NAME])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
        )
    now = dt.datetime.now(dt.UTC)
    waiting = [
        run
        for run in runs
        if run.parameters.get("replay_key") == replay_key
        and (database_tag is None or DATABASE_TAG.format(database_tag) in run.tags)
        and (flow_run_id is None or run.id == flow_run_id)
        and not _expired(run, now)
    ]
    if not waiting:
        where = "" if database_tag is None else f" on this database ({database_tag})"
        which = "" if flow_run_id is None else f" with id {flow_run_id}"
        raise NoPausedRun(
            f"no pipeline run{which} for replay {replay_key!r}{where} is waiting for approval"
            + (
                ": name the database the pipeline runs on (--database-url or "
                "ZDR_DATABASE_URL), or pick the run with --flow-run-id"
                if database_tag is not None
                else ""
            )
        )
    waiting.sort(key=lambda run: run.created or run.expected_start_time, reverse=True)
    return waiting[0].id


def _expired(run: Any, now: dt.datetime) -> bool:
    """A pause past its timeout can no longer be answered (a server that fails expired
    pauses has not got to it yet, or the process that paused died): it waits for nobody."""
    deadline = run.state.state_details.pause_timeout if run.state else None
    return deadline is not None and deadline < now


def answer(
    replay_key: str,
    *,
    approve: bool,
    approver: str,
    comment: str = "",
    database_tag: str | None = None,
    flow_run_id: UUID | None = None,
) -> UUID:
    """Resume the paused pipeline run of ``replay_key`` (on the database tagged
    ``database_tag``, or the run ``flow_run_id``) with a decision; return its id."""
    decision = Approval(approve=approve, approver=approver, comment=comment)
    run_id = find_paused_run(replay_key, database_tag=database_tag, flow_run_id=flow_run_id)
    resume_flow_run(
        run_id, run_input=decision.model_dump(include={"decision", "approver", "comment"})
    )
    return run_id

"""The approval a person gives in the Prefect UI (or with `zdr approve`), and finding
the paused pipeline run of a replay key so nobody has to look up a flow-run id."""

from __future__ import annotations

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
from pydantic import Field

import zdr
from zdr.errors import NoPausedRun

PIPELINE_FLOW_NAME = "zero-downtime-replay"


class Approval(RunInput):
    """Promote this replay?"""

    approve: bool = Field(False, description="Promote the replay to live.")
    approver: str = Field(..., min_length=1, description="Who decides (name or handle).")
    comment: str = Field("", description="Why; kept in the run's logs and result.")


def find_paused_run(replay_key: str) -> UUID:
    """The id of the paused pipeline run for ``replay_key`` (the newest if several)."""
    zdr.names.validate_key(replay_key)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW_NAME])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
        )
    waiting = [run for run in runs if run.parameters.get("replay_key") == replay_key]
    if not waiting:
        raise NoPausedRun(f"no pipeline run for replay {replay_key!r} is waiting for approval")
    waiting.sort(key=lambda run: run.created or run.expected_start_time, reverse=True)
    return waiting[0].id


def answer(replay_key: str, *, approve: bool, approver: str, comment: str = "") -> UUID:
    """Resume the paused pipeline run of ``replay_key`` with a decision; return its id."""
    decision = Approval(approve=approve, approver=approver, comment=comment)
    run_id = find_paused_run(replay_key)
    resume_flow_run(
        run_id, run_input=decision.model_dump(include={"approve", "approver", "comment"})
    )
    return run_id

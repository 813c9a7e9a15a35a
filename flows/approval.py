"""The approval a person gives in the Prefect UI (or with `zdr approve`), and finding
the paused pipeline run of a replay key so nobody has to look up a flow-run id."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterLevel,
    LogFilterTimestamp,
)
from prefect.client.schemas.objects import State, StateType
from prefect.flow_runs import resume_flow_run
from prefect.input import RunInput
from pydantic import Field, model_validator

import zdr
from zdr.config import DATABASE_URL_ENV
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


#: The words of a pause key's verdict.
VERDICTS = {True: "equal", False: "differences"}


def pause_key(replay_key: str, *, equal: bool, replay_digest: str) -> str:
    """The key a run's question is asked under: the replay key, the verification's
    verdict and a digest of the replay's making (when, which projectors). Lower-case
    letters, digits and dashes only (Prefect's rule for keys)."""
    return f"approve-{replay_key.replace('_', '-')}-{VERDICTS[equal]}-{replay_digest}"


EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Given:
    """An answer a run was given, and the pause key of the question it answered."""

    key: str
    approval: Approval


def answers_given(current_key: str) -> list[Given]:
    """The answers this run was given for this replay key, oldest first."""
    from prefect.input.actions import filter_flow_run_input

    prefix = current_key.rsplit("-", 2)[0] + "-"
    found = []
    # Prefect keeps an answer under "<paused|suspended>-<pause key>-response".
    for state_name in ("paused-", "suspended-"):
        for item in filter_flow_run_input(key_prefix=state_name + prefix, limit=100):
            if item.key.endswith("-response"):
                key = item.key.removeprefix(state_name).removesuffix("-response")
                found.append(
                    (item.created, Given(key, Approval.model_validate(item.decoded_value)))
                )
    return [given for _, given in sorted(found, key=lambda pair: pair[0] or dt.datetime.min)]


def _question(key: str) -> tuple[str, str]:
    """(verdict, digest) of a pause key; a key asked again carries "n<count>" after it."""
    _, verdict, digest = key.rsplit("-", 2)
    return verdict, digest.split("n")[0]


def same_question(answered_key: str, current_key: str) -> bool:
    return _question(answered_key) == _question(current_key)


def unused_key(base: str, used: set[str]) -> str:
    """``base``, or ``base`` with a count when a question of that key was answered
    already (Prefect refuses a pause key used once; the answer given then is not the
    run's latest)."""
    key, count = base, 0
    while key in used:
        count += 1
        key = f"{base}n{count}"
    return key


def what_changed(earlier_key: str, current_key: str) -> str:
    """Why an answer to ``earlier_key`` does not answer ``current_key``, in words."""
    then, made_then = _question(earlier_key)
    now, made_now = _question(current_key)
    if then not in VERDICTS.values():
        return "it was asked by an earlier version of zdr"
    if then != now:
        return f"the verification said {then!r} then and says {now!r} now"
    return "the replay was made again or its projectors changed since"


def run_tags(replay_key: str, database_tag: str) -> list[str]:
    """The tags a pipeline run of ``replay_key`` carries from its creation: give them to
    ``run_deployment`` (``zdr.flows.approval.run_tags(key, manager.database_tag())``),
    and the runs list finds the run by key and database before it starts."""
    return [KEY_TAG.format(replay_key), DATABASE_TAG.format(database_tag)]


def find_paused_run(
    replay_key: str,
    *,
    database_tag: str | None = None,
    flow_run_id: UUID | None = None,
    database_url: str | None = None,
) -> UUID:
    """The id of the paused pipeline run for ``replay_key`` on the database tagged
    ``database_tag`` (the newest if several), or the paused run ``flow_run_id`` if it is
    one for that key (and database). Two environments can share a Prefect server: a
    run of another database is never picked. The database, as the CLI takes it:
    ``database_tag``, else ``database_url``'s, else ZDR_DATABASE_URL's; with none of
    them, a run of any database."""
    zdr.names.validate_key(replay_key)
    database_tag = _database_tag(database_tag, database_url)
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


def _database_tag(tag: str | None, url: str | None) -> str | None:
    """The tag of the database named: never the embedded one's, which nobody named."""
    url = url or os.environ.get(DATABASE_URL_ENV)
    if tag is not None or not url:
        return tag
    manager = zdr.ReplayManager(url)
    try:
        return manager.database_tag()
    finally:
        manager.engine.dispose()


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
    database_url: str | None = None,
) -> UUID:
    """Resume the paused pipeline run of ``replay_key`` (on the database named as
    ``find_paused_run`` takes it, or the run ``flow_run_id``) with a decision; return
    its id."""
    decision = Approval(approve=approve, approver=approver, comment=comment)
    run_id = find_paused_run(
        replay_key, database_tag=database_tag, flow_run_id=flow_run_id, database_url=database_url
    )
    resume_flow_run(
        run_id, run_input=decision.model_dump(include={"decision", "approver", "comment"})
    )
    return run_id


#: The words a run logs when an answer does not answer its question (the flow's).
NOT_TAKEN = "is not taken"


@dataclass(frozen=True)
class Outcome:
    """What a run did with an answer: ``ended`` (it took the answer; ``state`` and
    ``message`` say how it ended), ``asked_again`` (it did not take it: ``message`` is
    why, from its log) or ``running`` (neither yet)."""

    kind: Literal["ended", "asked_again", "running"]
    state: str
    message: str
    completed: bool = False


def paused_state(run_id: UUID) -> State | None:
    """The run's state now: read it before answering, for ``outcome``."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def outcome(run_id: UUID, asked: State | None, timeout_s: float, *, poll_s: float = 0.5) -> Outcome:
    """Wait up to ``timeout_s`` for the run ``run_id``, answered in its paused state
    ``asked``, to end or to ask again (a paused state other than ``asked``)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is None:
                return Outcome("running", "unknown", "")
            if state.is_final():
                return Outcome("ended", state.name or "", state.message or "", state.is_completed())
            if state.is_paused() and asked is not None and state.id != asked.id:
                why = _why_asked_again(client, run_id, asked, timeout_s=10)
                return Outcome("asked_again", state.name or "", why)
            if time.monotonic() >= deadline:
                return Outcome("running", state.name or "", "")
            time.sleep(poll_s)


def _why_asked_again(client: Any, run_id: UUID, asked: State, *, timeout_s: float) -> str:
    """The run's log line saying why it did not take the answer. A run sends its logs
    in batches (every 2 s by default): wait for the line a little."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run_id]),
                level=LogFilterLevel(ge_=30),
                timestamp=LogFilterTimestamp(after_=asked.timestamp),
            )
        )
        why = [log.message for log in logs if NOT_TAKEN in log.message]
        if why or time.monotonic() >= deadline:
            return why[-1] if why else ""
        time.sleep(0.5)


def answer_when_asked(
    replay_key: str,
    database_tag: str,
    ask: Callable[[str], tuple[bool, str, str]],
    run_done: threading.Event,
) -> None:
    """Wait for the run of ``replay_key`` to pause, ``ask`` (given the key, it returns
    approve, approver, comment) and answer it: the question of a run started from a
    terminal with no server to answer it from elsewhere (the demo, ``zdr run``). Run it
    in a thread beside the run; ``run_done`` set: the run ended without asking. Only a
    run created after this call is asked about: a paused run an earlier, killed process
    left behind is not this one."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    while not run_done.is_set():
        try:
            run_id = find_paused_run(replay_key, database_tag=database_tag)
            with get_client(sync_client=True) as client:
                created = client.read_flow_run(run_id).created
            if created is not None and created >= since:
                break
        except NoPausedRun:
            pass
        run_done.wait(0.5)
    else:
        return
    approve, approver, comment = ask(replay_key)
    answer(
        replay_key,
        approve=approve,
        approver=approver,
        comment=comment,
        database_tag=database_tag,
        flow_run_id=run_id,
    )

"""The zero-downtime replay pipeline: clone, replay, catch up, dual write, approve, promote.

Run it from the Prefect UI (deployment "zero-downtime-replay"), on a schedule,
or from Python::

    from zdr.flows.zero_downtime_replay import zero_downtime_replay
    zero_downtime_replay(replay_key="balances_v2",
                         projectors=["zdr.examples.bank.projectors:BalancesV2"],
                         auto_approve=True)

A live runner (``flows.live_projection`` or ``ReplayManager.follow``) must be
running for dual write to keep the replay level with live.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect import tags as prefect_tags
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import FlowPauseTimeout, PrefectHTTPStatusError
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.runtime import flow_run as this_run
from prefect.states import Completed, Running

import zdr
from zdr import reports
from zdr.errors import ApprovalTimedOut, NotConverged
from zdr.flows.approval import (
    NOT_TAKEN,
    PROJECTION_TAG,
    Approval,
    NoPausedRun,
    answers_given,
    find_paused_run,
    pause_key,
    run_tags,
    same_question,
    unused_key,
    what_changed,
)
from zdr.flows.parameters import ReplayKey, dask_task_runner, database
from zdr.replay import REPLAYABLE, Replay, ReplayState, SwapReport
from zdr.reports import ApprovalReport, ReplaySummary
from zdr.settings import DEFAULTS, whole
from zdr.tasks.replay import (
    clone_schema,
    enable_dual_write,
    manager_for,
    measure_lag,
    plan_partitions,
    promote,
    remove,
    replay_batches,
    replay_partition,
    verify_replay,
)


def _run_name() -> str:
    """``replay-<key>-<UTC time>``: a run is found by its replay key in the runs list. A
    run started again after suspending keeps the name it had (a notification names it)."""
    prefix = f"replay-{_dashed(str(this_run.parameters.get('replay_key', 'unknown')))}-"
    current = str(this_run.name or "")
    if current.startswith(prefix):
        return current
    return f"{prefix}{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"


@flow(
    name="zero-downtime-replay",
    log_prints=True,
    flow_run_name=_run_name,
    persist_result=True,
)
def zero_downtime_replay(
    replay_key: ReplayKey,
    projectors: list[str],
    database_url: str | None = None,
    batch_size: int = DEFAULTS.batch_size,
    lag_threshold: int = DEFAULTS.lag_threshold,
    max_catch_up_rounds: int = DEFAULTS.catch_up_rounds,
    approval_timeout_s: int = DEFAULTS.approval_timeout_s,
    auto_approve: bool = False,
    remove_on_reject: bool = False,
    events_per_task: int = DEFAULTS.events_per_task,
    reader: str | None = None,
    database_secret: str | None = None,
    partitions: int = 1,
    partition_deployment: str | None = None,
    dask_address: str | None = None,
) -> ReplaySummary:
    """Rebuild projectors beside the live read model, wait for approval, promote with no gap.

    Args:
        replay_key: The replay's name: 1-40 lower-case letters, digits and underscores,
            starting with a letter (balances_v2). Running again with the same key takes
            the replay up where it stopped.
        projectors: The projectors to rebuild, as import paths (module:Class), e.g.
            zdr.examples.bank.projectors:BalancesV2.
        database_url: The database as a URL (postgresql://user@host/db). Anyone who
            can read the run sees it: for a password use database_secret. Empty: the
            worker's ZDR_DATABASE_URL, else the embedded PostgreSQL.
        batch_size: Events per transaction of the replay.
        lag_threshold: Dual write starts once the replay is at most this many events
            behind live.
        max_catch_up_rounds: Catch-up rounds before the run gives up (the replay is
            kept; run again).
        approval_timeout_s: Seconds to wait for approval; then the run fails and the
            replay stays in dual write, live unchanged.
        auto_approve: Promote without asking (unattended runs).
        remove_on_reject: On a rejection, drop the replay instead of keeping it in
            dual write.
        events_per_task: Events one replay-batches task applies (a progress step).
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL,
            so no password shows in the run's parameters.
        partitions: Replay the history in this many partitions of streams at once, a
            replay-partition task each on the flow's task runner (with prefect-dask's
            DaskTaskRunner: in processes or machines of their own). Needs projectors
            that declare partition_by = "stream"; others replay with one reader (the
            logs say so). 1: one reader.
        partition_deployment: Run each partition as a flow run of this deployment of
            the replay-partition flow (replay-partition/replay-partition), on its work
            pool's workers, instead of as tasks of this run. Needs database_url or
            database_secret (the workers must reach the same database).
        dask_address: Run the partitions' tasks on the Dask cluster whose scheduler
            is at this address (tcp://host:8786), each round a subflow run on
            prefect-dask's DaskTaskRunner (the dask extra, on the worker). Its workers
            must reach the database and the Prefect API.
    """
    logger = get_run_logger()
    zdr.names.validate_key(replay_key)
    DEFAULTS.replace(  # refuse bad numbers before anything runs (ConfigurationError)
        batch_size=batch_size,
        lag_threshold=lag_threshold,
        catch_up_rounds=max_catch_up_rounds,
        approval_timeout_s=approval_timeout_s,
        events_per_task=events_per_task,
    )
    whole("partitions", partitions, minimum=1)
    on_dask = dask_task_runner(0, dask_address)  # refused here without prefect-dask
    if on_dask is not None and partition_deployment:
        raise zdr.ConfigurationError(
            "give partition_deployment or dask_address, not both: the partitions run "
            "either as flow runs of a deployment or as tasks on a Dask cluster"
        )
    if partition_deployment and not (database_url or database_secret):
        raise zdr.ConfigurationError(
            "partition_deployment needs database_url or database_secret: its flow runs go "
            "to other workers, which must reach this same database"
        )
    url = database(database_url, database_secret)
    # What a partition's flow run is given (never the URL read from a secret).
    on_deployment = partition_deployment and {
        "database_url": database_url,
        "database_secret": database_secret,
        "batch_size": batch_size,
        "events_per_task": events_per_task,
        "reader": reader,
    }
    manager = manager_for(url, reader)  # loads the reader: a bad path fails here
    tag = manager.database_tag()
    artifacts = f"zdr-{tag}-{_dashed(replay_key)}"
    with manager.pipeline_lock(replay_key) as lock:
        replay = clone_schema(url, replay_key, projectors, reader=reader)
        # `zdr approve` answers this database's runs only; the key and projections find a
        # run (`zdr run` and run_deployment give the first two when they create it).
        _tag_this_run(
            *run_tags(replay_key, tag), *(PROJECTION_TAG.format(n) for n in replay.projectors)
        )
        if replay.state is ReplayState.LIVE:
            logger.info("replay %r is already live: nothing to do", replay_key)
            return _summary(replay, lag=measure_lag(url, replay_key, reader=reader), promoted=True)
        if replay.state in REPLAYABLE:
            replay = _replay_history(
                url,
                reader,
                replay,
                batch_size,
                events_per_task,
                artifacts,
                partitions,
                (partition_deployment, on_deployment) if on_deployment else None,
                run_tags(replay_key, tag),
                (on_dask, {"database_url": database_url, "database_secret": database_secret})
                if on_dask is not None
                else None,
            )
        if replay.state is ReplayState.CAUGHT_UP:
            _catch_up(
                url,
                reader,
                replay_key,
                batch_size,
                lag_threshold,
                max_catch_up_rounds,
                events_per_task,
            )
            replay = enable_dual_write(url, replay_key, lag_threshold, reader=reader)
            if manager.live_runner_pid() is None:
                logger.warning(
                    "dual write is on, but no live runner is running: nothing brings new "
                    "events to live or to the replay, and promotion waits for them to be "
                    "level; start one (`zdr live`, or the live-projection deployment)"
                )
            else:
                logger.info("dual write is on: the live runner now writes both copies")

        report = verify_replay(url, replay_key, reader=reader)
        _publish_report(report, artifacts)
        decision = _approval(report, auto_approve, approval_timeout_s, artifacts, tag)
        while decision.approve and not auto_approve and not _deployed():
            # Paused in this process, the run goes on with the answer at once: hold it to
            # the question it was given to, as a suspended run started again does (it
            # verifies again first). A report of copies not level, answered once the
            # live runner has levelled them, is asked again with the verdict it has now.
            now = verify_replay(url, replay_key, reader=reader)
            if _pause_key(now) == _pause_key(report):
                break
            report = now
            _publish_report(report, artifacts)
            decision = _approval(report, auto_approve, approval_timeout_s, artifacts, tag)
        logger.info(
            "%s by %s: %s",
            "approved" if decision.approve else "rejected",
            decision.approver,
            decision.comment or "(no comment)",
        )
        if not decision.approve:
            removed = False
            if remove_on_reject:
                remove(url, replay_key, reader=reader)
                removed = True
                logger.info("replay %r removed as asked; live is unchanged", replay_key)
            else:
                logger.info("replay %r left intact in dual write; live is unchanged", replay_key)
            summary = _summary(
                report.replay, lag=report.lag, promoted=False, decision=decision
            ).model_copy(
                update={"removed": removed} | ({"state": ReplayState.REMOVED} if removed else {})
            )
            # A state named for the outcome: the runs list tells a rejection from a promotion.
            return Completed(  # type: ignore[return-value]
                name="Rejected",
                message=f"rejected by {decision.approver}: live is unchanged, the replay "
                + ("removed" if removed else "left in dual write"),
                data=summary,
            )

        lock.require()  # never promote without the lock (a lost connection loses it)
        promotion = _promote_when_level(url, reader, replay_key)
        _publish_promotion(promotion, artifacts)
        final = verify_replay(url, replay_key, reader=reader)
        summary = _summary(final.replay, lag=final.lag, promoted=True, decision=decision)
        return Completed(  # type: ignore[return-value]
            name="Promoted",
            message=f"promoted, approved by {decision.approver}",
            data=summary.model_copy(
                update={"lock_wait_ms": promotion.lock_wait_ms, "swap_ms": promotion.duration_ms}
            ),
        )


def _replay_history(
    url: str,
    reader: str | None,
    replay: Replay,
    batch_size: int,
    events_per_task: int,
    artifacts: str,
    partitions: int = 1,
    deployment: tuple[str, dict[str, Any]] | None = None,
    tags: list[str] | None = None,
    task_runner: Any = None,
) -> Replay:
    """Replay in task-sized pieces, with a progress artifact, rate and ETA in the logs:
    first in partitions if asked (and the projectors can), then with one reader up to
    the head (which brings the partitions together)."""
    logger = get_run_logger()
    key = replay.key
    done_before = replay.events_applied
    total = done_before + measure_lag(url, key, reader=reader)
    progress_id = create_progress_artifact(
        progress=_percent(done_before, total),
        key=f"{artifacts}-progress",
        description=f"Replay {key!r}: events applied out of the log",
    )
    started = time.monotonic()
    last_done = done_before
    rounds = 0
    plan = plan_partitions(url, key, partitions, reader=reader)
    pending = plan.pending if plan is not None else []
    if plan is not None:
        runner = task_runner or FlowRunContext.get().task_runner  # type: ignore[union-attr]
        logger.info(
            "replaying %r in %d partitions of streams up to position %s, %s; then one reader "
            "goes on from there",
            key,
            plan.partitions,
            f"{plan.until.position:,}",
            f"a flow run each of {deployment[0]}"
            if deployment
            else f"a task each on {type(runner).__name__}",
        )
    while True:
        if pending and deployment:
            assert plan is not None
            _partition_flow_runs(key, pending, plan.partitions, *deployment, tags or [])
            pending = []
            replay = manager_for(url, reader).require_replay(key)
        elif pending:
            assert plan is not None
            rounds += 1
            a_round = (key, pending, plan.partitions, rounds, batch_size, events_per_task)
            if task_runner is None:
                runs = _partition_round(url, *a_round, reader=reader)
            else:  # a flow's task runner is its own: a subflow runs the round on it
                runner, named = task_runner
                with prefect_tags(*(tags or [])):
                    runs = partition_round.with_options(task_runner=runner)(
                        named["database_url"], named["database_secret"], *a_round, reader=reader
                    )
            pending = [run.partition.index for run in runs if not run.done]
            replay = manager_for(url, reader).require_replay(key)
        else:
            replay = replay_batches(
                url, key, batch_size=batch_size, max_events=events_per_task, reader=reader
            )
        done = replay.events_applied
        total = max(total, done)
        elapsed = time.monotonic() - started
        rate = (done - done_before) / elapsed if elapsed > 0 else 0.0
        line = reports.replay_progress(done, total, rate)
        if done > last_done:  # a task that found nothing new has nothing to say
            logger.info(line)
        last_done = done
        if replay.state is ReplayState.CAUGHT_UP:
            update_progress_artifact(
                progress_id,
                100.0,
                description=f"Replay {key!r}: caught up, {done:,} events applied "
                f"({rate:,.0f} events/s)",
            )
            return replay
        # The artifact's description says what the bar alone does not: rate and ETA.
        update_progress_artifact(
            progress_id, _percent(done, total), description=f"Replay {key!r}: {line}"
        )


def _partition_round(
    url: str,
    key: str,
    pending: list[int],
    count: int,
    round_number: int,
    batch_size: int,
    events_per_task: int,
    *,
    reader: str | None,
) -> list[zdr.PartitionRun]:
    """One replay-partition task per pending partition, at once, on the run's task runner."""
    futures = [
        replay_partition.with_options(
            task_run_name=f"replay-partition-{i + 1}-of-{count}-round-{round_number}"
        ).submit(url, key, i, batch_size=batch_size, max_events=events_per_task, reader=reader)
        for i in pending
    ]
    return [future.result() for future in futures]


@flow(
    name="replay-partitions",
    flow_run_name="replay-{key}-partitions-round-{round_number}",
    validate_parameters=False,
)
def partition_round(
    database_url: str | None,
    database_secret: str | None,
    key: str,
    pending: list[int],
    count: int,
    round_number: int,
    batch_size: int,
    events_per_task: int,
    *,
    reader: str | None,
) -> list[zdr.PartitionRun]:
    """A round of partition tasks as a subflow, on a task runner of its own (Dask). It
    is given the database as the pipeline was (a subflow's arguments show in the UI:
    never the URL read from a secret or the environment) and finds the URL itself."""
    url = database(database_url, database_secret)
    return _partition_round(
        url, key, pending, count, round_number, batch_size, events_per_task, reader=reader
    )


def _partition_flow_runs(
    key: str,
    partitions: list[int],
    count: int,
    deployment: str,
    parameters: dict[str, Any],
    tags: list[str],
) -> None:
    """One flow run of ``deployment`` (the replay-partition flow) per partition, started at
    once and waited for; ZdrError naming those that did not complete."""

    def start(i: int, as_subflow: bool) -> FlowRun:
        return run_deployment(  # type: ignore[no-any-return]
            deployment,
            parameters={**parameters, "replay_key": key, "partition": i},
            flow_run_name=f"replay-{_dashed(key)}-partition-{i + 1}-of-{count}",
            tags=tags,
            timeout=0,
            as_subflow=as_subflow,
        )

    try:
        runs = [start(partitions[0], as_subflow=True)]
    except PrefectHTTPStatusError as exc:
        # Older Prefect servers with a newer FastAPI refuse the request that links a
        # subflow to this run (422): the runs are then runs of their own, tagged alike.
        if exc.response.status_code != 422:
            raise
        get_run_logger().warning(
            "the Prefect server refused to link the partitions' runs to this one (%s): "
            "they run unlinked, tagged %s",
            exc.response.status_code,
            ", ".join(tags),
        )
        runs = [start(partitions[0], as_subflow=False)]
        linked = False
    else:
        linked = True
    runs += [start(i, as_subflow=linked) for i in partitions[1:]]
    get_run_logger().info(
        "started %s on %s's work pool; waiting for them",
        ", ".join(r.name for r in runs),
        deployment,
    )
    with get_client(sync_client=True) as client:
        while True:
            states = [client.read_flow_run(run.id).state for run in runs]
            if all(state is not None and state.is_final() for state in states):
                break
            time.sleep(2)
    failed = [
        f"{run.name} ({state.name if state else 'no state'})"
        for run, state in zip(runs, states, strict=True)
        if state is None or not state.is_completed()
    ]
    if failed:
        raise zdr.ZdrError(
            f"partition flow runs of replay {key!r} did not complete: {', '.join(failed)}; "
            "run the pipeline again to resume them where they stopped"
        )


def _catch_up(
    url: str,
    reader: str | None,
    key: str,
    batch_size: int,
    lag_threshold: int,
    rounds: int,
    events_per_task: int,
) -> None:
    logger = get_run_logger()
    for round_ in range(1, rounds + 1):
        lag = measure_lag(url, key, reader=reader)
        logger.info(
            "catch-up round %d: lag %s (threshold %s)", round_, f"{lag:,}", f"{lag_threshold:,}"
        )
        if lag <= lag_threshold:
            return
        replay_batches(
            url,
            key,
            batch_size=batch_size,
            max_events=max(events_per_task, lag),
            reader=reader,
        )
    lag = measure_lag(url, key, reader=reader)
    if lag > lag_threshold:
        raise NotConverged(
            f"replay {key!r} is still {lag:,} events behind after {rounds} catch-up rounds "
            f"(threshold {lag_threshold:,}): events arrive faster than it replays. The replay "
            "is intact; run the pipeline again, or raise lag_threshold or max_catch_up_rounds"
        )


def _approval(
    report: ApprovalReport, auto: bool, timeout_s: int, artifacts: str, database_tag: str
) -> Approval:
    """The approver's decision. A run of a deployment suspends while it waits: its
    process ends, so it holds no worker slot and no database connection for up to
    ``timeout_s``; when answered, Prefect starts it again, it finds the replay in dual
    write, verifies again and takes the answer. A run started from Python (no
    deployment to start it again) pauses in its process instead."""
    if auto:
        return Approval(decision="approve", approver="auto_approve", comment="unattended run")
    key = report.replay.key
    logger = get_run_logger()
    form = Approval.with_initial_data(
        description=report.to_form_markdown(full_report=f"artifact `{artifacts}-report`"),
        comment="",
    )
    asked = _pause_key(report)
    given = answers_given(asked)
    newest = given[-1] if given else None
    if newest is not None and same_question(newest.key, asked):
        # A suspended run started again: its latest answer is to this very question.
        logger.info("taking the answer given while the run was suspended")
        question_key = newest.key
    else:
        if newest is not None:
            logger.warning(
                "the answer %r by %s " + NOT_TAKEN + ": it was given to another question "
                "(%s); asking again",
                newest.approval.decision,
                newest.approval.approver,
                what_changed(newest.key, asked),
            )
        question_key = unused_key(asked, {g.key for g in given})
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout_s)
        logger.info(
            "waiting until %s UTC for approval (Prefect UI, or `zdr approve %s`); "
            "unanswered, the run fails and the replay stays intact in dual write, live "
            "unchanged",
            f"{deadline:%Y-%m-%d %H:%M:%S}",
            key,
        )
        _refuse_a_second_question(key, database_tag)
    if _deployed():
        return suspend_flow_run(wait_for_input=form, timeout=timeout_s, key=question_key)
    try:
        return pause_flow_run(
            wait_for_input=form, timeout=timeout_s, poll_interval=1, key=question_key
        )
    except FlowPauseTimeout as exc:
        # Prefect would end the run with its own words ("paused and never resumed"):
        # back to Running, so the run fails with the reason below as its state message.
        _force_running_if_paused()
        raise ApprovalTimedOut(
            f"nobody approved replay {key!r} within {timeout_s}s; it is left intact in dual "
            "write and live is unchanged. Run the pipeline again to ask again"
        ) from exc


def _deployed() -> bool:
    """Whether a deployment started this run (and so can start it again)."""
    context = FlowRunContext.get()
    return context is not None and context.flow_run.deployment_id is not None


def _pause_key(report: ApprovalReport) -> str:
    """An answer holds for what the run showed. The key names the replay (its key and
    when it was made, its projectors) and the verification's verdict: a run started
    again after the answer finds the same key and takes the answer (Prefect hands back
    the answer given under a key already used); if meanwhile the replay was removed and
    made again, its projectors changed, or the verification now says otherwise, the key
    is new, the run says in its log why the answer is not taken, and asks again."""
    replay = report.replay
    made = "|".join([replay.created_at.isoformat(), *sorted(replay.projectors.values())])
    return pause_key(
        replay.key,
        equal=report.verification.equal,
        replay_digest=hashlib.sha256(made.encode()).hexdigest()[:12],
    )


def _refuse_a_second_question(key: str, database_tag: str) -> None:
    """One question per replay at a time: a run that suspended let go of the pipeline
    lock, so a second run of the key could get this far; it stops instead of asking too
    (two answers to one replay would contradict each other)."""
    try:
        waiting = find_paused_run(key, database_tag=database_tag)
    except NoPausedRun:
        return
    if str(waiting) != str(this_run.id):
        raise zdr.RunnerBusy(
            f"another pipeline run ({waiting}) already waits for approval of replay {key!r}: "
            f"answer it (`zdr approve {key}` / `zdr reject {key}`, or its Resume form) or "
            f"cancel it (`prefect flow-run cancel {waiting}`); this run changed nothing"
        )


def _force_running_if_paused() -> None:
    """Back to Running, unless something else moved the run on (a cancellation wins)."""
    run_id = this_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(UUID(str(run_id))).state
        if current is not None and current.is_paused():
            client.set_flow_run_state(UUID(str(run_id)), Running(), force=True)


def _promote_when_level(url: str, reader: str | None, key: str) -> SwapReport:
    """Promote between two live batches: the live runner keeps both copies level."""
    deadline = time.monotonic() + DEFAULTS.promotion_wait_s
    while True:
        try:
            return promote(url, key, reader=reader)
        except zdr.ReplayLagging:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _publish_report(report: ApprovalReport, artifacts: str) -> None:
    key = report.replay.key
    create_markdown_artifact(
        markdown=report.to_markdown(),
        key=f"{artifacts}-report",
        description=f"Replay {key!r}: what to look at before approving",
    )
    create_table_artifact(
        table=reports.row_counts(report.verification.to_dict()["tables"]),
        key=f"{artifacts}-row-counts",
        description=f"Replay {key!r}: rows per table, live and replay",
    )


def _publish_promotion(promotion: SwapReport, artifacts: str) -> None:
    create_markdown_artifact(
        markdown=reports.promotion_markdown(
            promotion.key,
            position=promotion.position,
            lock_wait_ms=promotion.lock_wait_ms,
            duration_ms=promotion.duration_ms,
            attempts=promotion.attempts,
            analyzed=promotion.analyzed,
        ),
        key=f"{artifacts}-promotion",
        description=f"Replay {promotion.key!r}: the promotion",
    )


def _summary(
    replay: Replay, *, lag: int, promoted: bool, decision: Approval | None = None
) -> ReplaySummary:
    return ReplaySummary(
        replay_key=replay.key,
        state=replay.state,
        events_applied=replay.events_applied,
        position=replay.position,
        lag=lag,
        promoted=promoted,
        approved=None if decision is None else decision.approve,
        approver=None if decision is None else decision.approver,
        comment=None if decision is None else decision.comment,
    )


def _percent(done: int, total: int) -> float:
    return 100.0 if total <= 0 else min(100.0, 100.0 * done / total)


def _tag_this_run(*tags: str) -> None:
    """Add ``tags`` to this flow run's tags."""
    run_id = this_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(run_id)))
        client.update_flow_run(run.id, tags=sorted({*run.tags, *tags}))


def _dashed(replay_key: str) -> str:
    """Prefect's artifact and pause keys take lower-case letters, digits and dashes only."""
    return replay_key.replace("_", "-")

"""The pipeline's steps as Prefect tasks, each a verb over one core operation.

Retries: only for failures that trying again may not meet (``zdr.errors.is_transient``:
a lost connection, a serialization failure, a lock timeout). Bad input, an
unknown projector or a projector's bug fail at once with their message. Every
step is safe to retry because the core's operations are: a replay resumes from
its checkpoint, a promotion either committed or changed nothing.

Tasks are coarse: one task run replays up to ``max_events`` events (hundreds of
thousands), never one event.
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Callable
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

import zdr
from zdr import reports
from zdr.errors import is_transient, one_line
from zdr.projector import load_projector
from zdr.readers import load as load_reader
from zdr.reports import ApprovalReport


def retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry condition: retry only what may succeed the next time. Prefect
    says a retry only at INFO, without its count: say it at WARNING, with it."""
    exc = state.result(raise_on_failure=False)
    retry = isinstance(exc, BaseException) and is_transient(exc)
    if retry and task_run.run_count <= (task.retries or 0):
        get_run_logger().warning(
            "%s failed with a transient error (%s): retry %d of %d",
            task.name,
            one_line(exc),
            task_run.run_count,
            task.retries,
        )
    return retry


RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [1, 5, 15],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,  # every step has side effects; never reuse a result
}

#: How long a step may run before Prefect stops it and the run fails with "exceeded
#: timeout" (not retried: a step that hung once may hang again). Far above what the
#: steps take here (a short step: under a second; a replay-batches task of
#: ``events_per_task`` events or a verification: seconds to minutes) and far below a
#: hang nobody notices. Each step stops where it is safe to stop: a replay resumes from
#: its last committed batch, a promotion committed or changed nothing. Another value:
#: ``task.with_options(timeout_seconds=...)``. The live runner has none: its
#: ``max_seconds`` bounds it.
SHORT_STEP_TIMEOUT_S = 600
LONG_STEP_TIMEOUT_S = 4 * 3600


@functools.lru_cache(maxsize=16)
def manager_for(database_url: str, reader: str | None = None) -> zdr.ReplayManager:
    """One manager (and connection pool) per database and reader for the whole process.

    ``reader``: the import path of the event log's reader (``zdr.readers.load``);
    None reads zdr's own ``zdr.events``."""
    found = None if reader is None else load_reader(reader, database_url=database_url)
    return zdr.ReplayManager(database_url, reader=found)


# Let go of the managers (their pools, a reader's application) while the interpreter can
# still run their finalizers.
atexit.register(manager_for.cache_clear)


@task(name="clone-schema", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def clone_schema(
    database_url: str, replay_key: str, projectors: list[str], *, reader: str | None = None
) -> zdr.Replay:
    """Create the replay and its copy of the tables, or take up the existing one."""
    return manager_for(database_url, reader).ensure_replay(replay_key, projectors)


@task(name="replay-batches", timeout_seconds=LONG_STEP_TIMEOUT_S, **RETRIES)
def replay_batches(
    database_url: str,
    replay_key: str,
    *,
    batch_size: int,
    max_events: int,
    reader: str | None = None,
) -> zdr.Replay:
    """Replay up to ``max_events`` more events, in batches of ``batch_size``.

    The returned replay's last run (``runs[-1]``) says what this task did.
    """
    return manager_for(database_url, reader).start_replay(
        replay_key, batch_size=batch_size, max_events=max_events
    )


@task(name="plan-partitions", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def plan_partitions(
    database_url: str, replay_key: str, partitions: int, *, reader: str | None = None
) -> zdr.PartitionPlan | None:
    """Cut the rest of the history into partitions of streams, or take up the plan an
    earlier run made (whatever ``partitions`` says: its partitions must finish); None for
    one reader, with the reason in the logs when the projectors or the reader cannot."""
    manager = manager_for(database_url, reader)
    existing = manager.partition_plan(replay_key)
    if existing is not None:
        if existing.partitions != partitions:
            get_run_logger().warning(
                "replay %r was cut into %d partitions by an earlier run: going on with them "
                "(partitions=%d applies to a replay not cut yet)",
                replay_key,
                existing.partitions,
                partitions,
            )
        return existing
    if partitions == 1:
        return None
    try:
        return manager.plan_partitions(replay_key, partitions)
    except zdr.NotPartitionable as exc:
        get_run_logger().warning("%s: one reader replays it", exc)
        return None


#: No timeout: submitted beside the others, it runs in a worker thread (of this process or
#: a Dask worker's), where Prefect cannot stop it (and warns on every run that it could
#: not); each run is bounded by ``max_events`` instead.
@task(name="replay-partition", task_run_name="replay-partition-{partition}", **RETRIES)
def replay_partition(
    database_url: str,
    replay_key: str,
    partition: int,
    *,
    batch_size: int,
    max_events: int,
    reader: str | None = None,
) -> zdr.PartitionRun:
    """Replay up to ``max_events`` more events of one partition (0-based); runs beside the
    other partitions' tasks, wherever the flow's task runner puts it."""
    return manager_for(database_url, reader).replay_partition(
        replay_key, partition, batch_size=batch_size, max_events=max_events
    )


@task(name="measure-lag", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def measure_lag(database_url: str, replay_key: str, *, reader: str | None = None) -> int:
    """Events after the replay's checkpoint."""
    return manager_for(database_url, reader).get_replay_lag(replay_key)


@task(name="enable-dual-write", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def enable_dual_write(
    database_url: str, replay_key: str, lag_threshold: int, *, reader: str | None = None
) -> zdr.Replay:
    """From now on the live runner writes the replay's copy too."""
    manager = manager_for(database_url, reader)
    replay = manager.require_replay(replay_key)
    if replay.state is zdr.ReplayState.DUAL_WRITING:
        return replay  # a retry after the switch committed
    return manager.enable_dual_write(replay_key, lag_threshold=lag_threshold)


@task(name="verify-replay", timeout_seconds=LONG_STEP_TIMEOUT_S, **RETRIES)
def verify_replay(
    database_url: str, replay_key: str, *, reader: str | None = None
) -> ApprovalReport:
    """What the approver looks at: state, lag, rate, and the verification report."""
    manager = manager_for(database_url, reader)
    return ApprovalReport(
        replay=manager.require_replay(replay_key),
        lag=manager.get_replay_lag(replay_key),
        # Copies not level (dual write just started) give no verdict an answer can hold
        # for: wait for the live runner to level them first.
        verification=manager.verify(replay_key, wait_level_s=manager.settings.promotion_wait_s),
        lag_history=reports.lag_samples(manager.lag_history_samples(replay_key)),
    )


@task(name="promote", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def promote(database_url: str, replay_key: str, *, reader: str | None = None) -> zdr.SwapReport:
    """Make the replay's copy live in one transaction."""
    manager = manager_for(database_url, reader)
    return _swap_once(manager, replay_key, zdr.ReplayState.LIVE, manager.promote)


@task(name="rollback", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def rollback(database_url: str, replay_key: str, *, reader: str | None = None) -> zdr.SwapReport:
    """Make the previous copy live again."""
    manager = manager_for(database_url, reader)
    return _swap_once(manager, replay_key, zdr.ReplayState.ROLLED_BACK, manager.rollback)


roll_back = rollback  # the task's earlier name


def _swap_once(
    manager: zdr.ReplayManager,
    key: str,
    done: zdr.ReplayState,
    swap: Callable[[str], zdr.SwapReport],
) -> zdr.SwapReport:
    """Swap, unless a try before this retry already committed the swap (state ``done``)."""
    replay = manager.require_replay(key)
    if replay.state is done:
        return zdr.SwapReport.unchanged(replay)
    return swap(key)


@task(name="remove-replay", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def remove(database_url: str, replay_key: str, *, reader: str | None = None) -> zdr.Replay:
    """Drop the replay's copy and metadata; never a live table."""
    return manager_for(database_url, reader).remove_replay(replay_key)


# No retries: a retry would start its time again and run past the run's end; the next
# scheduled run takes over instead.
@task(name="project-live", cache_policy=NO_CACHE)
def project_live(
    database_url: str,
    projectors: list[str],
    *,
    max_seconds: float | None,
    batch_size: int,
    take_over: bool = False,
    overtime_s: float = 0.0,
    reader: str | None = None,
    stop: threading.Event | None = None,
    on_tick: Callable[[], None] | None = None,
    hand_over_after_s: float | None = None,
) -> int:
    """Apply new events to the live read models and dual-writing replays for a while
    (``take_over``, ``overtime_s``: see ``ReplayManager.follow``)."""
    shared = manager_for(database_url, reader)
    manager = zdr.ReplayManager(
        shared.engine,
        projectors=[load_projector(path) for path in projectors],
        batch_size=batch_size,
        reader=shared.reader,
    )
    manager.setup()
    return manager.follow(
        max_seconds=max_seconds,
        take_over=take_over,
        overtime_s=overtime_s,
        stop=stop,
        on_tick=on_tick,
        hand_over_after_s=hand_over_after_s,
    )


@task(name="replay-status", timeout_seconds=SHORT_STEP_TIMEOUT_S, **RETRIES)
def replay_status(
    database_url: str, replay_key: str | None = None, *, reader: str | None = None
) -> list[dict[str, Any]]:
    """Every replay (or one) with its state, position, lag, rate and ETA."""
    return manager_for(database_url, reader).status(replay_key)

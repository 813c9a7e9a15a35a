"""The smaller jobs: the live runner, promote, roll back, remove, status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext

import zdr
from zdr import reports
from zdr.flows.logs import zdr_logs_in_run
from zdr.flows.parameters import ReplayKey, database, live_projectors
from zdr.flows.standby import Duty
from zdr.settings import DEFAULTS
from zdr.tasks import replay as steps

#: How long one scheduled live-projection run lasts: 1.5 times the deployments'
#: 60 s interval, so the next run has started and waits to take over when it ends.
LIVE_RUN_SECONDS = 90.0
LIVE_RUN_INTERVAL_S = 60
#: With a standby (``keep_standby``): each run is active for six hours, and the
#: schedule (a safety net: a run that finds an active run and a standby ends at once)
#: starts one every six hours. A few runs a day.
STANDBY_RUN_SECONDS = 6 * 3600.0
STANDBY_INTERVAL_S = 6 * 3600


@flow(name="live-projection")
def live_projection(
    projectors: list[str] | None = None,
    database_url: str | None = None,
    max_seconds: float = LIVE_RUN_SECONDS,
    batch_size: int = DEFAULTS.batch_size,
    take_over: bool = True,
    reader: str | None = None,
    database_secret: str | None = None,
    keep_standby: bool = False,
) -> dict[str, Any]:
    """Apply new events to the live read models (and dual-writing replays) for a while.

    Deployed every minute with ``max_seconds`` 90, the runs overlap: each waits for
    the one before it to end and takes over within 50 ms (``take_over``), so the
    live read models never stand still between runs and no run is cancelled. A
    scheduled run's time is counted from its *scheduled* start, however early or
    late its process started, and it goes on past its time until the next run waits
    to take over (for at most ``max_seconds`` more): a late worker leaves no gap.
    A run started by hand lasts ``max_seconds``. A run that could not take over in
    its time ends having done nothing.

    Args:
        projectors: The live projectors as import paths (module:Class). Empty: the
            worker's ZDR_LIVE_PROJECTORS (comma-separated), else the bank example's.
        database_url: The database as a URL. Anyone who can read the run sees it: for
            a password use database_secret. Empty: the worker's ZDR_DATABASE_URL,
            else the embedded PostgreSQL.
        max_seconds: How long the run applies events (from its scheduled start).
        batch_size: Events per transaction.
        take_over: Wait for the running live runner to end and take over from it,
            instead of ending at once.
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL.
        keep_standby: Host the live runner as an active run and a standby run (another
            run of this deployment, waiting to take over): the run waits as long as it
            takes, is active for max_seconds, then hands over; while active it keeps
            a standby and sends zdr.live.heartbeat events (see zdr.flows.standby).
    """
    logger = get_run_logger()
    url = database(database_url, database_secret)
    projectors = projectors or live_projectors()
    if keep_standby:
        return _with_a_standby(url, projectors, max_seconds, batch_size, reader)
    window = _window(max_seconds)
    if window is None:
        message = (
            f"started more than {2 * max_seconds:g} s after its scheduled time: "
            "a later run is the live runner now"
        )
        logger.info("nothing to do: %s", message)
        return {"applied": 0, "skipped": message}
    remaining, overtime = window
    try:
        with zdr_logs_in_run():
            applied = steps.project_live(
                url,
                projectors,
                max_seconds=remaining,
                batch_size=batch_size,
                take_over=take_over,
                overtime_s=overtime,
                reader=reader,
            )
    except zdr.RunnerBusy as exc:
        logger.info("nothing to do: %s", exc)
        return {"applied": 0, "skipped": str(exc)}
    logger.info("applied %s events", f"{applied:,}")
    _fail_if_failing(steps.manager_for(url, reader))
    return {"applied": applied, "skipped": None}


def _with_a_standby(
    url: str, projectors: list[str], max_seconds: float, batch_size: int, reader: str | None
) -> dict[str, Any]:
    logger = get_run_logger()
    manager = steps.manager_for(url, reader)
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if manager.live_runner_pid() is not None and manager.live_runner_has_standby():
        message = "a live runner and a standby run already: this run is not needed"
        logger.info("nothing to do: %s", message)
        return {"applied": 0, "skipped": message}
    duty = Duty(
        manager.engine,
        manager.database_tag(),
        flow_run_id=run.id if run is not None else None,
        deployment_id=run.deployment_id if run is not None else None,
        parameters=dict(run.parameters) if run is not None else {},
    )
    with zdr_logs_in_run(), duty:
        applied = steps.project_live(
            url,
            projectors,
            max_seconds=None,
            batch_size=batch_size,
            take_over=True,
            reader=reader,
            on_tick=duty.tick,
            hand_over_after_s=max_seconds,
        )
    logger.info("applied %s events", f"{applied:,}")
    _fail_if_failing(manager)
    return {"applied": applied, "skipped": None, "standbys_started": duty.standbys_started}


def _fail_if_failing(manager: zdr.ReplayManager) -> None:
    """A run whose read models stood still must not end green."""
    failing = [live for live in manager.live_status() if live["state"] == "failing"]
    if failing:
        raise zdr.ZdrError(
            "live read model(s) standing still: "
            + "; ".join(
                f"{live['projection']} at event {live['error_position']}: {live['error']}"
                for live in failing
            )
        )


def _window(max_seconds: float) -> tuple[float, float] | None:
    """(seconds left of this run's time, overtime allowed after it), or None when even
    the overtime is over. A scheduled run counts from its scheduled start and may go
    on up to ``max_seconds`` more; a run started by hand has ``max_seconds`` and no
    overtime."""
    context = FlowRunContext.get()
    if context is None or not context.flow_run.auto_scheduled:
        return max_seconds, 0.0
    late = (dt.datetime.now(dt.UTC) - context.flow_run.expected_start_time).total_seconds()
    if late >= 2 * max_seconds:
        return None
    return max(max_seconds - late, 0.0), min(max_seconds, 2 * max_seconds - late)


@flow(name="promote-replay")
def promote_replay(
    replay_key: ReplayKey,
    database_url: str | None = None,
    reader: str | None = None,
    database_secret: str | None = None,
) -> zdr.SwapReport:
    """Put a replay live (atomic; the previous copy is kept).

    Args:
        replay_key: The replay's name (balances_v2).
        database_url: The database as a URL. Anyone who can read the run sees it: for
            a password use database_secret. Empty: the worker's ZDR_DATABASE_URL,
            else the embedded PostgreSQL.
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL.
    """
    return steps.promote(database(database_url, database_secret), replay_key, reader=reader)


@flow(name="replay-partition")
def replay_partition(
    replay_key: ReplayKey,
    partition: int,
    database_url: str | None = None,
    batch_size: int = DEFAULTS.batch_size,
    events_per_task: int = DEFAULTS.events_per_task,
    reader: str | None = None,
    database_secret: str | None = None,
) -> zdr.PartitionRun:
    """Replay one partition of a replay that the pipeline cut into partitions, to its end.

    The pipeline runs one of these per partition when its partition_deployment names
    this flow's deployment: each on a worker of the deployment's work pool.

    Args:
        replay_key: The replay's name (balances_v2).
        partition: Which partition, 0 to partitions - 1.
        database_url: The database as a URL. Anyone who can read the run sees it: for
            a password use database_secret. Empty: the worker's ZDR_DATABASE_URL,
            else the embedded PostgreSQL.
        batch_size: Events per transaction.
        events_per_task: Events one replay-partition task applies (a progress step).
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL.
    """
    url = database(database_url, database_secret)
    events = 0
    while True:
        run = steps.replay_partition(
            url,
            replay_key,
            partition,
            batch_size=batch_size,
            max_events=events_per_task,
            reader=reader,
        )
        events += run.events
        if run.done:
            get_run_logger().info(
                "partition %s of replay %r: %s events, all up to the plan's point",
                run.partition,
                replay_key,
                f"{events:,}",
            )
            return zdr.PartitionRun(run.key, run.partition, events=events, done=True)


@flow(name="rollback-replay")
def rollback_replay(
    replay_key: ReplayKey,
    database_url: str | None = None,
    reader: str | None = None,
    database_secret: str | None = None,
) -> zdr.SwapReport:
    """Make the copy a promotion replaced live again.

    Args:
        replay_key: The replay's name (balances_v2).
        database_url: The database as a URL. Anyone who can read the run sees it: for
            a password use database_secret. Empty: the worker's ZDR_DATABASE_URL,
            else the embedded PostgreSQL.
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL.
    """
    return steps.rollback(database(database_url, database_secret), replay_key, reader=reader)


@flow(name="remove-replay")
def remove_replay(
    replay_key: ReplayKey,
    database_url: str | None = None,
    reader: str | None = None,
    database_secret: str | None = None,
) -> zdr.Replay:
    """Drop a replay's copy and metadata; never a live table.

    Args:
        replay_key: The replay's name (balances_v2).
        database_url: The database as a URL. Anyone who can read the run sees it: for
            a password use database_secret. Empty: the worker's ZDR_DATABASE_URL,
            else the embedded PostgreSQL.
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL.
    """
    return steps.remove(database(database_url, database_secret), replay_key, reader=reader)


@flow(name="replay-status")
def replay_status(
    replay_key: ReplayKey | None = None,
    database_url: str | None = None,
    reader: str | None = None,
    database_secret: str | None = None,
) -> list[dict[str, Any]]:
    """The replays, their states, positions and lags, as a table artifact.

    Args:
        replay_key: One replay's name; empty: every replay.
        database_url: The database as a URL. Anyone who can read the run sees it: for
            a password use database_secret. Empty: the worker's ZDR_DATABASE_URL,
            else the embedded PostgreSQL.
        reader: The event log's reader as module:attr (see zdr.readers). Empty:
            zdr's own zdr.events table.
        database_secret: The name of a Prefect Secret block holding the database URL.
    """
    url = database(database_url, database_secret)
    rows = steps.replay_status(url, replay_key, reader=reader)
    create_table_artifact(
        table=reports.status_records(rows),
        key="zdr-replay-status",
        description="zdr replays",
    )
    return rows

"""The smaller jobs: the live runner, promote, roll back, remove, status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext

import zdr
from zdr import reports
from zdr.config import resolve_url
from zdr.flows.logs import zdr_logs_in_run
from zdr.settings import DEFAULTS
from zdr.tasks import replay as steps

#: How long one scheduled live-projection run lasts: 1.5 times the deployments'
#: 60 s interval, so the next run has started and waits to take over when it ends.
LIVE_RUN_SECONDS = 90.0
LIVE_RUN_INTERVAL_S = 60


@flow(name="live-projection")
def live_projection(
    projectors: list[str],
    database_url: str | None = None,
    max_seconds: float = LIVE_RUN_SECONDS,
    batch_size: int = DEFAULTS.batch_size,
    take_over: bool = True,
) -> dict[str, Any]:
    """Apply new events to the live read models (and dual-writing replays) for a while.

    A scheduled run ends ``max_seconds`` after its *scheduled* start, however early
    or late its process started; a run started by hand lasts ``max_seconds``.
    Deployed every minute with ``max_seconds`` 90, runs overlap: each waits for
    the one before it to end and takes over within 50 ms (``take_over``), so the
    live read models never stand still between runs and no run is cancelled. A
    run that could not take over in its time, or that started after its time was
    over, ends having done nothing.
    """
    logger = get_run_logger()
    url = resolve_url(database_url)
    remaining = max_seconds - _late_by()
    if remaining <= 0:
        message = (
            f"started {max_seconds - remaining:.0f} s after its scheduled time, when its "
            f"{max_seconds:g} s were over: a later run is the live runner now"
        )
        logger.info("nothing to do: %s", message)
        return {"applied": 0, "skipped": message}
    try:
        with zdr_logs_in_run():
            applied = steps.project_live(
                url, projectors, max_seconds=remaining, batch_size=batch_size, take_over=take_over
            )
    except zdr.RunnerBusy as exc:
        logger.info("nothing to do: %s", exc)
        return {"applied": 0, "skipped": str(exc)}
    logger.info("applied %s events", f"{applied:,}")
    return {"applied": applied, "skipped": None}


def _late_by() -> float:
    """Seconds since a scheduled run's scheduled start (negative if it started early);
    0 for a run started by hand."""
    context = FlowRunContext.get()
    if context is None or not context.flow_run.auto_scheduled:
        return 0.0
    return (dt.datetime.now(dt.UTC) - context.flow_run.expected_start_time).total_seconds()


@flow(name="promote-replay")
def promote_replay(replay_key: str, database_url: str | None = None) -> zdr.SwapReport:
    """Put a replay live (atomic; the previous copy is kept)."""
    return steps.promote(resolve_url(database_url), replay_key)


@flow(name="rollback-replay")
def rollback_replay(replay_key: str, database_url: str | None = None) -> zdr.SwapReport:
    """Make the copy a promotion replaced live again."""
    return steps.rollback(resolve_url(database_url), replay_key)


@flow(name="remove-replay")
def remove_replay(replay_key: str, database_url: str | None = None) -> zdr.Replay:
    """Drop a replay's copy and metadata; never a live table."""
    return steps.remove(resolve_url(database_url), replay_key)


@flow(name="replay-status")
def replay_status(
    replay_key: str | None = None, database_url: str | None = None
) -> list[dict[str, Any]]:
    """The replays, their states, positions and lags, as a table artifact."""
    rows = steps.replay_status(resolve_url(database_url), replay_key)
    create_table_artifact(
        table=reports.status_records(rows),
        key="zdr-replay-status",
        description="zdr replays",
    )
    return rows

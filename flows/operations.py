"""The smaller jobs: the live runner, promote, roll back, remove, status."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

import zdr
from zdr import reports
from zdr.config import resolve_url
from zdr.settings import DEFAULTS
from zdr.tasks import replay as steps


@flow(name="live-projection")
def live_projection(
    projectors: list[str],
    database_url: str | None = None,
    max_seconds: float = 55.0,
    batch_size: int = DEFAULTS.batch_size,
) -> dict[str, Any]:
    """Apply new events to the live read models (and dual-writing replays) for a while.

    Scheduled every minute with ``max_seconds`` under a minute, it keeps tailing
    the log. If another live runner holds the lock, this run does nothing.
    """
    logger = get_run_logger()
    url = resolve_url(database_url)
    try:
        applied = steps.project_live(
            url, projectors, max_seconds=max_seconds, batch_size=batch_size
        )
    except zdr.RunnerBusy as exc:
        logger.warning("skipped: %s", exc)
        return {"applied": 0, "skipped": str(exc)}
    logger.info("applied %s events", f"{applied:,}")
    return {"applied": applied, "skipped": None}


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

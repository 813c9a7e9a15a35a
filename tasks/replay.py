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

import functools
from dataclasses import asdict
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

import zdr
from zdr import reports
from zdr.errors import is_transient
from zdr.projector import load_projector


def retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry condition: retry only what may succeed the next time."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [1, 5, 15],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,  # every step has side effects; never reuse a result
}


@functools.lru_cache(maxsize=16)
def manager_for(database_url: str) -> zdr.ReplayManager:
    """One manager (and connection pool) per database for the whole process."""
    return zdr.ReplayManager(database_url)


def snapshot(replay: zdr.Replay) -> dict[str, Any]:
    """A replay as plain data for flow logic and results (runs left out)."""
    data = asdict(replay)
    data.pop("runs")
    data["state"] = replay.state.value
    data["rate"] = replay.rate
    return data


@task(name="clone-schema", **RETRIES)
def clone_schema(database_url: str, replay_key: str, projectors: list[str]) -> dict[str, Any]:
    """Create the replay and its copy of the tables, or take up the existing one."""
    return snapshot(manager_for(database_url).ensure_replay(replay_key, projectors))


@task(name="replay-batches", **RETRIES)
def replay_batches(
    database_url: str, replay_key: str, *, batch_size: int, max_events: int
) -> dict[str, Any]:
    """Replay up to ``max_events`` more events, in batches of ``batch_size``."""
    replay = manager_for(database_url).start_replay(
        replay_key, batch_size=batch_size, max_events=max_events
    )
    result = snapshot(replay)
    result["run_events"] = replay.runs[-1].events
    result["run_seconds"] = replay.runs[-1].seconds
    return result


@task(name="measure-lag", **RETRIES)
def measure_lag(database_url: str, replay_key: str) -> int:
    """Events after the replay's checkpoint."""
    return manager_for(database_url).get_replay_lag(replay_key)


@task(name="enable-dual-write", **RETRIES)
def enable_dual_write(database_url: str, replay_key: str, lag_threshold: int) -> dict[str, Any]:
    """From now on the live runner writes the replay's copy too."""
    manager = manager_for(database_url)
    replay = manager.get_replay(replay_key)
    if replay is not None and replay.state is zdr.ReplayState.DUAL_WRITING:
        return snapshot(replay)  # a retry after the switch committed
    return snapshot(manager.start_projecting_to_replay(replay_key, lag_threshold=lag_threshold))


@task(name="verify-replay", **RETRIES)
def verify_replay(database_url: str, replay_key: str) -> dict[str, Any]:
    """What the approver looks at: state, lag, rate, and the verification report."""
    manager = manager_for(database_url)
    replay = manager.get_replay(replay_key)
    if replay is None:
        raise zdr.ReplayNotFound(f"no replay with key {replay_key!r}")
    verification = manager.verify(replay_key)
    return {
        "replay": snapshot(replay),
        "lag": manager.get_replay_lag(replay_key),
        "verification": verification.to_dict(),
        "verification_markdown": reports.verification_markdown(verification),
        "lag_history": reports.lag_samples(manager.lag_history(replay_key)),
    }


@task(name="promote", **RETRIES)
def promote(database_url: str, replay_key: str) -> dict[str, Any]:
    """Make the replay's copy live in one transaction."""
    manager = manager_for(database_url)
    replay = manager.get_replay(replay_key)
    if replay is not None and replay.state is zdr.ReplayState.LIVE:
        return {"key": replay_key, "state": "live", "already": True}  # retried after commit
    report = manager.put_replay_live(replay_key)
    return {**asdict(report), "state": report.state.value}


@task(name="roll-back", **RETRIES)
def roll_back(database_url: str, replay_key: str) -> dict[str, Any]:
    """Make the previous copy live again."""
    report = manager_for(database_url).rollback(replay_key)
    return {**asdict(report), "state": report.state.value}


@task(name="remove-replay", **RETRIES)
def remove(database_url: str, replay_key: str) -> dict[str, Any]:
    """Drop the replay's copy and metadata; never a live table."""
    return snapshot(manager_for(database_url).remove_replay(replay_key))


@task(name="project-live", **RETRIES)
def project_live(
    database_url: str, projectors: list[str], *, max_seconds: float, batch_size: int
) -> int:
    """Apply new events to the live read models and dual-writing replays for a while."""
    manager = zdr.ReplayManager(
        manager_for(database_url).engine,
        projectors=[load_projector(path) for path in projectors],
        batch_size=batch_size,
    )
    manager.setup()
    return manager.follow(max_seconds=max_seconds)


@task(name="replay-status", **RETRIES)
def replay_status(database_url: str, replay_key: str | None = None) -> list[dict[str, Any]]:
    """Every replay (or one) with its state, position and lag."""
    manager = manager_for(database_url)
    replays = manager.list_replays()
    if replay_key is not None:
        replays = [r for r in replays if r.key == replay_key]
        if not replays:
            raise zdr.ReplayNotFound(f"no replay with key {replay_key!r}")
    return [{**snapshot(r), "lag": manager.get_replay_lag(r.key)} for r in replays]

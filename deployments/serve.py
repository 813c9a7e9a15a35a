"""Serve the zdr flows as deployments from this process.

    prefect server start                       # in another terminal (schedules need it)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    export ZDR_DATABASE_URL=postgresql://...   # the database the flows work on
    python -m zdr.deployments.serve                # add --paused to serve without schedules

Deployments (name "<flow>/<deployment>"):

* ``zero-downtime-replay/zero-downtime-replay``: the pipeline; no schedule,
  started from the UI with its parameters (key, projectors, ...).
* ``live-projection/live-projection``: the live runner as an active run and a
  standby run (``keep_standby``, see ``zdr.flows.standby``): the active run applies
  events for six hours and hands over to the standby, which takes over within 50 ms
  of the active run's end, whatever ended it; the active run starts a new standby
  when none waits. The schedule (every six hours) is a safety net. With
  ``--live-interval S --live-run S``: the earlier way instead, a run every S
  seconds lasting S seconds, each taking over from the one before (1,440 runs a day
  at 60 and 90).
* ``replay-status/replay-status``, ``promote-replay/...``, ``rollback-replay/...``,
  ``remove-replay/...``: the operator's single steps, no schedule.

The live runner applies the projectors in the worker's ZDR_LIVE_PROJECTORS
(comma-separated import paths, read as each run starts), by default the bank
example's. prefect.yaml declares the same deployments for a work pool. Every
deployment reads the event log named by ``--reader`` or ZDR_READER (an import
path, see ``zdr.readers``; default: zdr's own ``zdr.events``), given to its runs
as the ``reader`` parameter.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from zdr.errors import ConfigurationError
from zdr.flows.operations import (
    LIVE_RUN_INTERVAL_S,
    LIVE_RUN_SECONDS,
    STANDBY_INTERVAL_S,
    STANDBY_RUN_SECONDS,
    live_projection,
    promote_replay,
    remove_replay,
    replay_partition,
    replay_status,
    rollback_replay,
)
from zdr.flows.parameters import LIVE_PROJECTORS_ENV, live_projectors  # noqa: F401 (kept here)
from zdr.flows.zero_downtime_replay import zero_downtime_replay
from zdr.readers import load as load_reader

READER_ENV = "ZDR_READER"

#: Each deployment's description; prefect.yaml says the same (tests/test_deployments.py).
DESCRIPTIONS = {
    "zero-downtime-replay": "Rebuild projectors beside the live read model, wait for "
    "approval, promote with no gap. Give replay_key and projectors in Custom run.",
    "live-projection": "The live runner as an active run and a standby run on another "
    "worker: the standby takes over within 50 ms of the active run's end, whatever ended "
    "it; a run is active for six hours, then hands over. The schedule is a safety net. "
    "No concurrency limit: it would cancel the standby.",
    "replay-status": "The replays, their states, positions and lags.",
    "promote-replay": "Put a replay live by itself (the pipeline promotes on approval).",
    "rollback-replay": "Make the copy a promotion replaced live again.",
    "remove-replay": "Drop a replay's copy and metadata; never a live table.",
    "replay-partition": "One partition of a replay the pipeline cut into partitions, to its "
    "end: the pipeline starts one per partition when its partition_deployment names this.",
}


def deployments(
    *,
    paused: bool = False,
    live_interval_s: float | None = None,
    live_run_s: float | None = None,
    reader: str | None = None,
) -> list[RunnerDeployment]:
    """Every deployment, with its schedule (``paused`` turns the schedules off).

    The live runner: an active run and a standby (``keep_standby``), or, given
    ``live_interval_s`` / ``live_run_s``, the earlier overlapping runs that take over
    from each other. Either way no concurrency limit: it would cancel the waiting run,
    and a worker that died would keep its slot for minutes.
    No deployment has a replay key or projectors as defaults: a Quick run starts no
    rebuild. The live runner's projectors are the worker's ``ZDR_LIVE_PROJECTORS``,
    read when each run starts.
    """
    interval: float = STANDBY_INTERVAL_S
    live: dict[str, Any] = {"max_seconds": STANDBY_RUN_SECONDS, "keep_standby": True}
    if live_interval_s is not None or live_run_s is not None:
        # The earlier way, overlapping runs each taking over from the one before; one of
        # the two numbers alone takes the earlier default for the other.
        interval = LIVE_RUN_INTERVAL_S if live_interval_s is None else live_interval_s
        run_s = LIVE_RUN_SECONDS if live_run_s is None else live_run_s
        if not interval < run_s < 2 * interval:
            raise ValueError("a live run must last longer than the interval and under twice it")
        live = {"max_seconds": run_s, "take_over": True}
    reader = reader or os.environ.get(READER_ENV) or None
    if reader is not None:
        load_reader(reader)  # a bad path is refused now, not at each run
    log = {} if reader is None else {"reader": reader}

    def deploy(flow: Any, name: str, **options: Any) -> RunnerDeployment:
        options["parameters"] = {**options.get("parameters", {}), **log}
        return flow.to_deployment(  # type: ignore[no-any-return]
            name=name,
            tags=["zdr"],
            description=DESCRIPTIONS[name],
            # zdr.flows.<module>.<flow>: the installed package, as prefect.yaml names it,
            # so a run imports the flow's module under its own name.
            entrypoint_type=EntrypointType.MODULE_PATH,
            **options,
        )

    return [
        deploy(zero_downtime_replay, "zero-downtime-replay"),
        deploy(
            live_projection,
            "live-projection",
            interval=interval,
            paused=paused,
            parameters=live,
        ),
        deploy(replay_status, "replay-status"),
        deploy(promote_replay, "promote-replay"),
        deploy(rollback_replay, "rollback-replay"),
        deploy(remove_replay, "remove-replay"),
        deploy(replay_partition, "replay-partition"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zdr.deployments.serve", description="Serve the zdr flows as deployments."
    )
    parser.add_argument("--paused", action="store_true", help="serve without running schedules")
    parser.add_argument(
        "--live-interval",
        type=float,
        default=None,
        help="the earlier way of running the live runner: seconds between overlapping "
        "live-projection runs (with --live-run; default: an active run and a standby)",
    )
    parser.add_argument(
        "--live-run",
        type=float,
        default=None,
        help="seconds each overlapping live-projection run lasts from its scheduled start, "
        "more than the interval and under twice it (with --live-interval)",
    )
    parser.add_argument(
        "--reader",
        default=None,
        help="the event log's reader, module:attr of a reader or a function returning one "
        f"(default: ${READER_ENV}, else zdr's own zdr.events)",
    )
    args = parser.parse_args()
    try:
        served = deployments(
            paused=args.paused,
            live_interval_s=args.live_interval,
            live_run_s=args.live_run,
            reader=args.reader,
        )
    except (ValueError, ConfigurationError) as exc:
        parser.error(str(exc))
    for line in on_work_pools([d.name for d in served]):
        print(f"warning: {line}", file=sys.stderr)
    serve(*served)


def on_work_pools(names: list[str]) -> list[str]:
    """The deployments of these names that `prefect deploy` put on a work pool: serving
    takes them over, and stopping `serve` then pauses their schedules (the live
    runner's too), so the two ways must not be mixed on one server: say so."""
    from prefect.client.orchestration import get_client

    said = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                # Each deployment is named after its flow.
                found = client.read_deployment_by_name(f"{name}/{name}")
            except Exception:  # not deployed yet
                continue
            if found.work_pool_name:
                said.append(
                    f"deployment {name!r} is on work pool {found.work_pool_name!r} (prefect "
                    "deploy): serve takes it over, and stopping serve pauses its schedule; use "
                    "one way or the other on one Prefect server"
                )
    return said


if __name__ == "__main__":
    main()

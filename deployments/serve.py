"""Serve the zdr flows as deployments from this process.

    prefect server start                       # in another terminal (schedules need it)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    export ZDR_DATABASE_URL=postgresql://...   # the database the flows work on
    python -m zdr.deployments.serve                # add --paused to serve without schedules

Deployments (name "<flow>/<deployment>"):

* ``zero-downtime-replay/zero-downtime-replay``: the pipeline; no schedule,
  started from the UI with its parameters (key, projectors, ...).
* ``live-projection/live-projection``: the live runner, started every minute and
  running 90 s from its scheduled start: each run waits for the one before it to
  end and takes over within 50 ms, and a run goes on past its time until the
  next one waits, so the live read models never stand still between runs, and
  no run is cancelled. A run whose process dies lets go of the lock with its
  database session: the next run takes over at once. ``--live-interval`` and
  ``--live-run`` change the two numbers.
* ``replay-status/replay-status``, ``promote-replay/...``, ``rollback-replay/...``,
  ``remove-replay/...``: the operator's single steps, no schedule.

The live runner applies the projectors in ZDR_LIVE_PROJECTORS (comma-separated
import paths), by default the bank example's. Every deployment reads the event log
named by ``--reader`` or ZDR_READER (an import path, see ``zdr.readers``; default:
zdr's own ``zdr.events``), given to its runs as the ``reader`` parameter.
"""

from __future__ import annotations

import argparse
import os

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from zdr.errors import ConfigurationError
from zdr.examples.bank.projectors import LIVE
from zdr.flows.operations import (
    LIVE_RUN_INTERVAL_S,
    LIVE_RUN_SECONDS,
    live_projection,
    promote_replay,
    remove_replay,
    replay_status,
    rollback_replay,
)
from zdr.flows.zero_downtime_replay import zero_downtime_replay
from zdr.readers import load as load_reader

LIVE_PROJECTORS_ENV = "ZDR_LIVE_PROJECTORS"
READER_ENV = "ZDR_READER"


def live_projectors() -> list[str]:
    configured = os.environ.get(LIVE_PROJECTORS_ENV, "")
    paths = [p.strip() for p in configured.split(",") if p.strip()]
    return paths or [cls.import_path() for cls in LIVE]


def deployments(
    *,
    paused: bool = False,
    live_interval_s: float = LIVE_RUN_INTERVAL_S,
    live_run_s: float = LIVE_RUN_SECONDS,
    reader: str | None = None,
) -> list[RunnerDeployment]:
    """Every deployment, with its schedule (``paused`` turns the schedules off).

    The live runner's runs overlap on purpose (``live_run_s`` over ``live_interval_s``)
    and take over from each other; a Prefect concurrency limit would cancel the
    waiting run instead, and a worker that died would keep its slot for minutes.
    """
    if not live_interval_s < live_run_s < 2 * live_interval_s:
        raise ValueError("a live run must last longer than the interval and under twice it")
    reader = reader or os.environ.get(READER_ENV) or None
    if reader is not None:
        load_reader(reader)  # a bad path is refused now, not at each run
    log = {} if reader is None else {"reader": reader}
    return [
        zero_downtime_replay.to_deployment(
            name="zero-downtime-replay",
            tags=["zdr"],
            description="Rebuild projectors beside the live read model, approve, promote.",
            parameters=log,
        ),
        live_projection.to_deployment(
            name="live-projection",
            interval=live_interval_s,
            paused=paused,
            parameters={
                "projectors": live_projectors(),
                "max_seconds": live_run_s,
                "take_over": True,
                **log,
            },
            tags=["zdr"],
        ),
        replay_status.to_deployment(name="replay-status", tags=["zdr"], parameters=log),
        promote_replay.to_deployment(name="promote-replay", tags=["zdr"], parameters=log),
        rollback_replay.to_deployment(name="rollback-replay", tags=["zdr"], parameters=log),
        remove_replay.to_deployment(name="remove-replay", tags=["zdr"], parameters=log),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zdr.deployments.serve", description="Serve the zdr flows as deployments."
    )
    parser.add_argument("--paused", action="store_true", help="serve without running schedules")
    parser.add_argument(
        "--live-interval",
        type=float,
        default=LIVE_RUN_INTERVAL_S,
        help="seconds between live-projection runs (default %(default)s)",
    )
    parser.add_argument(
        "--live-run",
        type=float,
        default=LIVE_RUN_SECONDS,
        help="seconds each live-projection run lasts from its scheduled start, more than "
        "the interval and under twice it (default %(default)s)",
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
    serve(*served)


if __name__ == "__main__":
    main()

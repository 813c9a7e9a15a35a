"""Serve the zdr flows as deployments from this process.

    prefect server start                       # in another terminal (schedules need it)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    export ZDR_DATABASE_URL=postgresql://...   # the database the flows work on
    python -m zdr.deployments.serve                # add --paused to serve without schedules

Deployments (name "<flow>/<deployment>"):

* ``zero-downtime-replay/zero-downtime-replay``: the pipeline; no schedule,
  started from the UI with its parameters (key, projectors, ...).
* ``live-projection/live-projection``: the live runner, every minute for 55 s,
  so it keeps tailing the log; at most one run at a time.
* ``replay-status/replay-status``, ``promote-replay/...``, ``rollback-replay/...``,
  ``remove-replay/...``: the operator's single steps, no schedule.

The live runner applies the projectors in ZDR_LIVE_PROJECTORS (comma-separated
import paths), by default the bank example's.
"""

from __future__ import annotations

import argparse
import os

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from zdr.examples.bank.projectors import LIVE
from zdr.flows.operations import (
    live_projection,
    promote_replay,
    remove_replay,
    replay_status,
    rollback_replay,
)
from zdr.flows.zero_downtime_replay import zero_downtime_replay

LIVE_PROJECTORS_ENV = "ZDR_LIVE_PROJECTORS"


def live_projectors() -> list[str]:
    configured = os.environ.get(LIVE_PROJECTORS_ENV, "")
    paths = [p.strip() for p in configured.split(",") if p.strip()]
    return paths or [cls.import_path() for cls in LIVE]


def deployments(*, paused: bool = False) -> list[RunnerDeployment]:
    """Every deployment, with its schedule (``paused`` turns the schedules off)."""
    return [
        zero_downtime_replay.to_deployment(
            name="zero-downtime-replay",
            tags=["zdr"],
            description="Rebuild projectors beside the live read model, approve, promote.",
        ),
        live_projection.to_deployment(
            name="live-projection",
            interval=60,
            paused=paused,
            parameters={"projectors": live_projectors(), "max_seconds": 55.0},
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            tags=["zdr"],
        ),
        replay_status.to_deployment(name="replay-status", tags=["zdr"]),
        promote_replay.to_deployment(name="promote-replay", tags=["zdr"]),
        rollback_replay.to_deployment(name="rollback-replay", tags=["zdr"]),
        remove_replay.to_deployment(name="remove-replay", tags=["zdr"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zdr.deployments.serve", description="Serve the zdr flows as deployments."
    )
    parser.add_argument("--paused", action="store_true", help="serve without running schedules")
    args = parser.parse_args()
    serve(*deployments(paused=args.paused))


if __name__ == "__main__":
    main()

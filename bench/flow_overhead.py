"""What the Prefect flow costs over the plain Python API: the same rebuild of the bank's
balances (``--events`` events, auto-approved, no appends meanwhile) once through
``ReplayManager`` calls and once as the ``zero-downtime-replay`` flow, each in a
database of its own with the same log.

Prints one JSON line (numbers only, no pass/fail):

    python bench/flow_overhead.py [--events 200000] [--database-url URL]

``api_s`` and ``flow_s`` are wall times of the rebuild (the flow's includes creating
its run, its tasks, artifacts and logs); ``ratio`` is flow_s / api_s. The flow talks
to the Prefect API named by PREFECT_API_URL (a running `prefect server start`), else
to the temporary server Prefect starts in the process (``prefect_mode`` says which;
its start-up is counted in ``temporary_server_start_s``, not in ``flow_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zdr  # noqa: E402
from bench.replay_bench import beside, fresh_database  # noqa: E402
from zdr.examples.bank.domain import BankSimulator  # noqa: E402
from zdr.examples.bank.projectors import LIVE, BalancesV2  # noqa: E402


def _prepared(url: str, events: int) -> zdr.ReplayManager:
    manager = zdr.ReplayManager(url, projectors=[cls() for cls in LIVE])
    manager.setup()
    manager.store.import_events(BankSimulator(accounts=5_000, seed=7).stream(events))
    manager.project_live()
    return manager


def _through_the_api(manager: zdr.ReplayManager) -> float:
    """The steps the flow takes, as calls."""
    started = time.perf_counter()
    manager.ensure_replay("overhead", [BalancesV2()])
    manager.start_replay("overhead")
    manager.get_replay_lag("overhead")
    manager.enable_dual_write("overhead")
    manager.verify("overhead")
    manager.promote("overhead")
    manager.verify("overhead")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL

    api_url = fresh_database(args.database_url, "zdr_bench_overhead")
    flow_url = beside(api_url, "flow")
    api_s = _through_the_api(_prepared(api_url, args.events))
    _prepared(flow_url, args.events)

    from zdr.flows.zero_downtime_replay import zero_downtime_replay

    server = None
    temporary_start_s = None
    if not PREFECT_API_URL.value():
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import temporary_settings

        started = time.perf_counter()
        server = SubprocessASGIServer()
        server.start()
        temporary_start_s = time.perf_counter() - started
    settings = {} if server is None else {PREFECT_API_URL: server.api_url}
    from prefect.settings import temporary_settings

    with temporary_settings(settings):
        started = time.perf_counter()
        summary = zero_downtime_replay(
            replay_key="overhead",
            projectors=[BalancesV2.import_path()],
            database_url=flow_url,
            auto_approve=True,
        )
        flow_s = time.perf_counter() - started
    assert summary.promoted
    print(
        json.dumps(
            {
                "events": args.events,
                "prefect_mode": "server" if server is None else "temporary server",
                "api_s": round(api_s, 2),
                "flow_s": round(flow_s, 2),
                "ratio": round(flow_s / api_s, 2),
                "temporary_server_start_s": None
                if temporary_start_s is None
                else round(temporary_start_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

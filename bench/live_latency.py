"""Live latency: how long from an append's commit to its row in the live read model.

Prints one JSON line (numbers only, no pass/fail):

    python bench/live_latency.py [--events 300000] [--database-url URL]

The live runner (``ReplayManager.follow``) tails the log while a probe appends
one event about every 50 ms and times how long it takes to appear in the live
balances table, in three phases:

* ``idle``: nothing else runs;
* ``during_replay``: a replay rebuilds the balances projection (BalancesV2)
  from the whole log beside it (its own rate is reported too);
* ``during_new_read_model``: a brand-new read model (the history projection) is
  registered and builds from the start of the log in the live runner;
* ``while_another_database_writes``, ``while_an_update_is_open``,
  ``while_an_index_builds``: a write transaction that appends nothing stays open for
  ``--blocker-seconds``: in another database of the same server, an UPDATE of an
  application table here, a DBA's ``CREATE INDEX`` on a replay's copy here.

Without a URL it runs in a database of its own in the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

import zdr  # noqa: E402
from bench.replay_bench import beside, fresh_database  # noqa: E402
from zdr.examples.bank.domain import BankSimulator  # noqa: E402
from zdr.examples.bank.projectors import Balances, BalancesV2, History  # noqa: E402

PROBE_EVERY_S = 0.05


class Probe:
    """Appends an account-opened event and waits for its row in the live balances."""

    def __init__(self, manager: zdr.ReplayManager) -> None:
        self.manager = manager
        self.count = 0

    def once(self, timeout_s: float = 120.0) -> float:
        self.count += 1
        account = f"probe-{self.count:06d}"
        event = {"type": "AccountOpened", "data": {"account_id": account, "owner": "probe"}}
        with self.manager.engine.connect() as conn:
            self.manager.store.append(account, [event])
            appended = time.perf_counter()
            deadline = appended + timeout_s
            while time.perf_counter() < deadline:
                found = conn.exec_driver_sql(
                    "SELECT 1 FROM bank_balances.balances WHERE account_id = %s", (account,)
                ).first()
                conn.rollback()
                if found:
                    return time.perf_counter() - appended
                time.sleep(0.002)
        return timeout_s

    def during(self, busy: threading.Thread | None, seconds: float) -> list[float]:
        """Probe until ``busy`` ends (or for ``seconds`` when there is nothing busy)."""
        samples = []
        end = time.monotonic() + seconds
        while (busy.is_alive() if busy is not None else time.monotonic() < end) or not samples:
            samples.append(self.once())
            time.sleep(PROBE_EVERY_S)
        return samples


def summary(samples: list[float]) -> dict[str, float | int]:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        "probes": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(ms[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--blocker-seconds", type=float, default=5.0)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    url = fresh_database(args.database_url, "zdr_live_bench")
    manager = zdr.ReplayManager(url, projectors=[Balances()])
    manager.setup()
    for replay in manager.list_replays():  # left by an interrupted run
        manager.remove_replay(replay.key)
    with manager.engine.connect() as conn:
        have = manager.store.count_after(conn, zdr.store.START)
    if have < args.events:
        manager.store.import_events(
            BankSimulator(accounts=args.accounts).stream(args.events - have)
        )
    manager.project_live()

    stop = threading.Event()
    live = threading.Thread(target=manager.follow, kwargs={"stop": stop, "poll_interval": 0.01})
    live.start()
    probe = Probe(manager)
    result: dict[str, object] = {"events": max(have, args.events)}
    try:
        result["idle"] = summary(probe.during(None, args.idle_seconds))

        manager.create_replay("live_bench", [BalancesV2()])
        rebuilt: dict[str, float] = {}

        def replay() -> None:
            started = time.perf_counter()
            done = manager.start_replay("live_bench")
            rebuilt["rate"] = done.events_applied / (time.perf_counter() - started)

        busy = threading.Thread(target=replay)
        busy.start()
        result["during_replay"] = summary(probe.during(busy, 0))
        busy.join()
        result["replay_events_per_s"] = round(rebuilt["rate"])
        manager.remove_replay("live_bench")

        def new_read_model() -> None:
            zdr.ReplayManager(manager.engine, projectors=[History()]).setup()
            while True:  # built once its checkpoint is level with the live balances
                points = manager.checkpoints()
                if points["live:history"] >= points["live:balances"]:
                    return
                time.sleep(0.05)

        busy = threading.Thread(target=new_read_model)
        busy.start()
        result["during_new_read_model"] = summary(probe.during(busy, 0))
        busy.join()

        # Write transactions that append nothing, each held open for --blocker-seconds:
        # one in another database of the same server (an ETL job's), an UPDATE of an
        # application table here, a DBA building an index on a read model here. None
        # can append to this log, so none may hold the live read models.
        other = sa.create_engine(beside(url, "other"), poolclass=sa.NullPool)
        with manager.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS public.bench_rows (id int, n int)")
        blockers = {
            "while_another_database_writes": (other, "SELECT pg_current_xact_id()"),
            "while_an_update_is_open": (manager.engine, "UPDATE public.bench_rows SET n = 1"),
            "while_an_index_builds": (
                manager.engine,
                "CREATE INDEX bench_owner ON zdr_idx_bench_1.balances (owner, balance)",
            ),
        }
        manager.create_replay("idx_bench", [BalancesV2()])  # the copy the DBA indexes
        for case, (where, statement) in blockers.items():
            opened = threading.Event()

            def hold(where: sa.Engine = where, statement: str = statement, opened=opened) -> None:
                with where.connect() as conn:
                    conn.exec_driver_sql(statement)
                    conn.exec_driver_sql("SELECT pg_current_xact_id()")  # a transaction id
                    opened.set()
                    time.sleep(args.blocker_seconds)
                    conn.rollback()

            busy = threading.Thread(target=hold)
            busy.start()
            opened.wait()
            result[case] = summary(probe.during(busy, 0))
            busy.join()
        other.dispose()
        manager.remove_replay("idx_bench")
    finally:
        stop.set()
        live.join()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

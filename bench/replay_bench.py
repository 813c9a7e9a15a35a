"""Replay throughput on the bank example: this engine against a naive baseline.

Prints one JSON line (numbers only, no pass/fail):

    python bench/replay_bench.py [--events 1000000] [--database-url URL]

* engine: ``ReplayManager.start_replay`` rebuilding the balances projection
  (BalancesV2: fold each batch, one array upsert per batch) from the whole log;
* baseline: what the PHP original does, one UPDATE per event and one
  transaction per event, timed on the first ``--baseline-sample`` events of
  the same log (its rate does not depend on the log's length).

Without a URL it runs in a database of its own in the embedded PostgreSQL. A
database named with --database-url gets the schemas zdr, bank_balances and
bench_naive; its events are reused by the next run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zdr  # noqa: E402
from zdr.config import embedded_url, to_libpq_url, to_sqlalchemy_url  # noqa: E402
from zdr.examples.bank.domain import CLOSED, DEPOSITED, OPENED, BankSimulator  # noqa: E402
from zdr.examples.bank.projectors import Balances, BalancesV2  # noqa: E402

BASELINE_TABLE = """CREATE UNLOGGED TABLE IF NOT EXISTS bench_naive.balances (
    account_id text PRIMARY KEY, owner text, balance bigint NOT NULL DEFAULT 0,
    events integer NOT NULL DEFAULT 0, closed boolean NOT NULL DEFAULT false)"""


def fresh_database(url: str | None, name: str = "zdr_bench") -> str:
    """The URL given, else a database ``name`` made afresh in the embedded PostgreSQL."""
    if url:
        return to_sqlalchemy_url(url)
    server = sa.create_engine(embedded_url(), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return server.url.set(database=name).render_as_string(hide_password=False)


def naive_replay(url: str, store: zdr.EventStore, sample: int) -> float:
    """One statement and one transaction per event, like the PHP original. Events/s."""
    with store.engine.connect() as conn:
        events = store.read(conn, zdr.store.START, sample)
    with psycopg.connect(to_libpq_url(url)) as db:
        db.autocommit = True
        db.execute("CREATE SCHEMA IF NOT EXISTS bench_naive")
        db.execute(BASELINE_TABLE)
        db.execute("TRUNCATE bench_naive.balances")
        started = time.perf_counter()
        for event in events:
            account = event.data["account_id"]
            if event.type == OPENED:
                db.execute(
                    "INSERT INTO bench_naive.balances (account_id, owner, events) "
                    "VALUES (%s, %s, 1)",
                    (account, event.data["owner"]),
                )
            elif event.type == CLOSED:
                db.execute(
                    "UPDATE bench_naive.balances SET closed = true, events = events + 1 "
                    "WHERE account_id = %s",
                    (account,),
                )
            else:
                sign = 1 if event.type == DEPOSITED else -1
                db.execute(
                    "UPDATE bench_naive.balances SET balance = balance + %s, events = events + 1 "
                    "WHERE account_id = %s",
                    (sign * event.data["amount"], account),
                )
        return len(events) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--baseline-sample", type=int, default=20_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    url = fresh_database(args.database_url)
    manager = zdr.ReplayManager(url, projectors=[Balances()], batch_size=args.batch_size)
    manager.setup()
    if manager.get_replay("bench") is not None:  # left by an interrupted run
        manager.remove_replay("bench")
    with manager.engine.connect() as conn:
        have = manager.store.count_after(conn, zdr.store.START)
    if have < args.events:
        sim = BankSimulator(accounts=args.accounts, seed=11)
        manager.store.import_events(sim.stream(args.events - have))
    with manager.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE zdr.events")
        conn.commit()

    manager.create_replay("bench", [BalancesV2()])
    started = time.perf_counter()
    replay = manager.start_replay("bench")
    engine_seconds = time.perf_counter() - started
    engine_rate = replay.events_applied / engine_seconds

    baseline_rate = naive_replay(url, manager.store, min(args.baseline_sample, args.events))
    manager.remove_replay("bench")

    print(
        json.dumps(
            {
                "events": replay.events_applied,
                "engine_events_per_s": round(engine_rate),
                "engine_seconds": round(engine_seconds, 2),
                "baseline_events_per_s": round(baseline_rate),
                "baseline_sample": min(args.baseline_sample, args.events),
                "speedup": round(engine_rate / baseline_rate, 1),
                "batch_size": args.batch_size,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Verification cost: ``ReplayManager.verify`` on a table of about a million rows.

Prints one JSON line (numbers only, no pass/fail):

    python bench/verify_bench.py [--events 1100000] [--chunk-rows 50000] [--database-url URL]

The history projection (one row per deposit or withdrawal) is projected live and
replayed beside it, dual write on, so both copies hold the same rows. Then:

* ``equal``: verify the two copies while a writer updates live rows every 10 ms
  (``SET amount = amount``: a real write, no change, under a 5 ms
  ``lock_timeout``: a write that waits longer for a lock fails and is counted
  in ``live_write_lock_timeouts``), and report how long verify
  took, how long its snapshot was open, the lock modes verify held on the
  read-model tables, whether any lock was waited for, and the writer's latency
  idle, during verify, and during a query that touches no table (the control:
  what a busy server alone costs the writer);
* ``one_changed_row``: one row in the middle of the replay's copy changed;
* ``swapped_rows``: the amounts of two rows of the replay's copy swapped (each
  row's key now holds the other's value: per-column sums cannot see it).

Without a URL it runs in a database of its own in the embedded PostgreSQL. The
events are kept for the next run against the same database.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zdr  # noqa: E402
from bench.replay_bench import fresh_database  # noqa: E402
from zdr.examples.bank.domain import BankSimulator  # noqa: E402
from zdr.examples.bank.projectors import History  # noqa: E402

KEY = "verify_bench"
LIVE = "bank_history.transactions"
WRITE_EVERY_S = 0.01
LOCK_TIMEOUT_MS = 5


class Writer:
    """Updates one live row at a time in short transactions and times each write."""

    def __init__(self, conn: sa.Connection, positions: list[int]) -> None:
        self.conn = conn  # one session throughout, so LockWatch knows its pid
        self.positions = positions
        self.pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.commit()
        self.lock_timeouts = 0

    def run(self, busy: threading.Thread | None, seconds: float) -> list[float]:
        """Write until ``busy`` ends (or for ``seconds`` when nothing is busy); each
        write's seconds."""
        samples: list[float] = []
        end = time.monotonic() + seconds
        while (busy.is_alive() if busy is not None else time.monotonic() < end) or not samples:
            position = self.positions[len(samples) % len(self.positions)]
            # A write that waits for a lock longer than this fails and is counted.
            self.conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
            started = time.perf_counter()
            try:
                self.conn.exec_driver_sql(
                    f"UPDATE {LIVE} SET amount = amount WHERE position = %s", (position,)
                )
                self.conn.commit()
            except sa.exc.OperationalError:
                self.conn.rollback()
                self.lock_timeouts += 1
            samples.append(time.perf_counter() - started)
            time.sleep(WRITE_EVERY_S)
        return samples


class LockWatch:
    """Samples pg_locks on the read-model tables: the modes held by anyone but the writer
    (verify, since nothing else runs), and any lock not granted."""

    def __init__(self, engine: sa.Engine, schemas: list[str], writer: Writer) -> None:
        self.engine = engine
        self.schemas = schemas
        self.writer = writer
        self.modes: set[str] = set()
        self.waits = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            while not self.stop.is_set():
                rows = conn.exec_driver_sql(
                    """SELECT l.mode, l.granted, l.pid = %s FROM pg_locks l
                       JOIN pg_class c ON c.oid = l.relation
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = ANY(%s) AND l.pid <> pg_backend_pid()""",
                    (self.writer.pid, self.schemas),
                ).all()
                conn.rollback()
                for mode, granted, writer in rows:
                    if not writer:
                        self.modes.add(mode)
                    self.waits += not granted
                time.sleep(0.02)


def latency(samples: list[float]) -> dict[str, float | int]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "writes": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "max_ms": round(ms[-1], 2),
    }


def busy_query(engine: sa.Engine, rows: int) -> None:
    """Hash ``rows`` numbers as text: server work like verify's, on no table."""
    with engine.connect() as conn:
        conn.exec_driver_sql(
            "SELECT sum(hashtextextended(g::text, 0)) FROM generate_series(1, %s) g", (rows,)
        ).one()


def timed_verify(manager: zdr.ReplayManager, chunk_rows: int) -> tuple[Any, float]:
    started = time.perf_counter()
    report = manager.verify(KEY, chunk_rows=chunk_rows)
    return report, time.perf_counter() - started


def outcome(report: Any, seconds: float) -> dict[str, Any]:
    return {
        "equal": report.equal,
        "seconds": round(seconds, 2),
        "snapshot_seconds": _snapshot(report),
        "differences": [(d.kind, d.key, d.columns) for d in report.differences],
    }


def _snapshot(report: Any) -> float | None:
    value = getattr(report, "snapshot_seconds", None)  # verify before rows were compared: none
    return None if value is None else round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_100_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    url = fresh_database(args.database_url, "zdr_verify_bench")
    manager = zdr.ReplayManager(url, projectors=[History()], batch_size=50_000)
    manager.setup()
    if manager.get_replay(KEY) is not None:  # left by an earlier run
        manager.remove_replay(KEY)
    with manager.engine.connect() as conn:
        have = manager.store.count_after(conn, zdr.store.START)
    if have < args.events:
        sim = BankSimulator(accounts=args.accounts, seed=13)
        manager.store.import_events(sim.stream(args.events - have))
    manager.project_live()
    manager.create_replay(KEY, ["history"])
    replay = manager.start_replay(KEY)
    manager.enable_dual_write(KEY)
    side = replay.schemas["bank_history"]
    copy = f'"{side}".transactions'
    with manager.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM ANALYZE {LIVE}")
        conn.exec_driver_sql(f"VACUUM ANALYZE {copy}")
        positions = list(
            conn.exec_driver_sql(f"SELECT position FROM {LIVE} ORDER BY position").scalars()
        )
    result: dict[str, Any] = {"rows": len(positions), "chunk_rows": args.chunk_rows}

    writing = manager.engine.connect()
    writer = Writer(writing, positions[:: max(1, len(positions) // 1000)])
    idle = writer.run(None, 2.0)
    # The control: a query of about as long that touches no read-model table, so what
    # the writer feels from a busy server alone (2 cores) is told apart from locks.
    cpu = threading.Thread(target=busy_query, args=(manager.engine, len(positions) * 2))
    cpu.start()
    during_busy_query = writer.run(cpu, 0)
    cpu.join()
    watch = LockWatch(manager.engine, ["bank_history", side], writer)
    done: dict[str, Any] = {}

    def verify() -> None:
        done["report"], done["seconds"] = timed_verify(manager, args.chunk_rows)

    busy = threading.Thread(target=verify)
    watcher = threading.Thread(target=watch.run)
    watcher.start()
    busy.start()
    during = writer.run(busy, 0)
    busy.join()
    watch.stop.set()
    watcher.join()
    writing.close()
    result["equal"] = {
        **outcome(done["report"], done["seconds"]),
        "verify_lock_modes": sorted(watch.modes),
        "lock_waits_seen": watch.waits,
        "live_write_lock_timeouts": writer.lock_timeouts,
        "live_writes_idle": latency(idle),
        "live_writes_during_verify": latency(during),
        "live_writes_during_a_busy_query": latency(during_busy_query),
    }

    middle = positions[len(positions) // 2]
    with manager.engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE {copy} SET amount = amount + 1 WHERE position = %s", (middle,)
        )
    result["one_changed_row"] = outcome(*timed_verify(manager, args.chunk_rows))
    with manager.engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE {copy} SET amount = amount - 1 WHERE position = %s", (middle,)
        )
        first, second = conn.exec_driver_sql(
            f"""SELECT a.position, b.position FROM {copy} a JOIN {copy} b
                ON b.position > a.position AND b.amount <> a.amount
                WHERE a.position = %s ORDER BY b.position LIMIT 1""",
            (positions[len(positions) // 3],),
        ).one()
        conn.exec_driver_sql(
            f"""UPDATE {copy} t SET amount = o.amount FROM {copy} o
                WHERE (t.position, o.position) IN ((%s, %s), (%s, %s))""",
            (first, second, second, first),
        )
    result["swapped_rows"] = outcome(*timed_verify(manager, args.chunk_rows))
    manager.remove_replay(KEY)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()

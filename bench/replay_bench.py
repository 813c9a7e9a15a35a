"""Replay throughput on the bank example: the four ways to write a projector against
a faithful baseline, on each kind of event log.

Prints one JSON line (numbers only, no pass/fail):

    python bench/replay_bench.py [--events 1000000] [--database-url URL]
                                 [--readers own,eventsourcing,stored_events] [--writes 5000]
                                 [--batch-sizes 10000,50000,100000] [--partitions 1,2,4]

* ``rowfold_events_per_s``: ``Balances``, a ``zdr.RowProjector`` (plain Python per
  event on the account's row), rebuilt from the whole log;
* ``batch_events_per_s`` (also ``engine_events_per_s``): ``BalancesV2``, a
  hand-written batch projector (fold each batch, one array upsert), the whole log;
* ``frame_events_per_s``: ``FrameBalances``, a ``zdr.FrameProjector`` (each batch as
  a pandas DataFrame, folded with a group-by), the whole log;
* ``per_event_events_per_s``: the same balances with ``@zdr.handles`` per-event
  handlers writing through SQLAlchemy, timed on the first ``--per-event-sample``
  events (its rate does not depend on the log's length);
* ``baseline_events_per_s``: what the PHP original does: the projector's
  statement in a transaction of its own per event, into a logged table, the
  replay's position stored every 50 events; on the first ``--baseline-sample``
  events;
* the ratios of each to the baseline, and the peak RSS of the process;
* readers: the same replay of the same history read from each kind of log
  (``replay_events_per_s``), and the reader alone, reading and decoding every
  event with no projector (``read_events_per_s``): zdr's own table, an
  eventsourcing application's (each event decoded by its mapper), a Laravel-era
  ``stored_events`` table prepared by ``TableReader.prepare``;
* appends: ``EventStore.append`` of one event a transaction from 4 connections at once,
  ``--appends`` each (appends/s, median and p99 ms);
* writers: what ``prepare`` costs the application's writers: ``--writes``
  one-row INSERT transactions into a ``stored_events`` table before and after it
  is prepared (inserts/s, median and p99 ms);
* history_index: ``History`` (a row per deposit and withdrawal, one secondary
  index) replayed with its index maintained row by row, and replayed without it
  then built (seconds, replay and build);
* partitions (with ``--partitions 1,2,4``): ``BalancesV2``'s whole replay in that
  many partitions at once, per runner (threads of this process, as Prefect's default
  task runner; processes, as a DaskTaskRunner's local cluster), and one partition's
  reads alone (events of it per second);
* batch_sizes (with ``--batch-sizes``): the row-fold, batch and frame ways again at each
  size, and the peak RSS after each (sizes run in ascending order).

Without a URL it runs in databases of its own in the embedded PostgreSQL. A
database named with --database-url gets the schemas zdr, bank_balances and
bench_baseline (its events are reused by the next run); the other logs get
databases of their own beside it (``<name>_eventsourcing``, ``<name>_stored_events``,
made afresh: the user needs CREATEDB).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zdr  # noqa: E402
from bench.unindexed import UnindexedHistory  # noqa: E402
from zdr.config import embedded_url, to_libpq_url, to_sqlalchemy_url  # noqa: E402
from zdr.examples.bank.domain import (  # noqa: E402
    CLOSED,
    DEPOSITED,
    OPENED,
    BankSimulator,
)
from zdr.examples.bank.projectors import (  # noqa: E402
    Balances,
    BalancesV2,
    FrameBalances,
    History,
    PerEventBalances,
    history,
)
from zdr.partitions import PartitionReader  # noqa: E402
from zdr.readers import EventsourcingReader  # noqa: E402
from zdr.store import Partition, iter_all  # noqa: E402

READERS = ("own", "eventsourcing", "stored_events")
Pair = tuple[str, dict[str, Any]]

BASELINE_TABLES = """
CREATE SCHEMA IF NOT EXISTS bench_baseline;
DROP TABLE IF EXISTS bench_baseline.balances, bench_baseline.position;
CREATE TABLE bench_baseline.balances (
    account_id text PRIMARY KEY, owner text, balance bigint NOT NULL DEFAULT 0,
    events integer NOT NULL DEFAULT 0, closed boolean NOT NULL DEFAULT false);
CREATE INDEX ON bench_baseline.balances (owner);
CREATE TABLE bench_baseline.position (position bigint NOT NULL);
INSERT INTO bench_baseline.position VALUES (0);
"""


def fresh_database(url: str | None, name: str = "zdr_bench") -> str:
    """The URL given, else a database ``name`` made afresh in the embedded PostgreSQL."""
    if url:
        return to_sqlalchemy_url(url)
    return _made_afresh(embedded_url(), name)


def _made_afresh(server_url: str, name: str) -> str:
    server = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    server.dispose()
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def beside(url: str, suffix: str) -> str:
    """A database of its own next to ``url``'s, made afresh: one log per database."""
    return _made_afresh(url, f"{sa.make_url(url).database}_{suffix}")


def other_log(
    kind: str, url: str
) -> tuple[zdr.EventReader, Callable[[Iterable[Pair]], int], Callable[[], None]]:
    """The reader of a log of ``kind`` in ``url``'s database, how to import into it, and
    how to let go of it after."""
    if kind == "eventsourcing":
        from zdr.examples.bank.eventsourced import BankLog, bank_app

        app = bank_app(url)
        return EventsourcingReader(app), BankLog(app).import_events, app.close
    from zdr.examples.bank import stored_events

    stored_events.create(url)
    reader = stored_events.table_reader()
    reader.prepare(url)
    engine = sa.create_engine(url)
    return reader, stored_events.StoredEventsLog(engine).import_events, engine.dispose


def settle(url: str) -> None:
    """VACUUM ANALYZE a freshly loaded log (as zdr.events is analyzed above): the runs then
    read it as an application's long-lived table, not while autovacuum works through it."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE)")
    engine.dispose()


def replay_rates(url: str, reader: zdr.EventReader | None, batch_size: int) -> tuple[float, float]:
    """(replay events/s, read-only events/s) of the whole log in ``url``."""
    manager = zdr.ReplayManager(url, projectors=[Balances()], batch_size=batch_size, reader=reader)
    manager.setup()
    if manager.get_replay("bench") is not None:  # left by an interrupted run
        manager.remove_replay("bench")
    manager.create_replay("bench", [BalancesV2()])
    started = time.perf_counter()
    replay = manager.start_replay("bench")
    replay_rate = replay.events_applied / (time.perf_counter() - started)
    started = time.perf_counter()
    read = sum(1 for _ in iter_all(manager.reader, manager.engine, batch_size))
    read_rate = read / (time.perf_counter() - started)
    manager.remove_replay("bench")
    manager.engine.dispose()
    return replay_rate, read_rate


def writer_cost(url: str, writes: int) -> dict[str, float]:
    """One-row INSERT transactions into a stored_events table, before and after prepare."""
    from zdr.examples.bank import stored_events

    stored_events.create(url)
    sim = BankSimulator(accounts=1_000, seed=3)
    engine = sa.create_engine(url)
    log = stored_events.StoredEventsLog(engine)
    found: dict[str, float] = {}
    for when in ("before_prepare", "after_prepare"):
        if when == "after_prepare":
            stored_events.table_reader().prepare(engine)
        took = []
        for pair in sim.events(writes):
            started = time.perf_counter()
            log.append([pair])
            took.append(time.perf_counter() - started)
        took.sort()
        found[f"{when}_inserts_per_s"] = round(len(took) / sum(took))
        found[f"{when}_median_ms"] = round(took[len(took) // 2] * 1000, 3)
        found[f"{when}_p99_ms"] = round(took[int(len(took) * 0.99)] * 1000, 3)
    engine.dispose()
    return found


def append_rate(url: str, connections: int, each: int) -> dict[str, float]:
    """Single-event appends (``EventStore.append``, a transaction each) from ``connections``
    connections at once: what the application's writers get, announcements included."""
    import threading

    engine = sa.create_engine(url, pool_size=connections)
    store = zdr.EventStore(engine)
    store.setup()
    opened = [{"type": "AccountOpened", "data": {"account_id": "a", "owner": "x"}}]
    for i in range(100):  # warm: connections made
        store.append(f"warm-{i}", opened)
    took: list[float] = []

    def appender(n: int) -> None:
        mine = []
        for i in range(each):
            before = time.perf_counter()
            store.append(f"w{n}-{i}", opened)
            mine.append(time.perf_counter() - before)
        took.extend(mine)

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    engine.dispose()
    took.sort()
    return {
        "connections": connections,
        "appends_per_s": round(len(took) / seconds),
        "median_ms": round(took[len(took) // 2] * 1000, 3),
        "p99_ms": round(took[int(len(took) * 0.99)] * 1000, 3),
    }


def baseline_replay(url: str, store: zdr.EventStore, sample: int) -> float:
    """The PHP original's replay: each event's statement in a transaction of its own, into
    a logged table, the position stored every 50 events. Events/s."""
    with store.engine.connect() as conn:
        events = store.read(conn, zdr.store.START, sample)
    with psycopg.connect(to_libpq_url(url)) as db:
        db.autocommit = True
        db.execute(BASELINE_TABLES)
        started = time.perf_counter()
        for i, event in enumerate(events, 1):
            account = event.data["account_id"]
            with db.transaction():
                if event.type == OPENED:
                    db.execute(
                        "INSERT INTO bench_baseline.balances (account_id, owner, events) "
                        "VALUES (%s, %s, 1)",
                        (account, event.data["owner"]),
                    )
                elif event.type == CLOSED:
                    db.execute(
                        "UPDATE bench_baseline.balances SET closed = true, events = events + 1 "
                        "WHERE account_id = %s",
                        (account,),
                    )
                else:
                    sign = 1 if event.type == DEPOSITED else -1
                    db.execute(
                        "UPDATE bench_baseline.balances SET balance = balance + %s, "
                        "events = events + 1 WHERE account_id = %s",
                        (sign * event.data["amount"], account),
                    )
            if i % 50 == 0:
                db.execute("UPDATE bench_baseline.position SET position = %s", (event.position,))
        return len(events) / (time.perf_counter() - started)


def index_after(url: str, batch_size: int) -> dict[str, float]:
    """History's replay (one row per deposit and withdrawal, an index on (account_id,
    position)) with its index maintained row by row, and built after the replay."""
    manager = zdr.ReplayManager(url, projectors=[Balances(), History()], batch_size=batch_size)
    manager.setup()
    found = {}
    for way, projector in (("maintained", History()), ("built_after", UnindexedHistory())):
        if manager.get_replay("bench") is not None:
            manager.remove_replay("bench")
        replay = manager.create_replay("bench", [projector])
        started = time.perf_counter()
        manager.start_replay("bench")
        if way == "built_after":
            with manager.engine.begin() as conn:
                side = dict(replay.schemas)[history.schema]
                conn.exec_driver_sql(
                    f'CREATE INDEX ON "{side}".{history.name} (account_id, position)'
                )
        found[f"index_{way}_seconds"] = round(time.perf_counter() - started, 2)
        manager.remove_replay("bench")
    manager.engine.dispose()
    return found


def partition_rates(manager: zdr.ReplayManager, counts: list[int]) -> dict[str, Any]:
    """BalancesV2's whole replay in ``n`` partitions at once, events/s per runner: threads of
    this process (what Prefect's default task runner does) and processes (what a
    DaskTaskRunner's local cluster does), without Prefect's own cost per task (ms); and
    reading one partition alone, events of it per second (each partition's reads scan the
    whole log's index and keep the rows of its streams)."""
    found: dict[str, Any] = {}
    url = manager.engine.url.render_as_string(hide_password=False)
    spawn = multiprocessing.get_context("spawn")  # no fork of this process's pools
    for runner in ("threads", "processes"):
        rates = {}
        for n in counts:
            if manager.get_replay("bench") is not None:
                manager.remove_replay("bench")
            manager.create_replay("bench", [BalancesV2()])
            executor: Executor = (
                ThreadPoolExecutor(n)
                if runner == "threads"
                else ProcessPoolExecutor(n, mp_context=spawn, initializer=_warm)
            )
            with executor:
                list(executor.map(_warm_up, range(n)))  # processes started and importing
                started = time.perf_counter()
                if n > 1:
                    manager.plan_partitions("bench", n)
                    args = [(url, i, manager.batch_size) for i in range(n)]
                    list(executor.map(_replay_partition, args))
                replay = manager.start_replay("bench")
                rates[str(n)] = round(replay.events_applied / (time.perf_counter() - started))
        found[f"{runner}_events_per_s"] = rates
    manager.remove_replay("bench")
    reads = {}
    for n in counts:
        part = PartitionReader(manager.reader, Partition(0, n))
        started = time.perf_counter()
        read, cursor = 0, zdr.store.START
        while True:
            with manager.engine.begin() as conn:
                batch = part.read(conn, cursor, manager.batch_size)
            if not batch:
                break
            read, cursor = read + len(batch), batch[-1].cursor
        reads[str(n)] = round(read / (time.perf_counter() - started))
    found["read_one_partition_events_per_s"] = reads
    return found


def _warm() -> None:
    import zdr.manager  # noqa: F401  (imported once per process, before the clock starts)


def _warm_up(_: int) -> None:
    time.sleep(0.1)  # every worker of the pool up before the clock starts


def _replay_partition(args: tuple[str, int, int]) -> int:
    url, index, batch_size = args
    manager = _managers.get(url) or _managers.setdefault(url, zdr.ReplayManager(url))
    return manager.replay_partition("bench", index, batch_size=batch_size).events


_managers: dict[str, zdr.ReplayManager] = {}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed_replay(
    manager: zdr.ReplayManager, projector: zdr.Projector, max_events: int | None = None
) -> tuple[float, float, int]:
    """(events/s, seconds, events) of a replay of ``projector`` from the start of the log."""
    if manager.get_replay("bench") is not None:  # left by an interrupted run
        manager.remove_replay("bench")
    manager.create_replay("bench", [projector])
    started = time.perf_counter()
    replay = manager.start_replay("bench", max_events=max_events)
    seconds = time.perf_counter() - started
    manager.remove_replay("bench")
    return replay.events_applied / seconds, seconds, replay.events_applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=zdr.Settings().batch_size)
    parser.add_argument("--baseline-sample", type=int, default=20_000)
    parser.add_argument("--per-event-sample", type=int, default=50_000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument(
        "--readers",
        default=",".join(READERS),
        help="comma-separated, from: " + ", ".join(READERS),
    )
    parser.add_argument("--writes", type=int, default=5_000)
    parser.add_argument(
        "--appends",
        type=int,
        default=2_500,
        help="single-event appends per connection, from 4 connections at once (0: none)",
    )
    parser.add_argument(
        "--partitions",
        default="",
        help="comma-separated partition counts: BalancesV2's whole replay in that many "
        "partitions at once, in threads and in processes (1: one reader)",
    )
    parser.add_argument(
        "--batch-sizes",
        default="",
        help="comma-separated batch sizes to compare the row-fold, batch and frame ways at "
        "(ascending: the peak RSS after each is that size's)",
    )
    args = parser.parse_args()
    try:
        sweep = sorted(int(size) for size in args.batch_sizes.split(",") if size.strip())
        counts = [int(n) for n in args.partitions.split(",") if n.strip()]
    except ValueError:
        parser.error("--batch-sizes and --partitions take whole numbers")
    kinds = [k.strip() for k in args.readers.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(READERS))
    if unknown:
        parser.error(f"unknown readers {unknown}: choose from {', '.join(READERS)}")

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

    rowfold_rate, _, _ = timed_replay(manager, Balances())
    batch_rate, batch_seconds, events = timed_replay(manager, BalancesV2())
    frame_rate, _, _ = timed_replay(manager, FrameBalances())
    per_event_sample = min(args.per_event_sample, args.events)
    per_event_rate, _, _ = timed_replay(manager, PerEventBalances(), per_event_sample)
    baseline_rate = baseline_replay(url, manager.store, min(args.baseline_sample, args.events))

    readers: dict[str, dict[str, float]] = {}
    for kind in kinds:
        if kind == "own":
            replay_rate, read_rate = replay_rates(url, None, args.batch_size)
        else:
            log_url = beside(url, kind)
            reader, load, let_go = other_log(kind, log_url)
            load(BankSimulator(accounts=args.accounts, seed=11).stream(args.events))
            settle(log_url)
            replay_rate, read_rate = replay_rates(log_url, reader, args.batch_size)
            let_go()
        readers[kind] = {
            "replay_events_per_s": round(replay_rate),
            "read_events_per_s": round(read_rate),
        }
    writers = writer_cost(beside(url, "writers"), args.writes) if args.writes else {}
    appends = append_rate(beside(url, "appends"), 4, args.appends) if args.appends else {}
    peak = peak_rss_mb()  # before the partitions (in threads: n batches at once) and the sweep
    history_index = index_after(url, args.batch_size)
    partitions = partition_rates(manager, counts) if counts else {}
    batch_sizes = {}
    for size in sweep:
        manager.batch_size = size
        batch_sizes[str(size)] = {
            "rowfold_events_per_s": round(timed_replay(manager, Balances())[0]),
            "batch_events_per_s": round(timed_replay(manager, BalancesV2())[0]),
            "frame_events_per_s": round(timed_replay(manager, FrameBalances())[0]),
            "peak_rss_mb": peak_rss_mb(),
        }

    print(
        json.dumps(
            {
                "events": events,
                "rowfold_events_per_s": round(rowfold_rate),
                "batch_events_per_s": round(batch_rate),
                "frame_events_per_s": round(frame_rate),
                "per_event_events_per_s": round(per_event_rate),
                "per_event_sample": per_event_sample,
                "baseline_events_per_s": round(baseline_rate),
                "baseline_sample": min(args.baseline_sample, args.events),
                "rowfold_vs_baseline": round(rowfold_rate / baseline_rate, 1),
                "batch_vs_baseline": round(batch_rate / baseline_rate, 1),
                "frame_vs_baseline": round(frame_rate / baseline_rate, 1),
                "per_event_vs_baseline": round(per_event_rate / baseline_rate, 1),
                "engine_events_per_s": round(batch_rate),
                "engine_seconds": round(batch_seconds, 2),
                "speedup": round(batch_rate / baseline_rate, 1),
                "batch_size": args.batch_size,
                "peak_rss_mb": peak,
                "readers": readers,
                "writers": writers,
                "appends": appends,
                "history_index": history_index,
                "partitions": partitions,
                "batch_sizes": batch_sizes,
            }
        )
    )


if __name__ == "__main__":
    main()

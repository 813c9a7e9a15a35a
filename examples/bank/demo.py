"""The demo of a zero-downtime replay, on the bank example, under live traffic.

It seeds a history, builds the live read models, then runs the pipeline (the
``zero-downtime-replay`` Prefect flow, in Prefect's no-server mode) to rebuild
the balances projection into a new shape (BalancesV2) while a writer keeps
appending events and a reader keeps querying the live table, and promotes it. The summary says
whether any event was lost or applied twice, whether any read failed, and how
long readers stalled at the switch.

``source`` picks the event log: zdr's own ``zdr.events`` (``zdr``), an
``eventsourcing`` application's table (``eventsourcing``, read by
``zdr.readers.EventsourcingReader``), or a Laravel-era ``stored_events`` table
written with no lock (``stored-events``, read by a prepared ``TableReader``).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

import zdr
from zdr.config import (
    DATABASE_URL_ENV,
    embedded_url,
    resolve_url,
    to_libpq_url,
    to_sqlalchemy_url,
)
from zdr.examples.bank.domain import BankSimulator, fold_balances
from zdr.examples.bank.projectors import LIVE, BalancesV2
from zdr.readers import load as load_reader
from zdr.store import START, iter_all

REPLAY_KEY = "balances_v2"
DEMO_DATABASE = "zdr_demo"
DEMO_SCHEMAS = (
    "zdr",
    "bank_balances",
    "bank_history",
    "bank_stats",
    "bank_accounts",
    "bank_es",
    "bank_laravel",
)
#: ``--source``: the event log the demo writes and replays, and its reader's import path.
SOURCES = {
    "zdr": None,
    "eventsourcing": "zdr.examples.bank.eventsourced:reader",
    "stored-events": "zdr.examples.bank.stored_events:reader",
}


@dataclass
class DemoSummary:
    """What the demo measured; ``lost``, ``duplicated`` and ``read_errors`` must be 0."""

    events_expected: int = 0
    events_in_read_model: int = 0
    lost: int = 0
    duplicated: int = 0
    accounts_differing: int = 0
    appended_during_run: int = 0
    reads: int = 0
    read_errors: int = 0
    max_read_stall_ms: float = 0.0  # longest read overlapping the promotion
    max_read_ms_whole_run: float = 0.0
    promoted: bool = False
    source: str = "zdr"
    replay_rate: float = 0.0
    seconds: float = 0.0
    database: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DemoRefused(zdr.ZdrError):
    """Raised when the named database already holds data the demo would mix with."""


def demo_database(database_url: str | None, *, reset: bool) -> tuple[str, str]:
    """The URL the demo runs against, and a description of it.

    Without a URL (argument or ZDR_DATABASE_URL) the demo uses a database of its
    own in the embedded PostgreSQL, made afresh on every run. A URL the user
    names is used as it is, and refused if it already holds zdr data (unless
    ``reset``, which drops only the demo's schemas).
    """
    named = database_url or os.environ.get(DATABASE_URL_ENV)
    if not named:
        server = sa.create_engine(embedded_url(), isolation_level="AUTOCOMMIT")
        with server.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{DEMO_DATABASE}"')
        url = server.url.set(database=DEMO_DATABASE).render_as_string(hide_password=False)
        server.dispose()
        folder = sa.make_url(url).query.get("host", "")
        return url, f"embedded PostgreSQL (socket in {folder}), database {DEMO_DATABASE}"
    url = to_sqlalchemy_url(named)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        present = (
            conn.exec_driver_sql(
                "SELECT nspname FROM pg_namespace "
                "WHERE nspname = ANY(%s) OR nspname LIKE 'zdr\\_%%'",
                (list(DEMO_SCHEMAS),),
            )
            .scalars()
            .all()
        )
        if present and not reset:
            raise DemoRefused(
                f"the database already has zdr or bank schemas ({', '.join(sorted(present))}); "
                "the demo will not mix with them: pass --reset to drop exactly these schemas, "
                "or name an empty database"
            )
        for schema in present:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    engine.dispose()
    return url, sa.make_url(url).render_as_string(hide_password=True)


def _reader_process(url: str, stop: Any, results: Any) -> None:
    """Query the live balances in a loop, in a process of its own (no GIL shared with the
    replay), and send back how many reads ran, which failed, and how long each took."""
    query = "SELECT count(*), coalesce(sum(balance), 0) FROM bank_balances.balances"
    timings: list[tuple[float, float]] = []
    errors: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            began = time.time()
            try:
                accounts, _ = conn.execute(query).fetchone()  # type: ignore[misc]
                if not accounts:
                    errors.append("the live balances table was empty")
            except psycopg.Error as exc:
                errors.append(str(exc).splitlines()[0])
            timings.append((began, time.time() - began))
            time.sleep(0.001)
    results.send((timings, errors))


class DemoLog:
    """The demo's event log: its writer and its reader, by ``source``."""

    def __init__(self, source: str, url: str, engine: sa.Engine) -> None:
        self.source = source
        self.engine = engine
        self.reader_path = SOURCES[source]
        self.reader: zdr.EventReader | None = None
        if self.reader_path is not None:
            self.reader = load_reader(self.reader_path, database_url=url)
        if source == "eventsourcing":
            from zdr.examples.bank.eventsourced import BankLog

            self.writer: Any = BankLog(self.reader.app)  # type: ignore[attr-defined]
        elif source == "stored-events":
            from zdr.examples.bank.stored_events import StoredEventsLog

            self.writer = StoredEventsLog(engine)
        else:
            self.writer = zdr.EventStore(engine)

    def import_events(self, events: Iterable[tuple[str, dict[str, Any]]]) -> int:
        return int(self.writer.import_events(events))

    def events_so_far(self) -> int:
        """How many events the log holds."""
        reader = self.reader if self.reader is not None else self.writer
        with self.engine.connect() as conn:
            return int(reader.count_after(conn, START))

    def append(self, batch: list[tuple[str, dict[str, Any]]], *, hold_s: float = 0) -> None:
        """Append in one transaction, held open ``hold_s`` (an application's slow commit;
        an eventsourcing application holds its table lock meanwhile, so it commits as is)."""
        if self.source == "eventsourcing":
            self.writer.append(batch)
            return
        with self.engine.begin() as conn:
            if self.source == "stored-events":
                self.writer.append(batch, conn=conn)
            else:
                for stream, event in batch:
                    self.writer.append(stream, [event], conn=conn)
            if hold_s:
                time.sleep(hold_s)

    def close(self) -> None:
        app = getattr(self.reader, "app", None)
        if app is not None:
            app.close()


class Traffic:
    """Writers appending events and a live runner in threads, a reader in its own process."""

    def __init__(
        self, manager: zdr.ReplayManager, url: str, log: DemoLog, *, rate: int = 600
    ) -> None:
        self.manager = manager
        self.log = log
        self.rate = rate
        self.stop = threading.Event()
        self.appended = 0
        self.failures: list[BaseException] = []
        self.timings: list[tuple[float, float]] = []
        self.read_errors: list[str] = []
        context = multiprocessing.get_context("spawn")
        self._reader_stop = context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._reader = context.Process(
            target=_reader_process,
            args=(
                to_libpq_url(url),
                self._reader_stop,
                child_end,
            ),
            name="zdr-demo-reader",
        )
        self._threads = [
            threading.Thread(target=self._guard(self._write), name="zdr-demo-writer"),
            threading.Thread(target=self._guard(self._project), name="zdr-demo-live-runner"),
        ]

    def __enter__(self) -> Traffic:
        self._reader.start()  # before the threads: spawn a clean process
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)
        self._reader_stop.set()
        if self._results.poll(60):
            self.timings, self.read_errors = self._results.recv()
        self._reader.join(10)

    def longest_read_ms(self, window: tuple[float, float] | None = None) -> float:
        """The longest read, over the whole run or among reads overlapping ``window``."""
        durations = [
            took
            for began, took in self.timings
            if window is None or (began <= window[1] and began + took >= window[0])
        ]
        return round(max(durations, default=0.0) * 1000, 1)

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # reported in the summary
                self.failures.append(exc)
                self.stop.set()

        return run

    def _write(self) -> None:
        sim = BankSimulator(accounts=200, seed=2024, prefix="live")
        rng = random.Random(1)
        while not self.stop.is_set():
            batch = sim.events(rng.randint(1, 12))
            # some writers are slow to commit
            self.log.append(batch, hold_s=rng.uniform(0.005, 0.05) if rng.random() < 0.1 else 0)
            self.appended += len(batch)
            time.sleep(len(batch) / self.rate)

    def _project(self) -> None:
        self.manager.follow(stop=self.stop, poll_interval=0.05)


def run_demo(
    database_url: str | None = None,
    *,
    events: int = 100_000,
    reset: bool = False,
    lag_threshold: int = 2_000,
    ask: Callable[[str], tuple[bool, str, str]] | None = None,
    say: Callable[[str], None] = print,
    source: str = "zdr",
) -> DemoSummary:
    """Run the zero-downtime replay pipeline (the Prefect flow) under traffic and measure it.

    ``ask`` (given the replay key, returns approve, approver, comment) answers the
    approval the way a person would; without it the run is auto-approved.
    """
    from zdr.flows.approval import answer_when_asked
    from zdr.flows.zero_downtime_replay import zero_downtime_replay

    started = time.monotonic()
    if source not in SOURCES:
        raise zdr.ConfigurationError(f"unknown demo source {source!r}: one of {', '.join(SOURCES)}")
    summary = DemoSummary(source=source)
    url, summary.database = demo_database(database_url, reset=reset)
    say(f"database: {summary.database}")
    log = DemoLog(source, url, sa.create_engine(url))
    manager = zdr.ReplayManager(
        url, projectors=[cls() for cls in LIVE], batch_size=10_000, reader=log.reader
    )
    manager.setup()

    t0 = time.monotonic()
    log.import_events(BankSimulator(accounts=5_000, seed=7).stream(events))
    where = {"zdr": "zdr.events", "eventsourcing": "an eventsourcing application's table"}
    say(
        f"seeded {events:,} events into {where.get(source, 'a stored_events table')} "
        f"in {time.monotonic() - t0:.1f}s"
    )
    t0 = time.monotonic()
    manager.project_live()
    say(f"built the live read models in {time.monotonic() - t0:.1f}s")

    with Traffic(manager, url, log) as traffic:
        time.sleep(0.5)
        say(f"running the pipeline: rebuild 'balances' as {BalancesV2.import_path()}")
        flow_done = threading.Event()
        if ask is not None:
            threading.Thread(
                target=answer_when_asked,
                args=(REPLAY_KEY, manager.database_tag(), ask, flow_done),
                name="zdr-demo-approver",
                daemon=True,
            ).start()
        try:
            result = zero_downtime_replay(
                replay_key=REPLAY_KEY,
                projectors=[BalancesV2.import_path()],
                database_url=url,
                lag_threshold=lag_threshold,
                auto_approve=ask is None,
                approval_timeout_s=900,
                reader=log.reader_path,
            )
        finally:
            flow_done.set()
        summary.promoted = result.promoted
        if result.promoted:
            say(f"promoted: lock wait {result.lock_wait_ms:.1f} ms, swap {result.swap_ms:.1f} ms")
        else:
            say("not approved: the replay stays in dual write, live is unchanged")
        time.sleep(1.0)
    if traffic.failures:
        raise traffic.failures[0]

    manager.project_live()
    replay = manager.get_replay(REPLAY_KEY)
    assert replay is not None
    summary.replay_rate = round(replay.rate or 0.0)
    _count(manager, summary)
    summary.appended_during_run = traffic.appended
    summary.reads = len(traffic.timings)
    summary.read_errors = len(traffic.read_errors)
    summary.max_read_stall_ms = traffic.longest_read_ms(_promotion_window(replay))
    summary.max_read_ms_whole_run = traffic.longest_read_ms()
    summary.notes = traffic.read_errors[:5]
    summary.seconds = round(time.monotonic() - started, 1)
    log.close()
    log.engine.dispose()
    manager.engine.dispose()
    return summary


def seed_events(
    database_url: str | None, *, events: int, source: str = "zdr", seed: int = 7
) -> tuple[int, str]:
    """Append ``events`` bank events (5,000 accounts) to the log of ``source`` in the
    database named (else the embedded one's default database); return (count, where)."""
    if source not in SOURCES:
        raise zdr.ConfigurationError(f"unknown source {source!r}: one of {', '.join(SOURCES)}")
    url = resolve_url(database_url)
    engine = sa.create_engine(url)
    try:
        if source == "zdr":
            zdr.EventStore(engine).setup()
        log = DemoLog(source, url, engine)
        try:
            # Seeded again, the log gets new accounts: the same ones opened twice would
            # make the example's Accounts read model refuse them (one row per account).
            before = log.events_so_far()
            prefix = "acc" if before == 0 else f"acc-{before}"
            simulator = BankSimulator(accounts=5_000, seed=seed, prefix=prefix)
            count = log.import_events(simulator.stream(events))
        finally:
            log.close()
    finally:
        engine.dispose()
    where = {"zdr": "zdr.events", "eventsourcing": "bank_es.bank_events"}
    return count, where.get(source, "bank_laravel.stored_events")


def _promotion_window(replay: zdr.Replay) -> tuple[float, float] | None:
    """When the swap transaction ran (database clock = this machine's clock)."""
    for run in replay.runs:
        if run.kind == "promote" and run.finished_at is not None:
            return run.started_at.timestamp(), run.finished_at.timestamp()
    return None


def _count(manager: zdr.ReplayManager, summary: DemoSummary) -> None:
    """Compare the live balances with a from-scratch fold of the whole log."""
    expected = fold_balances(iter_all(manager.reader, manager.engine))
    with manager.engine.connect() as conn:
        rows = {
            row.account_id: row
            for row in conn.exec_driver_sql("SELECT * FROM bank_balances.balances")
        }
    summary.events_expected = sum(row["events"] for row in expected.values())
    summary.events_in_read_model = sum(row.events for row in rows.values())
    for account, want in expected.items():
        got = rows.get(account)
        if got is None:
            summary.lost += want["events"]
            summary.accounts_differing += 1
            continue
        summary.lost += max(want["events"] - got.events, 0)
        summary.duplicated += max(got.events - want["events"], 0)
        if (got.balance, got.events, got.closed) != (
            want["balance"],
            want["events"],
            want["closed"],
        ):
            summary.accounts_differing += 1
    summary.accounts_differing += len(set(rows) - set(expected))

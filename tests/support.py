"""Helpers shared by the tests: seeding the bank, reading read models, reference folds."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

import zdr
from zdr.examples.bank.domain import DEPOSITED, WITHDRAWN, BankSimulator, fold_balances
from zdr.examples.bank.projectors import Balances, BalancesV2, History
from zdr.store import iter_all

#: Roles belong to the server, not to a database: a test run names its roles with this
#: prefix (its processes share it through the environment) and drops only those, so
#: runs that share a server never touch each other's roles; each of a run's pytest-xdist
#: workers adds its name (gw0, gw1...), as it has a database of its own.
ROLE = os.environ.setdefault("ZDR_TEST_ROLE_PREFIX", f"zdr_test_{uuid.uuid4().hex[:6]}_") + (
    f"{os.environ['PYTEST_XDIST_WORKER']}_" if "PYTEST_XDIST_WORKER" in os.environ else ""
)


def append(store: zdr.EventStore, events: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
    """Append (stream_id, event) pairs in one transaction, a call per run of one stream."""
    from tests.logs import append_own

    return append_own(store, events, None)


def seed(
    store: zdr.EventStore, n: int, *, accounts: int = 100, seed: int = 7, prefix: str = "acc"
) -> BankSimulator:
    sim = BankSimulator(accounts=accounts, seed=seed, prefix=prefix)
    append(store, sim.events(n))
    return sim


def balances(engine: sa.Engine, schema: str = "bank_balances") -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT * FROM "{schema}".balances').mappings().all()
    return {row["account_id"]: dict(row) for row in rows}


def assert_balances_match_fold(
    engine: sa.Engine, reader: zdr.EventReader, schema: str = "bank_balances"
) -> None:
    """The balances table equals a from-scratch fold of every event, column for column."""
    expected = fold_balances(iter_all(reader, engine))
    actual = balances(engine, schema)
    assert set(actual) == set(expected), "accounts differ"
    for account, want in expected.items():
        got = actual[account]
        for column in ("owner", "balance", "events", "closed"):
            assert got[column] == want[column], (account, column, got, want)
        if "deposits" in got:
            assert got["deposits"] == want["deposits"], (account, got, want)


def assert_history_exactly_once(
    engine: sa.Engine, reader: zdr.EventReader, schema: str = "bank_history"
) -> None:
    """Every deposit and withdrawal is in the history once, and nothing else is."""
    want = [e.position for e in iter_all(reader, engine) if e.type in (DEPOSITED, WITHDRAWN)]
    with engine.connect() as conn:
        got = conn.exec_driver_sql(f'SELECT position FROM "{schema}".transactions').scalars().all()
    duplicated = [p for p, n in Counter(got).items() if n > 1]
    assert not duplicated, f"applied twice: {duplicated[:10]}"
    assert sorted(got) == sorted(want), f"missing: {sorted(set(want) - set(got))[:10]}"


@contextmanager
def following(manager: zdr.ReplayManager, poll_interval: float = 0.02) -> Iterator[None]:
    """A live runner tailing the log in a thread for the block (stopped and joined after)."""
    stop = threading.Event()
    live = threading.Thread(
        target=manager.follow, kwargs={"stop": stop, "poll_interval": poll_interval}
    )
    live.start()
    try:
        yield
    finally:
        stop.set()
        live.join(60)


def wait_for(
    predicate: Any, timeout: float = 30.0, interval: float = 0.02, message: Any = None
) -> Any:
    """The predicate's first true value; fails after ``timeout`` seconds, saying
    ``message()`` when given."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(message() if message else "condition not met in time")
        time.sleep(interval)
    return value


class SlowBalancesV2(BalancesV2):
    """BalancesV2 that sleeps after writing each batch when ZDR_TEST_SLOW_BATCH is set.

    Lets a test kill a replay while a batch's writes are done but not committed.
    """

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        super().handle_batch(events, conn)
        time.sleep(float(os.environ.get("ZDR_TEST_SLOW_BATCH", "0")))


class ExplodingBalancesV2(BalancesV2):
    """BalancesV2 whose per-event handling raises on the event at ZDR_TEST_EXPLODE_AT."""

    explode_at: int = 0

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        for event in events:
            if event.position == self.explode_at:
                raise RuntimeError("cannot project this event")
        super().handle_batch(events, conn)


class ExplodingAtSevenBalancesV2(ExplodingBalancesV2):
    """For another process, which cannot be told where: raises on event 7."""

    explode_at = 7


class BulkExplodingBalancesV2(BalancesV2):
    """BalancesV2 whose batch fails in one bulk statement (division by zero in SQL) when
    it holds the event at ``explode_at``: no loop over ``event`` names the culprit."""

    explode_at: int = 0

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        if self.explode_at in {e.position for e in events}:
            conn.exec_driver_sql("SELECT 1 / 0")
        super().handle_batch(events, conn)


def postgres_on(data_dir: Path) -> list[psutil.Process]:
    """The postgres processes whose data folder (``-D``) is ``data_dir``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (
            proc.info["name"] == "postgres"
            and "-D" in cmdline
            and cmdline[cmdline.index("-D") + 1] == str(data_dir)
        ):
            found.append(proc)
    return found


def wait_until_gone(data_dir: Path, seconds: float = 10) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := postgres_on(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class SlowHistory(History):
    """History that takes 0.1 ms per event: a read model whose build from the start of a
    long log takes seconds."""

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        super().handle_batch(events, conn)
        time.sleep(len(events) * 0.0001)


#: A table the next version of balances adds beside its own.
ledger = sa.Table(
    "ledger",
    sa.MetaData(schema="bank_balances"),
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("account_id", sa.Text, nullable=False),
)


class BalancesWithLedger(Balances):
    """Balances, plus a table of its own (a version that adds a table)."""

    tables = [*Balances.tables, ledger]

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        super().handle_batch(events, conn)
        rows = [{"position": e.position, "account_id": e.data["account_id"]} for e in events]
        conn.execute(ledger.insert(), rows)


def zdr_state(engine: sa.Engine) -> dict[str, Any]:
    """Everything an operation could change: zdr's records (replays, runs, samples,
    checkpoints, live projections), the schemas and their tables. Equal before and after
    an operation means it changed nothing."""
    queries = {
        "replays": "SELECT * FROM zdr.replays ORDER BY key",
        "runs": "SELECT * FROM zdr.runs ORDER BY id",
        "samples": "SELECT * FROM zdr.samples ORDER BY replay_key, at",
        "checkpoints": "SELECT * FROM zdr.checkpoints ORDER BY name",
        "projections": "SELECT * FROM zdr.projections ORDER BY name",
        "tables": """SELECT n.nspname, c.relname FROM pg_class c
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind IN ('r', 'v') AND (n.nspname LIKE 'zdr%%'
                        OR n.nspname LIKE 'bank\\_%%' OR n.nspname = 'public')
                     ORDER BY 1, 2""",
    }
    with engine.connect() as conn:
        state = {
            name: [tuple(row) for row in conn.exec_driver_sql(query)]
            for name, query in queries.items()
        }
        state["rows"] = [
            conn.exec_driver_sql(
                f'SELECT md5(string_agg(t::text, \',\' ORDER BY t::text)) FROM "{s}"."{t}" t'
            ).scalar()
            for s, t in state["tables"]
        ]
    return state

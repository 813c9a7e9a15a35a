"""What holds readers back is visible: the appending transaction that holds the safe
position, in `zdr horizon`, `zdr status` and the live runner's log; and what appends
nothing holds nothing."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

import zdr
from tests.support import balances, seed, wait_for
from tests.test_live_path import _opened

APP = "zdr-test-blocker"
BALANCES = "zdr.examples.bank.projectors:Balances"
#: The blocker's query, an append; reports show its first line.
QUERY = "INSERT INTO zdr.events (stream_id, type, data) VALUES ('held', 'Held', '{}')"
BLOCKER_SQL = f"{QUERY}\n  RETURNING txid -- held open by the test"
#: A write transaction that appends nothing.
WRITE_SQL = "SELECT pg_current_xact_id()::text::bigint"


@pytest.fixture()
def other_database(server_url: str) -> Iterator[tuple[str, str]]:
    """(name, url) of a database of its own on the test server, dropped afterwards."""
    name = f"zdr_test_other_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield name, url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture()
def this_database(database_url: str) -> tuple[str, str]:
    """(name, url) of the test database: where a write transaction holds the horizon."""
    return str(sa.make_url(database_url).database), database_url


@contextmanager
def write_transaction(
    url: str, application: str = APP, statements: tuple[str, ...] = (BLOCKER_SQL,)
) -> Iterator[tuple[sa.Connection, int, int]]:
    """An open transaction that appended an event (or ran ``statements``, the last one
    returning its transaction id), so has a transaction id: (connection, pid, txid).

    Rolled back and closed on the way out (unless the caller ended it already).
    """
    engine = sa.create_engine(
        url, poolclass=sa.NullPool, connect_args={"application_name": application}
    )
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            conn.commit()
            for statement in statements[:-1]:
                conn.exec_driver_sql(statement)
            txid = int(conn.exec_driver_sql(statements[-1]).scalar_one())
            try:
                yield conn, pid, txid
            finally:
                if conn.in_transaction():
                    conn.rollback()
    finally:
        engine.dispose()


def _quiet(manager: zdr.ReplayManager) -> None:
    """Wait out transactions the server runs by itself (autovacuum's ANALYZE, ...)."""
    wait_for(lambda: manager.horizon().holder is None, timeout=10)


def test_horizon_names_an_appending_transaction_open_in_this_database(manager, this_database):
    name, url = this_database
    _quiet(manager)
    with write_transaction(url) as (_, pid, txid):
        seed(manager.store, 20)  # committed after the blocker's transaction began
        wait_for(lambda: manager.horizon().held_longer_than(0.05))
        found = manager.horizon()
        with manager.engine.connect() as conn, conn.begin():
            readable = manager.store.read(conn, zdr.Cursor(0, 0), 100)
    holder = found.holder
    assert holder is not None and found.held
    assert (holder.kind, holder.pid, holder.database, holder.application_name) == (
        "session",
        pid,
        name,
        APP,
    )
    assert holder.txid == txid and found.position is not None
    assert holder.state == "idle in transaction" and holder.query == QUERY
    assert holder.user and holder.age_s is not None and 0.05 < holder.age_s < 60
    assert readable == [], "the events wait above the safe position"
    as_dict = found.to_dict()
    assert as_dict["held"] is True and as_dict["holder"]["pid"] == pid
    assert as_dict["holder"]["database"] == name and as_dict["holder"]["txid"] == txid
    assert as_dict["position"] == found.position


def test_nothing_open_means_no_holder(manager, this_database):
    _quiet(manager)
    with write_transaction(this_database[1]) as (conn, _, _):
        conn.rollback()
        found = manager.horizon()
    assert found.holder is None and not found.held
    assert found.to_dict()["holder"] is None
    assert not found.held_longer_than(0)


def test_a_replay_transaction_is_not_named_as_the_holder(manager, engine):
    """Runner transactions append nothing, so they never hold readers back."""
    _quiet(manager)
    with engine.connect() as runner:
        runner.begin()
        zdr.store.mark_runner_transaction(runner)
        runner.exec_driver_sql("SELECT pg_current_xact_id()")  # the newest id, still open
        found = manager.horizon()
        runner.rollback()
    assert found.holder is None, found.describe()


def test_zdr_horizon_prints_the_holder(cli, manager, this_database):
    name, url = this_database
    _quiet(manager)
    code, out, _ = cli("horizon")
    assert code == 0 and "nothing holds it back" in out
    with write_transaction(url) as (_, pid, txid):
        code, out, _ = cli("horizon", "--json")
        assert code == 0 and json.loads(out)["held"] is False, "nothing waits for it yet"
        seed(manager.store, 5)  # committed after it: these wait
        code, out, _ = cli("horizon", "--json")
        assert code == 0
        printed = json.loads(out)
        assert printed["holder"]["txid"] == txid and printed["held"] is True
        holder = printed["holder"]
        assert (holder["pid"], holder["database"], holder["application_name"]) == (pid, name, APP)
        assert holder["query"] == QUERY and holder["age_s"] >= 0
        code, out, _ = cli("horizon")
        assert code == 0 and f"held by pid {pid}" in out and name in out and APP in out


def test_zdr_status_shows_live_lag_and_warns_when_the_horizon_is_held(cli, manager, this_database):
    name, url = this_database
    seed(manager.store, 30)
    assert manager.live_lag() == dict.fromkeys(manager.live_lag(), 30) and manager.live_lag()
    _quiet(manager)
    code, out, err = cli("status")
    assert code == 0 and "live projection" in out and not _horizon_warnings(err)
    assert "no live runner is running" in err, "nothing applies the lag of 30: it says so"
    with write_transaction(url) as (_, pid, _):
        seed(manager.store, 5, prefix="waits")  # committed after it: these wait
        wait_for(lambda: manager.horizon().held_longer_than(0.05))
        code, out, err = cli("status")  # default threshold, 30 s: not yet
        assert code == 0 and not _horizon_warnings(err)
        code, out, err = cli("status", "--horizon-warning", "0.01")
        assert code == 0, err
        warning = _horizon_warnings(err)
        assert len(warning) == 1, err
        assert f"pid {pid}" in warning[0] and f"database {name}" in warning[0]
        assert APP in warning[0] and QUERY in warning[0]
    manager.project_live()
    assert set(manager.live_lag().values()) == {0}
    code, _, err = cli("status", "--horizon-warning", "-1")
    assert code == 2 and "'--horizon-warning': must be a number of seconds" in err
    assert len(err.strip().splitlines()) == 1


def _horizon_warnings(err: str) -> list[str]:
    return [
        line
        for line in err.splitlines()
        if line.startswith("warning:") and "no live runner" not in line
    ]


def test_the_live_runner_warns_once_per_blocker(manager, this_database, caplog):
    name, url = this_database
    manager.project_live()
    manager.settings = manager.settings.replace(horizon_warning_s=0.2)
    _quiet(manager)
    with (
        write_transaction(url, "blocker-one") as (first, first_pid, _),
        write_transaction(url, "blocker-two") as (_, second_pid, _),
    ):
        seed(manager.store, 10)  # committed after both blockers began
        # The first blocker ends halfway: the second then holds the horizon.
        ending = threading.Timer(0.8, first.rollback)
        ending.start()
        with caplog.at_level(logging.INFO, logger="zdr"):
            applied = manager.follow(poll_interval=0.02, max_seconds=1.6)
        ending.join()
    assert applied == 0
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "safe position" in r.getMessage()
    ]
    assert len(warnings) == 2, warnings
    assert f"pid {first_pid}" in warnings[0] and "blocker-one" in warnings[0]
    assert f"pid {second_pid}" in warnings[1] and "blocker-two" in warnings[1]
    for message in warnings:
        assert f"database {name}" in message and QUERY in message and "10 events" in message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zdr"):
        assert manager.follow(poll_interval=0.02, max_seconds=0.5) == 10
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_live_runner_is_quiet_below_the_threshold(manager, this_database, caplog):
    manager.project_live()
    _quiet(manager)
    with write_transaction(this_database[1]):
        seed(manager.store, 5)
        with caplog.at_level(logging.INFO, logger="zdr"):
            assert manager.follow(poll_interval=0.02, max_seconds=0.4) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_warning_threshold_is_a_validated_setting():
    assert zdr.Settings().horizon_warning_s == 30.0
    with pytest.raises(zdr.ConfigurationError, match="horizon_warning_s must be a number"):
        zdr.Settings(horizon_warning_s=-1)


def test_zdr_live_takes_the_warning_threshold(cli, manager, this_database, caplog):
    name, url = this_database
    _quiet(manager)
    with write_transaction(url) as (_, pid, _):
        seed(manager.store, 5)
        with caplog.at_level(logging.INFO, logger="zdr"):
            code, _, err = cli(
                "live",
                "-p",
                BALANCES,
                "--max-seconds",
                "1",
                "--horizon-warning",
                "0.2",
            )
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"pid {pid}" in warnings[0] and name in warnings[0]
    code, _, err = cli("live", "-p", BALANCES, "--horizon-warning", "-1")
    assert code == 2 and err.startswith("error: Invalid value for '--horizon-warning'")


def test_a_runner_waiting_in_another_database_does_not_end_this_ones_overtime(
    manager, other_database
):
    """Advisory locks are per database: a waiter there is not a successor here."""
    from zdr.examples.bank.projectors import LIVE
    from zdr.locks import live_runner

    there = zdr.ReplayManager(other_database[1], projectors=[cls() for cls in LIVE])
    there.setup()
    stop = threading.Event()
    with there.engine.connect() as holder, live_runner(holder):
        waiter = threading.Thread(
            target=there.follow, kwargs={"take_over": True, "stop": stop, "poll_interval": 0.02}
        )
        waiter.start()
        time.sleep(0.3)  # waiting to take over, over there
        started = time.monotonic()
        manager.follow(take_over=True, max_seconds=0.2, overtime_s=2.0, poll_interval=0.02)
        took = time.monotonic() - started
        stop.set()
        waiter.join(10)
    there.engine.dispose()
    assert took > 1.8, f"ended after {took:.2f}s: it handed over to a runner of another database"


@pytest.mark.parametrize(
    "blocker",
    ["another database's write", "an UPDATE here", "a DBA's index build", "a table lock"],
)
def test_a_transaction_that_appends_nothing_holds_no_live_read_model(
    manager, other_database, this_database, blocker
):
    """An ETL job's transaction in another database, an UPDATE of an application table,
    a DBA building an index on a replay's copy in an open transaction, a LOCK TABLE:
    each has a transaction id and none appends. The live runner passes them: an event
    appended meanwhile is live at once."""
    seed(manager.store, 20)
    manager.project_live()
    manager.create_replay("copy", ["zdr.examples.bank.projectors:BalancesV2"])
    with manager.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS public.app_rows (id int, n int)")
    _quiet(manager)
    url, first = {
        "another database's write": (other_database[1], None),
        "an UPDATE here": (this_database[1], "UPDATE public.app_rows SET n = 1"),
        "a DBA's index build": (
            this_database[1],
            "CREATE INDEX dba_index ON zdr_copy_1.balances (owner)",
        ),
        "a table lock": (this_database[1], "LOCK TABLE public.app_rows IN ACCESS EXCLUSIVE MODE"),
    }[blocker]
    statements = (WRITE_SQL,) if first is None else (first, WRITE_SQL)
    with write_transaction(url, statements=statements):
        manager.store.append("acc-now", [_opened("acc-now")])
        found = manager.horizon()
        applied = manager.project_live()
    assert found.holder is None, found.describe()
    assert applied == 1
    assert "acc-now" in balances(manager.engine)


#: How long each write transaction that appends nothing stays open (the issue's 30 s).
BLOCKED_FOR_S = 30.0


def test_live_latency_stays_under_a_second_while_writes_that_append_nothing_stay_open(
    manager, other_database, this_database, database_url
):
    """`zdr live` in its own process, the application appending all along, while for 30 s
    a write transaction is open in another database, an UPDATE with no event is open
    here, and a DBA builds an index in an open transaction: every append is live within
    a second (the earlier order held them all until the blockers ended)."""
    seed(manager.store, 20)
    manager.project_live()
    manager.create_replay("copy", ["zdr.examples.bank.projectors:BalancesV2"])
    with manager.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS public.app_rows (id int, n int)")
    live = subprocess.Popen(
        [sys.executable, "-m", "zdr.cli.main", "live", "-p", BALANCES],
        env={**os.environ, "ZDR_DATABASE_URL": database_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latencies: list[float] = []
    try:
        _probe(manager, "before")  # the runner is up and following
        with (
            write_transaction(other_database[1], statements=(WRITE_SQL,)),
            write_transaction(
                this_database[1], statements=("UPDATE public.app_rows SET n = 1", WRITE_SQL)
            ),
            write_transaction(
                this_database[1],
                statements=("CREATE INDEX dba_index ON zdr_copy_1.balances (owner)", WRITE_SQL),
            ),
        ):
            ends = time.monotonic() + BLOCKED_FOR_S
            n = 0
            while time.monotonic() < ends:
                n += 1
                latencies.append(_probe(manager, f"probe-{n}"))
                time.sleep(0.2)
    finally:
        live.terminate()
        _, err = live.communicate(timeout=30)
    assert len(latencies) > 50, err
    assert max(latencies) < 1.0, f"max {max(latencies):.2f}s, p50 {statistics.median(latencies)}"


def _probe(manager: zdr.ReplayManager, account: str, timeout_s: float = 20.0) -> float:
    """Seconds from an append's commit to its row in the live balances."""
    manager.store.append(account, [_opened(account)])
    appended = time.monotonic()
    with manager.engine.connect() as conn:
        while time.monotonic() - appended < timeout_s:
            if conn.exec_driver_sql(
                "SELECT 1 FROM bank_balances.balances WHERE account_id = %s", (account,)
            ).first():
                return time.monotonic() - appended
            conn.rollback()
            time.sleep(0.005)
    raise AssertionError(f"{account} did not reach the live balances in {timeout_s} s")

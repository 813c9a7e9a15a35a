"""The safe horizon is visible: who holds it, in `zdr horizon`, `zdr status` and the live
runner's log.

The horizon is cluster-wide, so the blocker here is a write transaction left open in
*another* database of the test server, created and dropped by these tests.
"""

from __future__ import annotations

import json
import logging
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
#: The blocker's query; reports show its first line.
QUERY = "SELECT pg_current_xact_id()::text::bigint"
BLOCKER_SQL = f"{QUERY}\n  AS txid -- held open by the test"


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
def write_transaction(url: str, application: str = APP) -> Iterator[tuple[sa.Connection, int, int]]:
    """An open transaction that has a transaction id: (connection, pid, txid).

    Rolled back and closed on the way out (unless the caller ended it already).
    """
    engine = sa.create_engine(
        url, poolclass=sa.NullPool, connect_args={"application_name": application}
    )
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            conn.commit()
            txid = int(conn.exec_driver_sql(BLOCKER_SQL).scalar_one())
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


def test_horizon_names_a_write_transaction_open_in_this_database(manager, this_database):
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
    assert holder.txid == txid == found.txid
    assert holder.state == "idle in transaction" and holder.query == QUERY
    assert holder.user and holder.age_s is not None and 0.05 < holder.age_s < 60
    assert readable == [], "the events wait above the horizon"
    as_dict = found.to_dict()
    assert as_dict["held"] is True and as_dict["holder"]["pid"] == pid
    assert as_dict["holder"]["database"] == name and as_dict["txid"] == txid


def test_nothing_open_means_no_holder(manager, this_database):
    _quiet(manager)
    with write_transaction(this_database[1]) as (conn, _, _):
        conn.rollback()
        found = manager.horizon()
    assert found.holder is None and not found.held
    assert found.to_dict()["holder"] is None
    assert not found.held_longer_than(0)


def test_a_replay_transaction_with_the_newest_id_is_not_named_as_the_holder(manager, engine):
    """The horizon passes zdr's runner transactions, so they never hold it."""
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
        assert code == 0
        printed = json.loads(out)
        assert printed["txid"] == txid and printed["held"] is True
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
        if r.levelno == logging.WARNING and "safe horizon" in r.getMessage()
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


def test_a_write_transaction_in_another_database_holds_no_live_read_model(manager, other_database):
    """An ETL job's long transaction in another database of the cluster cannot append to
    this log: the live runner passes it, an event appended here is live at once."""
    name, url = other_database
    seed(manager.store, 20)
    manager.project_live()
    _quiet(manager)
    with write_transaction(url):
        manager.store.append("acc-now", [_opened("acc-now")])
        found = manager.horizon()
        applied = manager.project_live()
    assert found.holder is None, found.describe()
    assert applied == 1
    assert "acc-now" in balances(manager.engine)

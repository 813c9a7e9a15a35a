"""Faults that pass are not projector bugs: lost connections, deadlocks and timeouts
leave a replay resumable and a live runner running."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

import zdr
import zdr.locks
import zdr.manager
from tests.support import assert_balances_match_fold, balances, seed, wait_for
from tests.test_live_path import _live_runner_pid, _opened
from zdr.errors import is_transient
from zdr.examples.bank.projectors import LIVE, Balances, BalancesV2


class KilledOnce(BalancesV2):
    """BalancesV2 whose connection is terminated during its first batch (as a DBA's
    pg_terminate_backend or a server restart would), after part of the batch's writes."""

    killed = False

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        super().handle_batch(events, conn)
        if not KilledOnce.killed:
            KilledOnce.killed = True
            conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")


def test_a_lost_connection_mid_batch_leaves_the_replay_resumable_not_failed(manager, engine):
    seed(manager.store, 2_000)
    manager.project_live()
    KilledOnce.killed = False
    manager.create_replay("v2", [KilledOnce()])
    with pytest.raises(zdr.ZdrError) as lost:
        manager.start_replay("v2")
    assert is_transient(lost.value)
    assert not isinstance(lost.value, zdr.ProjectorError), "a lost connection is no bug"
    assert "connection" in str(lost.value) and "run it again" in str(lost.value)
    replay = manager.get_replay("v2")
    assert replay.state is not zdr.ReplayState.FAILED
    manager.start_replay("v2")  # resumes from the checkpoint
    manager.enable_dual_write("v2")
    manager.project_live()
    assert_balances_match_fold(engine, manager.store, schema=replay.schemas["bank_balances"])


@pytest.mark.parametrize(
    "where",
    [
        (zdr.locks, "_held_here"),  # just after pg_try_advisory_lock granted it
        (zdr.locks, "_notice_a_lost_client"),  # while the lock's session is set up
        (zdr.manager, "_require_same_cluster"),  # before the first batch
    ],
    ids=lambda where: where[1],
)
def test_a_live_runner_whose_connection_is_killed_right_after_it_took_its_lock_goes_on(
    manager, engine, monkeypatch, where
):
    """Between taking the lock and its first batch (a DBA's kill, a failover): the runner
    holds the lock, visible to all as the live runner, so it reconnects as it would
    mid-batch, instead of dying."""
    seed(manager.store, 50)
    module, name = where
    checked = getattr(module, name)
    killed: list[int] = []

    def killed_once(conn: sa.Connection, *args: object) -> object:
        if not killed:
            killed.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return checked(conn, *args)

    monkeypatch.setattr(module, name, killed_once)
    monkeypatch.setattr(zdr.manager, "RECONNECT_FIRST_S", 0.05)
    assert manager.follow(max_seconds=3, poll_interval=0.02) == 50
    assert killed, "the connection was not killed"
    assert_balances_match_fold(engine, manager.store)


def test_the_live_runner_reconnects_when_its_connection_is_killed(manager, engine):
    seed(manager.store, 200)
    manager.project_live()
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            manager.follow(stop=stop, poll_interval=0.02)
        except BaseException as exc:  # what the test reports
            failures.append(exc)

    live = threading.Thread(target=run)
    live.start()
    try:
        wait_for(lambda: _live_runner_pid(engine) is not None)
        with engine.connect() as admin:
            admin.exec_driver_sql("SELECT pg_terminate_backend(%s)", (_live_runner_pid(engine),))
            admin.commit()
        time.sleep(0.3)
        manager.store.append("acc-after", [_opened("acc-after")])
        wait_for(lambda: "acc-after" in balances(engine) or bool(failures), timeout=10)
        assert not failures, f"the live runner died: {failures[0]!r}"
        assert "acc-after" in balances(engine)
    finally:
        stop.set()
        live.join(30)
    assert_balances_match_fold(engine, manager.store)


class TimesOutOnce(BalancesV2):
    """BalancesV2 whose first dual-write batch hits a statement timeout."""

    timed_out = False

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        if not TimesOutOnce.timed_out:
            TimesOutOnce.timed_out = True
            conn.exec_driver_sql("SET LOCAL statement_timeout = '10ms'")
            conn.exec_driver_sql("SELECT pg_sleep(1)")
        super().handle_batch(events, conn)


def test_a_timeout_in_dual_write_keeps_the_replay_dual_writing(engine, caplog):
    manager = zdr.ReplayManager(
        engine, projectors=[Balances()], settings=zdr.Settings(dual_write_retry_s=0.01)
    )
    manager.setup()
    seed(manager.store, 300)
    manager.project_live()
    TimesOutOnce.timed_out = True  # not while it replays
    manager.create_replay("v2", [TimesOutOnce()])
    manager.start_replay("v2")
    manager.enable_dual_write("v2")
    TimesOutOnce.timed_out = False
    manager.store.append("acc-late", [_opened("acc-late")])
    with caplog.at_level("WARNING", logger="zdr"):
        manager.project_live()
        time.sleep(0.05)
        manager.project_live()
    assert TimesOutOnce.timed_out
    assert "stays behind" in caplog.text
    assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING
    assert manager.get_replay_lag("v2") == 0


def _move_to_another_cluster(engine, log_table: str = "zdr.events", txid: str = "txid") -> None:
    """What a dump and restore into a younger cluster leaves: the log (and checkpoints of
    the earlier order) stamped with transaction ids this cluster has not reached, another
    cluster's name."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {log_table} SET {txid} = {txid} + 1000000000")
        conn.exec_driver_sql("UPDATE zdr.checkpoints SET txid = txid + 1000000000 WHERE txid <> 0")
        conn.exec_driver_sql("UPDATE zdr.cluster SET system_identifier = '42'")


def test_a_log_read_by_position_runs_on_after_a_move_to_another_cluster(log_manager, log, engine):
    """Positions mean the same in any cluster, for every kind of log: nothing refuses,
    nothing is lost, and rebase only records the new cluster."""
    manager = log_manager
    log.seed(300)
    manager.project_live()
    stamps = getattr(log.reader, "stamps", None)
    if log.kind == "own":  # a restore keeps the stamps, above this cluster's counter
        _move_to_another_cluster(engine, stamps.table, stamps.txid_column)
    with engine.begin() as conn:  # a dump and restore elsewhere: another cluster's name
        conn.exec_driver_sql("UPDATE zdr.cluster SET system_identifier = '42'")
    log.append([("acc-moved", _opened("acc-moved"))])
    manager.project_live()
    assert "acc-moved" in balances(engine)
    rebased = manager.rebase()
    assert (rebased.recorded, rebased.events) == ("42", 0)
    assert manager.rebase().recorded == rebased.current
    assert_balances_match_fold(engine, log.reader)


counted_metadata = sa.MetaData()
counted = sa.Table(
    "opened",
    counted_metadata,
    sa.Column("n", sa.BigInteger, sa.Sequence("opened_n", schema="bank_counted"), primary_key=True),
    sa.Column("account_id", sa.Text, nullable=False),
    schema="bank_counted",
)


class Counted(zdr.Projector):
    """Numbers each opened account from a sequence of its own."""

    name = "counted"
    tables = [counted]
    event_types = frozenset({"AccountOpened"})

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        conn.execute(counted.insert(), [{"account_id": e.data["account_id"]} for e in events])


def test_a_restarted_replay_restarts_the_projectors_own_sequences(engine):
    manager = zdr.ReplayManager(engine, projectors=[Counted()])
    manager.setup()
    seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("again", ["counted"])
    manager.start_replay("again")
    manager.start_replay("again", restart=True)
    numbers = "SELECT min(n), max(n), count(*) FROM {}.opened"
    with engine.connect() as conn:
        live = conn.exec_driver_sql(numbers.format("bank_counted")).one()
        again = conn.exec_driver_sql(numbers.format("zdr_again_1")).one()
    assert again == live  # numbered from 1 again, as the live copy was


class CurrvalBug(BalancesV2):
    """A projector bug the database reports as an OperationalError (SQLSTATE 55000)."""

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        conn.exec_driver_sql("CREATE TEMPORARY SEQUENCE IF NOT EXISTS never_used")
        conn.exec_driver_sql("SELECT currval('never_used')")


def test_a_projector_bug_of_the_operational_kind_is_no_transient_error(manager, engine):
    seed(manager.store, 100)
    manager.project_live()
    manager.create_replay("bug", [CurrvalBug()])
    with pytest.raises(zdr.ProjectorError, match="currval") as failed:
        manager.start_replay("bug")
    assert not is_transient(failed.value)
    assert manager.get_replay("bug").state is zdr.ReplayState.FAILED


def test_the_live_runner_ends_its_own_old_session_that_still_holds_the_lock(engine):
    """Cut off by the network, the old session holds the lock until the server notices;
    the runner that reconnects ends it instead of ending itself."""
    from zdr.locks import end_session, live_runner

    with engine.connect() as ghost, live_runner(ghost):
        pid = ghost.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        ghost.commit()
        with engine.connect() as conn:
            assert not end_session(conn, pid + 1_000_000)  # not the holder: nothing
            assert end_session(conn, pid)
            with live_runner(conn):  # the lock is free again
                pass


class SlowPerEvent(BalancesV2):
    """BalancesV2 with 0.4 ms of Python per event before it writes (a slow projector's
    fold): the batch's transaction is idle meanwhile."""

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        time.sleep(0.0004 * len(events))
        super().handle_batch(events, conn)


def test_a_slow_projector_under_an_idle_transaction_timeout_replays_in_batches_that_fit(
    manager, engine, database_url
):
    """A DBA's idle_in_transaction_session_timeout (1 s here) would end a 6,000-event
    batch of this projector (2.4 s idle) every time: zdr measures a short first batch
    and sizes the next ones to half the timeout."""
    seed(manager.store, 6_000)
    manager.project_live()
    timed_url = sa.make_url(database_url).update_query_dict(
        {"options": "-c idle_in_transaction_session_timeout=1000"}
    )
    timed = zdr.ReplayManager(
        timed_url.render_as_string(hide_password=False),
        projectors=[cls() for cls in LIVE],
        batch_size=50_000,
    )
    timed.create_replay("v2", [SlowPerEvent()])
    replay = timed.start_replay("v2")
    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert replay.events_applied == 6_000
    timed.enable_dual_write("v2")
    timed.engine.dispose()
    assert_balances_match_fold(engine, manager.store, schema=replay.schemas["bank_balances"])


def test_a_live_runner_waiting_to_take_over_whose_connection_is_killed_waits_again(manager, engine):
    """A standby (`zdr live --take-over`) killed while it waits (a DBA, a failover) goes
    on waiting on a new connection and takes over when the running one ends."""
    seed(manager.store, 100)
    manager.project_live()
    stop_first = threading.Event()
    failures: list[BaseException] = []

    def run(**kwargs) -> None:
        try:
            manager.follow(poll_interval=0.02, **kwargs)
        except BaseException as exc:  # what the test reports
            failures.append(exc)

    first = threading.Thread(target=run, kwargs={"stop": stop_first})
    first.start()
    wait_for(lambda: _live_runner_pid(engine) is not None)
    stop_standby = threading.Event()
    standby = threading.Thread(target=run, kwargs={"stop": stop_standby, "take_over": True})
    standby.start()
    waiting = (
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' "
        "AND granted AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())"
    )
    try:
        with engine.connect() as admin:
            pid = wait_for(lambda: admin.exec_driver_sql(waiting).scalar(), timeout=10)
            admin.exec_driver_sql("SELECT pg_terminate_backend(%s)", (pid,))
            admin.commit()
        time.sleep(0.5)
        stop_first.set()
        first.join(30)
        manager.store.append("acc-standby", [_opened("acc-standby")])
        wait_for(lambda: "acc-standby" in balances(engine) or bool(failures), timeout=15)
        assert not failures, f"a runner died: {failures[0]!r}"
        assert "acc-standby" in balances(engine)
    finally:
        stop_first.set()
        stop_standby.set()
        first.join(30)
        standby.join(30)
    assert_balances_match_fold(engine, manager.store)

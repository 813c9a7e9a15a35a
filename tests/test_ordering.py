"""No skipped events, exactly once: late commits, concurrent appenders, the dual-write switch."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

import zdr
from tests.support import (
    ROLE,
    assert_balances_match_fold,
    assert_history_exactly_once,
    balances,
    seed,
)
from zdr.examples.bank.domain import BankSimulator
from zdr.examples.bank.projectors import BalancesV2
from zdr.runner import LiveRunner, apply_batch


@pytest.mark.parametrize("log", ["own", "table"], indirect=True)
def test_an_event_committed_late_below_positions_already_read_is_still_delivered(
    log_manager, log, engine
):
    manager = log_manager
    log.seed(10)
    with engine.connect() as slow:
        slow_tx = slow.begin()
        [late] = log.append([_opened("acc-late")], conn=slow)
        # A later position commits first and a reader could take it...
        [early] = log.append([_opened("acc-early")])
        assert early > late
        manager.project_live()
        with engine.connect() as conn:
            assert not conn.exec_driver_sql(
                "SELECT 1 FROM bank_balances.balances WHERE account_id = 'acc-early'"
            ).first(), "nothing at or after an open transaction is read"
        slow_tx.commit()
    manager.project_live()
    assert_balances_match_fold(engine, log.reader)


@pytest.mark.parametrize("log", ["own", "table"], indirect=True)
def test_the_reader_orders_by_position_not_by_which_transaction_wrote_first(log, engine):
    with engine.connect() as slow:
        slow_tx = slow.begin()
        slow.exec_driver_sql("SELECT pg_current_xact_id()")  # takes its xid now
        [a] = log.append([_opened("a")])
        [b] = log.append([_opened("b")], conn=slow)
        slow_tx.commit()
    events = log.events()
    assert [e.position for e in events] == [a, b], "a was appended (and committed) first"
    assert all(e.cursor == (0, e.position) for e in events)


def test_appenders_with_open_transactions_during_replay_and_dual_write_lose_nothing(
    log_manager, log, engine
):
    """Against each kind of log: zdr's own, a prepared table whose writers commit out of
    order, an eventsourcing application's (its writers serialize on a table lock)."""
    manager = log_manager
    log.seed(2_000, accounts=200)
    manager.project_live()
    stop = threading.Event()
    errors: list[BaseException] = []

    def appender(seed_: int) -> None:
        rng = random.Random(seed_)
        sim = BankSimulator(accounts=50, seed=seed_, prefix=f"w{seed_}")
        try:
            while not stop.is_set():
                batch = sim.events(rng.randint(1, 20))
                with engine.begin() as conn:
                    for pair in batch:  # one statement each, the transaction held open
                        log.append([pair], conn=conn)
                    if rng.random() < 0.2:
                        time.sleep(rng.uniform(0.01, 0.08))  # held open while others commit
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def live_runner() -> None:
        try:
            manager.follow(stop=stop, poll_interval=0.01)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=live_runner))
    for t in threads:
        t.start()
    try:
        manager.create_replay("busy", [BalancesV2(), "history"])
        manager.start_replay("busy", batch_size=300)
        for _ in range(20):
            manager.start_replay("busy", batch_size=300)
            if manager.get_replay_lag("busy") < 200:
                break
        manager.start_projecting_to_replay("busy", lag_threshold=10_000)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    manager.project_live()
    assert manager.get_replay_lag("busy") == 0

    assert_balances_match_fold(engine, log.reader)
    assert_balances_match_fold(engine, log.reader, "zdr_busy_1")
    assert_history_exactly_once(engine, log.reader)
    assert_history_exactly_once(engine, log.reader, "zdr_busy_2")


def test_no_event_falls_between_caught_up_and_dual_write_on(log_manager, log, engine):
    """The race the PHP original has a TODO for: events between the last replay
    batch and the switch go to live only; the replay must still get them."""
    manager = log_manager
    sim = log.seed(1_000)
    manager.project_live()
    manager.create_replay("switch", [BalancesV2(), "history"])
    manager.start_replay("switch")
    log.append(sim.events(150))
    assert manager.project_live() == 150  # live only: dual write is not on yet

    manager.start_projecting_to_replay("switch", lag_threshold=200)
    log.append(sim.events(50))
    manager.project_live()

    assert_balances_match_fold(engine, log.reader, "zdr_switch_1")
    assert_history_exactly_once(engine, log.reader, "zdr_switch_2")
    manager.put_replay_live("switch")
    assert_balances_match_fold(engine, log.reader)


def test_a_stale_runner_cannot_apply_a_batch_twice(manager, engine):
    """The checkpoint claim: a runner whose cursor is behind the stored one is refused."""
    seed(manager.store, 100)
    manager.project_live()
    with engine.connect() as conn:
        runner = LiveRunner(manager.reader, manager.registry)
        [target] = [t for t in runner.targets(conn) if "history" in t.where]
        events = manager.store.read(conn, zdr.store.START, 50)
        target.cursor = zdr.store.START  # what a second, stale runner would believe
        conn.rollback()
        tx = conn.begin()
        try:
            apply_batch(conn, target, events)
            raise AssertionError("a stale claim was accepted")
        except zdr.RunnerBusy:
            tx.rollback()
    assert_history_exactly_once(engine, manager.store)


def _opened(account: str) -> tuple[str, dict]:
    return account, {"type": "AccountOpened", "data": {"account_id": account, "owner": "zed"}}


@pytest.mark.parametrize("log", ["own", "table"], indirect=True)
def test_a_replay_transaction_in_progress_never_lets_the_horizon_pass_an_appender(
    log_manager, log, engine
):
    """The horizon passes zdr's runner transactions, and only those: an application
    transaction that is still open keeps every later event back, runner or not."""
    manager = log_manager
    log.seed(10)
    manager.project_live()
    with engine.connect() as app, engine.connect() as runner:
        app_tx = app.begin()
        [late] = log.append([_opened("acc-late")], conn=app)
        runner_tx = runner.begin()
        zdr.store.mark_runner_transaction(runner)
        runner.exec_driver_sql("SELECT pg_current_xact_id()")  # a runner's xid, after app's
        [early] = log.append([_opened("acc-early")])
        manager.project_live()
        assert "acc-early" not in balances(engine), "read past an open appender"
        app_tx.commit()
        manager.project_live()  # the runner is still open: the horizon passes it
        assert {"acc-late", "acc-early"} <= set(balances(engine))
        runner_tx.rollback()
    assert early > late
    assert_balances_match_fold(engine, log.reader)
    assert_history_exactly_once(engine, log.reader)


def test_an_appender_that_takes_the_runners_name_after_appending_still_holds_the_horizon(
    manager, engine
):
    """The name alone proves nothing: an append holds its lock on the event table to the
    end of its transaction, and such a session is never passed, whatever its name."""
    seed(manager.store, 10)
    manager.project_live()
    with engine.connect() as app:
        app_tx = app.begin()
        manager.store.append("acc-late", [_opened("acc-late")[1]], conn=app)
        app.exec_driver_sql(f"SET LOCAL application_name = '{zdr.store.RUNNER_APPLICATION_NAME}'")
        manager.store.append("acc-early", [_opened("acc-early")[1]])
        manager.project_live()
        assert "acc-early" not in balances(engine), "read past an open appender"
        app_tx.commit()
    manager.project_live()
    assert {"acc-late", "acc-early"} <= set(balances(engine))
    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)


def test_a_session_that_takes_the_runners_name_and_drops_it_to_append_still_holds_the_horizon(
    manager, engine
):
    """The name can be changed back within a transaction; the runner's mark is a
    transaction-level lock, which cannot: without it, no session is passed."""
    seed(manager.store, 10)
    manager.project_live()
    with engine.connect() as app:
        app_tx = app.begin()
        name = zdr.store.RUNNER_APPLICATION_NAME
        app.exec_driver_sql(f"SET LOCAL application_name = '{name}'")
        app.exec_driver_sql("SELECT pg_current_xact_id()")  # an id, early
        manager.store.append("acc-early", [_opened("acc-early")[1]])
        manager.project_live()
        app.exec_driver_sql("SET LOCAL application_name = 'app'")
        manager.store.append("acc-late", [_opened("acc-late")[1]], conn=app)
        app_tx.commit()
    manager.project_live()
    assert {"acc-late", "acc-early"} <= set(balances(engine))
    assert_history_exactly_once(engine, manager.store)


@pytest.mark.parametrize("log", ["own", "table"], indirect=True)
def test_a_runner_transaction_cannot_append_even_after_changing_its_name(log, engine):
    with engine.connect() as runner, runner.begin():
        zdr.store.mark_runner_transaction(runner)
        runner.exec_driver_sql("SET LOCAL application_name = 'app'")
        with pytest.raises(psycopg.Error, match="cannot be appended from a replay"):
            log.append([_opened("acc-x")], conn=runner)


def _an_open_appender_holds_readers_back(
    manager: zdr.ReplayManager, engine, *first: str, late: str | None = None
) -> None:
    """An application transaction runs ``first``, appends acc-late (``late``: by that
    statement) and stays open while acc-early commits after it: live shows acc-early only
    once that transaction has committed, and then both, once each."""
    seed(manager.store, 10)
    manager.project_live()
    with engine.connect() as app:
        app_tx = app.begin()
        for statement in first:
            app.exec_driver_sql(statement)
        if late is None:
            manager.store.append("acc-late", [_opened("acc-late")[1]], conn=app)
        else:
            app.exec_driver_sql(late)
        manager.store.append("acc-early", [_opened("acc-early")[1]])
        manager.project_live()
        assert "acc-early" not in balances(engine), "read past an open appender"
        app_tx.commit()
    manager.project_live()
    assert {"acc-late", "acc-early"} <= set(balances(engine))
    assert_history_exactly_once(engine, manager.store)


def test_an_append_under_the_replica_replication_role_still_holds_readers_back(manager, engine):
    """Bulk loaders set session_replication_role = replica, which silences ordinary
    triggers: the log's trigger fires always, so such an append announces itself too."""
    _an_open_appender_holds_readers_back(
        manager, engine, "SET LOCAL session_replication_role = replica"
    )


def test_a_role_that_may_only_insert_appends_and_holds_readers_back(manager, engine):
    """An identity column draws for a role without any privilege on its sequence; the
    announcement reads that sequence for it (a function of the log's owner's)."""
    role = f"{ROLE}inserter"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'CREATE ROLE "{role}"; GRANT USAGE ON SCHEMA zdr TO "{role}"; '
            f'GRANT INSERT ON zdr.events TO "{role}"'
        )
    try:
        _an_open_appender_holds_readers_back(
            manager,
            engine,
            f'SET LOCAL ROLE "{role}"',
            late="INSERT INTO zdr.events (stream_id, type, data) VALUES ('acc-late', "
            """'AccountOpened', '{"account_id": "acc-late", "owner": "app"}')""",
        )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


def test_an_application_lock_keyed_by_the_log_table_announces_nothing(manager, engine):
    """A lock of the (int, int) form keyed by the event table's oid, a common pattern, is
    not mistaken for a part of an announcement (which would lift the bound)."""
    _an_open_appender_holds_readers_back(
        manager, engine, "SELECT pg_advisory_xact_lock('zdr.events'::regclass::oid::bigint::int, 7)"
    )


def test_a_replay_run_ends_while_the_application_appends_faster_than_it_replays(manager, engine):
    """A run replays up to where the log stood when it started, as before: it ends."""
    seed(manager.store, 100)
    manager.create_replay("slow", [BalancesV2()])
    stop = threading.Event()

    def append() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            manager.store.append(f"acc-{n}", [_opened(f"acc-{n}")[1]])

    appender = threading.Thread(target=append)
    appender.start()
    run = threading.Thread(target=manager.start_replay, args=("slow",), kwargs={"batch_size": 1})
    try:
        time.sleep(0.3)
        run.start()
        run.join(60)
        assert not run.is_alive(), "the run chased the application's appends"
    finally:
        stop.set()
        appender.join(10)
        run.join(60)
    assert manager.get_replay("slow").state is zdr.ReplayState.CAUGHT_UP

"""Dual write degrades, never blocks: a replay's copy never holds the live read models back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

import pytest
import sqlalchemy as sa

import zdr
from tests.support import (
    append,
    assert_balances_match_fold,
    assert_history_exactly_once,
    seed,
    wait_for,
)
from zdr.examples.bank.domain import BankSimulator
from zdr.examples.bank.projectors import Balances, BalancesV2, History
from zdr.runner import LiveRunner


def _dual_writing(manager: zdr.ReplayManager, key: str, projectors: list) -> BankSimulator:
    sim = seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay(key, projectors)
    manager.start_replay(key)
    manager.start_projecting_to_replay(key)
    return sim


def _opened(account: str) -> dict:
    return {"type": "AccountOpened", "data": {"account_id": account, "owner": "zed"}}


def _visible_after(manager: zdr.ReplayManager, engine: sa.Engine, account: str) -> float:
    """Append an event; seconds until its row is in the live read model."""
    started = time.monotonic()
    manager.store.append(account, [_opened(account)])
    with engine.connect() as conn:
        while not conn.exec_driver_sql(
            "SELECT 1 FROM bank_balances.balances WHERE account_id = %s", (account,)
        ).first():
            conn.rollback()
            if time.monotonic() - started > 15:
                raise AssertionError(f"{account} never reached the live read model")
            time.sleep(0.005)
    return time.monotonic() - started


def test_a_locked_replay_copy_does_not_delay_live_and_catches_up_exactly_once(
    manager, engine, caplog
):
    sim = _dual_writing(manager, "locked", [BalancesV2(), "history"])
    stop = threading.Event()
    errors: list[BaseException] = []

    def live_runner() -> None:
        try:
            manager.follow(stop=stop, poll_interval=0.01)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    runner = threading.Thread(target=live_runner)
    runner.start()
    latencies: list[float] = []
    try:
        assert _visible_after(manager, engine, "warm-up") < 1.0
        locked = threading.Event()

        def dba() -> None:
            # A DBA blocks writes to the replay's copy for 4 s (EXCLUSIVE blocks writers, not
            # readers; ACCESS EXCLUSIVE would also take a transaction id and hold the horizon).
            with engine.connect() as conn:
                conn.exec_driver_sql("LOCK TABLE zdr_locked_1.balances IN EXCLUSIVE MODE")
                locked.set()
                time.sleep(4.0)
                conn.rollback()

        holder = threading.Thread(target=dba)
        with caplog.at_level(logging.WARNING, logger="zdr"):
            holder.start()
            locked.wait(10)
            i = 0
            while holder.is_alive():
                append(manager.store, sim.events(20))
                latencies.append(_visible_after(manager, engine, f"locked-{i}"))
                i += 1
                if holder.is_alive() and i > 3:
                    assert manager.get_replay_lag("locked") > 0, "the replay stayed behind"
                time.sleep(0.1)
            holder.join()
            assert max(latencies) < 1.0, f"live waited for the replay's copy: {latencies}"
            assert manager.get_replay("locked").state is zdr.ReplayState.DUAL_WRITING
        assert any("locked" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        append(manager.store, sim.events(50))
        wait_for(lambda: manager.get_replay_lag("locked") == 0, timeout=20)
    finally:
        stop.set()
        runner.join(30)
    assert not errors, errors

    replay = manager.get_replay("locked")
    assert replay.state is zdr.ReplayState.DUAL_WRITING
    assert_balances_match_fold(engine, manager.store)
    assert_balances_match_fold(engine, manager.store, "zdr_locked_1")
    assert_history_exactly_once(engine, manager.store)
    assert_history_exactly_once(engine, manager.store, "zdr_locked_2")
    manager.put_replay_live("locked")
    assert_balances_match_fold(engine, manager.store)


class Watching(BalancesV2):
    """BalancesV2 that notes the lock_timeout its writes run under."""

    seen: ClassVar[list[str]] = []

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        self.seen.append(conn.exec_driver_sql("SHOW lock_timeout").scalar_one())
        super().handle_batch(events, conn)


@pytest.mark.parametrize("locked", [False, True], ids=["written", "stayed_behind"])
def test_the_short_lock_timeout_ends_with_the_replay_s_savepoint(manager, engine, locked):
    """SET LOCAL in a savepoint outlives its RELEASE: the live batch gets its setting back."""
    sim = _dual_writing(manager, "short", [Watching()])
    append(manager.store, sim.events(10))
    runner = LiveRunner(manager.reader, manager.registry)
    Watching.seen.clear()
    with engine.connect() as dba, engine.connect() as conn:
        if locked:
            dba.exec_driver_sql("LOCK TABLE zdr_short_1.balances IN EXCLUSIVE MODE")
        with conn.begin():
            conn.exec_driver_sql("SET LOCAL lock_timeout = '7s'")
            [target] = [t for t in runner.targets(conn) if t.replay_key == "short"]
            events = manager.store.read(conn, target.cursor, 100)
            runner._side_write(conn, target, events, shared=False, own_setting="7s")
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "7s"
        dba.rollback()
    assert Watching.seen == ["100ms"]
    assert (manager.get_replay_lag("short") > 0) is locked


def test_an_unloadable_replay_projector_marks_that_replay_failed_and_live_goes_on(manager, engine):
    _dual_writing(manager, "lost", [BalancesV2()])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """UPDATE zdr.replays SET projectors = '{"balances": "__main__:BalancesV2"}'
               WHERE key = 'lost'"""
        )
    seed(manager.store, 30, seed=5, prefix="more")

    assert manager.project_live() == 30

    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)
    replay = manager.get_replay("lost")
    assert replay.state is zdr.ReplayState.FAILED
    assert "__main__:BalancesV2" in replay.error
    assert replay.position == 1_000
    seed(manager.store, 10, seed=6, prefix="after")
    assert manager.project_live() == 10
    assert_balances_match_fold(engine, manager.store)


class MutatingBalances(Balances):
    """A live projector that changes its input after using it (it should not, but may)."""

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        super().handle_batch(events, conn)
        for event in events:
            if "amount" in event.data:
                event.data["amount"] = 0
            event.data["account_id"] = "scribbled"


def test_a_live_projector_that_mutates_event_data_does_not_change_the_replay(engine):
    manager = zdr.ReplayManager(engine, projectors=[MutatingBalances(), History()])
    manager.setup()
    sim = seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("clean", [BalancesV2(), "history"])
    manager.start_replay("clean")
    manager.start_projecting_to_replay("clean")
    append(manager.store, sim.events(300))

    assert manager.project_live() == 300

    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)
    assert_balances_match_fold(engine, manager.store, "zdr_clean_1")
    assert_history_exactly_once(engine, manager.store, "zdr_clean_2")
    with engine.connect() as conn:
        assert not conn.exec_driver_sql(
            "SELECT 1 FROM zdr_clean_2.transactions WHERE account_id = 'scribbled'"
        ).first()

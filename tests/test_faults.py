"""Faults that pass are not projector bugs: lost connections, deadlocks and timeouts
leave a replay resumable and a live runner running."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

import zdr
from tests.support import assert_balances_match_fold, balances, seed, wait_for
from tests.test_live_path import _live_runner_pid, _opened
from zdr.errors import is_transient
from zdr.examples.bank.projectors import Balances, BalancesV2


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

"""Live never waits: nothing zdr runs makes the application's appends wait."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest

import zdr
from tests.support import (
    ExplodingBalancesV2,
    SlowBalancesV2,
    SlowHistory,
    assert_balances_match_fold,
    assert_history_exactly_once,
    balances,
    following,
    seed,
    wait_for,
)
from zdr.examples.bank.domain import BankSimulator
from zdr.examples.bank.projectors import LIVE, Balances, BalancesV2, History
from zdr.locks import ZDR_LOCK_SPACE, live_runner
from zdr.names import LIVE_RUNNER_LOCK


def _timed(work) -> tuple[threading.Thread, dict[str, float]]:
    took: dict[str, float] = {}

    def run() -> None:
        started = time.monotonic()
        work()
        took["s"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def test_setup_with_nothing_to_create_never_makes_appends_wait(manager, engine):
    """An application transaction that appended stays open while `zdr live` (setup) starts."""
    manager.store.append("s", [{"type": "Ok", "data": {}}])
    again = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE])
    with engine.connect() as app:
        app.begin()
        manager.store.append("app", [{"type": "Ok", "data": {}}], conn=app)  # left open
        setup, setup_took = _timed(again.setup)
        setup.join(2)
        append, append_took = _timed(
            lambda: manager.store.append("b", [{"type": "Ok", "data": {}}])
        )
        append.join(2)
        app.rollback()  # the application commits at last; whatever waited goes on
    setup.join(10)
    append.join(10)
    assert setup_took.get("s", 99) < 1.0, "setup waited for the application's transaction"
    assert append_took.get("s", 99) < 1.0, "an append waited behind setup"


def test_setup_that_must_add_a_trigger_never_makes_appends_wait(manager, engine):
    """The first set-up after an upgrade adds a trigger to the live event table while
    the application has a transaction open that appended: appends go on meanwhile."""
    with engine.begin() as conn:  # the event table as an older version left it
        conn.exec_driver_sql("DROP TRIGGER append_trigger_3 ON zdr.events")
    upgraded = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE], lock_timeout=0.1)
    upgraded.swap_attempts = 20
    with engine.connect() as app:
        app.begin()
        manager.store.append("app", [{"type": "Ok", "data": {}}], conn=app)  # left open
        setup, setup_took = _timed(upgraded.setup)
        time.sleep(0.3)  # set-up is waiting for its lock now
        append_took = []
        for i in range(5):
            _, took = _timed(
                lambda i=i: manager.store.append(f"b{i}", [{"type": "Ok", "data": {}}])
            )
            _.join(5)
            append_took.append(took.get("s", 99))
        assert setup.is_alive(), (
            "set-up should still be trying while the application's lock is held"
        )
        app.commit()
    setup.join(30)
    assert max(append_took) < 0.5, f"an append waited {max(append_took):.2f}s behind set-up"
    assert "s" in setup_took, "set-up did not finish once the application committed"
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'append_trigger_3'"
            ).scalar_one()
            == 1
        )


def test_a_slow_replay_does_not_hold_the_live_runner_back(manager, engine, monkeypatch):
    """Each replay batch holds a transaction id for seconds; live latency stays far below."""
    seed(manager.store, 600)
    manager.project_live()
    manager.create_replay("slow", [SlowBalancesV2()])
    monkeypatch.setenv("ZDR_TEST_SLOW_BATCH", "2.5")  # each batch sleeps before its commit
    replay = threading.Thread(
        target=manager.start_replay, args=("slow",), kwargs={"batch_size": 200}
    )
    stop = threading.Event()
    live = threading.Thread(target=manager.follow, kwargs={"stop": stop, "poll_interval": 0.02})
    replay.start()
    live.start()
    try:
        time.sleep(0.5)  # the first replay batch is applied and holds its transaction open
        latencies = []
        for i in range(3):
            manager.store.append(f"acc-late-{i}", [_opened(f"acc-late-{i}")])
            appended = time.monotonic()
            wait_for(lambda i=i: f"acc-late-{i}" in balances(engine), timeout=30, interval=0.01)
            latencies.append(time.monotonic() - appended)
    finally:
        stop.set()
        live.join(30)
        replay.join(60)
    assert max(latencies) < 1.0, f"append to live took {max(latencies):.2f}s during a slow replay"
    assert manager.get_replay("slow").state is zdr.ReplayState.CAUGHT_UP
    assert_balances_match_fold(engine, manager.store)
    manager.start_replay("slow")
    assert_balances_match_fold(engine, manager.store, "zdr_slow_1")


def test_a_projector_cannot_append_events_from_a_replay_transaction(manager, engine):
    """The horizon passes replay transactions only because they append no events."""

    seed(manager.store, 50)
    manager.create_replay("sneaky", [AppendingBalances()])
    with pytest.raises(zdr.ProjectorError, match="cannot be appended from a replay's transaction"):
        manager.start_replay("sneaky")
    with engine.connect() as conn:
        sneaked = conn.exec_driver_sql("SELECT count(*) FROM zdr.events WHERE stream_id = 'sneaky'")
        assert sneaked.scalar_one() == 0


class AppendingBalances(BalancesV2):
    """A projector that (wrongly) appends an event with plain SQL while it projects."""

    def handle_batch(self, events, conn):
        conn.exec_driver_sql(
            "INSERT INTO zdr.events (stream_id, type, data) VALUES ('sneaky', 'Ok', '{}')"
        )


def _opened(account: str) -> dict:
    return {"type": "AccountOpened", "data": {"account_id": account, "owner": "late"}}


def _open_and_deposit(manager, account: str) -> None:
    """An account opened and a deposit to it: an event of History's, for its stream."""
    deposit = {"type": "MoneyDeposited", "data": {"account_id": account, "amount": 5}}
    manager.store.append(account, [_opened(account), deposit])


def test_a_pipeline_lock_lost_with_its_connection_is_noticed(manager, engine):
    with manager.pipeline_lock("k") as lock:
        lock.require()  # held
        with engine.connect() as admin:
            _terminate_other_sessions(admin)
        with pytest.raises(zdr.LockLost, match="lost its lock"):
            lock.require()
    with manager.pipeline_lock("k") as again:  # free for the next run
        again.require()


def _terminate_other_sessions(admin) -> None:
    """What a restarted server or a network cut does to every other session."""
    admin.exec_driver_sql(
        """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()"""
    )
    admin.commit()


def test_a_new_read_model_builds_without_holding_live_back(engine):
    """A read model registered on a long log catches up in slices between live batches."""
    manager = zdr.ReplayManager(engine, projectors=[Balances()])
    manager.setup()
    manager.store.import_events(BankSimulator(accounts=500, seed=5).stream(40_000))
    manager.project_live()
    with following(manager):
        zdr.ReplayManager(engine, projectors=[SlowHistory()]).setup()  # builds from 0: 4 s
        latencies = []
        for i in range(5):
            manager.store.append(f"acc-new-{i}", [_opened(f"acc-new-{i}")])
            appended = time.monotonic()
            wait_for(lambda i=i: f"acc-new-{i}" in balances(engine), timeout=60, interval=0.01)
            latencies.append(time.monotonic() - appended)
        wait_for(
            lambda: manager.checkpoints()["live:history"] == manager.checkpoints()["live:balances"],
            timeout=120,
        )
    assert max(latencies) < 1.0, f"append to live took {max(latencies):.2f}s during a build"
    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)


def _append_and_time(manager, engine, account: str) -> float:
    """Seconds from an append's commit to its row in the live balances."""
    manager.store.append(account, [_opened(account)])
    appended = time.monotonic()
    wait_for(lambda: account in balances(engine), timeout=30, interval=0.01)
    return time.monotonic() - appended


def test_a_live_runner_that_takes_over_goes_on_from_the_one_before_with_no_gap(manager, engine):
    """How the scheduled live runs hand over: the next waits, then continues at once."""
    seed(manager.store, 200)
    manager.project_live()
    second = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE])
    first = threading.Thread(
        target=manager.follow, kwargs={"max_seconds": 1.5, "poll_interval": 0.02}
    )
    first.start()
    wait_for(lambda: _live_runner_pid(engine) is not None, timeout=10, interval=0.02)
    with pytest.raises(zdr.RunnerBusy, match=r"already running .*; held by pid \d+"):
        second.project_live()  # without take_over: at once, naming the holder
    took_over: dict[str, int] = {}
    taker = threading.Thread(
        target=lambda: took_over.update(
            applied=second.follow(take_over=True, max_seconds=6.0, poll_interval=0.02)
        )
    )
    taker.start()
    latencies = []
    ends = time.monotonic() + 4.0  # the first ends after 1.5 s, the second goes on
    i = 0
    while time.monotonic() < ends:
        latencies.append(_append_and_time(manager, engine, f"acc-handover-{i}"))
        i += 1
    first.join(10)
    taker.join(10)
    assert max(latencies) < 1.0, f"an append waited {max(latencies):.2f}s across the handover"
    assert took_over["applied"] > 0, "the second runner never took over"
    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)


def test_a_live_runner_whose_session_dies_is_taken_over_at_once(manager, engine):
    """A killed process lets go of the lock with its session: the waiting runner goes on."""
    seed(manager.store, 100)
    manager.project_live()
    stop = threading.Event()
    with engine.connect() as holder, live_runner(holder):
        taker = threading.Thread(
            target=manager.follow,
            kwargs={"take_over": True, "stop": stop, "poll_interval": 0.02},
        )
        taker.start()
        manager.store.append("acc-stuck", [_opened("acc-stuck")])
        time.sleep(0.5)
        assert "acc-stuck" not in balances(engine), "two live runners ran at once"
        with engine.connect() as admin:
            admin.exec_driver_sql("SELECT pg_terminate_backend(%s)", (_live_runner_pid(engine),))
            admin.commit()
        try:
            wait_for(lambda: "acc-stuck" in balances(engine), timeout=1.0, interval=0.01)
        finally:
            stop.set()
            taker.join(10)
    assert_balances_match_fold(engine, manager.store)


def test_a_runner_that_cannot_take_over_in_its_time_ends_naming_the_holder(manager, engine):
    with engine.connect() as holder, live_runner(holder):
        started = time.monotonic()
        with pytest.raises(zdr.RunnerBusy, match=r"held by pid \d+"):
            manager.follow(take_over=True, max_seconds=0.5)
        assert 0.5 <= time.monotonic() - started < 3.0


def _live_runner_pid(engine) -> int | None:
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid::bigint = %s AND objsubid = 2
               AND objid::bigint = (hashtext(%s)::bigint & 4294967295)""",
            (ZDR_LOCK_SPACE, LIVE_RUNNER_LOCK),
        ).scalar()


def test_a_runner_past_its_time_goes_on_until_the_next_one_waits(manager, engine):
    """A late next run leaves no gap: the one running hands over only once it waits."""
    seed(manager.store, 100)
    manager.project_live()
    first_ended: dict[str, float] = {}

    def first() -> None:
        manager.follow(take_over=True, max_seconds=0.3, overtime_s=30, poll_interval=0.02)
        first_ended["at"] = time.monotonic()

    running = threading.Thread(target=first)
    running.start()
    time.sleep(1.5)  # well past its 0.3 s, and no one waits yet
    assert running.is_alive(), "the runner stopped with no one to take over"
    assert _append_and_time(manager, engine, "acc-overtime") < 1.0
    second = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE])
    asked = time.monotonic()
    taker = threading.Thread(
        target=second.follow, kwargs={"take_over": True, "max_seconds": 3, "poll_interval": 0.02}
    )
    taker.start()
    running.join(10)
    assert first_ended["at"] - asked < 1.0, "the runner did not hand over to the waiting one"
    assert _append_and_time(manager, engine, "acc-after-handover") < 1.0
    taker.join(10)
    with pytest.raises(zdr.ConfigurationError, match="overtime_s must be a number of seconds"):
        manager.follow(take_over=True, max_seconds=1, overtime_s=-1)
    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)


class PerEventHistory(History):
    """A read model that costs 1 ms per event (say, a call per event to another system)."""

    def handle_batch(self, events, conn):
        super().handle_batch(events, conn)
        time.sleep(len(events) * 0.001)


def _latencies(manager, engine, n: int) -> list[float]:
    return [_append_and_time(manager, engine, f"acc-probe-{time.monotonic_ns()}") for _ in range(n)]


def test_a_slow_new_read_model_costs_live_at_most_its_budget_per_batch(engine):
    """1 ms per event: a 2,000-event slice would hold each live batch up 2 s."""
    manager = zdr.ReplayManager(engine, projectors=[Balances()])
    manager.setup()
    manager.store.import_events(BankSimulator(accounts=500, seed=5).stream(20_000))
    manager.project_live()
    with following(manager):
        zdr.ReplayManager(engine, projectors=[PerEventHistory()]).setup()
        time.sleep(0.5)
        during = _latencies(manager, engine, 5)
        building = manager.checkpoints()["live:history"].position
    assert building > 0, "the new read model did not build meanwhile"
    assert max(during) < 1.0, f"an append waited {max(during):.2f}s while a slow read model built"


def test_a_slow_dual_writing_replay_costs_live_at_most_its_budget_per_batch(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("slow", [BalancesV2(), PerEventHistory()])
    manager.start_replay("slow")
    manager.enable_dual_write("slow")
    manager.store.import_events(BankSimulator(accounts=50, seed=9, prefix="bulk").stream(5_000))
    with following(manager):
        wait_for(lambda: manager.live_lag()["balances"] == 0, timeout=60)
        assert manager.get_replay_lag("slow") > 1_000, "the replay should still be behind"
        during = _latencies(manager, engine, 5)
        wait_for(lambda: manager.get_replay_lag("slow") == 0, timeout=120, interval=0.2)
    assert max(during) < 1.0, f"an append waited {max(during):.2f}s behind a slow replay"
    assert_history_exactly_once(engine, manager.store, "zdr_slow_2")
    assert_balances_match_fold(engine, manager.store, "zdr_slow_1")


class BrokenHistory(History):
    """A new read model whose projector raises on one old event."""

    def handle_batch(self, events, conn):
        if any(e.position == 150 for e in events):
            raise RuntimeError("cannot project event 150")
        super().handle_batch(events, conn)


def test_a_broken_new_read_model_stays_behind_and_the_others_go_on(engine, caplog):
    manager = zdr.ReplayManager(engine, projectors=[Balances()])
    manager.setup()
    seed(manager.store, 300)
    manager.project_live()
    both = zdr.ReplayManager(engine, projectors=[Balances(), BrokenHistory()])
    both.setup()
    with caplog.at_level("ERROR", logger="zdr"):
        with pytest.raises(zdr.ProjectorError, match="event 150"):
            both.project_live()
        manager.store.append("acc-after-broken", [_opened("acc-after-broken")])
        with pytest.raises(zdr.ProjectorError, match="event 150"):
            both.project_live()  # balances go on, history is tried again
    assert both.checkpoints()["live:history"].position < 150
    assert "acc-after-broken" in balances(engine)
    assert "cannot project event 150" in caplog.text and "stays behind" in caplog.text


class PoisonedHistory(History):
    """A live read model whose projector raises on one new event (until ``broken`` is
    set False: the fix, made in place)."""

    broken = True

    def handle_batch(self, events, conn):
        if PoisonedHistory.broken and any(e.stream_id == "acc-poison" for e in events):
            raise RuntimeError("cannot project acc-poison")
        super().handle_batch(events, conn)


def test_a_live_read_model_that_breaks_on_a_new_event_stays_behind_and_the_others_go_on(
    engine, caplog
):
    """The runner neither stops nor holds the other live read models back for it."""
    manager = zdr.ReplayManager(engine, projectors=[Balances(), PoisonedHistory()])
    manager.setup()
    seed(manager.store, 100)
    manager.project_live()
    before = manager.checkpoints()["live:history"]
    with caplog.at_level("ERROR", logger="zdr"), following(manager):
        _open_and_deposit(manager, "acc-poison")
        for account in ("acc-after-poison", "acc-later"):
            manager.store.append(account, [_opened(account)])
            wait_for(lambda account=account: account in balances(engine), timeout=10)
        assert manager.live_runner_pid() is not None  # the runner goes on
    assert manager.checkpoints()["live:history"] == before
    assert manager.live_lag()["history"] == 4
    assert "cannot project acc-poison" in caplog.text and "stays behind" in caplog.text
    # A one-off project_live applies what it can, then raises the error it met.
    manager.store.append("acc-one-off", [_opened("acc-one-off")])
    with pytest.raises(zdr.ProjectorError, match="event 102 .*acc-poison"):
        manager.project_live()
    assert "acc-one-off" in balances(engine)


def test_status_shows_a_live_read_model_that_stands_still_until_it_is_written_again(
    engine, zdr_cli, monkeypatch
):
    manager = zdr.ReplayManager(engine, projectors=[Balances(), PoisonedHistory()])
    manager.setup()
    seed(manager.store, 20)
    manager.project_live()
    _open_and_deposit(manager, "acc-poison")
    with pytest.raises(zdr.ProjectorError):
        manager.project_live()

    code, out, err = zdr_cli("status")
    assert code == 0, err
    assert "failing" in out
    assert "live projection 'history' stands still since" in err and "acc-poison" in err
    code, out, err = zdr_cli("status", "--json", "--live")
    live = {row["projection"]: row for row in json.loads(out) if row["kind"] == "live"}
    assert live["history"]["state"] == "failing"
    # The deposit; the opening (21) is not History's event.
    assert live["history"]["error_position"] == 22
    assert "cannot project acc-poison" in live["history"]["error"]
    assert live["history"]["lag"] == 2 and live["balances"]["lag"] == 0
    assert live["balances"]["state"] == "following" and live["balances"]["error"] is None

    # The projector fixed (its module, as a restart would load it): written, and said so.
    monkeypatch.setattr(PoisonedHistory, "handle_batch", History.handle_batch)
    manager.project_live()
    code, out, err = zdr_cli("status", "--json", "--live")
    live = {row["projection"]: row for row in json.loads(out) if row["kind"] == "live"}
    assert live["history"]["state"] == "following" and live["history"]["error"] is None
    assert "stands still" not in zdr_cli("status")[2]


def test_a_broken_live_read_model_costs_the_runner_no_memory_and_no_false_alarm(engine, caplog):
    """While it stays behind, the live runner keeps none of its errors and does not
    blame the safe horizon for the events that wait for its projector."""
    settings = zdr.Settings(failed_retry_s=0.01, horizon_warning_s=0.2)
    manager = zdr.ReplayManager(engine, projectors=[Balances(), PoisonedHistory()])
    manager.settings = settings
    manager.setup()
    _open_and_deposit(manager, "acc-poison")
    with caplog.at_level("INFO", logger="zdr"), following(manager):
        time.sleep(1.5)  # about a hundred tries of the broken read model
        assert not manager._live._failed  # nothing kept between tries (it was a leak)
    assert caplog.text.count("cannot project acc-poison") > 10
    assert "safe horizon" not in caplog.text and "safe position" not in caplog.text


class TimingOutHistory(History):
    """A live read model whose statement times out on one stream's events (transient)."""

    def handle_batch(self, events, conn):
        if any(e.stream_id == "acc-slow" for e in events):
            conn.exec_driver_sql("SET LOCAL statement_timeout = '50ms'")
            conn.exec_driver_sql("SELECT pg_sleep(1)")
        super().handle_batch(events, conn)


def test_a_level_live_read_model_that_times_out_waits_alone(engine, caplog):
    """A timeout is no lost connection: only that read model waits and is tried again."""
    manager = zdr.ReplayManager(engine, projectors=[Balances(), TimingOutHistory()])
    manager.setup()
    seed(manager.store, 50)
    manager.project_live()
    before = manager.checkpoints()["live:history"]
    _open_and_deposit(manager, "acc-slow")
    with caplog.at_level("WARNING", logger="zdr"):
        assert manager.project_live() == 2
    assert "acc-slow" in balances(engine)
    assert manager.checkpoints()["live:history"] == before
    assert "live projection 'history' stays behind" in caplog.text
    assert "QueryCanceled" in caplog.text


def test_a_live_read_model_this_runner_cannot_load_stands_still_and_the_others_go_on(
    engine, caplog
):
    """Another process registered a read model whose module this live runner lacks."""
    manager = zdr.ReplayManager(engine, projectors=[Balances()])
    manager.setup()
    seed(manager.store, 100)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO zdr.projections (name, projector, schemas) "
            "VALUES ('ghost', 'nowhere.models:Ghost', '{ghost}')"
        )
        conn.exec_driver_sql(
            "INSERT INTO zdr.checkpoints (name, txid, position) VALUES ('live:ghost', 0, 0)"
        )
    with caplog.at_level("ERROR", logger="zdr"):
        assert manager.project_live() == 100
    assert "live projection 'ghost' stands still" in caplog.text
    assert "nowhere.models:Ghost" in caplog.text


def test_a_runner_stopped_while_it_waits_to_take_over_ends_quietly(manager, engine):
    stop = threading.Event()
    with engine.connect() as holder, live_runner(holder):
        threading.Timer(0.3, stop.set).start()
        assert manager.follow(take_over=True, stop=stop) == 0
    with pytest.raises(zdr.ConfigurationError, match="poll_interval"):
        manager.follow(max_seconds=1, poll_interval=0)
    with pytest.raises(zdr.ConfigurationError, match="max_seconds"):
        manager.follow(max_seconds=float("nan"))


def test_starting_a_replay_on_a_long_log_does_not_hold_live_back(manager, engine, monkeypatch):
    """start_replay counts the log in a transaction that holds a row lock (an id): 0.5 s
    at 6M events. Its first transaction is made to take 2 s here."""
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("long", [BalancesV2()])
    started = zdr.records.start_run

    def slow_start_run(conn, *args, **kwargs):
        time.sleep(2.0)  # as long as counting a long log
        return started(conn, *args, **kwargs)

    with following(manager):
        monkeypatch.setattr(zdr.records, "start_run", slow_start_run)
        starting, _ = _timed(lambda: manager.start_replay("long"))
        time.sleep(0.5)  # in its first transaction now
        took = _append_and_time(manager, engine, "acc-while-counting")
        starting.join(30)
    assert took < 1.0, f"an append waited {took:.2f}s while start_replay counted"
    assert manager.get_replay("long").state is zdr.ReplayState.CAUGHT_UP


def test_wait_for_live_returns_once_the_live_runner_applied_what_was_committed(
    manager, engine, zdr_cli
):
    """Read-your-writes for scripts: append, wait, read; and a clear refusal when nothing
    would ever get there (no live runner; a read model that stands still)."""
    seed(manager.store, 100)
    manager.project_live()
    with pytest.raises(zdr.LiveLagging, match="no live runner is running") as none:
        manager.store.append("acc-waited", [_opened("acc-waited")])
        manager.wait_for_live(timeout_s=1)
    assert none.value.behind and all(lag == 1 for lag in none.value.behind.values())
    code, _, err = zdr_cli("wait", "--timeout", "1")
    assert code == 1 and "no live runner is running" in err
    with following(manager):
        reached = manager.wait_for_live(timeout_s=10)
        assert "acc-waited" in balances(engine), "it returned before the event was applied"
        assert reached == max(manager.checkpoints().values())
        manager.store.append("acc-cli", [_opened("acc-cli")])
        code, _, err = zdr_cli("wait", "--timeout", "10")
        assert code == 0 and "applied every event" in err, err
        assert "acc-cli" in balances(engine)


def test_wait_for_live_names_a_dual_writing_replay_that_fails_meanwhile(
    manager, engine, monkeypatch
):
    """dual write, wait, verify: a replay that fails while the script waits leaves dual
    write, so nothing is left to wait for; the wait says so instead of succeeding (the
    next step would compare a copy that no longer follows)."""
    seed(manager.store, 100)
    manager.project_live()
    manager.create_replay("fragile", [ExplodingBalancesV2()])
    manager.start_replay("fragile")
    manager.start_projecting_to_replay("fragile")
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 105)
    seed(manager.store, 20, seed=1, prefix="new")
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            manager.wait_for_live(timeout_s=20)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()  # dual-writing at the call: no runner yet, so it has not failed
    time.sleep(0.3)
    with following(manager):
        waiter.join(30)
    [error] = outcome
    assert isinstance(error, zdr.LiveLagging), error
    assert "replay 'fragile' failed in dual write" in str(error) and "event 105" in str(error)
    assert manager.get_replay("fragile").state is zdr.ReplayState.FAILED
    # Called after the failure, it says so too (until the replay is resumed or removed).
    with pytest.raises(zdr.LiveLagging, match="'fragile' failed in dual write"):
        manager.wait_for_live(timeout_s=1)
    manager.remove_replay("fragile")
    with following(manager):
        assert manager.wait_for_live(timeout_s=20) is not None


def test_wait_for_live_names_a_live_read_model_that_stands_still(engine):
    manager = zdr.ReplayManager(engine, projectors=[Balances(), PoisonedHistory()])
    manager.setup()
    seed(manager.store, 50)
    manager.project_live()
    with following(manager):
        _open_and_deposit(manager, "acc-poison")
        started = time.monotonic()
        with pytest.raises(zdr.LiveLagging, match="'history' stands still: .*acc-poison"):
            manager.wait_for_live(timeout_s=20)
        assert time.monotonic() - started < 15, "it waited for the timeout instead"


def test_wait_for_live_waits_for_a_runner_restarted_after_the_fix(engine, monkeypatch):
    """The error message says: fix the projector and restart the live runner. Waiting right
    after that restart waits for the restarted runner's first try of the read model that
    stood still, instead of failing on the error recorded before the fix."""
    broken = zdr.ReplayManager(engine, projectors=[Balances(), PoisonedHistory()])
    broken.setup()
    seed(broken.store, 50)
    broken.project_live()
    with following(broken):
        _open_and_deposit(broken, "acc-poison")
        wait_for(lambda: any(row["state"] == "failing" for row in broken.live_status()))
    monkeypatch.setattr(PoisonedHistory, "broken", False)  # the fix, then the restart
    fixed = zdr.ReplayManager(engine, projectors=[Balances(), PoisonedHistory()])
    with following(fixed):
        assert fixed.wait_for_live(timeout_s=20) is not None
    assert all(row["state"] == "following" and row["lag"] == 0 for row in fixed.live_status())
    lagging = pickle.loads(pickle.dumps(zdr.LiveLagging("behind", behind={"live:x": 1})))
    assert lagging.behind == {"live:x": 1} and str(lagging) == "behind"

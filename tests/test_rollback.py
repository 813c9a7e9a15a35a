"""Only the replay whose copy is live can be rolled back: promoting a second replay of a
projection supersedes the first, rolling the second back makes the first live again. A
rollback that would break something is refused before it changes anything; one that fails
leaves the replay live, to be tried again."""

from __future__ import annotations

import threading
import time

import pytest

import zdr
from tests.support import (
    append,
    assert_balances_match_fold,
    assert_history_exactly_once,
    balances,
    following,
    seed,
    wait_for,
    zdr_state,
)
from zdr.examples.bank.projectors import Balances, BalancesV2, History
from zdr.runner import BatchRun

S = zdr.ReplayState


def _two_promotions(manager):
    """v2 (the new shape) promoted, then v3 (the first shape again) promoted over it."""
    sim = seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.promote("v2")
    append(manager.store, sim.events(200))
    manager.project_live()
    manager.create_replay("v3", [Balances()])
    manager.start_replay("v3")
    manager.promote("v3")
    return sim


def test_rolling_back_a_replay_a_later_promotion_superseded_is_refused_and_changes_nothing(
    manager, engine
):
    _two_promotions(manager)
    before = zdr_state(engine)

    with pytest.raises(zdr.InvalidState, match="in state 'superseded'.*roll back 'v3' first"):
        manager.rollback("v2")

    assert zdr_state(engine) == before
    assert "deposits" not in next(iter(balances(engine).values())), "v3's shape stays live"
    v2 = manager.get_replay("v2")
    assert (v2.state, v2.superseded_by) == (S.SUPERSEDED, "v3")
    assert manager.get_replay("v3").state is S.LIVE


def test_rolling_back_the_newer_replay_makes_the_one_it_superseded_live_again(manager, engine):
    sim = _two_promotions(manager)
    append(manager.store, sim.events(300))
    manager.project_live()

    assert manager.rollback("v3").state is S.ROLLED_BACK

    v2 = manager.get_replay("v2")
    assert (v2.state, v2.superseded_by) == (S.LIVE, None)
    assert "deposits" in next(iter(balances(engine).values())), "v2's shape is live again"
    assert_balances_match_fold(engine, manager.store)
    append(manager.store, sim.events(100))
    manager.project_live()
    assert manager.rollback("v2").state is S.ROLLED_BACK
    assert "deposits" not in next(iter(balances(engine).values())), "the first copy is back"
    assert_balances_match_fold(engine, manager.store)


def test_a_replay_of_several_projections_supersedes_every_live_replay_it_covers(manager, engine):
    seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("bal", [BalancesV2()])
    manager.create_replay("hist", ["history"])
    manager.create_replay("both", [Balances(), "history"])
    for key in ("bal", "hist", "both"):
        manager.start_replay(key)
    manager.promote("bal")
    manager.promote("hist")

    manager.promote("both")

    assert {k: manager.get_replay(k).superseded_by for k in ("bal", "hist")} == {
        "bal": "both",
        "hist": "both",
    }
    manager.rollback("both")
    assert {k: manager.get_replay(k).state for k in ("bal", "hist")} == {
        "bal": S.LIVE,
        "hist": S.LIVE,
    }
    assert "deposits" in next(iter(balances(engine).values()))


def test_promoting_over_part_of_a_live_replay_s_projections_is_refused(manager, engine):
    seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("both", [BalancesV2(), "history"])
    manager.start_replay("both")
    manager.promote("both")
    manager.create_replay("one", [Balances()])
    manager.start_replay("one")
    before = zdr_state(engine)

    with pytest.raises(zdr.InvalidState) as refused:
        manager.promote("one")

    assert "live replay 'both' also rebuilt projection 'history'" in str(refused.value)
    assert "Nothing was changed" in str(refused.value)
    assert zdr_state(engine) == before


def test_an_install_from_before_superseding_still_refuses_to_roll_back_the_older_live_replay(
    manager, engine
):
    _two_promotions(manager)
    with engine.begin() as conn:  # both say live, as zdr left them before `superseded`
        conn.exec_driver_sql(
            "UPDATE zdr.replays SET state = 'live', superseded_by = NULL WHERE key = 'v2'"
        )
    before = zdr_state(engine)

    with pytest.raises(zdr.InvalidState, match="replay 'v3', promoted after it, is live"):
        manager.rollback("v2")
    assert zdr_state(engine) == before


def test_removing_the_newer_replay_leaves_the_superseded_one_for_removal_only(manager, engine):
    _two_promotions(manager)
    manager.remove_replay("v3")

    v2 = manager.get_replay("v2")
    assert (v2.state, v2.superseded_by) == (S.SUPERSEDED, None)
    with pytest.raises(zdr.InvalidState, match="only remove_replay is left"):
        manager.rollback("v2")
    # A later replay under the same key does not bring v2 back when it is rolled back.
    manager.create_replay("v3", [BalancesV2()])
    manager.start_replay("v3")
    manager.promote("v3")
    manager.rollback("v3")
    assert manager.get_replay("v2").state is S.SUPERSEDED
    manager.remove_replay("v2")
    assert_balances_match_fold(engine, manager.store)


# -- a failed rollback leaves the replay live ---------------------------------------------


def test_a_rollback_that_would_break_a_view_is_refused_before_it_catches_up(manager, engine):
    sim = seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.promote("v2")
    append(manager.store, sim.events(300))  # the previous copy would have these to catch up
    manager.project_live()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW public.rich AS SELECT * FROM bank_balances.balances")
    before = zdr_state(engine)

    with pytest.raises(zdr.DependentObjects, match="view public.rich uses bank_balances"):
        manager.rollback("v2")

    assert zdr_state(engine) == before, "no catch-up run, no events applied"


def _broken(self, events, conn):
    raise RuntimeError("the previous projector cannot project this")


@pytest.mark.parametrize("where", ["catch-up", "swap"])
def test_a_projector_error_while_rolling_back_leaves_the_replay_live_and_rollback_can_be_retried(
    manager, engine, monkeypatch, where
):
    sim = seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.promote("v2")
    append(manager.store, sim.events(700))  # the previous copy must catch up with these
    manager.project_live()
    monkeypatch.setattr(Balances, "handle_batch", _broken)
    if where == "swap":  # nothing caught up in batches: every event inside the swap
        monkeypatch.setattr(BatchRun, "run", lambda self, conn, **kwargs: True)

    with pytest.raises(zdr.ProjectorError, match="cannot project this"):
        manager.rollback("v2")

    replay = manager.get_replay("v2")
    assert replay.state is S.LIVE
    assert "cannot project this" in replay.error
    assert replay.runs[-1].status == "failed" and "cannot project this" in replay.runs[-1].error
    assert "deposits" in next(iter(balances(engine).values())), "v2 is still live"

    monkeypatch.undo()  # the projector is fixed
    assert manager.rollback("v2").state is S.ROLLED_BACK
    assert manager.get_replay("v2").error is None
    assert "deposits" not in next(iter(balances(engine).values()))
    assert_balances_match_fold(engine, manager.store)


def _deposit(account: str) -> dict:
    return {"type": "MoneyDeposited", "data": {"account_id": account, "amount": 1}}


class SlowHistory5ms(History):
    """History at 5 ms an event: a previous version whose catch-up takes seconds."""

    def handle_batch(self, events, conn):
        super().handle_batch(events, conn)
        time.sleep(len(events) * 0.005)


def test_a_rollback_catches_up_outside_the_swap_lock_so_live_waits_a_moment_at_most(engine):
    """What arrives while the previous copy catches up is caught up in further rounds
    outside the lock, not under it: the live runner never waits for the old projector's
    whole catch-up (2-3 s here when everything that came meanwhile was applied locked:
    the application appends about half as fast as the old projector applies)."""
    manager = zdr.ReplayManager(engine, projectors=[SlowHistory5ms()], batch_size=500)
    manager.settings = manager.settings.replace(lag_threshold=50)
    manager.setup()
    sim = seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("fast", [History()])
    manager.start_replay("fast")
    manager.promote("fast")
    append(manager.store, sim.events(1_000))  # the previous copy catches these up: 5 s
    manager.project_live()

    appending, watching = threading.Event(), threading.Event()
    appended: list[tuple[int, float]] = []
    seen: list[tuple[int, float]] = []

    def application() -> None:
        while not appending.wait(0.01):
            [position] = manager.store.append("acc-live", [_deposit("acc-live")])
            appended.append((position, time.monotonic()))

    def watch() -> None:
        while not watching.wait(0.005):
            seen.append((manager.checkpoints()["live:history"].position, time.monotonic()))

    threads = [threading.Thread(target=application), threading.Thread(target=watch)]
    with following(manager, poll_interval=0.005):
        for thread in threads:
            thread.start()
        try:
            report = manager.rollback("fast")
            time.sleep(0.5)
        finally:
            appending.set()
            threads[0].join(10)  # its last append done
            wait_for(lambda: manager.live_lag()["history"] == 0, timeout=30)
            # The watcher has seen the checkpoint past the last append too.
            wait_for(lambda: bool(seen) and seen[-1][0] >= appended[-1][0], timeout=10)
            watching.set()
            for thread in threads:
                thread.join(10)
    assert report.state is S.ROLLED_BACK
    # From each append to the first moment the live checkpoint was seen past it.
    waits = [next(t for p, t in seen if p >= position) - at for position, at in appended]
    assert len(appended) > 100
    assert max(waits) < 1.0, sorted(waits)[-5:]
    assert_history_exactly_once(engine, manager.store)

"""A rollback that would break something is refused before it changes anything; one that
fails leaves the replay live, to be tried again."""

from __future__ import annotations

import pytest

import zdr
from tests.support import append, assert_balances_match_fold, balances, seed, zdr_state
from zdr.examples.bank.projectors import Balances, BalancesV2
from zdr.runner import BatchRun

S = zdr.ReplayState


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

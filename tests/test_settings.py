"""Settings: one validated object, read by the manager for every later operation."""

from __future__ import annotations

import decimal
import math

import numpy as np
import pytest

import zdr
from tests.support import seed
from zdr.examples.bank.projectors import Balances, BalancesV2, History
from zdr.locks import holding_live_batch_lock
from zdr.runner import FIRST_SLICE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"batch_size": True}, "batch_size must be a whole number"),
        ({"batch_size": math.inf}, "batch_size must be a whole number"),
        ({"approval_timeout_s": 1.5}, "approval_timeout_s must be a whole number"),
        ({"lag_threshold": -1}, "lag_threshold must be a whole number of at least 0"),
        ({"lock_timeout_s": 0}, "lock_timeout_s must be a number of seconds more than 0"),
        ({"lock_timeout_s": math.inf}, "at most 86400"),
        ({"lock_timeout_s": 5e6}, "at most 86400"),
        ({"sample_interval_s": math.nan}, "sample_interval_s must be a number of seconds"),
        ({"events_per_task": 0}, "events_per_task must be a whole number of at least 1"),
        ({"catch_up_slice": 0}, "catch_up_slice must be a whole number of at least 1"),
        ({"dual_write_lock_timeout_s": 0}, "dual_write_lock_timeout_s must be a number of seconds"),
        ({"dual_write_retry_s": -1}, "dual_write_retry_s must be a number of seconds 0 or more"),
        ({"bogus": 1}, "unknown settings: bogus"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(changes, message):
    with pytest.raises(zdr.ConfigurationError, match=message):
        zdr.Settings().replace(**changes)


def test_numbers_of_other_kinds_are_taken_as_plain_ones():
    settings = zdr.Settings(batch_size=np.int64(500), lock_timeout_s=decimal.Decimal("0.25"))
    assert settings.batch_size == 500 and type(settings.batch_size) is int
    assert settings.lock_timeout_s == 0.25 and type(settings.lock_timeout_s) is float


def test_a_manager_takes_settings_and_keyword_overrides(engine):
    manager = zdr.ReplayManager(
        engine, settings=zdr.Settings(batch_size=123, swap_attempts=3), lock_timeout=2
    )
    assert (manager.batch_size, manager.swap_attempts, manager.lock_timeout) == (123, 3, 2.0)
    with pytest.raises(zdr.ConfigurationError, match="settings must be a zdr.Settings"):
        zdr.ReplayManager(engine, settings={"batch_size": 5})


def test_changing_a_managers_lock_timeout_reaches_promotion(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.enable_dual_write("v2")
    manager.project_live()
    manager.lock_timeout = 0.05
    manager.swap_attempts = 2
    with (
        engine.connect() as holder,
        holding_live_batch_lock(holder),
        pytest.raises(zdr.LockTimeout, match="2 attempts of 0.05s"),
    ):
        manager.promote("v2")
    with pytest.raises(zdr.ConfigurationError, match="swap_attempts"):
        manager.swap_attempts = 0


def test_changing_a_managers_catch_up_slice_reaches_the_live_runner(engine):
    """A read model that is behind catches up by at most ``catch_up_slice`` events per
    live batch (its first slice, before its speed is measured, is ``FIRST_SLICE``)."""
    first = zdr.ReplayManager(engine, projectors=[Balances()])
    first.setup()
    seed(first.store, 1_000)
    first.project_live()
    manager = zdr.ReplayManager(engine, projectors=[Balances(), History()])
    manager.setup()
    # A slice is also bounded by its measured speed (slice_budget_s): a budget no slice
    # reaches leaves catch_up_slice the bound, however slow the machine is today.
    manager.settings = manager.settings.replace(catch_up_slice=150, slice_budget_s=3600)
    manager.project_live(max_batches=2)
    checkpoints = manager.checkpoints()
    assert checkpoints["live:history"].position == FIRST_SLICE + 150
    assert checkpoints["live:balances"].position == 1_000


def test_a_bad_batch_size_for_one_call_is_refused_before_anything_changes(manager, engine):
    seed(manager.store, 300)
    manager.create_replay("k", [BalancesV2()])
    manager.start_replay("k")
    before = manager.get_replay("k")
    for bad in (0, -5):
        with pytest.raises(zdr.ConfigurationError, match="batch_size"):
            manager.start_replay("k", batch_size=bad, restart=True)
    after = manager.get_replay("k")
    assert (after.state, after.position, after.events_applied) == (
        before.state,
        before.position,
        before.events_applied,
    )
    with pytest.raises(zdr.ConfigurationError, match="lag_threshold"):
        manager.enable_dual_write("k", lag_threshold=-1)


def test_the_php_names_follow_a_subclass_that_overrides_the_new_ones(manager):
    calls = []

    class Audited(zdr.ReplayManager):
        def enable_dual_write(self, key, *, lag_threshold=None):
            calls.append(("enable_dual_write", key))
            return super().enable_dual_write(key, lag_threshold=lag_threshold)

        def promote(self, key):
            calls.append(("promote", key))
            return super().promote(key)

    audited = Audited(manager.engine)
    seed(manager.store, 100)
    manager.project_live()
    audited.create_replay("old_names", [BalancesV2()])
    audited.start_replay("old_names")
    audited.start_projecting_to_replay("old_names")
    manager.project_live()
    report = audited.put_replay_live("old_names")
    assert report.state is zdr.ReplayState.LIVE
    assert calls == [("enable_dual_write", "old_names"), ("promote", "old_names")]

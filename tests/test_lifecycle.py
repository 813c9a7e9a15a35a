"""The whole life cycle on the bank example: the promoted read model equals the fold."""

from __future__ import annotations

import zdr
from tests.support import (
    ROLE,
    append,
    assert_balances_match_fold,
    assert_history_exactly_once,
    balances,
    seed,
)
from zdr.examples.bank.domain import fold_balances, fold_daily_totals
from zdr.examples.bank.projectors import LIVE, BalancesV2


def test_full_life_cycle_promotes_a_read_model_equal_to_the_fold(manager, engine):
    sim = seed(manager.store, 3_000)
    assert manager.project_live() == 3_000

    replay = manager.create_replay("balances_v2", [BalancesV2()])
    assert replay.state is zdr.ReplayState.CREATED
    assert replay.schemas == {"bank_balances": "zdr_balances_v2_1"}
    assert manager.get_replay_lag("balances_v2") == 3_000

    replay = manager.start_replay("balances_v2")
    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert replay.events_applied == 3_000
    assert replay.rate is not None and replay.rate > 0

    # Events arrive while the replay is being prepared: the live runner applies
    # them to live only, the replay catches up from its own checkpoint.
    append(manager.store, sim.events(400))
    assert manager.project_live() == 400
    assert manager.get_replay_lag("balances_v2") == 400
    manager.start_replay("balances_v2")
    assert manager.get_replay_lag("balances_v2") == 0

    append(manager.store, sim.events(200))
    manager.start_projecting_to_replay("balances_v2", lag_threshold=500)
    append(manager.store, sim.events(300))
    assert manager.project_live() == 500

    report = manager.put_replay_live("balances_v2")
    assert report.state is zdr.ReplayState.LIVE
    assert report.attempts == 1

    assert_balances_match_fold(engine, manager.store)
    assert "deposits" in next(iter(balances(engine).values()))
    assert_history_exactly_once(engine, manager.store)
    # After promotion the live runner writes the new shape with the new projector.
    append(manager.store, sim.events(250))
    assert manager.project_live() == 250
    assert_balances_match_fold(engine, manager.store)

    replay = manager.get_replay("balances_v2")
    assert replay.state is zdr.ReplayState.LIVE
    assert [run.kind for run in replay.runs] == ["replay", "replay", "promote"]
    with engine.connect() as conn:
        live = conn.exec_driver_sql(
            "SELECT projector FROM zdr.projections WHERE name = 'balances'"
        ).scalar_one()
    assert live == BalancesV2.import_path()


def test_a_replay_of_the_same_version_rebuilds_the_same_rows(manager, engine):
    seed(manager.store, 2_000)
    manager.project_live()
    manager.create_replay("same", ["balances", "history"])
    manager.start_replay("same")
    assert balances(engine, "zdr_same_1") == balances(engine, "bank_balances")
    assert_history_exactly_once(engine, manager.store, "zdr_same_2")


def test_rollback_brings_the_previous_copy_up_to_date_and_makes_it_live(manager, engine):
    sim = seed(manager.store, 1_500)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.start_projecting_to_replay("v2")
    manager.project_live()
    manager.put_replay_live("v2")

    append(manager.store, sim.events(700))  # applied by v2 only, while it is live
    manager.project_live()
    report = manager.rollback("v2")

    assert report.state is zdr.ReplayState.ROLLED_BACK
    rows = balances(engine)
    assert "deposits" not in next(iter(rows.values())), "the v1 shape is live again"
    assert_balances_match_fold(engine, manager.store)
    with engine.connect() as conn:
        live = conn.exec_driver_sql(
            "SELECT projector FROM zdr.projections WHERE name = 'balances'"
        ).scalar_one()
    assert live.endswith(":Balances")

    append(manager.store, sim.events(100))
    manager.project_live()
    assert_balances_match_fold(engine, manager.store)


def test_remove_drops_the_replay_copy_and_metadata_but_never_live_tables(manager, engine):
    seed(manager.store, 500)
    manager.project_live()
    before = balances(engine)
    manager.create_replay("gone", [BalancesV2()])
    manager.start_replay("gone")

    removed = manager.remove_replay("gone")

    assert removed.state is zdr.ReplayState.REMOVED
    assert manager.get_replay("gone") is None
    assert balances(engine) == before
    with engine.connect() as conn:
        assert not conn.exec_driver_sql(
            "SELECT 1 FROM pg_namespace WHERE nspname LIKE 'zdr\\_gone%%'"
        ).first()
    assert "replay:gone" not in manager.checkpoints()


def test_removing_a_promoted_replay_drops_the_previous_copy_only(manager, engine):
    seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.put_replay_live("v2")
    live = balances(engine)

    manager.remove_replay("v2")

    assert balances(engine) == live
    assert "deposits" in next(iter(live.values()))


def test_setup_is_idempotent_and_keeps_data(manager, engine):
    seed(manager.store, 100)
    manager.project_live()
    before = balances(engine)
    manager.setup()
    manager.store.setup()
    assert balances(engine) == before


def test_a_replay_can_start_over_from_zero(manager, engine):
    seed(manager.store, 800)
    manager.project_live()
    manager.create_replay("again", [BalancesV2()])
    manager.start_replay("again")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr_again_1.balances SET balance = -1")

    replay = manager.start_replay("again", restart=True)

    assert replay.events_applied == 800
    assert_balances_match_fold(engine, manager.store, "zdr_again_1")


def test_progress_is_reported_after_each_batch(manager):
    seed(manager.store, 1_200)
    manager.create_replay("progress", [BalancesV2()])
    seen: list[zdr.Progress] = []
    manager.start_replay("progress", batch_size=500, on_progress=seen.append)
    assert [p.events_done for p in seen] == [500, 1_000, 1_200]
    assert seen[-1].events_total == 1_200
    assert seen[-1].eta_seconds == 0


def test_grants_on_the_live_copy_follow_the_promotion(manager, engine):
    seed(manager.store, 100)
    manager.project_live()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {ROLE}reader")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA bank_balances TO {ROLE}reader")
        conn.exec_driver_sql(f"GRANT SELECT ON bank_balances.balances TO {ROLE}reader")
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.put_replay_live("v2")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL ROLE {ROLE}reader")
        assert conn.exec_driver_sql("SELECT count(*) FROM bank_balances.balances").scalar() > 0


def test_the_same_projector_class_writes_live_and_replay_copies(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("copy", ["balances"])
    manager.start_replay("copy")
    with engine.connect() as conn:
        tables = conn.exec_driver_sql(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'balances'"
        ).scalars()
        assert sorted(tables) == ["bank_balances", "zdr_copy_1"]


def test_every_live_projection_equals_its_fold_after_live_projection(manager, engine):
    seed(manager.store, 2_500, accounts=300)
    manager.project_live(batch_size=333)
    events = list(manager.store.iter_all())
    assert_balances_match_fold(engine, manager.store)
    assert_history_exactly_once(engine, manager.store)
    with engine.connect() as conn:
        days = {
            row.day: {k: row._mapping[k] for k in ("opened", "closed", "deposited", "withdrawn")}
            for row in conn.exec_driver_sql("SELECT * FROM bank_stats.daily_totals")
        }
        accounts = dict(
            conn.exec_driver_sql(
                "SELECT account_id, closed_at IS NOT NULL FROM bank_accounts.accounts"
            ).all()
        )
    assert days == fold_daily_totals(events)
    folded = fold_balances(events)
    assert accounts == {a: row["closed"] for a, row in folded.items()}


def test_a_replay_records_its_lag_and_rate_over_time(engine):
    manager = zdr.ReplayManager(
        engine,
        projectors=[cls() for cls in LIVE],
        settings=zdr.Settings(sample_interval_s=0.0),  # a sample per batch
    )
    manager.setup()
    seed(manager.store, 2_000)
    manager.create_replay("sampled", ["balances"])
    manager.start_replay("sampled", batch_size=500)

    history = manager.lag_history("sampled")
    assert list(history["events_applied"]) == [500, 1_000, 1_500, 2_000, 2_000]
    assert list(history["lag"]) == [1_500, 1_000, 500, 0, 0]
    assert (history["events_per_s"].iloc[1:4] > 0).all()


def test_a_replay_run_of_exactly_what_was_left_ends_caught_up(manager):
    """A run bounded by max_events that applied the last event says caught up, so the
    pipeline needs no further task to find the log empty."""
    seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    part = manager.start_replay("v2", batch_size=300, max_events=600)
    assert part.state is zdr.ReplayState.REPLAYING  # 600 of 1,000
    rest = manager.start_replay("v2", batch_size=300, max_events=400)
    assert rest.state is zdr.ReplayState.CAUGHT_UP
    assert rest.events_applied == 1_000


class CountingReader:
    """zdr's own log, counting the batches read from it."""

    def __init__(self, store: zdr.EventStore) -> None:
        self.store = store
        self.reads = 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def read(self, *args, **kwargs):
        self.reads += 1
        return self.store.read(*args, **kwargs)


def test_bounded_runs_go_on_with_what_the_run_before_read_ahead_and_apply_each_event_once(
    manager, engine
):
    """A pipeline replays in tasks of max_events: each run starts with the batch the one
    before read ahead (no first read to wait for), and with events appended between the
    runs every event is applied exactly once."""
    seed(manager.store, 1_000)
    manager.project_live()
    counting = CountingReader(manager.store)
    tasks = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE], reader=counting)
    tasks.create_replay("v2", [BalancesV2()])
    tasks.start_replay("v2", batch_size=200, max_events=200)
    assert counting.reads == 2  # its batch, and the next one read ahead
    tasks.start_replay("v2", batch_size=200, max_events=200)
    assert counting.reads == 3  # only the batch after the one carried over
    for round_ in range(6):
        seed(manager.store, 150, prefix=f"between{round_}", seed=round_)
        tasks.start_replay("v2", batch_size=200, max_events=250)
    replay = tasks.start_replay("v2", batch_size=200)
    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert replay.events_applied == 1_900
    tasks.enable_dual_write("v2")
    manager.project_live()
    assert_balances_match_fold(engine, manager.store, schema=replay.schemas["bank_balances"])


def test_a_restarted_replay_does_not_take_the_batch_read_ahead_before(manager, engine):
    seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2", batch_size=200, max_events=200)
    replay = manager.start_replay("v2", batch_size=200, restart=True)
    assert replay.events_applied == 1_000
    manager.enable_dual_write("v2")
    assert_balances_match_fold(engine, manager.store, schema=replay.schemas["bank_balances"])

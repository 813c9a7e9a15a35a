"""Bad input gets one clear error naming the problem, and leaves everything as it was."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import zdr
from tests.support import (
    BulkExplodingBalancesV2,
    ExplodingBalancesV2,
    assert_balances_match_fold,
    seed,
)
from zdr.examples.bank.projectors import Balances, BalancesV2
from zdr.store import iter_all

BAD_KEYS = [
    "",
    "Upper",
    "1starts_with_digit",
    "has-dash",
    "has space",
    "x" * 41,
    "a; DROP SCHEMA zdr CASCADE; --",
    'a"b',
    "robert'); DROP TABLE zdr.events;--",
    None,
    42,
]


def _catalog(engine):
    with engine.connect() as conn:
        return (
            conn.exec_driver_sql("SELECT count(*) FROM zdr.replays").scalar(),
            conn.exec_driver_sql("SELECT count(*) FROM zdr.events").scalar(),
            sorted(conn.exec_driver_sql("SELECT nspname FROM pg_namespace").scalars()),
        )


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_replay_keys_are_refused_before_any_sql(manager, engine, key):
    before = _catalog(engine)
    for call in (
        lambda: manager.create_replay(key, ["balances"]),
        lambda: manager.start_replay(key),
        lambda: manager.get_replay(key),
        lambda: manager.get_replay_lag(key),
        lambda: manager.put_replay_live(key),
        lambda: manager.remove_replay(key),
    ):
        with pytest.raises(zdr.InvalidName, match="invalid replay key"):
            call()
    assert _catalog(engine) == before


@pytest.mark.parametrize(
    "operation",
    [
        "start_replay",
        "get_replay_lag",
        "start_projecting_to_replay",
        "put_replay_live",
        "rollback",
        "remove_replay",
    ],
)
def test_unknown_replay_keys_name_the_key(manager, operation):
    with pytest.raises(zdr.ReplayNotFound, match="no replay with key 'nope'"):
        getattr(manager, operation)("nope")


def test_get_replay_of_an_unknown_key_is_none(manager):
    assert manager.get_replay("nope") is None


def test_a_duplicate_key_is_refused_and_the_first_replay_is_untouched(manager, engine):
    seed(manager.store, 100)
    manager.create_replay("once", ["balances"])
    manager.start_replay("once")
    with pytest.raises(zdr.DuplicateReplay, match="'once' already exists"):
        manager.create_replay("once", ["history"])
    assert manager.get_replay("once").state is zdr.ReplayState.CAUGHT_UP
    assert manager.get_replay("once").projections == ["balances"]


@pytest.mark.parametrize(
    ("projectors", "error", "message"),
    [
        (["nope"], zdr.UnknownProjector, "unknown projector 'nope'"),
        (["zdr.examples.bank.projectors:Nope"], zdr.UnknownProjector, "has no projector 'Nope'"),
        (["no.such.module:X"], zdr.UnknownProjector, "cannot import module 'no.such.module'"),
        (["zdr.examples.bank.domain:BankSimulator"], zdr.UnknownProjector, "not a zdr.Projector"),
        ([], zdr.ConfigurationError, "non-empty list"),
        ("balances", zdr.ConfigurationError, "non-empty list"),
        (["balances", BalancesV2()], zdr.ConfigurationError, "each projection once"),
        (["DROP TABLE x"], zdr.InvalidName, "invalid projector name"),
    ],
)
def test_unknown_or_bad_projectors_are_refused_and_create_nothing(
    manager, engine, projectors, error, message
):
    before = _catalog(engine)
    with pytest.raises(error, match=message):
        manager.create_replay("fine_key", projectors)
    assert _catalog(engine) == before


def test_a_projection_that_is_not_live_is_refused(engine):
    manager = zdr.ReplayManager(engine, projectors=[Balances()])
    manager.setup()
    with pytest.raises(zdr.UnknownProjector, match="no live projection named 'history'"):
        manager.create_replay("k", ["zdr.examples.bank.projectors:History"])


def test_a_replay_must_take_every_projection_of_a_schema_it_swaps(engine):
    shared = sa.MetaData()

    class A(zdr.Projector):
        name = "a"
        tables = [sa.Table("a", shared, sa.Column("id", sa.Integer), schema="shared_s")]

        @zdr.handles("X")
        def x(self, event, conn): ...

    class B(zdr.Projector):
        name = "b"
        tables = [sa.Table("b", shared, sa.Column("id", sa.Integer), schema="shared_s")]

        @zdr.handles("X")
        def x(self, event, conn): ...

    manager = zdr.ReplayManager(engine, projectors=[A(), B()])
    manager.setup()
    with pytest.raises(zdr.ConfigurationError, match="'shared_s' also holds projection 'b'"):
        manager.create_replay("k", ["a"])
    manager.create_replay("k", ["a", "b"])


def test_a_projector_that_raises_names_the_event_and_the_replay_stays_resumable(
    manager, engine, monkeypatch
):
    seed(manager.store, 1_000)
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 777)
    manager.create_replay("boom", [ExplodingBalancesV2()])

    with pytest.raises(zdr.ProjectorError) as failed:
        manager.start_replay("boom", batch_size=100)

    assert failed.value.position == 777
    assert "event 777" in str(failed.value) and "replay 'boom'" in str(failed.value)
    assert "cannot project this event" in str(failed.value)
    replay = manager.get_replay("boom")
    assert replay.state is zdr.ReplayState.FAILED
    assert replay.position == 700, "the checkpoint stays at the last good batch"
    assert replay.runs[-1].status == "failed" and "777" in replay.runs[-1].error

    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 0)  # the projector is fixed
    replay = manager.start_replay("boom", batch_size=100)
    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert_balances_match_fold(engine, manager.store, "zdr_boom_1")


def test_a_batch_handler_failing_in_one_bulk_statement_still_names_the_event(
    manager, engine, monkeypatch
):
    """Nothing in the traceback names the event: the batch is tried again event by event
    (all of it rolled back) to find the one that fails, even after an SQL error."""
    seed(manager.store, 1_000)
    monkeypatch.setattr(BulkExplodingBalancesV2, "explode_at", 777)
    manager.create_replay("bulk", [BulkExplodingBalancesV2()])
    event = next(e for e in iter_all(manager.store, engine) if e.position == 777)

    with pytest.raises(zdr.ProjectorError) as failed:
        manager.start_replay("bulk", batch_size=250)

    assert failed.value.position == 777 and failed.value.event_type == event.type
    assert f"event 777 ({event.type}, stream {event.stream_id!r})" in str(failed.value)
    assert "division by zero" in str(failed.value)
    assert manager.get_replay("bulk").position == 750, "the checkpoint stays at the last batch"
    monkeypatch.setattr(BulkExplodingBalancesV2, "explode_at", 0)
    assert manager.start_replay("bulk").state is zdr.ReplayState.CAUGHT_UP
    assert_balances_match_fold(engine, manager.store, "zdr_bulk_1")


def test_a_broken_replay_projector_leaves_dual_write_but_live_goes_on(manager, engine, monkeypatch):
    seed(manager.store, 300)
    manager.project_live()
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 0)
    manager.create_replay("fragile", [ExplodingBalancesV2()])
    manager.start_replay("fragile")
    manager.start_projecting_to_replay("fragile")
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 305)
    seed(manager.store, 20, seed=1, prefix="new")

    assert manager.project_live() == 20

    assert_balances_match_fold(engine, manager.store)
    replay = manager.get_replay("fragile")
    assert replay.state is zdr.ReplayState.FAILED
    assert "event 305" in replay.error
    assert replay.position == 300


def test_a_live_projector_that_raises_stops_the_batch_and_applies_nothing(engine, monkeypatch):
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 50)
    manager = zdr.ReplayManager(engine, projectors=[ExplodingBalancesV2()])
    manager.setup()
    seed(manager.store, 100)
    with pytest.raises(zdr.ProjectorError, match="event 50"):
        manager.project_live()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM bank_balances.balances").scalar() == 0
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 0)
    assert manager.project_live() == 100


@pytest.mark.parametrize(
    ("operation", "state"),
    [("put_replay_live", "created"), ("rollback", "created"), ("start_replay", "live")],
)
def test_operations_out_of_order_are_refused_with_the_state(manager, operation, state):
    seed(manager.store, 50)
    manager.project_live()
    manager.create_replay("order", [BalancesV2()])
    if state == "live":
        manager.start_replay("order")
        manager.put_replay_live("order")
    with pytest.raises(zdr.InvalidState, match=f"in state '{state}'"):
        getattr(manager, operation)("order")


def test_dual_write_is_refused_while_the_lag_is_above_the_threshold(manager):
    seed(manager.store, 500)
    manager.create_replay("behind", [BalancesV2()])
    with pytest.raises(zdr.ReplayLagging, match="500 events behind") as refused:
        manager.start_projecting_to_replay("behind", lag_threshold=100)
    assert refused.value.lag == 500
    assert manager.get_replay("behind").state is zdr.ReplayState.CREATED


def test_an_unprepared_database_gets_one_instruction(engine):
    manager = zdr.ReplayManager(engine, projectors=[Balances()])
    with pytest.raises(zdr.NotSetUp, match=r"call ReplayManager.setup\(\)"):
        manager.get_replay("any")


@pytest.mark.parametrize(
    "operation",
    [
        lambda m: m.start_replay("k"),
        lambda m: m.enable_dual_write("k"),
        lambda m: m.project_live(),
        lambda m: m.get_replay_lag("k"),
    ],
    ids=["start_replay", "enable_dual_write", "project_live", "get_replay_lag"],
)
def test_a_missing_event_table_is_not_set_up_not_a_raw_error(manager, engine, operation):
    manager.create_replay("k", [BalancesV2()])
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE zdr.events CASCADE")
    with pytest.raises(zdr.NotSetUp, match=r"call ReplayManager.setup\(\)"):
        operation(manager)


def test_a_projectors_own_missing_table_stays_a_projector_error(manager, engine):
    seed(manager.store, 50)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE bank_balances.balances")
    with pytest.raises(zdr.ProjectorError, match="balances"):
        manager.project_live()


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([{"data": {}}], "non-empty string 'type'"),
        ([{"type": "X"}], "needs a dict 'data'"),
        ([{"type": "X", "data": {}, "extra": 1}], "unknown fields"),
        (["not a mapping"], "must be a mapping"),
    ],
)
def test_malformed_events_are_refused_and_nothing_is_appended(manager, engine, events, message):
    with pytest.raises(zdr.ZdrError, match=message):
        manager.store.append("s", [{"type": "Ok", "data": {}}, *events])
    assert _catalog(engine)[1] == 0


def test_a_projector_without_a_schema_of_its_own_is_refused(engine):
    class NoSchema(zdr.Projector):
        name = "no_schema"
        tables = [sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer))]

        @zdr.handles("X")
        def x(self, event, conn): ...

    with pytest.raises(zdr.InvalidName, match="has no schema"):
        zdr.ReplayManager(engine, projectors=[NoSchema()])


def test_all_errors_share_one_root():
    for error in (
        zdr.InvalidName,
        zdr.ReplayNotFound,
        zdr.ProjectorError,
        zdr.LockTimeout,
        zdr.RunnerBusy,
        zdr.DependentObjects,
        zdr.NotSetUp,
        zdr.ReplayLagging,
    ):
        assert issubclass(error, zdr.ZdrError)


def _main_class() -> type:
    return type("MainBalances", (BalancesV2,), {"__module__": "__main__"})


def _local_class() -> type:
    class LocalBalances(BalancesV2):
        pass

    return LocalBalances


def _impostor_class() -> type:
    """Says it is zdr.examples.bank.projectors:BalancesV2 but is another class."""
    return type(
        "BalancesV2",
        (BalancesV2,),
        {"__module__": BalancesV2.__module__, "__qualname__": "BalancesV2"},
    )


def test_every_error_survives_pickling_with_its_fields():
    """A Prefect task on Dask sends its exception back pickled: ReplayLagging and
    ProjectorError (keyword-only fields) could not be rebuilt and came back as a
    pickling error instead of the error raised."""
    import pickle

    errors = [
        zdr.ReplayLagging("the replay is 7 events behind", lag=7),
        zdr.ProjectorError("boom", projector="balances", position=3, event_type="Opened"),
        zdr.LiveLagging("behind", behind={"live:balances": 2}),
        zdr.PrivilegeMissing("GRANT USAGE ON SCHEMA x TO y"),
        zdr.InvalidName("bad key"),
    ]
    for error in errors:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_main_class, "__main__:MainBalances"),
        (_local_class, "<locals>"),
        (_impostor_class, "another class"),
    ],
    ids=["__main__", "local", "impostor"],
)
def test_create_replay_refuses_a_projector_another_process_cannot_load(manager, make, says):
    """The replay's import path is what the live runner and the pipeline's workers load."""
    seed(manager.store, 10)
    manager.project_live()
    with pytest.raises(zdr.ConfigurationError, match="another process") as refused:
        manager.create_replay("unloadable", [make()()])
    assert says in str(refused.value)
    assert manager.get_replay("unloadable") is None


def test_a_registered_projector_is_replayed_by_the_path_its_live_projection_has(engine):
    """Registered with the manager, a class is recorded for live by the same path already:
    one process (a script) may replay it, by name or instance."""
    main_balances = _main_class()()
    manager = zdr.ReplayManager(engine, projectors=[main_balances])
    manager.setup()
    seed(manager.store, 10)
    manager.project_live()
    assert manager.create_replay("by_name", ["balances"]).projectors == {
        "balances": "__main__:MainBalances"
    }
    manager.create_replay("by_instance", [main_balances])


ledger_table = sa.Table(
    "entries",
    sa.MetaData(),
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("amount", sa.BigInteger, sa.CheckConstraint("amount < 500"), nullable=False),
    schema="errors_ledger",
)


class PerEventLedger(zdr.Projector):
    """Per-event handlers whose statement the database refuses for one event: in pipeline
    mode the error arrives later, while another handler runs."""

    name = "ledger"
    tables = [ledger_table]

    @zdr.handles("MoneyDeposited", "MoneyWithdrawn")
    def moved(self, event, conn):
        conn.execute(
            ledger_table.insert().values(position=event.position, amount=event.data["amount"])
        )


def test_per_event_handlers_name_the_event_the_database_refused(engine):
    manager = zdr.ReplayManager(engine, projectors=[PerEventLedger()], batch_size=1_000)
    manager.setup()
    pairs = [
        ("acc-1", {"type": "MoneyDeposited", "data": {"amount": 999 if n == 40 else n % 100}})
        for n in range(100)
    ]
    positions = manager.store.import_events(pairs)
    with engine.connect() as conn:
        bad = conn.exec_driver_sql(
            "SELECT position FROM zdr.events ORDER BY position LIMIT 1 OFFSET 40"
        ).scalar()
    with pytest.raises(
        zdr.ProjectorError, match=rf"failed on event {bad} \(MoneyDeposited"
    ) as found:
        manager.project_live()
    assert "CheckViolation" in str(found.value) and found.value.position == bad
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM errors_ledger.entries").scalar() == 0
    assert positions == 100

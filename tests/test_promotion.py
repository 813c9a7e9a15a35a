"""Atomic promotion: readers never fail or see an empty table; refusals change nothing."""

from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest

import zdr
from tests.support import (
    SlowBalancesV2,
    append,
    assert_balances_match_fold,
    balances,
    seed,
    wait_for,
    zdr_state,
)
from zdr.config import to_libpq_url
from zdr.examples.bank.domain import BankSimulator
from zdr.examples.bank.projectors import LIVE, BalancesV2
from zdr.locks import holding_live_batch_lock
from zdr.names import SCHEMA_PATTERN, side_schema, swap_schema


def _dual_writing_replay(manager, key="v2"):
    sim = seed(manager.store, 2_000)
    manager.project_live()
    manager.create_replay(key, [BalancesV2()])
    manager.start_replay(key)
    manager.start_projecting_to_replay(key)
    return sim


def _state(engine, key="v2"):
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            """SELECT r.state, p.projector, (SELECT array_agg(nspname ORDER BY nspname)
               FROM pg_namespace WHERE nspname LIKE 'zdr\\_%%' OR nspname LIKE 'bank\\_%%')
               FROM zdr.replays r, zdr.projections p WHERE r.key = %s AND p.name = 'balances'""",
            (key,),
        ).one()


# Two kinds of reader: a plain ``SELECT *`` (sees 5 columns, then 7), and a
# prepared statement that names what it selects. A prepared ``SELECT *`` cannot
# survive a change of shape in PostgreSQL ("cached plan must not change result
# type"), whatever the swap does; that is documented, not tested here.
READS = {
    "plain": ("SELECT * FROM bank_balances.balances LIMIT 1", False),
    "prepared": (
        "SELECT account_id, to_jsonb(b) ? 'deposits' FROM bank_balances.balances b LIMIT 1",
        True,
    ),
}


def test_readers_in_a_loop_never_fail_and_switch_from_old_to_new_at_one_point(
    manager, engine, database_url
):
    _dual_writing_replay(manager)
    url = to_libpq_url(database_url)
    stop = threading.Event()
    seen: dict[str, list[tuple[float, bool]]] = {name: [] for name in READS}  # (time, is new)
    failures: list[BaseException] = []

    def reader(name: str) -> None:
        query, prepare = READS[name]
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    row = conn.execute(query, prepare=prepare).fetchone()
                    if row is None:
                        raise AssertionError("the read model was empty")
                    seen[name].append(
                        (time.perf_counter(), len(row) == 7 if name == "plain" else row[1])
                    )
                except BaseException as exc:
                    failures.append(exc)
                    return

    def writer() -> None:
        local = BankSimulator(accounts=100, seed=99, prefix="w")
        while not stop.is_set():
            append(manager.store, local.events(20))
            time.sleep(0.005)

    runner = threading.Thread(target=manager.follow, kwargs={"stop": stop, "poll_interval": 0.01})
    threads = [threading.Thread(target=reader, args=(name,)) for name in READS]
    threads += [threading.Thread(target=writer), runner]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(len(s) for s in seen.values()) > 100)
        report = _promote_with_live_runner(manager)
        counts = {name: len(s) for name, s in seen.items()}
        wait_for(lambda: all(len(seen[n]) > counts[n] + 100 for n in READS))
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    assert not failures, failures
    assert report.state is zdr.ReplayState.LIVE
    for name, reads in seen.items():
        shapes = [new for _, new in reads]
        switch = shapes.index(True)
        assert switch > 0 and all(shapes[switch:]) and not any(shapes[:switch]), name
        stalls = [b[0] - a[0] for a, b in zip(reads, reads[1:], strict=False)]
        assert max(stalls) < 2.0, "readers wait a bounded time"
    manager.project_live()
    assert_balances_match_fold(engine, manager.store)


def _promote_with_live_runner(manager):
    # The live runner in another thread keeps both copies at the same position
    # between batches; promotion takes its turn between two batches.
    for _ in range(100):
        try:
            return manager.put_replay_live("v2")
        except zdr.ReplayLagging:
            time.sleep(0.05)
    raise AssertionError("never at the live position")


def test_promotion_is_refused_while_the_replay_lags_and_nothing_changes(manager, engine):
    sim = seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    append(manager.store, sim.events(30))
    manager.project_live()  # live moves on; the replay is not dual writing
    before = _state(engine)

    with pytest.raises(zdr.ReplayLagging) as refused:
        manager.put_replay_live("v2")

    assert refused.value.lag == 30, "the replay is 30 events behind live"
    assert "v2" in str(refused.value)
    assert _state(engine) == before


def test_promotion_that_cannot_get_its_lock_fails_cleanly(manager, engine):
    _dual_writing_replay(manager)
    manager.project_live()
    before = _state(engine)
    live_rows = balances(engine)
    impatient = zdr.ReplayManager(engine, lock_timeout=0.05, swap_attempts=2)

    # A live batch that takes as long as the block.
    with (
        engine.connect() as holder,
        holding_live_batch_lock(holder),
        pytest.raises(zdr.LockTimeout) as refused,
    ):
        impatient.put_replay_live("v2")

    assert "nothing was changed" in str(refused.value)
    assert _state(engine) == before
    assert balances(engine) == live_rows
    assert impatient.put_replay_live("v2").state is zdr.ReplayState.LIVE


def test_promotion_is_refused_when_a_view_outside_would_keep_reading_the_old_copy(manager, engine):
    _dual_writing_replay(manager)
    manager.project_live()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE VIEW public.rich AS SELECT * FROM bank_balances.balances WHERE balance > 100"
        )
    before = _state(engine)

    with pytest.raises(zdr.DependentObjects) as refused:
        manager.put_replay_live("v2")

    assert "view public.rich uses bank_balances.balances" in str(refused.value)
    assert _state(engine) == before


def test_promotion_is_refused_when_the_live_schema_holds_objects_the_replay_lacks(manager, engine):
    _dual_writing_replay(manager)
    manager.project_live()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE bank_balances.notes (id int)")

    with pytest.raises(zdr.DependentObjects, match="bank_balances.notes"):
        manager.put_replay_live("v2")
    assert _state(engine)[0] == "dual_writing"


def test_two_runs_on_one_replay_are_refused(manager, engine, monkeypatch):
    seed(manager.store, 3_000)
    manager.project_live()
    manager.create_replay("busy", [SlowBalancesV2()])
    monkeypatch.setenv("ZDR_TEST_SLOW_BATCH", "0.2")
    first = threading.Thread(
        target=manager.start_replay, args=("busy",), kwargs={"batch_size": 100}
    )
    first.start()
    try:
        wait_for(lambda: manager.get_replay("busy").state is zdr.ReplayState.REPLAYING)
        other = zdr.ReplayManager(engine)  # as if from another process
        with pytest.raises(zdr.RunnerBusy, match="replay 'busy' is busy"):
            other.start_replay("busy")
        with pytest.raises(zdr.RunnerBusy):
            other.put_replay_live("busy")
        with pytest.raises(zdr.RunnerBusy):
            other.remove_replay("busy")
    finally:
        monkeypatch.setenv("ZDR_TEST_SLOW_BATCH", "0")
        first.join(60)
    assert manager.get_replay("busy").state is zdr.ReplayState.CAUGHT_UP


def test_two_live_runners_are_refused(manager, engine):
    stop = threading.Event()
    runner = threading.Thread(target=manager.follow, kwargs={"stop": stop})
    runner.start()
    try:
        time.sleep(0.3)
        second = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE])
        with pytest.raises(zdr.RunnerBusy, match="another live runner"):
            second.project_live()
    finally:
        stop.set()
        runner.join(10)
    assert manager.project_live() == 0  # the lock was released when the runner stopped


def test_remove_refuses_to_drop_a_copy_that_other_objects_depend_on(manager, engine):
    seed(manager.store, 100)
    manager.project_live()
    manager.create_replay("kept", [BalancesV2()])
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW public.peek AS SELECT * FROM zdr_kept_1.balances")

    with pytest.raises(zdr.DependentObjects, match="public.peek"):
        manager.remove_replay("kept")
    assert manager.get_replay("kept") is not None


SIDE_SCHEMA = re.compile(r"^zdr_[a-z][a-z0-9_]{0,39}_[1-9][0-9]*$")


@pytest.mark.parametrize("key", ["x", "swap", "swap_x", "zdr_swap_x", "a" * 40])
def test_no_key_makes_a_side_schema_with_a_swap_schema_s_name(key):
    side = side_schema(key, 1)
    tmp = swap_schema(side)
    assert SIDE_SCHEMA.fullmatch(side) and not SIDE_SCHEMA.fullmatch(tmp)
    assert not SCHEMA_PATTERN.fullmatch(tmp), "nor could a live schema have it"
    assert len(tmp.encode()) <= 63


def test_a_replay_is_promoted_and_rolled_back_while_a_replay_keyed_swap_x_exists(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("swap_x", [BalancesV2()])  # its side schema: zdr_swap_x_1
    manager.create_replay("x", [BalancesV2()])
    manager.start_replay("x")

    assert manager.promote("x").state is zdr.ReplayState.LIVE
    assert "deposits" in next(iter(balances(engine).values()))
    assert manager.rollback("x").state is zdr.ReplayState.ROLLED_BACK

    assert manager.get_replay("swap_x").state is zdr.ReplayState.CREATED
    assert balances(engine, "zdr_swap_x_1") == {}, "replay swap_x's copy is untouched"


def test_a_swap_whose_temporary_name_is_taken_is_refused_and_changes_nothing(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("x", [BalancesV2()])
    manager.start_replay("x")
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{swap_schema("zdr_x_1")}"')
    before = zdr_state(engine)

    with pytest.raises(zdr.DependentObjects, match="'zdr-swap-x_1' exists"):
        manager.promote("x")
    assert zdr_state(engine) == before


def test_a_refused_remove_leaves_the_replay_dual_writing(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("kept", [BalancesV2()])
    manager.start_replay("kept")
    manager.enable_dual_write("kept")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW public.peek AS SELECT * FROM zdr_kept_1.balances")
    before = zdr_state(engine)

    with pytest.raises(zdr.DependentObjects, match="public.peek"):
        manager.remove_replay("kept")

    assert zdr_state(engine) == before
    seed(manager.store, 20, seed=1, prefix="new")
    manager.project_live()
    assert manager.get_replay_lag("kept") == 0, "the live runner still writes its copy"


def test_a_dual_writing_replay_is_removed_while_the_live_runner_runs(manager, engine):
    sim = seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("going", [BalancesV2()])
    manager.start_replay("going")
    manager.enable_dual_write("going")
    stop = threading.Event()
    failures: list[BaseException] = []

    def follow() -> None:
        try:
            manager.follow(stop=stop, poll_interval=0.01)
        except BaseException as exc:
            failures.append(exc)

    runner = threading.Thread(target=follow)
    runner.start()
    try:
        for _ in range(5):
            append(manager.store, sim.events(20))
            time.sleep(0.02)
        assert manager.remove_replay("going").state is zdr.ReplayState.REMOVED
        append(manager.store, sim.events(20))
        time.sleep(0.3)
    finally:
        stop.set()
        runner.join(30)
    assert not failures, failures
    assert manager.get_replay("going") is None
    manager.project_live()
    assert_balances_match_fold(engine, manager.store)


def test_the_promoted_copy_has_planner_statistics_at_once(manager, engine):
    """A replay's copy was filled by inserts: without an ANALYZE before the swap its tables
    go live with no statistics (reltuples -1, nothing in pg_stats) until autovacuum comes,
    and the first queries are planned blind."""
    seed(manager.store, 3_000)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    with engine.begin() as conn:  # autovacuum must not do it for us meanwhile
        schema = manager.get_replay("v2").schemas["bank_balances"]
        conn.exec_driver_sql(f'ALTER TABLE "{schema}".balances SET (autovacuum_enabled = false)')
    manager.start_replay("v2")
    manager.enable_dual_write("v2")
    report = manager.promote("v2")
    assert f"{schema}.balances" in report.analyzed  # named as it was before the swap
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT count(*) FROM bank_balances.balances").scalar_one()
        tuples = conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE oid = 'bank_balances.balances'::regclass"
        ).scalar_one()
        stats = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'bank_balances' "
            "AND tablename = 'balances'"
        ).scalar_one()
    assert tuples == rows > 0
    assert stats > 0


def test_a_remove_that_cannot_get_its_locks_names_who_holds_them(manager, engine):
    """A report reading the replay's copy in a long transaction: the remove gives up
    after its attempts, changing nothing, and names that session so a DBA can act."""
    _dual_writing_replay(manager)
    schema = manager.get_replay("v2").schemas["bank_balances"]
    impatient = zdr.ReplayManager(engine, lock_timeout=0.2, swap_attempts=2)
    with engine.connect() as report:
        report.exec_driver_sql("SET application_name = 'nightly-report'")
        report.exec_driver_sql(f'SELECT count(*) FROM "{schema}".balances')  # stays open
        pid = report.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with pytest.raises(zdr.LockTimeout) as refused:
            impatient.remove_replay("v2")
        report.rollback()
    message = str(refused.value)
    assert f"held by pid {pid} (user " in message
    assert "application nightly-report, idle in transaction" in message
    assert "nothing was changed" in message
    assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING

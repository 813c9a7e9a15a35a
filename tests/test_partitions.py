"""Partitioned replay: streams cut into partitions replayed at once, each exactly once and
resumable alone, brought together before catch-up and dual write with nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import zdr
from tests.logs import append_own
from tests.support import (
    append,
    assert_balances_match_fold,
    assert_history_exactly_once,
    following,
    seed,
    wait_for,
)
from zdr.examples.bank.domain import BankSimulator
from zdr.names import partition_checkpoints
from zdr.store import iter_all

ROOT = Path(__file__).resolve().parent.parent

PARTITION_SCRIPT = textwrap.dedent(
    """
    import sys
    import zdr
    manager = zdr.ReplayManager(sys.argv[1])
    manager.replay_partition(sys.argv[2], int(sys.argv[3]), batch_size=int(sys.argv[4]))
    """
)


class Appender:
    """Appends bank events in a thread for the block, in transactions of a few events."""

    def __init__(self, store: zdr.EventStore, prefix: str) -> None:
        self.store = store
        self.sim = BankSimulator(accounts=60, seed=13, prefix=prefix)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            append(self.store, self.sim.events(5))
            time.sleep(0.005)

    def __enter__(self) -> Appender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _plan_rows(engine: sa.Engine, key: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.exec_driver_sql(
                "SELECT name FROM zdr.checkpoints WHERE starts_with(name, %s) ORDER BY name",
                (partition_checkpoints(key),),
            ).scalars()
        )


def _partition_in_a_process(
    database_url: str, key: str, index: int, *, slow_batch_s: float
) -> subprocess.Popen[bytes]:
    """``replay_partition(key, index)`` in a child process, batches of 100 events, each
    sleeping ``slow_batch_s`` after its writes (SlowBalancesV2)."""
    env = {**os.environ, "ZDR_TEST_SLOW_BATCH": str(slow_batch_s), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", PARTITION_SCRIPT, database_url, key, str(index), "100"],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )


def _events(manager: zdr.ReplayManager) -> int:
    return sum(1 for _ in iter_all(manager.reader, manager.engine))


def test_a_partitioned_replay_under_concurrent_appends_equals_the_fold_of_every_event(
    manager, engine
):
    """Three partitions in threads while events are appended, one transaction holding its
    events open across the plan (it commits after, below events that committed before)."""
    seed(manager.store, 3_000, accounts=150)
    manager.project_live()
    manager.create_replay("parts", ["balances", "history"])
    late = BankSimulator(accounts=20, seed=3, prefix="late")
    with engine.connect() as held:
        # An append whose transaction stays open across the plan and the partitions.
        append_in = held.begin()
        append_own(manager.store, late.events(30), held)
        with Appender(manager.store, "during"):
            plan = manager.plan_partitions("parts", 3)
            assert plan.partitions == 3 and plan.pending == [0, 1, 2]
            errors: list[BaseException] = []

            def run(index: int) -> None:
                try:
                    manager.replay_partition("parts", index, batch_size=200)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not errors, errors
            append_in.commit()
        runs = [r for r in manager.get_replay("parts").runs if r.kind.startswith("partition")]
        assert sorted(r.kind for r in runs) == ["partition 1/3", "partition 2/3", "partition 3/3"]
        assert all(r.events > 0 for r in runs), "every partition had streams of its own"
        assert sum(r.events for r in runs) == manager.get_replay("parts").events_applied

    replay = manager.start_replay("parts")  # brings them together, then one reader

    assert _plan_rows(engine, "parts") == []
    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert replay.events_applied == _events(manager), "each event applied once"
    assert_balances_match_fold(engine, manager.reader, "zdr_parts_1")
    assert_history_exactly_once(engine, manager.reader, "zdr_parts_2")


def _partition_events(engine: sa.Engine, key: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            """SELECT name, events_applied FROM zdr.checkpoints
               WHERE starts_with(name, %s) AND name NOT LIKE '%%/until'""",
            (partition_checkpoints(key),),
        )
        return {name.rsplit("/", 1)[1]: events for name, events in rows}


def test_a_partition_killed_mid_batch_resumes_alone(manager, engine, database_url):
    """SIGKILL of one partition's process while a batch's writes are done but not
    committed; the re-run of every partition finds work in that one only."""
    seed(manager.store, 4_000, accounts=150)
    manager.project_live()
    manager.create_replay("killed", ["tests.support:SlowBalancesV2", "history"])
    manager.plan_partitions("killed", 3)
    for index in (0, 2):
        assert manager.replay_partition("killed", index, batch_size=300).done
    child = _partition_in_a_process(database_url, "killed", 1, slow_batch_s=0.15)
    try:
        wait_for(
            lambda: _partition_events(engine, "killed")["1"] >= 300 or child.poll() is not None,
            timeout=60,
        )
        assert child.poll() is None, child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    before = _partition_events(engine, "killed")
    assert 0 < before["1"] < 4_000 // 2, before
    replay = manager.get_replay("killed")
    assert (replay.partitions, replay.partitions_left) == (3, 1)
    [row] = wait_for(lambda: [r for r in manager.status("killed") if not r["running"]])
    assert row["last_run"] == "partition 2/3 interrupted", row
    assert row["next"].startswith("not running: 1 of its 3 partitions left"), row
    assert row["events_applied"] + row["lag"] == 4_000, row

    again = [manager.replay_partition("killed", i, batch_size=300) for i in range(3)]

    assert [run.events for run in again][0::2] == [0, 0], "the finished partitions had none"
    assert again[1].events > 0 and again[1].done
    after = _partition_events(engine, "killed")
    assert after["0"] == before["0"] and after["2"] == before["2"]
    replay = manager.start_replay("killed")
    assert replay.events_applied == 4_000, "each event counted once across the kill"
    assert_balances_match_fold(engine, manager.reader, "zdr_killed_1")
    assert_history_exactly_once(engine, manager.reader, "zdr_killed_2")


def test_the_switch_to_dual_write_after_a_partitioned_replay_loses_nothing(manager, engine):
    """Partitions, then one reader to the head, then dual write with the live runner and
    appends going on throughout: the replay ends equal to the fold, with live."""
    seed(manager.store, 3_000, accounts=150)
    manager.project_live()
    manager.create_replay("switch", ["balances", "history"])
    with following(manager), Appender(manager.store, "live"):
        manager.plan_partitions("switch", 2)
        for index in range(2):
            manager.replay_partition("switch", index, batch_size=400)
        with pytest.raises(zdr.ReplayLagging, match="replayed in partitions"):
            manager.enable_dual_write("switch", lag_threshold=10**9)
        manager.start_replay("switch")
        manager.enable_dual_write("switch", lag_threshold=10**9)
        time.sleep(0.5)  # dual write under appends
    manager.project_live()
    assert manager.get_replay_lag("switch") == 0
    assert manager.get_replay("switch").state is zdr.ReplayState.DUAL_WRITING
    assert_balances_match_fold(engine, manager.reader, "zdr_switch_1")
    assert_history_exactly_once(engine, manager.reader, "zdr_switch_2")
    assert manager.verify("switch").equal
    manager.promote("switch")
    assert manager.get_replay("switch").state is zdr.ReplayState.LIVE


def test_what_cannot_run_in_partitions_is_refused_and_nothing_is_left_behind(manager, engine):
    seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("whole", ["balances", "daily_totals"])
    with pytest.raises(
        zdr.NotPartitionable, match="projector 'daily_totals' does not declare partition_by"
    ):
        manager.plan_partitions("whole", 2)
    assert _plan_rows(engine, "whole") == []
    for bad in (1, 0, True, 2.0):
        with pytest.raises(zdr.ConfigurationError, match="partitions must be a whole number"):
            manager.plan_partitions("whole", bad)
    with pytest.raises(zdr.InvalidState, match="not cut into partitions"):
        manager.replay_partition("whole", 0)

    manager.create_replay("cut", ["balances"])
    manager.plan_partitions("cut", 2)
    assert manager.plan_partitions("cut", 2).partitions == 2, "the same plan, taken up again"
    with pytest.raises(zdr.ConfigurationError, match="in 2 partitions already"):
        manager.plan_partitions("cut", 3)
    with pytest.raises(zdr.ConfigurationError, match=r"partitions 0 to 1 \(0-based: 1/2 to 2/2\)"):
        manager.replay_partition("cut", 2)
    for bad in (1.0, "1", -1, True):
        with pytest.raises(zdr.ConfigurationError, match="partition must be a whole number"):
            manager.replay_partition("cut", bad)
    with pytest.raises(zdr.ConfigurationError, match="at most 256"):
        manager.plan_partitions("whole", 257)
    manager.replay_partition("cut", 0)
    with pytest.raises(zdr.InvalidState, match="partition 2/2 has not replayed"):
        manager.start_replay("cut")
    assert manager.get_replay_lag("cut") + manager.get_replay("cut").events_applied == 500

    replay = manager.start_replay("cut", restart=True)  # from zero, with one reader
    assert _plan_rows(engine, "cut") == [] and replay.events_applied == 500
    manager.plan_partitions("cut", 2)
    manager.remove_replay("cut")
    assert _plan_rows(engine, "cut") == []


def test_partitions_run_at_once_and_nothing_else_runs_beside_them(manager, engine, database_url):
    """A partition's run holds the replay's lock shared: another partition runs beside it;
    the same partition, the single reader and removal are refused while it runs."""
    seed(manager.store, 2_000, accounts=100)
    manager.project_live()
    manager.create_replay("busy", ["tests.support:SlowBalancesV2"])
    manager.plan_partitions("busy", 2)
    child = _partition_in_a_process(database_url, "busy", 0, slow_batch_s=0.3)
    try:
        wait_for(lambda: _partition_events(engine, "busy")["0"] > 0, timeout=60)
        with pytest.raises(
            zdr.RunnerBusy, match=r"partition 0 \(0-based\) of replay 'busy' is busy"
        ):
            manager.replay_partition("busy", 0)
        for refused in (manager.start_replay, manager.remove_replay):
            with pytest.raises(zdr.RunnerBusy, match="replay 'busy' is busy"):
                refused("busy")
        assert manager.replay_partition("busy", 1).done, "the other partition runs beside it"
        assert child.wait(60) == 0, child.stderr.read().decode()
    finally:
        if child.poll() is None:
            child.kill()
    assert manager.start_replay("busy").events_applied == 2_000


def test_events_without_a_stream_are_replayed_in_partitions_too(engine):
    """An application's table whose stream column is nullable (a Laravel stored_events):
    its events without a stream are in partition 0, not in none."""
    from zdr.examples.bank import stored_events
    from zdr.examples.bank.projectors import History

    stored_events.create(engine)
    reader = stored_events.table_reader()
    reader.prepare(engine)
    manager = zdr.ReplayManager(engine, projectors=[History()], batch_size=300, reader=reader)
    manager.setup()
    stored_events.StoredEventsLog(engine).append(BankSimulator(accounts=80, seed=4).events(2_000))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE {stored_events.TABLE} SET aggregate_uuid = NULL WHERE id %% 10 = 0"
        )
    manager.project_live()
    manager.create_replay("nulls", ["history"])
    manager.plan_partitions("nulls", 3)
    for index in range(3):
        manager.replay_partition("nulls", index)

    replay = manager.start_replay("nulls")

    assert replay.events_applied == 2_000
    assert_history_exactly_once(engine, reader, "zdr_nulls_1")


def test_a_partition_s_failure_stays_on_the_replay_while_the_others_run(
    manager, engine, monkeypatch
):
    """A projector raises in one partition: the replay is failed, and the other
    partitions' runs after it do not hide that; fixed, the partition resumes alone."""
    from tests.support import ExplodingBalancesV2

    seed(manager.store, 2_000, accounts=100)
    manager.project_live()
    manager.create_replay("broken", ["tests.support:ExplodingBalancesV2"])
    manager.plan_partitions("broken", 3)
    with engine.connect() as conn:
        failing = conn.exec_driver_sql(
            "SELECT abs(mod(hashtextextended(stream_id, 0), 3)) FROM zdr.events "
            "WHERE position = 700"
        ).scalar_one()
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 700)
    with pytest.raises(zdr.ProjectorError, match="event 700"):
        manager.replay_partition("broken", failing, batch_size=100)
    for index in {0, 1, 2} - {failing}:
        assert manager.replay_partition("broken", index).done
    replay = manager.get_replay("broken")
    assert replay.state is zdr.ReplayState.FAILED and "event 700" in replay.error
    assert replay.partitions_left == 1

    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 0)  # the fix
    assert manager.replay_partition("broken", failing).done
    replay = manager.start_replay("broken")
    assert replay.state is zdr.ReplayState.CAUGHT_UP and replay.error is None
    assert replay.events_applied == 2_000
    assert_balances_match_fold(engine, manager.reader, "zdr_broken_1")

"""Checkpoints an earlier zdr version left in (transaction id, position) order move to
position order once, with no event applied twice or skipped (``zdr.ordering``)."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

import zdr
from tests.support import assert_balances_match_fold, assert_history_exactly_once, seed
from zdr import records
from zdr.examples.bank.projectors import BalancesV2
from zdr.names import partition_checkpoint
from zdr.runner import LiveRunner, apply_batch, replay_target


def _deposit(account: str, amount: int) -> dict:
    return {"type": "MoneyDeposited", "data": {"account_id": account, "amount": amount}}


def _crossing(manager: zdr.ReplayManager, engine: sa.Engine, n: int) -> int:
    """A transaction takes its id first and appends last: its event comes first in the
    earlier order and after the other one's by position. Returns its event's position."""
    with engine.connect() as early:
        early.begin()
        early.exec_driver_sql("SELECT pg_current_xact_id()")
        manager.store.append(f"late-{n}", [_deposit(f"late-{n}", 5)])
        [position] = manager.store.append(f"early-{n}", [_deposit(f"early-{n}", 7)], conn=early)
        early.commit()
    return position


def _in_earlier_order(engine: sa.Engine, reader: zdr.EventReader) -> list[zdr.RecordedEvent]:
    """Every committed event as an earlier version read it: stamped, in (txid, position)
    order."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT position, txid, stream_id, type, data, metadata, recorded_at "
            "FROM zdr.events ORDER BY txid, position"
        ).all()
    return [zdr.RecordedEvent(*row) for row in rows]


def _up_to(events: list[zdr.RecordedEvent], position: int) -> list[zdr.RecordedEvent]:
    """The earlier order's prefix up to the event at ``position``."""
    cut = next(i for i, e in enumerate(events) if e.position == position)
    return events[: cut + 1]


def _applied_as_before(engine: sa.Engine, target, events) -> None:
    """What an earlier version's runner did: apply ``events`` and claim the checkpoint in
    (transaction id, position) order."""
    with engine.begin() as conn:
        apply_batch(conn, target, events)


def _split_as_before(
    engine: sa.Engine, manager: zdr.ReplayManager, point: zdr.Cursor, applied
) -> None:
    """Replay "split"'s plan of 2 partitions as an earlier version left it: its point at
    ``point`` (a cut of the earlier order) and each partition having applied its own
    streams' share of ``applied``."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE zdr.checkpoints SET txid = %s, position = %s WHERE name = %s",
            (point.txid, point.position, partition_checkpoint("split", "until", 2)),
        )
        replay = records.load_replay(conn, "split")
        part_of = dict(
            conn.exec_driver_sql(
                "SELECT position, abs(mod(hashtextextended(stream_id, 0), 2)) FROM zdr.events"
            ).all()
        )
    for index in range(2):
        target = dataclasses.replace(
            replay_target(manager.registry, replay),
            checkpoint=partition_checkpoint("split", index, 2),
            cursor=zdr.Cursor(0, 0),
        )
        mine = [e for e in applied if part_of[e.position] == index]
        _applied_as_before(engine, target, mine)


@pytest.fixture()
def earlier(manager: zdr.ReplayManager, engine: sa.Engine):
    """A log whose transaction-id order and position order cross."""
    seed(manager.store, 60)
    crossings = [_crossing(manager, engine, n) for n in range(3)]
    seed(manager.store, 30, prefix="after", seed=3)
    return crossings


def test_live_and_replay_checkpoints_of_the_earlier_order_move_exactly_once(
    manager, engine, earlier
):
    ordered = _in_earlier_order(engine, manager.store)
    first, second, _ = earlier
    runner = LiveRunner(manager.reader, manager.registry)
    with engine.connect() as conn, conn.begin():
        live = runner.targets(conn)
    for target in live:  # each stopped right after a crossing: events ahead of its position
        _applied_as_before(engine, target, _up_to(ordered, first))
    manager.create_replay("older", [BalancesV2(), "history"])
    with engine.connect() as conn:
        replay = records.load_replay(conn, "older")
    _applied_as_before(engine, replay_target(manager.registry, replay), _up_to(ordered, second))
    with engine.connect() as conn:
        stamped = conn.exec_driver_sql(
            "SELECT count(*) FROM zdr.checkpoints WHERE txid <> 0"
        ).scalar_one()
    assert stamped == len(live) + 1, "the checkpoints are in the earlier order"

    manager.project_live()
    manager.start_replay("older")
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql(
                "SELECT count(*) FROM zdr.checkpoints WHERE txid <> 0"
            ).scalar_one()
            == 0
        )
        assert conn.exec_driver_sql("SELECT count(*) FROM zdr.applied_ahead").scalar_one() == 0
    assert_balances_match_fold(engine, manager.reader)
    assert_history_exactly_once(engine, manager.reader)
    assert_balances_match_fold(engine, manager.reader, "zdr_older_1")
    assert_history_exactly_once(engine, manager.reader, "zdr_older_2")


def test_a_partition_plan_of_the_earlier_order_ends_with_every_event_once(manager, engine, earlier):
    ordered = _in_earlier_order(engine, manager.store)
    first, _, _ = earlier
    manager.create_replay("split", [BalancesV2(), "history"])
    plan = manager.plan_partitions("split", 2)
    _split_as_before(engine, manager, ordered[-1].cursor, _up_to(ordered, first))

    for index in range(plan.partitions):
        manager.replay_partition("split", index)
    manager.start_replay("split")
    assert_balances_match_fold(engine, manager.reader, "zdr_split_1")
    assert_history_exactly_once(engine, manager.reader, "zdr_split_2")


def test_a_runner_of_the_earlier_order_is_refused_after_the_move(manager, engine, earlier):
    """After the move, an earlier version's runner cannot write a transaction id into a
    checkpoint (it would read a position as one): its batch fails, nothing is applied."""
    ordered = _in_earlier_order(engine, manager.store)
    runner = LiveRunner(manager.reader, manager.registry)
    with engine.connect() as conn, conn.begin():
        [balances] = [t for t in runner.targets(conn) if t.projection == "balances"]
    _applied_as_before(engine, balances, _up_to(ordered, earlier[0]))
    manager.project_live()  # moves it
    with pytest.raises(sa.exc.DBAPIError, match="is in position order"), engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr.checkpoints SET txid = 12345 WHERE name = 'live:balances'")


def test_a_moved_partition_plan_waits_for_an_appender_still_open_below_its_point(manager, engine):
    """The plan's point, moved from the earlier order, can lie above a transaction still
    open (a later id, a lower position): the partitions stand below it until that
    transaction ends, and then apply its event too."""
    seed(manager.store, 40)
    manager.create_replay("split", [BalancesV2(), "history"])
    manager.plan_partitions("split", 2)
    with engine.connect() as early, engine.connect() as late:
        early.begin()
        early.exec_driver_sql("SELECT pg_current_xact_id()")  # the lower id
        late.begin()
        [open_one] = manager.store.append("open", [_deposit("open", 11)], conn=late)
        [committed] = manager.store.append("early", [_deposit("early", 5)], conn=early)
        early.commit()
        ordered = _in_earlier_order(engine, manager.store)  # what the earlier version saw
        assert open_one < committed == ordered[-1].position
        _split_as_before(engine, manager, ordered[-1].cursor, ordered)
        runs = [manager.replay_partition("split", index) for index in range(2)]
        assert not all(run.done for run in runs), "a partition stood at the point too soon"
        late.commit()
    assert all(manager.replay_partition("split", index).done for index in range(2))
    manager.start_replay("split")
    assert_balances_match_fold(engine, manager.reader, "zdr_split_1")
    assert_history_exactly_once(engine, manager.reader, "zdr_split_2")

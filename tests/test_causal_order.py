"""A stream's events are applied in the order the application wrote them, live and
replayed, exactly once, whichever transaction wrote something first."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from psycopg import sql

import zdr
from tests.logs import Log
from zdr.projector import physical_name

order = sa.Table(
    "stream_order",
    sa.MetaData(),
    sa.Column("stream_id", sa.Text, primary_key=True),
    sa.Column("types", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("positions", sa.ARRAY(sa.BigInteger), nullable=False),
    sa.Column("read_before", sa.ARRAY(sa.BigInteger), nullable=False),
    schema="causal_order",
)


class StreamOrder(zdr.Projector):
    """Per stream, the events in the order they were applied: order-sensitive, unlike a
    sum. ``read_before``: the position the writer of each event had read last in its
    stream (-1 where it read none)."""

    name = "stream_order"
    tables = [order]
    event_types = frozenset({"AccountOpened", "AccountClosed", "Step", "Noted"})

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        statement = sql.SQL(
            """INSERT INTO {t} AS t (stream_id, types, positions, read_before)
               VALUES (%s, ARRAY[%s], ARRAY[%s::bigint], ARRAY[%s::bigint])
               ON CONFLICT (stream_id) DO UPDATE SET
                   types = t.types || EXCLUDED.types,
                   positions = t.positions || EXCLUDED.positions,
                   read_before = t.read_before || EXCLUDED.read_before"""
        ).format(t=physical_name(conn, order))
        with conn.connection.driver_connection.cursor() as cur:
            for event in events:  # one statement each, in the order given
                cur.execute(
                    statement,
                    (event.stream_id, event.type, event.position, event.data.get("read", -1)),
                )


def _orders(engine: sa.Engine, schema: str = "causal_order") -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT stream_id, types, positions, read_before FROM {schema}.stream_order"
        ).all()
    return {stream: (types, positions, read) for stream, types, positions, read in rows}


def _replayed(manager: zdr.ReplayManager, key: str) -> None:
    """A replay of the projection from the whole log, in dual write, then level with live."""
    manager.create_replay(key, [StreamOrder()])
    manager.start_replay(key, batch_size=7)
    manager.start_projecting_to_replay(key, lag_threshold=10_000)
    manager.project_live()


@pytest.fixture()
def ordered(engine: sa.Engine, log: Log) -> zdr.ReplayManager:
    manager = zdr.ReplayManager(engine, projectors=[StreamOrder()], reader=log.reader)
    manager.setup()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE SCHEMA IF NOT EXISTS causal_app; "
            "CREATE TABLE IF NOT EXISTS causal_app.requests (id int PRIMARY KEY, n int); "
            "INSERT INTO causal_app.requests SELECT i, 0 FROM generate_series(1, 50) AS i"
        )
    return manager


def _event(kind: str, **data: object) -> dict:
    return {"type": kind, "data": data}


@pytest.mark.parametrize("log", ["own", "table"], indirect=True)
def test_a_request_that_wrote_first_appends_after_what_it_read(ordered, log, engine):
    """Request A writes first (an UPDATE of an application table), B opens the account
    and commits, A reads it open, closes it and commits: Opened, then Closed."""
    with engine.connect() as a:
        a_tx = a.begin()
        a.exec_driver_sql("UPDATE causal_app.requests SET n = n + 1 WHERE id = 1")
        [opened] = log.append([("acc", _event("AccountOpened", account_id="acc", owner="b"))])
        [closed] = log.append(
            [("acc", _event("AccountClosed", account_id="acc", read=opened))], conn=a
        )
        a_tx.commit()
    assert opened < closed, "positions drawn at insert follow what the writer saw"
    ordered.project_live()
    expected = (["AccountOpened", "AccountClosed"], [opened, closed], [-1, opened])
    assert _orders(engine)["acc"] == expected, "live applied Closed before Opened"
    _replayed(ordered, "again")
    assert _orders(engine, "zdr_again_1")["acc"] == expected, "the replay did"


@pytest.mark.parametrize("log", ["own", "table"], indirect=True)
def test_requests_that_write_first_then_append_on_what_they_read_are_applied_causally(
    ordered, log, engine
):
    """Many requests at once, each writing first (an UPDATE, or an event of another
    stream), then reading a stream's last event and appending to it what depends on it;
    the live runner follows all along. Every stream's events are applied once each, in
    position order, and each after the event its writer had read, live and replayed."""
    table, stream, position = (
        ("zdr.events", "stream_id", "position")
        if log.kind == "own"
        else ("bank_laravel.stored_events", "aggregate_uuid", "id")
    )
    streams = [f"s{i}" for i in range(6)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def request(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                with engine.begin() as conn:
                    if rng.random() < 0.5:
                        conn.exec_driver_sql(
                            "UPDATE causal_app.requests SET n = n + 1 WHERE id = %s",
                            (rng.randint(1, 50),),
                        )
                    else:
                        log.append([(f"other{seed}", _event("Noted"))], conn=conn)
                    if rng.random() < 0.5:
                        threading.Event().wait(rng.uniform(0, 0.01))  # others commit meanwhile
                    target = rng.choice(streams)
                    read = conn.exec_driver_sql(
                        f"SELECT coalesce(max({position}), -1) FROM {table} WHERE {stream} = %s",
                        (target,),
                    ).scalar_one()
                    log.append([(target, _event("Step", read=read))], conn=conn)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def live() -> None:
        try:
            ordered.follow(stop=stop, poll_interval=0.005)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    follower = threading.Thread(target=live)
    follower.start()
    requests = [threading.Thread(target=request, args=(i,)) for i in range(6)]
    for thread in requests:
        thread.start()
    for thread in requests:
        thread.join(120)
    stop.set()
    follower.join(30)
    assert not errors, errors
    ordered.project_live()
    _replayed(ordered, "causal")

    logged: dict[str, list[int]] = {}
    for event in log.events():
        logged.setdefault(event.stream_id, []).append(event.position)
    for schema in ("causal_order", "zdr_causal_1"):
        applied = _orders(engine, schema)
        assert {s: positions for s, (_, positions, _) in applied.items()} == logged, schema
        for s in streams:
            _, positions, read = applied[s]
            for i, seen in enumerate(read):
                assert seen == -1 or seen in positions[:i], (
                    f"{schema}: event {positions[i]} of {s} was applied before {seen}, which "
                    "its writer had read"
                )

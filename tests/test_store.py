"""The event store: appends, bulk import, and what a reader gets back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import sqlalchemy as sa

import zdr


def test_append_returns_ascending_positions_in_the_order_given(manager):
    events = [{"type": f"E{i}", "data": {"i": i}} for i in range(50)]
    positions = manager.store.append("stream-1", events)
    assert positions == sorted(positions) and len(set(positions)) == 50
    stored = {e.position: e for e in manager.store.iter_all()}
    assert [stored[p].data["i"] for p in positions] == list(range(50))
    assert all(stored[p].stream_id == "stream-1" for p in positions)


def test_recorded_events_carry_every_field(manager):
    [position] = manager.store.append(
        "s", [{"type": "T", "data": {"a": 1}, "metadata": {"by": "me"}}]
    )
    [event] = manager.store.iter_all()
    assert (event.position, event.type, event.data, event.metadata) == (
        position,
        "T",
        {"a": 1},
        {"by": "me"},
    )
    assert event.recorded_at is not None and event.recorded_at.tzinfo is not None
    assert event.cursor == zdr.Cursor(event.txid, position)


def test_payloads_round_trip_exactly_including_integers_beyond_64_bits(manager):
    data = {"big": 2**70, "negative": -(2**64), "float": 0.1, "text": "ü\u2603", "nested": [1, {}]}
    manager.store.append("s", [{"type": "T", "data": data}])
    [event] = manager.store.iter_all()
    assert event.data == data
    assert isinstance(event.data["big"], int)


def test_bulk_import_keeps_the_order_given(manager):
    pairs = [(f"s{i % 3}", {"type": "T", "data": {"i": i}}) for i in range(1_000)]
    assert manager.store.import_events(pairs) == 1_000
    events = list(manager.store.iter_all())
    assert [e.data["i"] for e in events] == list(range(1_000))
    assert [e.stream_id for e in events[:3]] == ["s0", "s1", "s2"]


def test_appends_from_many_connections_at_once_are_all_read_once(manager):
    def appender(n: int) -> None:
        for i in range(100):
            manager.store.append(f"writer-{n}", [{"type": "T", "data": {"n": n, "i": i}}] * 3)

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = list(manager.store.iter_all(batch_size=97))
    assert len(events) == 8 * 100 * 3
    assert len({e.position for e in events}) == len(events)
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)


def test_lag_counts_the_events_after_a_checkpoint(manager):
    manager.store.append("s", [{"type": "T", "data": {}}] * 25)
    manager.create_replay("lagging", ["balances"])
    assert manager.get_replay_lag("lagging") == 25
    manager.start_replay("lagging")
    assert manager.get_replay_lag("lagging") == 0


def test_a_read_is_bounded_by_bytes_as_well_as_by_count(engine):
    """A history of big events is read a few at a time, not batch_size at a time."""
    import os

    store = zdr.EventStore(engine)
    store.setup()
    big = [("big", {"type": "Blob", "data": {"blob": os.urandom(50_000).hex()}}) for _ in range(60)]
    store.import_events(big)
    store.max_batch_bytes = 1_000_000
    seen, cursor, reads = 0, zdr.store.START, 0
    with engine.begin() as conn:
        while events := store.read(conn, cursor, 10_000):
            stored = sum(len(e.data["blob"]) for e in events)
            assert stored < 1_000_000 + 200_000, "a read went past its budget by more than one"
            seen, cursor, reads = seen + len(events), events[-1].cursor, reads + 1
    assert seen == 60 and reads > 5
    manager = zdr.ReplayManager(engine, settings=zdr.Settings(batch_max_bytes=1_000))
    assert manager.store.max_batch_bytes == 1_000
    with engine.begin() as conn:
        assert len(manager.store.read(conn, zdr.store.START, 10_000)) == 1  # one at least


def test_the_byte_bound_counts_what_is_decoded_not_the_compressed_bytes_stored(engine):
    """Payloads that compress well (1 MB of one letter is ~12 kB stored) are counted at
    the size they are decoded to: 4 MB reads 4 of them (the one that passes included)."""
    store = zdr.EventStore(engine)
    store.setup()
    store.import_events(
        ("big", {"type": "Blob", "data": {"blob": "a" * 1_000_000}}) for _ in range(30)
    )
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT max(pg_column_size(data)) FROM zdr.events").scalar()
    assert stored < 100_000  # compressed: counting these would read all 30 (30 MB) at once
    store.max_batch_bytes = 4_000_000
    with engine.begin() as conn:
        assert len(store.read(conn, zdr.store.START, 10_000)) == 4


def test_an_import_is_cut_into_copies_that_a_statement_timeout_bounds_one_by_one(
    database_url, engine, monkeypatch
):
    """An import from a slow source (a generator reading another system) under a DBA's
    statement_timeout of 1 s: one COPY for all of it would be cancelled; one COPY per
    chunk is not, and the import stays one transaction."""
    monkeypatch.setattr(zdr.store, "IMPORT_CHUNK", 300)
    url = sa.make_url(database_url).update_query_dict({"options": "-c statement_timeout=1000"})
    store = zdr.EventStore(url.render_as_string(hide_password=False))
    store.setup()

    def slowly() -> Iterator[tuple[str, dict]]:
        for i in range(1_500):
            time.sleep(0.001)  # 1.5 s in all, about 0.3 s a chunk
            yield f"acc-{i % 10}", {"type": "AccountOpened", "data": {"account_id": str(i)}}

    assert store.import_events(slowly()) == 1_500
    store.engine.dispose()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM zdr.events").scalar_one() == 1_500

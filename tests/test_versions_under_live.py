"""A running live runner goes on with whatever version a promotion or rollback put live,
with that version's table shape, without a restart; per-event handlers may read what
their statements return (a generated key)."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

import zdr
from tests.journeys.wallets import (
    ENTRIES,
    VERSIONS,
    WALLETS,
    Application,
    EntriesV1,
    WalletsV1,
    WalletsV2,
    WalletsV3,
    WalletsV4,
    fold_entries,
    fold_wallets,
    read_entries,
    read_wallets,
)
from tests.support import following, wait_for
from zdr.store import iter_all

VERSION_OF = {cls: version for version, classes in VERSIONS.items() for cls in classes}


def _append_in_batches(manager, store, app, batches=8):
    """Appends one at a time, each waited for: as many live batches, so that psycopg has
    prepared the live runner's statements (after 5 runs of one) before what follows."""
    for _ in range(batches):
        for stream, event in app.events(3):
            store.append(stream, [event])
        wait_for(lambda: not any(manager.live_lag().values()), timeout=5)


@pytest.mark.parametrize(
    ("old", "new"),
    [(WalletsV1, WalletsV2), (WalletsV2, WalletsV3), (WalletsV3, WalletsV4)],
    ids=["column-added", "type-changed", "column-dropped"],
)
def test_a_running_live_runner_writes_a_promoted_version_and_a_rolled_back_one_in_their_shapes(
    engine, caplog, old, new
):
    store = zdr.EventStore(engine)
    store.setup()
    app = Application(seed=5, wallets=10)
    store.import_events(app.events(300))
    manager = zdr.ReplayManager(engine, projectors=[old()])
    manager.setup()
    with caplog.at_level(logging.WARNING, logger="zdr"), following(manager):
        _append_in_batches(manager, store, app)
        manager.create_replay("next", [new.import_path()])
        manager.start_replay("next")
        manager.enable_dual_write("next")
        wait_for(lambda: manager.get_replay_lag("next") == 0, timeout=10)
        manager.promote("next")
        _append_in_batches(manager, store, app)
        assert read_wallets(engine, WALLETS) == fold_wallets(
            iter_all(store, engine), VERSION_OF[new]
        )

        manager.rollback("next")
        _append_in_batches(manager, store, app)
        assert read_wallets(engine, WALLETS) == fold_wallets(
            iter_all(store, engine), VERSION_OF[old]
        )
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


hits = sa.Table(
    "hits",
    sa.MetaData(schema="versions_hits"),
    sa.Column("stream", sa.Text, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
)


class SelectThenWrite(zdr.Projector):
    """Reads the row it is about to change: SELECT, then UPDATE or INSERT."""

    name = "hits"
    tables = [hits]

    @zdr.handles("Hit")
    def hit(self, event, conn):
        n = conn.execute(sa.select(hits.c.n).where(hits.c.stream == event.stream_id)).scalar()
        if n is None:
            conn.execute(sa.insert(hits).values(stream=event.stream_id, n=1))
        else:
            conn.execute(sa.update(hits).where(hits.c.stream == event.stream_id).values(n=n + 1))


class RowcountUpsert(SelectThenWrite):
    """UPDATE, and INSERT when it changed no row (its rowcount)."""

    @zdr.handles("Hit")
    def hit(self, event, conn):
        changed = conn.execute(
            sa.update(hits).where(hits.c.stream == event.stream_id).values(n=hits.c.n + 1)
        )
        if changed.rowcount == 0:
            conn.execute(sa.insert(hits).values(stream=event.stream_id, n=1))


@pytest.mark.parametrize("projector", [SelectThenWrite, RowcountUpsert])
def test_per_event_handlers_read_what_their_statements_return(engine, projector):
    """By default a handler's statement waits for its result: in pipeline mode the SELECT
    read as no rows and the rowcount as -1, and the rows came out wrong, silently."""
    store = zdr.EventStore(engine)
    store.setup()
    for stream in ("a", "a", "b", "a", "b"):
        store.append(stream, [{"type": "Hit", "data": {}}])
    manager = zdr.ReplayManager(engine, projectors=[projector()])
    manager.setup()
    manager.project_live()
    with engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT stream, n FROM versions_hits.hits").all())
    assert rows == {"a": 3, "b": 2}


class PipelinedEntries(EntriesV1):
    """EntriesV1 claiming to only write: its generated keys fail in pipeline mode."""

    pipelined = True


def test_per_event_handlers_insert_rows_with_a_generated_key_live_and_in_a_replay(engine, caplog):
    store = zdr.EventStore(engine)
    store.setup()
    app = Application(seed=9, wallets=8)
    store.import_events(app.events(200))
    manager = zdr.ReplayManager(engine, projectors=[PipelinedEntries()], batch_size=50)
    manager.setup()
    with caplog.at_level(logging.INFO, logger="zdr"):
        manager.project_live()
        manager.create_replay("again", ["entries"])
        manager.start_replay("again")
    want = fold_entries(iter_all(store, engine), 1)
    assert sum(want["entries"].values()) > 100
    assert read_entries(engine, ENTRIES) == want
    replay = manager.get_replay("again")
    assert read_entries(engine, replay.schemas[ENTRIES]) == want
    said = [r.getMessage() for r in caplog.records if "one statement at a time" in r.getMessage()]
    assert len(said) == 1, said  # once per class and process, not once per batch
    # Each copy numbers its rows itself (its own sequence, gaps where a batch was tried
    # again): verify leaves the generated key out and compares the rest as a multiset.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"SELECT setval(pg_get_serial_sequence('\"{ENTRIES}\".entries', 'id'), 1000)"
        )
    manager.store.append("w000", [{"type": "Deposited", "data": {"wallet": "w000", "amount": "1"}}])
    manager.enable_dual_write("again")
    manager.project_live()
    report = manager.verify("again")
    [entries] = [t for t in report.tables if t.table.endswith(".entries")]
    assert entries.generated_columns == ["id"] and entries.primary_key == []
    assert report.equal, report.to_markdown()
    with engine.begin() as conn:
        conn.exec_driver_sql(f'UPDATE "{ENTRIES}".entries SET amount = 9 WHERE id = 1001')
    assert not manager.verify("again").equal


def test_forgetting_prepared_statements_empties_the_sessions_and_keeps_its_transaction(engine):
    from zdr.store import forget_prepared_statements

    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("CREATE TEMPORARY TABLE kept (x int)")
        for i in range(7):  # psycopg prepares a statement after 5 runs
            conn.exec_driver_sql("INSERT INTO kept VALUES (%s)", (i,))

        def prepared() -> int:
            return conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar()

        assert prepared() >= 1
        forget_prepared_statements(conn)
        assert prepared() == 0
        for i in range(7):  # prepared again, and the transaction went on
            conn.exec_driver_sql("INSERT INTO kept VALUES (%s)", (i,))
        assert conn.exec_driver_sql("SELECT count(*) FROM kept").scalar() == 14

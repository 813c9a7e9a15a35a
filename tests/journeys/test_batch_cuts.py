"""Journey 3: results do not depend on where batches are cut. The same version replayed
in batches of 1, 7 and 50,000 and applied live event by event gives the same rows, and
they equal a plain fold of the log, for numeric scales, char and varchar lengths,
single-precision floats and timestamp precisions."""

from __future__ import annotations

import sqlalchemy as sa

import zdr
from tests.journeys.wallets import Application, Measures, fold_measures
from zdr.store import iter_all


def _rows(engine: sa.Engine, schema: str) -> dict[str, dict]:
    with engine.connect() as conn:
        found = conn.exec_driver_sql(f'SELECT * FROM "{schema}".measures').mappings().all()
    return {row["wallet_id"]: dict(row) for row in found}


def test_a_row_projector_gives_the_same_rows_however_its_events_are_batched(engine):
    store = zdr.EventStore(engine)
    store.setup()
    app = Application(seed=11, wallets=12)
    store.import_events(app.events(400))
    manager = zdr.ReplayManager(engine, projectors=[Measures()])
    manager.setup()
    manager.project_live(batch_size=1)  # live: one event per batch

    replays = {}
    for size in (1, 7, 50_000):
        key = f"cut_{size}"
        replay = manager.create_replay(key, ["measures"])
        manager.start_replay(key, batch_size=size)
        replays[size] = replay.schemas["journey_measures"]

    want = fold_measures(iter_all(store, engine))
    assert _rows(engine, "journey_measures") == want
    for size, schema in replays.items():
        assert _rows(engine, schema) == want, f"batches of {size}"
    assert manager.verify("cut_50000").equal

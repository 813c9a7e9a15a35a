"""The three kinds of event log the ordering and crash tests run against, behind one face.

* ``own``: zdr's ``zdr.events``, read by ``EventStore``;
* ``table``: a Laravel-era ``stored_events`` written by plain SQL with no lock, read by
  a prepared ``TableReader``;
* ``eventsourcing``: an ``eventsourcing`` application's table, written by its recorder
  (under its EXCLUSIVE table lock), read by ``EventsourcingReader``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa

import zdr
from zdr.examples.bank.domain import BankSimulator
from zdr.store import iter_all

KINDS = (
    "own",
    "table",
    pytest.param("eventsourcing", marks=pytest.mark.eventsourcing),
)
#: What ``zdr.readers.load`` takes for each kind (``ZDR_DATABASE_URL`` names the database).
READER_PATHS = {
    "own": None,
    "table": "zdr.examples.bank.stored_events:reader",
    "eventsourcing": "zdr.examples.bank.eventsourced:reader",
}

Pairs = Sequence[tuple[str, dict[str, Any]]]


@dataclass
class Log:
    kind: str
    engine: sa.Engine
    reader: zdr.EventReader
    writer: Any
    closing: list[Any] = field(default_factory=list)

    @property
    def reader_path(self) -> str | None:
        return READER_PATHS[self.kind]

    def append(self, events: Pairs, *, conn: sa.Connection | None = None) -> list[int]:
        """Append in one transaction (``conn``'s, if given), as the log's writers do."""
        if self.kind == "own":
            return append_own(self.writer, events, conn)
        if self.kind == "table":
            return self.writer.append(events, conn=conn)
        if conn is None:
            return self.writer.append(events)
        return _append_eventsourcing_in(self.writer, events, conn)

    def seed(self, n: int, *, accounts: int = 100, seed: int = 7) -> BankSimulator:
        sim = BankSimulator(accounts=accounts, seed=seed)
        self.writer.import_events(sim.stream(n))
        return sim

    def events(self) -> list[zdr.RecordedEvent]:
        return list(iter_all(self.reader, self.engine))

    def close(self) -> None:
        for thing in self.closing:
            thing.close()


def make_log(kind: str, engine: sa.Engine, database_url: str) -> Log:
    if kind == "own":
        store = zdr.EventStore(engine)
        store.setup()
        return Log(kind, engine, store, store)
    if kind == "table":
        from zdr.examples.bank import stored_events

        stored_events.create(engine)
        reader = stored_events.table_reader()
        reader.prepare(engine)
        return Log(kind, engine, reader, stored_events.StoredEventsLog(engine))
    from zdr.examples.bank.eventsourced import BankLog, bank_app

    app = bank_app(database_url)
    return Log(kind, engine, zdr.readers.EventsourcingReader(app), BankLog(app), [app])


def append_own(store: zdr.EventStore, events: Pairs, conn: sa.Connection | None) -> list[int]:
    """One ``append`` call per run of one stream, all in one transaction."""
    if conn is None:
        with store.engine.begin() as own:
            return append_own(store, events, own)
    positions: list[int] = []
    i = 0
    while i < len(events):
        stream = events[i][0]
        j = i
        while j < len(events) and events[j][0] == stream:
            j += 1
        positions += store.append(stream, [e for _, e in events[i:j]], conn=conn)
        i = j
    return positions


def _append_eventsourcing_in(writer: Any, events: Pairs, conn: sa.Connection) -> list[int]:
    """What the application's recorder runs, in the caller's transaction: the EXCLUSIVE
    lock on its table, held to the commit, then the insert."""
    recorder = writer.app.recorder
    table = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
    stored = [writer.app.mapper.to_stored_event(e) for e in writer.domain_events(events)]
    conn.exec_driver_sql(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
            "VALUES (%s, %s, %s, %s) RETURNING notification_id",
            [(s.originator_id, s.originator_version, s.topic, s.state) for s in stored],
            returning=True,
        )
        ids: list[int] = []
        while True:
            ids.extend(row[0] for row in cur.fetchall())
            if not cur.nextset():
                return ids

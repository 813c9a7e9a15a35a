"""The bank in a Laravel-era ``stored_events`` table, read by ``zdr.readers.TableReader``.

The table is the one Spatie's laravel-event-sourcing creates; its writers insert
with no lock, so their transactions commit out of order, which is why the reader
reads it only once ``prepare`` has stamped it. ``StoredEventsLog`` writes the
simulator's events with plain SQL, as such an application does.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from zdr.config import DATABASE_URL_ENV
from zdr.errors import ConfigurationError
from zdr.examples.bank.domain import in_chunks
from zdr.readers import TableReader

SCHEMA = "bank_laravel"
TABLE = f"{SCHEMA}.stored_events"

CREATE = f"""
    CREATE SCHEMA IF NOT EXISTS {SCHEMA};
    CREATE TABLE IF NOT EXISTS {TABLE} (
        id bigserial PRIMARY KEY,
        aggregate_uuid varchar(36),
        aggregate_version bigint,
        event_version smallint NOT NULL DEFAULT 1,
        event_class varchar(255) NOT NULL,
        event_properties json NOT NULL,
        meta_data json NOT NULL,
        created_at timestamp NOT NULL
    );
"""

#: One INSERT per call, as an application's ORM sends them (the column list named).
_INSERT = f"""
    INSERT INTO {TABLE} (aggregate_uuid, aggregate_version, event_class, event_properties,
                         meta_data, created_at)
    SELECT * FROM unnest(%s::varchar[], %s::bigint[], %s::varchar[], %s::json[], %s::json[],
                         %s::timestamp[])
    RETURNING id
"""


def table_reader() -> TableReader:
    """The TableReader of this table (its columns named as Laravel names them)."""
    return TableReader(
        TABLE,
        position="id",
        stream_id="aggregate_uuid",
        type="event_class",
        data="event_properties",
        metadata="meta_data",
        recorded_at="created_at",
    )


def reader() -> TableReader:
    """``--reader zdr.examples.bank.stored_events:reader``: the table of ZDR_DATABASE_URL,
    created and prepared if it is not."""
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigurationError(
            f"zdr.examples.bank.stored_events:reader reads the database from {DATABASE_URL_ENV}"
        )
    create(url)
    found = table_reader()
    found.prepare(url)
    return found


def create(url_or_engine: str | sa.Engine) -> None:
    engine = (
        url_or_engine if isinstance(url_or_engine, sa.Engine) else sa.create_engine(url_or_engine)
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(CREATE)


class StoredEventsLog:
    """Appends (account id, event) pairs with plain SQL, no lock, as the application would."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._versions: dict[str, int] = {}

    def append(
        self, events: Sequence[tuple[str, dict[str, Any]]], *, conn: sa.Connection | None = None
    ) -> list[int]:
        """Insert the events in one statement (in ``conn``'s transaction if given)."""
        if conn is None:
            with self.engine.begin() as own:
                return self.append(events, conn=own)
        columns: list[list[Any]] = [[], [], [], [], [], []]
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for account, event in events:
            version = self._versions.get(account, 0) + 1
            self._versions[account] = version
            row = (
                account,
                version,
                event["type"],
                json.dumps(event["data"]),
                json.dumps(event.get("metadata", {})),
                now,
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            cur.execute(_INSERT, columns)
            return sorted(row[0] for row in cur.fetchall())

    def import_events(self, events: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Insert many events, 10_000 a transaction; return the count."""
        return in_chunks(self.append, events, 10_000)

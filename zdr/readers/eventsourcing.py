"""An application of the ``eventsourcing`` package: ``EventsourcingReader``.

``eventsourcing.postgres`` stores an application's events in one table
(``<app>_events``: notification_id, originator_id, originator_version, topic,
state) and takes an EXCLUSIVE lock on it before each insert, held to the commit:
notification ids commit in the order they are given, and a transaction becomes
visible before the next writer gets the lock. So reading by notification id alone
skips nothing, and no transaction can hold a reader back: cursors are
``(0, notification id)`` and the table is only read, never changed.

An application configured with ``POSTGRES_ENABLE_DB_FUNCTIONS`` inserts through a
database function that takes no such lock: its events can commit out of order,
and this reader refuses it (read its table with a prepared ``TableReader`` of your
own decoding instead).

Each notification is decoded by the application's own mapper (its transcoder,
compressor and cipher, and the event class's upcasting), as the application's
repository would: ``data`` holds the event's attributes (``originator_version``,
``timestamp`` and its own fields) as Python objects, ``type`` is the event class's
qualified name (``Book.Lent``), ``metadata`` is ``{"topic": ...}``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from zdr.config import resolve_url
from zdr.errors import ConfigurationError, InvalidEvent, NotSetUp
from zdr.settings import DEFAULTS
from zdr.store import Cursor, RecordedEvent, driver_connection


class EventsourcingReader:
    """Reads the notifications of an ``eventsourcing`` application persisted in
    PostgreSQL (``eventsourcing.postgres``), in the database zdr runs on."""

    #: Cursors are (0, notification id): see the module's docstring.
    transaction_ids = False
    #: Nothing to re-stamp after a move to another cluster.
    stamps = None

    def __init__(self, app: Any) -> None:
        try:
            from eventsourcing.postgres import PostgresApplicationRecorder
        except ImportError as exc:
            raise ConfigurationError(
                "EventsourcingReader needs the eventsourcing package with its PostgreSQL "
                "persistence: pip install 'zero-downtime-replays[eventsourcing]'"
            ) from exc
        recorder = getattr(app, "recorder", None)
        if not isinstance(recorder, PostgresApplicationRecorder):
            raise ConfigurationError(
                f"EventsourcingReader needs an eventsourcing Application persisted in "
                f"PostgreSQL (PERSISTENCE_MODULE=eventsourcing.postgres); {app!r} records "
                f"with {type(recorder).__name__}"
            )
        datastore = recorder.datastore
        if datastore.enable_db_functions:
            raise ConfigurationError(
                f"the application {type(app).__name__} inserts its events through a database "
                "function (POSTGRES_ENABLE_DB_FUNCTIONS), which takes no table lock: its "
                "notifications can commit out of order and a reader by notification id "
                "would skip some. Switch it off, or read the table with a prepared "
                "zdr.readers.TableReader"
            )
        #: The application read (its mapper decodes each notification).
        self.app = app
        self.mapper = app.mapper
        self.app_name = type(app).__name__
        schema = datastore.schema or "public"
        table = recorder.events_table_name
        self.table = _quoted(schema) + "." + _quoted(table)
        #: Stored payload bytes per read, beside its count (``Settings.batch_max_bytes``).
        self.max_batch_bytes = DEFAULTS.batch_max_bytes
        self._read = f"""
            SELECT notification_id, originator_id, originator_version, topic, state FROM (
                SELECT *, sum(octet_length(state)) OVER (ORDER BY notification_id
                                                         ROWS UNBOUNDED PRECEDING) AS upto
                FROM (SELECT notification_id, originator_id, originator_version, topic, state
                      FROM {self.table}
                      WHERE notification_id > %(after)s AND notification_id <= %(until)s
                      ORDER BY notification_id
                      LIMIT %(limit)s) AS first
            ) AS sized
            WHERE upto - octet_length(state) < %(max_bytes)s
            ORDER BY notification_id
        """
        self._count = f"SELECT count(*) FROM {self.table} WHERE notification_id > %s"
        self._checked: set[str] = set()

    @property
    def source(self) -> str:
        return f"eventsourcing {self.table}"

    def __repr__(self) -> str:
        return f"EventsourcingReader({self.app_name}, {self.table})"

    def read(
        self,
        conn: sa.Connection,
        after: Cursor,
        limit: int,
        *,
        until: Cursor | None = None,
        below_txid: int | None = None,
    ) -> list[RecordedEvent]:
        self._require_table(conn)
        if after.txid > 0 or (below_txid is not None and below_txid <= 0):
            return []  # every cursor of this log is (0, n): none sorts after or below
        if until is not None and until.txid < 0:
            return []
        bound = 2**63 - 1 if until is None or until.txid > 0 else until.position
        params = {
            "after": after.position,
            "until": bound,
            "limit": limit,
            "max_bytes": self.max_batch_bytes,
        }
        with driver_connection(conn).cursor() as cur:
            cur.execute(self._read, params)
            rows = cur.fetchall()
        return [self._event(row) for row in rows]

    def horizon(self, conn: sa.Connection) -> int:
        """1: every cursor's first part is 0, and everything committed can be read."""
        return 1

    def last_cursor(self, conn: sa.Connection) -> Cursor | None:
        """The cursor of the last notification committed (None: none yet). The
        application inserts under a table lock, so ids commit in order: none below it
        can still appear."""
        self._require_table(conn)
        last = conn.exec_driver_sql(f"SELECT max(notification_id) FROM {self.table}").scalar()
        return None if last is None else Cursor(0, int(last))

    def count_after(self, conn: sa.Connection, after: Cursor) -> int:
        self._require_table(conn)
        if after.txid > 0:
            return 0
        return int(conn.exec_driver_sql(self._count, (after.position,)).scalar_one())

    def _event(self, row: Sequence[Any]) -> RecordedEvent:
        from eventsourcing.persistence import StoredEvent

        position, originator_id, version, topic, state = row
        try:
            event = self.mapper.to_domain_event(
                StoredEvent(
                    originator_id=originator_id,
                    originator_version=version,
                    topic=topic,
                    state=bytes(state),
                )
            )
        except Exception as exc:  # the mapper's, the transcoder's, an upcast's, an import's
            raise InvalidEvent(
                f"notification {position} ({topic}, originator {originator_id}, version "
                f"{version}) in {self.table} cannot be decoded by {self.app_name}'s mapper: "
                f"{type(exc).__name__}: {exc}. Every reader stops there"
            ) from exc
        data = dict(vars(event))
        originator = data.pop("originator_id", originator_id)  # as the application sees it
        timestamp = data.get("timestamp")
        return RecordedEvent(
            position=position,
            txid=0,
            stream_id=str(originator),
            type=topic.partition(":")[2] or topic,
            data=data,
            metadata={"topic": topic},
            recorded_at=timestamp if isinstance(timestamp, dt.datetime) else None,
        )

    def _require_table(self, conn: sa.Connection) -> None:
        """Refuse (NotSetUp) where the application's table is not in zdr's database."""
        where = str(conn.engine.url)
        if where in self._checked:
            return
        database, port, found = conn.exec_driver_sql(
            "SELECT current_database(), current_setting('port'), to_regclass(%s)", (self.table,)
        ).one()
        theirs = getattr(self.app.recorder.datastore.pool, "kwargs", None) or {}
        if (theirs.get("dbname"), str(theirs.get("port"))) not in (
            (None, "None"),
            (database, port),
        ):
            raise ConfigurationError(
                f"{self.app_name} keeps its events in database {theirs.get('dbname')!r} (port "
                f"{theirs.get('port')}), and zdr runs on database {database!r} (port {port}): "
                "zdr reads the application's table in the database it runs on. Give zdr the "
                "application's database (zdr.readers.postgres_env builds the application's "
                "settings from zdr's URL)"
            )
        if found is None:
            raise NotSetUp(
                f"there is no table {self.table} in the database zdr runs on: "
                f"{self.app_name}'s events must be in the same database (its POSTGRES_DBNAME "
                "and host), and the application must have saved once (or been created with "
                "CREATE_TABLE) so its table exists"
            )
        self._checked.add(where)


def postgres_env(url: str | None = None, *, schema: str = "public") -> dict[str, str]:
    """``eventsourcing.postgres``'s settings (``Application(env=...)``) for the database at
    ``url``, by default zdr's (ZDR_DATABASE_URL, else the embedded PostgreSQL): the
    application whose events zdr reads keeps them in the database zdr runs on. Its schema
    must exist (eventsourcing creates only its table)."""
    parts = sa.make_url(resolve_url(url))
    host = parts.query.get("host") or parts.host or "localhost"  # a socket folder or a host
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.database or "",
        "POSTGRES_HOST": host if isinstance(host, str) else host[0],
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "",
        "POSTGRES_PASSWORD": parts.password or "",
        "POSTGRES_SCHEMA": schema,
    }


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

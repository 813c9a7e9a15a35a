"""The event store: an append-only table of events, read in a safe order.

Why the cursor is a pair. A position comes from a sequence when an event is
inserted, but transactions commit in any order: position 11 can be visible while
position 10 is still in an open transaction. A reader that remembers "the last
position" would pass over 10 for ever. So every event is stamped with its
transaction id (``pg_current_xact_id()``), readers only read events whose
transaction is below the *safe horizon* (``pg_snapshot_xmin(pg_current_snapshot())``:
every transaction below it has ended), and they order and page by the pair
(transaction id, position). An event that commits late has a transaction id at
or above the horizon the reader used, so it sorts after everything read so far.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson
import sqlalchemy as sa
from psycopg.types.json import Jsonb

from zdr.catalog import create_missing
from zdr.config import make_engine
from zdr.errors import InvalidEvent
from zdr.locks import ZDR_LOCK_SPACE, lock_setup
from zdr.names import RUNNER_TRANSACTION_LOCK
from zdr.settings import DEFAULTS


class Cursor(NamedTuple):
    """Where a reader stands: the (transaction id, position) of the last event it took."""

    txid: int
    position: int


START = Cursor(0, 0)


@dataclass(frozen=True)
class Partition:
    """One of ``count`` partitions of the log's streams: the streams whose hash falls in
    ``index`` (0 to count - 1), and their events."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: read-only, ordered by ``cursor``."""

    position: int
    txid: int
    stream_id: str
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    recorded_at: dt.datetime | None = None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.txid, self.position)


class EventReader(Protocol):
    """What the replay engine needs from an event table.

    Kept this small so that another event table (other names, other columns)
    can be read by writing one class.
    """

    def read(
        self,
        conn: sa.Connection,
        after: Cursor,
        limit: int,
        *,
        until: Cursor | None = None,
        below_txid: int | None = None,
    ) -> list[RecordedEvent]:
        """Events after ``after`` in cursor order, below the safe horizon, at most ``limit``."""
        ...

    def horizon(self, conn: sa.Connection) -> int:
        """The current safe horizon: every transaction id below it has ended."""
        ...

    def count_after(self, conn: sa.Connection, after: Cursor) -> int:
        """How many events sort after ``after`` (committed ones, horizon or not)."""
        ...


#: What zdr's replay transactions call themselves while they hold a transaction id
#: (``SET LOCAL application_name``, see ``mark_runner_transaction``), for people reading
#: pg_stat_activity. The mark that counts is a transaction-level advisory lock: a name can
#: be changed back within the transaction, the lock cannot be let go before its end.
RUNNER_APPLICATION_NAME = "zdr runner (appends no events)"
#: "This backend holds the runner-transaction lock" (pid and lock key spelled out).
_HOLDS_RUNNER_MARK = f"""EXISTS (
    SELECT 1 FROM pg_locks m
    WHERE m.pid = {{pid}} AND m.locktype = 'advisory' AND m.granted
      AND m.classid::bigint = {ZDR_LOCK_SPACE} AND m.objsubid = 2
      AND m.objid::bigint = (hashtext('{RUNNER_TRANSACTION_LOCK}')::bigint & 4294967295))"""
# The safe horizon: the oldest transaction still in progress that may append events,
# else the snapshot's xmax. Transactions in progress are the snapshot's xip list;
# those of other databases (OTHER_DATABASES_XIDS) and zdr's own runner transactions are
# left out (their top-level xid is backend_xid in
# pg_stat_activity, 32 bits: compared on the low 32 bits of the xid8, which is exact
# among transactions in progress at once). Leaving them out is what keeps a slow
# replay batch (seconds) from holding the live runner back for as long. Whatever is
# not sure (a session's row not visible, a runner that moved on) counts as in
# progress: the horizon can only come out lower, never past an appending transaction.
#
# A runner transaction is one that holds the runner mark (a trigger on the event table
# refuses its appends for as long as it does, that is to its end), bears the runner's
# name, and holds no lock stronger than a reader's on the event table (bound as
# %(event_table)s; an append holds RowExclusiveLock to the end of its transaction: one
# that appended before it took the mark is not passed).
RUNNER_XIDS = f"""
    SELECT a.backend_xid::text::bigint FROM pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL AND a.application_name = '{RUNNER_APPLICATION_NAME}'
      AND {_HOLDS_RUNNER_MARK.replace("{pid}", "a.pid")}
      AND NOT EXISTS (
          SELECT 1 FROM pg_locks l
          WHERE l.pid = a.pid AND l.locktype = 'relation'
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.relation = to_regclass(%(event_table)s)
            AND l.mode NOT IN ('AccessShareLock', 'RowShareLock'))"""
#: Transactions in progress in another database of the cluster: a session writes to its
#: own database only, so none of them can append to this log, and the horizon passes
#: them (a long ETL transaction in another database used to hold every live read model
#: here). A session's database is pg_stat_activity's datid (NULL for a background
#: process: counted as in progress), a prepared transaction's pg_prepared_xacts'.
OTHER_DATABASES_XIDS = """
    SELECT a.backend_xid::text::bigint FROM pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL
      AND a.datid <> (SELECT oid FROM pg_database WHERE datname = current_database())
    UNION ALL
    SELECT p.transaction::text::bigint FROM pg_prepared_xacts p
    WHERE p.database <> current_database()"""
HORIZON = f"""(
    SELECT COALESCE(
        (SELECT min(x::text::bigint) FROM pg_snapshot_xip(s.snap) AS x
         WHERE (x::text::bigint & 4294967295) NOT IN (
             {RUNNER_XIDS} UNION ALL {OTHER_DATABASES_XIDS})),
        pg_snapshot_xmax(s.snap)::text::bigint)
    FROM (SELECT pg_current_snapshot() AS snap) AS s)"""


def refuse_runner_appends(function: str) -> str:
    """The trigger function (``function``: its quoted, qualified name) that refuses appends
    from a runner's transaction, for as long as it holds the runner's mark (the lock:
    it cannot be dropped before the transaction ends). On every event table read by
    transaction id: ``zdr.events``, and a prepared TableReader's."""
    return f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('application_name') = '{RUNNER_APPLICATION_NAME}'
               OR {_HOLDS_RUNNER_MARK.replace("{pid}", "pg_backend_pid()")}
            THEN RAISE EXCEPTION USING
                ERRCODE = 'ZR001',
                MESSAGE = 'events cannot be appended from a replay''s '
                    || 'transaction (a projector writes read models only)';
            END IF;
            RETURN NULL;
        END $$"""


@dataclass(frozen=True)
class StampedLog:
    """Where a log read by (transaction id, position) keeps its stamps: what the reads
    order by, what the cluster check compares and what ``rebase`` re-stamps. Every part
    is SQL that zdr quoted."""

    #: The table, schema-qualified and quoted (``zdr.events``), and its name for
    #: ``to_regclass`` and messages.
    table: str
    name: str
    #: The transaction-id column, quoted (``txid``).
    txid_column: str
    #: The position column, quoted.
    position: str
    #: Rows from before the stamps have none (NULL): they count as committed, 0.
    nullable: bool = False

    @property
    def txid(self) -> str:
        """The stamp as the reads order by it (the expression an index is built on)."""
        return self.txid_of("")

    def txid_of(self, alias: str) -> str:
        """``txid`` of the row named ``alias`` in a query (``e``)."""
        column = f"{alias}.{self.txid_column}" if alias else self.txid_column
        return f"coalesce({column}, 0)" if self.nullable else column


class StampedReader:
    """An ``EventReader`` over a table whose rows carry the transaction id that wrote
    them (see the module's docstring): zdr's own ``zdr.events``, or an application's
    table stamped by ``zdr.readers.TableReader.prepare``."""

    #: Cursors are (transaction id, position): an open transaction can hold the
    #: horizon, and the cluster check applies (False for a log that commits in
    #: position order, such as ``zdr.readers.EventsourcingReader``'s).
    transaction_ids = True

    def __init__(
        self,
        log: StampedLog,
        *,
        stream_id: str,
        type_: str,
        data: str,
        metadata: str | None,
        recorded_at: str | None,
    ) -> None:
        self.stamps = log
        #: Payload bytes per read (as text), beside its count (``Settings.batch_max_bytes``).
        self.max_batch_bytes = DEFAULTS.batch_max_bytes
        self._row = _event_row_of(log.name)
        txid = log.txid
        # coalesce: a NULL payload has no size, and the row must still be read (a NULL
        # metadata is none; a NULL data stops the reader, naming the event).
        meta = "NULL::text" if metadata is None else f"{metadata}::text"
        recorded = "NULL::timestamptz" if recorded_at is None else recorded_at
        # The first ``limit`` events, cut where the size of their payloads as read (the
        # JSON text that is decoded, not the compressed bytes stored) passes the budget
        # (the event that passes it is the last one; the first always comes). Payloads
        # come as text and are decoded by _event_row: cheaper than psycopg's jsonb loader.
        # The partition a stream falls in (``zdr.partitions``): PostgreSQL's own hash of
        # text, the one hash partitioning uses, so stable across versions and servers.
        # Events without a stream (a nullable column of an application's table) are all
        # in partition 0: NULL would be in none, and skipped by every partition.
        in_partition = (
            "AND coalesce(abs(mod(hashtextextended("
            f"{stream_id}::text, 0), %(partitions)s)), 0) = %(partition)s"
        )
        self._read_statement, self._read_partition = (
            f"""
            SELECT position, txid, stream_id, type, data, metadata, recorded_at FROM (
                SELECT *, sum(size) OVER (ORDER BY txid, position ROWS UNBOUNDED PRECEDING)
                          AS upto
                FROM (SELECT *, coalesce(octet_length(data), 0)
                                + coalesce(octet_length(metadata), 0) AS size
                      FROM (SELECT {log.position} AS position, {txid} AS txid,
                                   {stream_id}::text AS stream_id, {type_}::text AS type,
                                   {data}::text AS data, {meta} AS metadata,
                                   {recorded} AS recorded_at
                            FROM {log.table}
                            WHERE ({txid}, {log.position}) > (%(txid)s, %(position)s)
                              AND ({txid}, {log.position})
                                  <= (%(until_txid)s, %(until_position)s)
                              AND {txid} < LEAST({HORIZON}, %(below_txid)s)
                              {partition}
                            ORDER BY {txid}, {log.position}
                            LIMIT %(limit)s) AS first
                     ) AS measured
            ) AS sized
            WHERE upto - size < %(max_bytes)s
            ORDER BY txid, position
        """
            for partition in ("", in_partition)
        )
        count = (
            f"SELECT count(*) FROM {log.table} "
            f"WHERE ({txid}, {log.position}) > (%(txid)s, %(position)s)"
        )
        self._count_statement, self._count_partition = count, f"{count} {in_partition}"
        self._last_statement = (
            f"SELECT {txid}, {log.position} FROM {log.table} WHERE {txid} < {HORIZON} "
            f"ORDER BY {txid} DESC, {log.position} DESC LIMIT 1"
        )

    @property
    def source(self) -> str:
        """The log this reader reads, as zdr records it beside the checkpoints."""
        return self.stamps.name

    #: It reads one partition of streams at a time (``read(..., partition=)``).
    reads_partitions = True

    def read(
        self,
        conn: sa.Connection,
        after: Cursor,
        limit: int,
        *,
        until: Cursor | None = None,
        below_txid: int | None = None,
        partition: Partition | None = None,
    ) -> list[RecordedEvent]:
        until = until or Cursor(2**63 - 1, 2**63 - 1)
        params = {
            "txid": after.txid,
            "position": after.position,
            "until_txid": until.txid,
            "until_position": until.position,
            "below_txid": below_txid if below_txid is not None else 2**63 - 1,
            "limit": limit,
            "max_bytes": self.max_batch_bytes,
            "event_table": self.stamps.name,
        }
        statement = self._read_statement
        if partition is not None:
            statement = self._read_partition
            params.update(partition=partition.index, partitions=partition.count)
        with driver_connection(conn).cursor(row_factory=self._row) as cur:
            cur.execute(statement, params)
            events: list[RecordedEvent] = cur.fetchall()
            return events

    def horizon(self, conn: sa.Connection) -> int:
        params = {"event_table": self.stamps.name}
        return int(conn.exec_driver_sql(f"SELECT {HORIZON}", params).scalar_one())

    def count_after(
        self, conn: sa.Connection, after: Cursor, *, partition: Partition | None = None
    ) -> int:
        params: dict[str, Any] = {"txid": after.txid, "position": after.position}
        statement = self._count_statement
        if partition is not None:
            statement = self._count_partition
            params.update(partition=partition.index, partitions=partition.count)
        return int(conn.exec_driver_sql(statement, params).scalar_one())

    def last_cursor(self, conn: sa.Connection) -> Cursor | None:
        """The cursor of the last event below the safe horizon (None: no event yet)."""
        row = conn.exec_driver_sql(self._last_statement, {"event_table": self.stamps.name}).first()
        return None if row is None else Cursor(int(row[0]), int(row[1]))


def iter_all(
    reader: EventReader, engine: sa.Engine, batch_size: int = 10_000
) -> Iterable[RecordedEvent]:
    """Every event ``reader`` gives, in cursor order, each batch in a short transaction
    of its own (for checks, tests and folds; the runners read by batch)."""
    cursor = START
    while True:
        with engine.begin() as conn:
            batch = reader.read(conn, cursor, batch_size)
        if not batch:
            return
        yield from batch
        cursor = batch[-1].cursor


class EventStore(StampedReader):
    """The project's own event table, ``zdr.events``."""

    def __init__(self, url_or_engine: str | sa.Engine | None = None) -> None:
        super().__init__(
            StampedLog("zdr.events", "zdr.events", "txid", "position"),
            stream_id="stream_id",
            type_="type",
            data="data",
            metadata="metadata",
            recorded_at="recorded_at",
        )
        self._engine = make_engine(url_or_engine)
        # (object, statement): created only where missing (see catalog.create_missing).
        self._create_statements = [
            ("zdr", "CREATE SCHEMA IF NOT EXISTS zdr"),
            (
                "zdr.events",
                """CREATE TABLE IF NOT EXISTS zdr.events (
                position bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                txid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
                stream_id text NOT NULL,
                type text NOT NULL,
                data jsonb NOT NULL,
                metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
                recorded_at timestamptz NOT NULL DEFAULT now()
            )""",
            ),
            (
                "zdr.events_txid_position",
                "CREATE INDEX IF NOT EXISTS events_txid_position ON zdr.events (txid, position)",
            ),
            (
                "zdr.events_stream",
                "CREATE INDEX IF NOT EXISTS events_stream ON zdr.events (stream_id, position)",
            ),
            # Version 2 (an install made before it keeps version 1 beside it).
            ("zdr.refuse_runner_appends_2()", refuse_runner_appends("zdr.refuse_runner_appends_2")),
            (
                "zdr.events/refuse_runner_appends_2",
                """CREATE TRIGGER refuse_runner_appends_2 BEFORE INSERT ON zdr.events
                   FOR EACH STATEMENT EXECUTE FUNCTION zdr.refuse_runner_appends_2()""",
            ),
        ]
        # ORDER BY ord makes the identity default run in the caller's order, so
        # positions come back ascending and match the events one for one.
        self._append_statement = """
            INSERT INTO zdr.events (stream_id, type, data, metadata)
            SELECT %s, e.type, e.data, e.metadata
            FROM unnest(%s::text[], %s::jsonb[], %s::jsonb[]) WITH ORDINALITY
                 AS e(type, data, metadata, ord)
            ORDER BY e.ord
            RETURNING position
        """
        self._copy_statement = "COPY zdr.events (stream_id, type, data, metadata) FROM STDIN"

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def iter_all(self, batch_size: int = 10_000) -> Iterable[RecordedEvent]:
        """Every committed event below the horizon, in cursor order (for checks and tests)."""
        return iter_all(self, self.engine, batch_size)

    def setup(self) -> None:
        """Create the event table if it does not exist (safe to call any number of times)."""
        with self.engine.begin() as conn:
            lock_setup(conn)
            self.create(conn)

    def create(self, conn: sa.Connection) -> None:
        """Create the event table in the caller's transaction (the caller holds the setup lock).

        Takes no lock on an event table that is already complete: appends never wait.
        """
        create_missing(conn, self._create_statements)

    def append(
        self,
        stream_id: str,
        events: Sequence[Mapping[str, Any]],
        *,
        conn: sa.Connection | None = None,
    ) -> list[int]:
        """Append events to a stream in one transaction and return their positions.

        Pass ``conn`` to append inside a transaction of your own (the events
        then commit, or not, with it).
        """
        _check_stream(stream_id)
        types, datas, metas = _columns_of(events)
        if not types:
            return []
        params = (stream_id, types, datas, metas)
        if conn is not None:
            return _positions(conn, self._append_statement, params)
        with self.engine.begin() as own:
            return _positions(own, self._append_statement, params)

    def import_events(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> int:
        """Bulk-load (stream_id, event) pairs with COPY, in one transaction; return the count.

        For bringing an existing history in (or seeding a demo): ~10x faster than
        ``append`` per stream. Positions follow the order given. One COPY statement per
        ``IMPORT_CHUNK`` events, so a server's statement_timeout bounds a chunk, not the
        whole import (which stays one transaction: all of it or nothing).
        """
        count = 0
        refused: InvalidEvent | None = None
        rows = iter(events)
        try:
            with self.engine.begin() as conn, driver_connection(conn).cursor() as cur:
                more = True
                while more:
                    more = False
                    with cur.copy(self._copy_statement) as copy:
                        for stream_id, event in rows:
                            try:
                                _check_stream(stream_id)
                                types, datas, metas = _columns_of([event])
                            except InvalidEvent as exc:
                                refused = InvalidEvent(f"event {count} of the import: {exc}")
                                raise refused from None
                            copy.write_row((stream_id, types[0], datas[0], metas[0]))
                            count += 1
                            if count % IMPORT_CHUNK == 0:
                                more = True
                                break
        except Exception:
            if refused is not None:  # older psycopg ends the COPY with QueryCanceled
                raise refused from None
            raise
        return count


#: Events per COPY statement of ``EventStore.import_events``.
IMPORT_CHUNK = 100_000


def mark_runner_transaction(conn: sa.Connection) -> None:
    """Mark the current transaction as a zdr runner's, for its whole length: the safe
    horizon then passes it (it appends no events), so a slow batch does not hold back
    the live runner. Call it first thing in the transaction, before any write."""
    conn.exec_driver_sql(f"SET LOCAL application_name = '{RUNNER_APPLICATION_NAME}'")
    conn.exec_driver_sql(
        "SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s))",
        (ZDR_LOCK_SPACE, RUNNER_TRANSACTION_LOCK),
    )


def _columns_of(events: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[Jsonb], list[Jsonb]]:
    types: list[str] = []
    datas: list[Jsonb] = []
    metas: list[Jsonb] = []
    for i, event in enumerate(events):
        if not isinstance(event, Mapping):
            raise InvalidEvent(f"event {i} must be a mapping with 'type' and 'data', got {event!r}")
        unknown = set(event) - {"type", "data", "metadata"}
        if unknown:
            raise InvalidEvent(f"event {i} has unknown fields {sorted(unknown)}")
        kind, data, meta = event.get("type"), event.get("data"), event.get("metadata", {})
        if not isinstance(kind, str) or not kind:
            raise InvalidEvent(f"event {i} needs a non-empty string 'type', got {kind!r}")
        if not isinstance(data, Mapping):
            raise InvalidEvent(f"event {i} ({kind}) needs a dict 'data', got {type(data).__name__}")
        if not isinstance(meta, Mapping):
            raise InvalidEvent(f"event {i} ({kind}) has 'metadata' that is not a dict")
        _check_text(kind, f"event {i}: type")
        _check_json(data, f"event {i} ({kind}): data")
        _check_json(meta, f"event {i} ({kind}): metadata")
        types.append(kind)
        datas.append(Jsonb(dict(data)))
        metas.append(Jsonb(dict(meta)))
    return types, datas, metas


#: Python reads no integer of more digits from text (``sys.get_int_max_str_digits``):
#: one in the log would stop every reader. About 4,200 digits.
_MAX_INT_BITS = 14_000


def _check_stream(stream_id: Any) -> None:
    if not isinstance(stream_id, str) or not stream_id:
        raise InvalidEvent(f"stream_id must be a non-empty string, got {stream_id!r}")
    _check_text(stream_id, "stream_id")


def _check_text(text: str, where: str) -> None:
    """Refuse what PostgreSQL cannot store in text or jsonb: NUL, invalid Unicode."""
    if "\x00" in text:
        raise InvalidEvent(
            f"{where} holds a NUL character (\\u0000), which PostgreSQL cannot store"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(
            f"{where} holds a lone surrogate ({text!r}): not valid Unicode"
        ) from None


def _check_json(value: Any, where: str) -> None:
    """Refuse (InvalidEvent, naming the path) what JSON cannot hold as given, instead of
    storing something else (a key made a string, NaN, a Decimal made a float)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif item is None or isinstance(item, bool):
            pass
        elif isinstance(item, int):
            if item.bit_length() > _MAX_INT_BITS:
                raise InvalidEvent(
                    f"{path} is an integer of more than 4,000 digits, which could not be read "
                    "back: store it as a string"
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                name = "NaN" if math.isnan(item) else str(item)
                raise InvalidEvent(f"{path} is {name}, which JSON has no value for")
        elif isinstance(item, Mapping):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise InvalidEvent(
                        f"{path}: key {key!r} is not a string (JSON keys are; it would come "
                        f"back as {str(key)!r})"
                    )
                _check_text(key, f"{path}: key {key!r}")
                stack.append((inner, f"{path}.{key}"))
        elif isinstance(item, list | tuple):
            stack.extend((inner, f"{path}[{n}]") for n, inner in enumerate(item))
        else:
            raise InvalidEvent(
                f"{path} is a {type(item).__name__}, which JSON has no type for: convert it "
                "(a Decimal to a string, a datetime to an ISO string)"
            )


_LONG_DIGITS = re.compile(r"\d{19}")


def _event_row_of(table: str) -> Any:
    """A psycopg row factory making RecordedEvents of rows read from ``table``."""

    def row_factory(cursor: Any) -> Any:
        def make(values: Sequence[Any]) -> RecordedEvent:
            position, txid, stream_id, kind, data, metadata, recorded_at = values
            try:
                payload = _loads_json(data)
                meta = {} if metadata in (None, "{}", "null") else _loads_json(metadata)
            except (ValueError, TypeError) as exc:  # orjson's and json's errors are
                raise InvalidEvent(
                    f"event {position} ({kind}, stream {stream_id!r}) in {table} cannot be "
                    f"read: {exc}. Every reader stops there: correct its payload, then run "
                    "again"
                ) from exc
            if not isinstance(payload, dict) or not isinstance(meta, dict):
                raise InvalidEvent(
                    f"event {position} ({kind}, stream {stream_id!r}) in {table}: its data "
                    "and metadata must be JSON objects, got "
                    f"{type(payload).__name__} and {type(meta).__name__}. Every reader stops "
                    "there: correct it, then run again"
                )
            return RecordedEvent(position, txid, stream_id, kind, payload, meta, recorded_at)

        return make

    return row_factory


def _loads_json(data: str) -> Any:
    """orjson (decoding is half of a replay's read cost), except where it would be wrong.

    orjson reads integers beyond 64 bits as floats; ``json`` keeps them exact, so
    a payload with a run of 19 digits or more goes to ``json``.
    """
    if _LONG_DIGITS.search(data):
        return json.loads(data, parse_int=_bounded_int)
    return orjson.loads(data)


def _bounded_int(digits: str) -> int:
    """An integer of the log, refused past 4,300 digits (``append`` takes about 4,200),
    whatever this process's own limit (``sys.set_int_max_str_digits``) is."""
    if len(digits.lstrip("-")) > 4_300:
        raise ValueError(f"an integer of {len(digits.lstrip('-')):,} digits")
    return int(digits)


def driver_connection(conn: sa.Connection) -> Any:
    """The psycopg connection under a SQLAlchemy one (same transaction)."""
    return conn.connection.driver_connection


#: Names of the savepoints ``forget_prepared_statements`` rolls back, each new.
_FORGETTING = itertools.count(1)


def forget_prepared_statements(conn: sa.Connection) -> None:
    """Make psycopg drop the statements it prepared on this connection (in the server
    too), inside the connection's open transaction, which goes on unchanged.

    After a promotion or rollback a table keeps its name but may change shape; a
    statement prepared on the old shape fails ("cached plan must not change result
    type"). psycopg drops every prepared statement when it sees a rollback it has
    not seen before: an empty savepoint of a new name, rolled back, is one.
    """
    name = f"zdr_forget_{next(_FORGETTING)}"
    with driver_connection(conn).cursor() as cur:
        cur.execute(f"SAVEPOINT {name}")
        cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
        cur.execute(f"RELEASE SAVEPOINT {name}")


def _positions(conn: sa.Connection, statement: str, params: tuple[Any, ...]) -> list[int]:
    with driver_connection(conn).cursor() as cur:
        cur.execute(statement, params)
        return sorted(row[0] for row in cur.fetchall())

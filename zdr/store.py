"""The event store: an append-only table of events, read in position order.

Why reading by position needs care. A position comes from a sequence when an event
is inserted, but transactions commit in any order: position 11 can be visible while
position 10 is still in an open transaction, and a reader that moved past 11 would
pass over 10 for ever. So a reader reads only up to the *safe position*: the highest
position below which nothing can still commit.

How a reader knows it. An appending transaction makes itself known before it draws
its first position: a statement trigger on the log takes a transaction-level advisory
lock naming the sequence's last value at that moment (its positions are all above
it). Any reader sees that lock in ``pg_locks`` at once, and the transaction holds it
until it commits or rolls back. A reader first reads the sequence's last value, then
the locks (in that order, ``safe_position_statement``), and reads events up to the lowest of
them in a statement of its own (a new snapshot, taken after the look at the locks):
a transaction not announced by then draws positions above the last value read, and
one announced commits above the number it named.

Why position order is causal. A transaction that saw another's events (its commit)
draws its positions after that commit, so higher: a stream's events are read in the
order the application wrote them, which an order by transaction id (given at a
transaction's first write, not at its commit) did not ensure. And only transactions
that append hold readers back, for as long as they are open: an UPDATE elsewhere, a
DBA's index build or a transaction in another database holds nothing.

What this needs of the log: positions drawn from a sequence with ``CACHE 1`` (with a
cache, a session draws from its own block, and "drawn later" is not "higher") within
the INSERT statement (a column default or identity), and read in READ COMMITTED.
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
from zdr.errors import ConfigurationError, InvalidEvent, NotSetUp
from zdr.locks import lock_setup
from zdr.settings import DEFAULTS


class Cursor(NamedTuple):
    """Where a reader stands: (0, the position of the last event it took). The first part
    is a transaction id only in a checkpoint kept by an earlier zdr version, which read
    logs in (transaction id, position) order; ``zdr.ordering`` moves those."""

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


#: What zdr's replay transactions call themselves (``SET LOCAL application_name``, see
#: ``mark_runner_transaction``), for people reading pg_stat_activity.
RUNNER_APPLICATION_NAME = "zdr runner (appends no events)"
#: The transaction-local setting that marks a runner's transaction too: a projector that
#: sets ``application_name`` back (a framework may) still cannot append.
RUNNER_MARK = "zdr.runner_transaction"

#: The announcement of a transaction that appends to a log (see the module's
#: docstring): a shared transaction-level advisory lock whose 64-bit key is the log
#: table's oid (high half) and the low 32 bits of the sequence's last value when the
#: transaction first inserted (low half), and, only when that value is 2^32 or more,
#: before it, one whose high half is the oid with its top bit flipped and whose low half
#: is the value's high half. Both in the 64-bit form (``objsubid`` 1 in ``pg_locks``, the
#: halves in ``classid`` and ``objid``): an application's lock of the (int, int) form
#: keyed by the table's oid, a common pattern, never looks like one. Taken once per
#: transaction and log (a transaction-local setting remembers it; a savepoint rolled
#: back lets go of both, and the next insert takes them again, higher). Shared:
#: appenders never wait for each other.
_ANNOUNCED = "'zdr.appending_' || TG_RELID::bigint"


def last_position_function(function: str, sequence: str) -> str:
    """The function (``function``: its quoted, qualified name) that gives the last value
    of the log's sequence (``sequence``: a quoted, qualified name) to anyone who may
    append or read: it runs as its owner (SECURITY DEFINER), since an identity column
    draws for a role that has no privilege on its sequence, and pg_sequence_last_value
    wants one. It reads that one sequence and nothing else."""
    literal = sequence.replace("'", "''")
    return f"""CREATE OR REPLACE FUNCTION {function}() RETURNS bigint
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
        AS $$ SELECT pg_catalog.pg_sequence_last_value('{literal}'::pg_catalog.regclass) $$"""


def append_trigger(function: str, last_position: str) -> str:
    """The statement trigger function on a log (``function``: its quoted, qualified name;
    ``last_position``: the ``last_position_function`` of its sequence) that announces an
    appending transaction before its first position is drawn, and refuses appends from
    a replay's transaction (a projector writes read models only)."""
    return f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            last bigint;
        BEGIN
            IF current_setting('application_name') = '{RUNNER_APPLICATION_NAME}'
               OR current_setting('{RUNNER_MARK}', true) = '1'
            THEN RAISE EXCEPTION USING
                ERRCODE = 'ZR001',
                MESSAGE = 'events cannot be appended from a replay''s '
                    || 'transaction (a projector writes read models only)';
            END IF;
            IF current_setting({_ANNOUNCED}, true) IS DISTINCT FROM '1' THEN
                last := coalesce({last_position}(), 0);
                IF last >= 4294967296 THEN
                    PERFORM pg_advisory_xact_lock_shared(
                        ((TG_RELID::bigint # 2147483648) << 32) | (last >> 32));
                END IF;
                PERFORM pg_advisory_xact_lock_shared(
                    (TG_RELID::bigint << 32) | (last & 4294967295));
                PERFORM set_config({_ANNOUNCED}, '1', true);
            END IF;
            RETURN NULL;
        END $$"""


#: The appending transactions in progress on the log whose oid is ``{log}`` (SQL), other
#: than this session: their virtual transaction, pid, and the value they announced
#: (``bound``: their positions are above it). A prepared transaction's locks stay (pid
#: NULL) until COMMIT PREPARED.
ANNOUNCEMENTS = """(
    SELECT y.virtualtransaction, y.pid,
           CASE WHEN y.lo IS NULL THEN y.hi << 32 ELSE (coalesce(y.hi, 0) << 32) | y.lo END
               AS bound
    FROM (SELECT l.virtualtransaction, min(l.pid) AS pid,
                 min(l.objid::bigint) FILTER (WHERE l.classid::bigint = {log}) AS lo,
                 min(l.objid::bigint) FILTER (WHERE l.classid::bigint <> {log}) AS hi
          FROM pg_locks l
          WHERE l.locktype = 'advisory' AND l.objsubid = 1
            AND l.classid::bigint IN ({log}, {log} # 2147483648)
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.pid IS DISTINCT FROM pg_backend_pid()
          GROUP BY l.virtualtransaction) AS y)"""
#: The lowest of them (NULL where there is none).
ANNOUNCED = f"(SELECT min(bound) FROM {ANNOUNCEMENTS} AS a)"


def safe_position_statement(last_position: str) -> str:
    """The statement that gives a log's safe position (the log bound as %(log)s, its
    sequence as %(sequence)s; ``last_position``: its ``last_position_function``): the
    sequence's last value, lowered to what an appending transaction in progress
    announced. The last value is read first: the correlated subquery on pg_locks runs
    for the row it reads. With it, what the reader must refuse: a session whose snapshot
    is older than the look at the locks (it would miss a transaction that committed in
    between: only READ COMMITTED takes one per statement), a standby (it sees none of
    the primary's locks), a sequence that caches, cycles or counts down."""
    return f"""
    SELECT least(s.last, {ANNOUNCED.format(log="s.log")}),
           current_setting('transaction_isolation'), pg_is_in_recovery(),
           q.seqcache, q.seqincrement, q.seqmin, q.seqcycle
    FROM (SELECT coalesce({last_position}(), 0) AS last,
                 to_regclass(%(log)s)::oid::bigint AS log
          OFFSET 0) AS s
    LEFT JOIN pg_sequence q ON q.seqrelid = to_regclass(%(sequence)s)"""


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
        """The current safe horizon: every cursor whose first part is below it can be read
        (1 for a log read by position: every cursor is (0, position))."""
        ...

    def count_after(self, conn: sa.Connection, after: Cursor) -> int:
        """How many events sort after ``after`` (committed ones, horizon or not)."""
        ...


@dataclass(frozen=True)
class StampedLog:
    """Where a log read by position keeps its parts: every part is SQL that zdr quoted.
    (The name is from when such logs were read by transaction id, which their rows may
    still carry: ``zdr.ordering`` moves checkpoints of that order to this one.)"""

    #: The table, schema-qualified and quoted (``zdr.events``), and its name for
    #: ``to_regclass`` and messages.
    table: str
    name: str
    #: The transaction-id column of the earlier order, quoted (``txid``), if the table has one.
    txid_column: str | None
    #: The position column, quoted.
    position: str
    #: Rows from before the stamps have none (NULL): they count as committed, 0.
    nullable: bool = False

    @property
    def txid(self) -> str:
        """The earlier order's stamp as it was read (the expression its index is on)."""
        return self.txid_of("")

    def txid_of(self, alias: str) -> str:
        """``txid`` of the row named ``alias`` in a query (``e``)."""
        assert self.txid_column is not None, f"{self.name} has no transaction-id stamps"
        column = f"{alias}.{self.txid_column}" if alias else self.txid_column
        return f"coalesce({column}, 0)" if self.nullable else column


class StampedReader:
    """An ``EventReader`` over a table whose appends announce themselves (see the module's
    docstring): zdr's own ``zdr.events``, or an application's table prepared by
    ``zdr.readers.TableReader.prepare``. Cursors are (0, position)."""

    #: Cursors are (0, position): no transaction id is compared, so the cluster check
    #: does not apply.
    transaction_ids = False

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
        position = log.position
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
        #: "The row is in partition %(partition)s of %(partitions)s", for a WHERE clause.
        self.partition_filter = in_partition
        self._read_statement, self._read_partition = (
            f"""
            SELECT position, 0, stream_id, type, data, metadata, recorded_at FROM (
                SELECT *, sum(size) OVER (ORDER BY position ROWS UNBOUNDED PRECEDING) AS upto
                FROM (SELECT *, coalesce(octet_length(data), 0)
                                + coalesce(octet_length(metadata), 0) AS size
                      FROM (SELECT {position} AS position,
                                   {stream_id}::text AS stream_id, {type_}::text AS type,
                                   {data}::text AS data, {meta} AS metadata,
                                   {recorded} AS recorded_at
                            FROM {log.table}
                            WHERE {position} > %(position)s AND {position} <= %(until)s
                              {partition}
                            ORDER BY {position}
                            LIMIT %(limit)s) AS first
                     ) AS measured
            ) AS sized
            WHERE upto - size < %(max_bytes)s
            ORDER BY position
        """
            for partition in ("", in_partition)
        )
        count = f"SELECT count(*) FROM {log.table} WHERE {position} > %(position)s"
        self._count_statement, self._count_partition = count, f"{count} {in_partition}"
        self._last_statement = (
            f"SELECT {position} FROM {log.table} WHERE {position} <= %(until)s "
            f"ORDER BY {position} DESC LIMIT 1"
        )

    @property
    def source(self) -> str:
        """The log this reader reads, as zdr records it beside the checkpoints."""
        return self.stamps.name

    #: It reads one partition of streams at a time (``read(..., partition=)``).
    reads_partitions = True

    def require_ready(self, conn: sa.Connection) -> None:
        """Refuse (NotSetUp) to read a log whose appends do not announce themselves."""

    def sequence(self, conn: sa.Connection) -> str:
        """The sequence the log's positions come from (a name for ``regclass``)."""
        return SEQUENCE

    def last_position(self, conn: sa.Connection) -> str:
        """The ``last_position_function`` of the log's sequence, as SQL to call."""
        return "zdr.events_last_position_3"

    def _safe_statement(self, conn: sa.Connection) -> str:
        return safe_position_statement(self.last_position(conn))

    def safe_position(self, conn: sa.Connection) -> int:
        """The highest position below which every event that will ever commit has
        committed, as of now (see the module's docstring). Asked in a statement of its
        own, before the events are read in another: in READ COMMITTED only (refused
        otherwise), whose next statement takes a snapshot after this one."""
        self.require_ready(conn)
        sequence = self.sequence(conn)
        params = {"sequence": sequence, "log": self.stamps.name}
        row = conn.exec_driver_sql(self._safe_statement(conn), params).one()
        safe, isolation, standby, cache, increment, minimum, cycle = row
        if standby:
            raise ConfigurationError(
                f"{self.stamps.name} cannot be read on a standby: the appending transactions "
                "that hold readers back are seen on the primary only. Run zdr on the primary"
            )
        if cache is not None and cache > 1:
            raise ConfigurationError(
                f"the sequence {sequence} of {self.stamps.name}'s positions has CACHE "
                f"{cache}: each session then draws from a block of its own, and a position "
                "drawn later can be lower, which a reader by position would pass over. "
                f"ALTER SEQUENCE {sequence} CACHE 1"
            )
        if increment is not None and (increment < 0 or minimum < 1 or cycle):
            raise ConfigurationError(
                f"the sequence {sequence} of {self.stamps.name}'s positions must count up "
                f"from 1 without cycling (it has INCREMENT {increment}, MINVALUE {minimum}"
                f"{', CYCLE' if cycle else ''}): zdr reads positions from 1 up"
            )
        if isolation != "read committed":
            raise ConfigurationError(
                f"{self.stamps.name} is read in READ COMMITTED transactions only (this one "
                f"is {isolation.upper()}): a snapshot taken before the reader looks at the "
                "appending transactions could pass over one that commits meanwhile"
            )
        return int(safe)

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
        _require_position_order(after, self.stamps.name)
        if below_txid is not None and below_txid <= 0:
            return []  # every cursor of this log is (0, n): none is below
        bound = self.safe_position(conn)
        if until is not None:
            _require_position_order(until, self.stamps.name)
            bound = min(bound, until.position)
        if bound <= after.position:
            return []
        params = {
            "position": after.position,
            "until": bound,
            "limit": limit,
            "max_bytes": self.max_batch_bytes,
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
        """1: every cursor's first part is 0 (see ``safe_position`` for how far it reads)."""
        return 1

    def count_after(
        self, conn: sa.Connection, after: Cursor, *, partition: Partition | None = None
    ) -> int:
        _require_position_order(after, self.stamps.name)
        self.require_ready(conn)
        params: dict[str, Any] = {"position": after.position}
        statement = self._count_statement
        if partition is not None:
            statement = self._count_partition
            params.update(partition=partition.index, partitions=partition.count)
        return int(conn.exec_driver_sql(statement, params).scalar_one())

    def last_cursor(self, conn: sa.Connection) -> Cursor | None:
        """The cursor of the last event up to the safe position (None: no event yet)."""
        bound = self.safe_position(conn)
        row = conn.exec_driver_sql(self._last_statement, {"until": bound}).first()
        return None if row is None else Cursor(0, int(row[0]))


def _require_position_order(cursor: Cursor, log: str) -> None:
    """Refuse a cursor of the earlier (transaction id, position) order: ``zdr.ordering``
    moves every checkpoint to position order before a runner reads."""
    if cursor.txid != 0:
        raise ConfigurationError(
            f"a cursor of the (transaction id, position) order of an earlier zdr version "
            f"({cursor.txid}, {cursor.position}) was given to the reader of {log}, which reads "
            "by position: checkpoints are moved to position order when a runner starts "
            "(zdr.ordering); a cursor kept from before cannot be used"
        )


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


#: The sequence of ``zdr.events``' positions (its identity column's).
SEQUENCE = "zdr.events_position_seq"


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
        self._ready: set[str] = set()
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
                "zdr.events_stream",
                "CREATE INDEX IF NOT EXISTS events_stream ON zdr.events (stream_id, position)",
            ),
            (
                "zdr.events_last_position_3()",
                last_position_function("zdr.events_last_position_3", SEQUENCE),
            ),
            (
                "zdr.append_trigger_3()",
                append_trigger("zdr.append_trigger_3", "zdr.events_last_position_3"),
            ),
            # Version 3 announces appends (see the module's docstring) and refuses a
            # replay's, as version 2 did: it takes version 2's place. Enabled ALWAYS: it
            # fires under session_replication_role = replica too (bulk loaders set it).
            # Waits for the transactions that appended before it (setup runs under a
            # short lock timeout, tried again).
            (
                "zdr.events/append_trigger_3",
                """CREATE TRIGGER append_trigger_3 BEFORE INSERT ON zdr.events
                   FOR EACH STATEMENT EXECUTE FUNCTION zdr.append_trigger_3();
                   ALTER TABLE zdr.events ENABLE ALWAYS TRIGGER append_trigger_3;
                   DROP TRIGGER IF EXISTS refuse_runner_appends_2 ON zdr.events""",
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

    def require_ready(self, conn: sa.Connection) -> None:
        """Refuse (NotSetUp) to read a log whose appends do not announce themselves (zdr
        set up by an earlier version, or the trigger disabled): read by position, it
        could skip events. Checked once per database (and by every runner as it starts)."""
        where = str(conn.engine.url)
        if where in self._ready:
            return
        exists, enabled = conn.exec_driver_sql(
            """SELECT to_regclass('zdr.events') IS NOT NULL,
                      (SELECT tgenabled FROM pg_trigger WHERE tgrelid = to_regclass('zdr.events')
                       AND tgname = 'append_trigger_3')"""
        ).one()
        if not exists:
            raise NotSetUp(
                "zdr is not set up in this database: call ReplayManager.setup() (or run "
                "`zdr setup`) first"
            )
        if enabled is None:
            raise NotSetUp(
                "zdr's event table is from an earlier zdr version, which read it by transaction "
                "id: run `zdr setup` (ReplayManager.setup()) once with this version; it adds "
                "the trigger that lets readers read by position, and moves nothing yet"
            )
        if enabled == "D":
            raise NotSetUp(
                "the trigger append_trigger_3 on zdr.events is disabled (a bulk load?): "
                "appends then do not announce themselves, and a reader could skip events. "
                "ALTER TABLE zdr.events ENABLE ALWAYS TRIGGER append_trigger_3"
            )
        self._ready.add(where)

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
    """Mark the current transaction as a zdr runner's, for its whole length: the log's
    trigger refuses its appends (a projector writes read models only), and
    pg_stat_activity shows its name. Call it first thing in the transaction."""
    conn.exec_driver_sql(f"SET LOCAL application_name = '{RUNNER_APPLICATION_NAME}'")
    conn.exec_driver_sql(f"SELECT set_config('{RUNNER_MARK}', '1', true)")


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

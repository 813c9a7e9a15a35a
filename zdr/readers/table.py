"""Any event table of the application's own: ``TableReader``.

Such a table's writers usually insert with no lock, so transactions commit out of
order: position 11 can be visible while 10 is still in an open transaction, and a
reader that pages by position alone passes over 10 for good. zdr reads its own
table by (transaction id, position) below the safe horizon (``zdr.store``); a
table of the application's gets the same stamps from ``prepare``:

* a nullable column ``zdr_txid`` whose default is the inserting transaction's id
  (``pg_current_xact_id()``), added without a default first and given it after, so
  the table is not rewritten; rows from before have none (NULL) and count as
  committed (0): ``ALTER TABLE`` waited for every transaction that had inserted
  into the table to end before the default took effect;
* ``CHECK (zdr_txid IS NOT NULL) NOT VALID``: no new row comes without a stamp (an
  insert of an explicit NULL, or one after somebody dropped the default, fails
  instead of being skipped by every reader); the rows from before are not checked;
* the statement trigger that refuses appends from a replay's transaction (the
  horizon passes those transactions; see ``zdr.store``), with its function in the
  table's schema (prepare creates nothing in zdr's);
* an index on ``(coalesce(zdr_txid, 0), position)``, built ``CONCURRENTLY``.

Writers pay for it: each insert stamps its rows (a function call per row), checks
the constraint, maintains one more index, and each INSERT statement runs the
trigger once (a look at ``pg_locks``, whose cost grows with the locks held in the
whole server). ``bench/replay_bench.py`` (``writers``) measures it. The column,
constraint and trigger are added under a short ``lock_timeout``, retried with
backoff, so the application's writers wait a moment at most; a writer
that runs ``INSERT INTO t VALUES (...)`` without a column list still works (the
new column is the last one), one that reads ``SELECT *`` sees one more column.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time

import sqlalchemy as sa

from zdr.config import make_engine
from zdr.errors import ConfigurationError, NotSetUp, interrupted, is_transient, one_line
from zdr.locks import ZDR_LOCK_SPACE, under_short_lock_timeout
from zdr.settings import DEFAULTS
from zdr.store import (
    Cursor,
    Partition,
    RecordedEvent,
    StampedLog,
    StampedReader,
    refuse_runner_appends,
)

log = logging.getLogger("zdr")

#: The stamp column ``prepare`` adds, and the names of what goes with it.
STAMP_COLUMN = "zdr_txid"
CHECK_NAME = "zdr_txid_stamped"
TRIGGER_NAME = "zdr_refuse_runner_appends"
_STAMP_DEFAULT = "(pg_current_xact_id())::text::bigint"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def _identifier(name: object, what: str) -> str:
    """``name`` quoted, refused (ConfigurationError) unless a plain SQL identifier."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"{what} must be a plain SQL identifier (letters, digits, _ and $, not first a "
            f"digit, at most 63), got {name!r}"
        )
    return '"' + name + '"'


class TableReader(StampedReader):
    """Reads an event table of the application's own, once ``prepare`` has stamped it.

    ``table`` is ``schema.name`` (a name alone is in ``public``); the other arguments
    name its columns: ``position`` (an integer that grows with each insert, such as a
    ``bigserial`` id), ``stream_id`` (any type: read as text), ``type`` (text),
    ``data`` and ``metadata`` (JSON or JSONB objects), ``recorded_at`` (a timestamp).
    """

    def __init__(
        self,
        table: str,
        *,
        position: str,
        stream_id: str,
        type: str,  # the column's role, named as the event's field is
        data: str,
        metadata: str | None = None,
        recorded_at: str | None = None,
    ) -> None:
        if not isinstance(table, str):
            raise ConfigurationError(f"table must be 'schema.name' or 'name', got {table!r}")
        schema, _, name = table.rpartition(".")
        self.schema = _identifier(schema or "public", "the table's schema")
        self.name = _identifier(name, "the table's name")
        self.columns = {
            "position": _identifier(position, "position"),
            "stream_id": _identifier(stream_id, "stream_id"),
            "type": _identifier(type, "type"),
            "data": _identifier(data, "data"),
        }
        if metadata is not None:
            self.columns["metadata"] = _identifier(metadata, "metadata")
        if recorded_at is not None:
            self.columns["recorded_at"] = _identifier(recorded_at, "recorded_at")
        qualified = f"{self.schema}.{self.name}"
        super().__init__(
            StampedLog(
                qualified, qualified, f'"{STAMP_COLUMN}"', self.columns["position"], nullable=True
            ),
            stream_id=self.columns["stream_id"],
            type_=self.columns["type"],
            data=self.columns["data"],
            metadata=self.columns.get("metadata"),
            recorded_at=self.columns.get("recorded_at"),
        )
        # Names of their own per table (a hash of its name: two long names never meet).
        tag = hashlib.sha1(qualified.encode()).hexdigest()[:10]
        self._index_name = f"zdr_txid_position_{tag}"
        self.index = f'{self.schema}."{self._index_name}"'
        self.function = f'{self.schema}."zdr_refuse_runner_appends_{tag}"'
        self._lock_key = f"prepare {qualified}"
        self._checked: set[str] = set()
        self._checked_lock = threading.Lock()

    @property
    def source(self) -> str:
        return f"table {self.stamps.table}"

    def __repr__(self) -> str:
        return f"TableReader({self.stamps.table})"

    # -- prepare -------------------------------------------------------------

    def prepare(
        self,
        url_or_engine: str | sa.Engine | None = None,
        *,
        lock_timeout_s: float = DEFAULTS.lock_timeout_s,
        attempts: int = DEFAULTS.swap_attempts,
    ) -> None:
        """Add the stamps (see the module's docstring); idempotent: what is there already
        is left alone, and a table that is fully prepared takes no lock at all.

        The column, its default, the constraint, the trigger and its function (in the
        table's schema) are added in one short transaction under ``lock_timeout_s``,
        tried ``attempts`` times (LockTimeout names the table after that; nothing is
        changed); the index is built concurrently after it, which waits for every
        transaction open in the database at its start to end (writers go on). Two
        prepares of one table take turns. Run it as the table's owner.
        """
        engine = make_engine(url_or_engine)
        try:
            with engine.connect() as conn:
                self._take_turn(conn)
                try:
                    with conn.begin():
                        missing = self._missing(conn)
                    if missing - {"index"}:
                        under_short_lock_timeout(
                            conn,
                            self._stamp,
                            lock_timeout_s=lock_timeout_s,
                            attempts=attempts,
                            what=f"prepare {self.stamps.table} (the application's writers hold it)",
                        )
                    if "index" in missing:
                        self._build_index(conn)
                finally:
                    conn.exec_driver_sql(
                        "SELECT pg_advisory_unlock(%s, hashtext(%s))",
                        (ZDR_LOCK_SPACE, self._lock_key),
                    )
                    conn.commit()
        except sa.exc.DBAPIError as exc:
            if is_transient(exc):
                raise interrupted(f"prepare {self.stamps.table}", exc) from exc
            raise ConfigurationError(
                f"prepare {self.stamps.table} failed: {one_line(exc)} (what was added before "
                "stays; run prepare again once that is fixed)"
            ) from exc
        with self._checked_lock:
            self._checked.discard(str(engine.url))

    def _take_turn(self, conn: sa.Connection) -> None:
        """Wait for another prepare of this table to end (a session lock). Tried, not waited
        for in a statement: a session waiting inside one holds a snapshot, which the other
        prepare's concurrent index build would wait for in turn."""
        while True:
            taken = conn.exec_driver_sql(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, self._lock_key)
            ).scalar_one()
            conn.commit()
            if taken:
                return
            time.sleep(0.2)

    def _stamp(self, conn: sa.Connection) -> None:
        missing = self._missing(conn)
        table = self.stamps.table
        if "function" in missing:
            conn.exec_driver_sql(refuse_runner_appends(self.function))
        if "column" in missing:
            # No default here: one on ADD COLUMN that is volatile rewrites the table.
            conn.exec_driver_sql(f'ALTER TABLE {table} ADD COLUMN "{STAMP_COLUMN}" bigint')
        if "default" in missing:
            # Waits for every transaction that inserted into the table: once this commits,
            # every row without a stamp comes from a transaction that has ended.
            conn.exec_driver_sql(
                f'ALTER TABLE {table} ALTER COLUMN "{STAMP_COLUMN}" SET DEFAULT {_STAMP_DEFAULT}'
            )
        if "check" in missing:
            conn.exec_driver_sql(
                f'ALTER TABLE {table} ADD CONSTRAINT "{CHECK_NAME}" '
                f'CHECK ("{STAMP_COLUMN}" IS NOT NULL) NOT VALID'
            )
        if "trigger" in missing:
            conn.exec_driver_sql(
                f'CREATE TRIGGER "{TRIGGER_NAME}" BEFORE INSERT ON {table} '
                f"FOR EACH STATEMENT EXECUTE FUNCTION {self.function}()"
            )

    def _build_index(self, conn: sa.Connection) -> None:
        """``CREATE INDEX CONCURRENTLY``: writers go on while it builds. One left invalid by
        an interrupted build is dropped (concurrently) and built again. No statement
        timeout: a big table takes as long as it takes."""
        log.info(
            "building the index of %s concurrently: it waits for the transactions open in "
            "the database to end, and writers go on meanwhile",
            self.stamps.table,
        )
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        auto.exec_driver_sql("SET statement_timeout = 0")
        try:
            if self._index_state(auto) == "invalid":
                auto.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {self.index}")
            auto.exec_driver_sql(
                f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{self._index_name}" '
                f"ON {self.stamps.table} (({self.stamps.txid}), {self.stamps.position})"
            )
        finally:
            auto.exec_driver_sql("RESET statement_timeout")

    # -- the check before reading --------------------------------------------

    def _missing(self, conn: sa.Connection) -> set[str]:
        """What ``prepare`` still has to add; ConfigurationError where the table cannot be
        read this way (no such table or column, a partitioned table, a position that is
        not a unique integer, a disabled trigger of zdr's)."""
        table = self.stamps.table
        kind = conn.exec_driver_sql(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (table,)
        ).scalar()
        if kind is None:
            raise ConfigurationError(
                f"TableReader: there is no table {table} in this database (name it as schema.table)"
            )
        if kind != "r":
            what = {"p": "a partitioned table", "v": "a view", "m": "a materialized view"}
            raise ConfigurationError(
                f"TableReader: {table} is {what.get(kind, f'not a table (relkind {kind})')}: "
                "zdr stamps and reads a plain table only"
            )
        found = conn.exec_driver_sql(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
               WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0
                 AND NOT a.attisdropped""",
            {"table": table},
        ).all()
        columns: dict[str, str] = {name: kind for name, kind in found}
        absent = [c for c in self.columns.values() if c.strip('"') not in columns]
        if absent:
            raise ConfigurationError(
                f"TableReader: {table} has no column {', '.join(absent)} "
                f"(its columns: {', '.join(sorted(columns))})"
            )
        position = self.columns["position"].strip('"')
        if columns[position] not in ("bigint", "integer", "smallint"):
            raise ConfigurationError(
                f"TableReader: the position column {position} of {table} is "
                f"{columns[position]}: it must be an integer (bigint, integer, smallint) "
                "that grows with each insert"
            )
        row = conn.exec_driver_sql(
            """SELECT
                 EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                           ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                         WHERE i.indrelid = to_regclass(%(table)s) AND i.indisunique
                           AND i.indnkeyatts = 1 AND i.indpred IS NULL
                           AND a.attname = %(position)s),
                 (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
                  JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                  WHERE d.adrelid = to_regclass(%(table)s) AND a.attname = %(column)s),
                 EXISTS (SELECT 1 FROM pg_constraint
                         WHERE conrelid = to_regclass(%(table)s) AND conname = %(check)s),
                 (SELECT tgenabled FROM pg_trigger
                  WHERE tgrelid = to_regclass(%(table)s) AND tgname = %(trigger)s),
                 to_regprocedure(%(function)s) IS NOT NULL""",
            {
                "table": table,
                "position": position,
                "column": STAMP_COLUMN,
                "check": CHECK_NAME,
                "trigger": TRIGGER_NAME,
                "function": f"{self.function}()",
            },
        ).one()
        unique, default, check, trigger, function = row
        if not unique:
            raise ConfigurationError(
                f"TableReader: the position column {position} of {table} has no unique "
                "index of its own (a primary key, say): two events at one position would "
                "be read once or twice"
            )
        if trigger == "D":
            raise ConfigurationError(
                f'TableReader: the trigger "{TRIGGER_NAME}" on {table} is disabled (a bulk '
                "load?), so a replay could append and be passed over: enable it again "
                f'(ALTER TABLE {table} ENABLE TRIGGER "{TRIGGER_NAME}")'
            )
        missing = set()
        if STAMP_COLUMN not in columns:
            missing.add("column")
        if default is None or "pg_current_xact_id" not in default:
            missing.add("default")
        if not check:
            missing.add("check")
        if not function:
            missing.add("function")
        if trigger is None:
            missing.add("trigger")
        if self._index_state(conn) != "valid":
            missing.add("index")
        return missing

    def _index_state(self, conn: sa.Connection) -> str:
        valid = conn.exec_driver_sql(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s) "
            "AND indrelid = to_regclass(%s)",
            (self.index, self.stamps.table),
        ).scalar()
        return "missing" if valid is None else "valid" if valid else "invalid"

    def require_ready(self, conn: sa.Connection) -> None:
        """Refuse (NotSetUp) to read a table ``prepare`` has not stamped: by position alone
        it would skip events. Checked once per database and reader (and by every runner
        as it starts, before the cluster check reads the stamps)."""
        where = str(conn.engine.url)
        if where in self._checked:
            return
        missing = self._missing(conn)
        if missing:
            raise NotSetUp(
                f"{self.stamps.table} is not prepared for zdr (missing: "
                f"{', '.join(sorted(missing))}): its writers commit out of order, and read "
                "by position alone it would skip events. Run the reader's prepare() once "
                "(`zdr prepare-reader --reader ...`); it adds a stamp column, a check, a "
                "trigger and an index without rewriting the table"
            )
        with self._checked_lock:
            self._checked.add(where)

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
        self.require_ready(conn)
        return super().read(
            conn, after, limit, until=until, below_txid=below_txid, partition=partition
        )

    def horizon(self, conn: sa.Connection) -> int:
        self.require_ready(conn)
        return super().horizon(conn)

    def count_after(
        self, conn: sa.Connection, after: Cursor, *, partition: Partition | None = None
    ) -> int:
        self.require_ready(conn)
        return super().count_after(conn, after, partition=partition)

    def last_cursor(self, conn: sa.Connection) -> Cursor | None:
        self.require_ready(conn)
        return super().last_cursor(conn)

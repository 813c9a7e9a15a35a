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
  horizon passes those transactions; see ``zdr.store``);
* an index on ``(coalesce(zdr_txid, 0), position)``, built ``CONCURRENTLY``.

Writers pay for it: each insert stamps its rows (a function call per row), checks
the constraint, maintains one more index, and each INSERT statement runs the
trigger once (a look at ``pg_locks``). ``bench/replay_bench.py --writers`` measures
it. The column, constraint and trigger are added under a short ``lock_timeout``,
retried with backoff, so the application's writers wait a moment at most; a writer
that runs ``INSERT INTO t VALUES (...)`` without a column list still works (the
new column is the last one), one that reads ``SELECT *`` sees one more column.
"""

from __future__ import annotations

import re
import threading

import sqlalchemy as sa

from zdr.catalog import create_missing
from zdr.config import make_engine
from zdr.errors import ConfigurationError, NotSetUp
from zdr.locks import lock_setup, under_short_lock_timeout
from zdr.settings import DEFAULTS
from zdr.store import REFUSE_RUNNER_APPENDS, Cursor, RecordedEvent, StampedLog, StampedReader

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
        index = f"{name[:40]}_zdr_txid_position"
        self.index = f'{self.schema}."{index}"'
        self._index_name = index
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

        The column, its default, the constraint and the trigger are added in one short
        transaction under ``lock_timeout_s``, tried ``attempts`` times (LockTimeout names
        the table after that; nothing is changed); the index is built concurrently.
        """
        engine = make_engine(url_or_engine)
        with engine.connect() as conn:
            with conn.begin():
                missing = self._missing(conn)
            if missing & {"column", "default", "check", "trigger"}:
                under_short_lock_timeout(
                    conn,
                    self._stamp,
                    lock_timeout_s=lock_timeout_s,
                    attempts=attempts,
                    what=f"prepare {self.stamps.table} (the application's writers hold it)",
                )
        if missing & {"index"}:
            self._build_index(engine)
        self._checked.discard(str(engine.url))

    def _stamp(self, conn: sa.Connection) -> None:
        lock_setup(conn)
        create_missing(conn, [("zdr", "CREATE SCHEMA IF NOT EXISTS zdr"), REFUSE_RUNNER_APPENDS])
        missing = self._missing(conn)
        table = self.stamps.table
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
                "FOR EACH STATEMENT EXECUTE FUNCTION zdr.refuse_runner_appends_2()"
            )

    def _build_index(self, engine: sa.Engine) -> None:
        """``CREATE INDEX CONCURRENTLY``: writers go on while it builds. One left invalid by
        an interrupted build is dropped (concurrently) and built again."""
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if self._index_state(conn) == "invalid":
                conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {self.index}")
            conn.exec_driver_sql(
                f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{self._index_name}" '
                f"ON {self.stamps.table} (({self.stamps.txid}), {self.stamps.position})"
            )

    # -- the check before reading --------------------------------------------

    def _missing(self, conn: sa.Connection) -> set[str]:
        """What ``prepare`` still has to add; ConfigurationError where the table or one of
        the named columns does not exist."""
        found = conn.exec_driver_sql(
            """SELECT a.attname FROM pg_attribute a
               WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0
                 AND NOT a.attisdropped""",
            {"table": self.stamps.table},
        ).scalars()
        columns = set(found.all())
        if not columns:
            raise ConfigurationError(
                f"TableReader: there is no table {self.stamps.table} in this database "
                "(name it as schema.table)"
            )
        absent = [c for c in self.columns.values() if c.strip('"') not in columns]
        if absent:
            raise ConfigurationError(
                f"TableReader: {self.stamps.table} has no column {', '.join(absent)} "
                f"(its columns: {', '.join(sorted(columns))})"
            )
        row = conn.exec_driver_sql(
            """SELECT
                 (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
                  JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                  WHERE d.adrelid = to_regclass(%(table)s) AND a.attname = %(column)s),
                 EXISTS (SELECT 1 FROM pg_constraint
                         WHERE conrelid = to_regclass(%(table)s) AND conname = %(check)s),
                 EXISTS (SELECT 1 FROM pg_trigger
                         WHERE tgrelid = to_regclass(%(table)s) AND tgname = %(trigger)s
                           AND tgenabled <> 'D')""",
            {
                "table": self.stamps.table,
                "column": STAMP_COLUMN,
                "check": CHECK_NAME,
                "trigger": TRIGGER_NAME,
            },
        ).one()
        default, check, trigger = row
        missing = set()
        if STAMP_COLUMN not in columns:
            missing.add("column")
        if default is None or "pg_current_xact_id" not in default:
            missing.add("default")
        if not check:
            missing.add("check")
        if not trigger:
            missing.add("trigger")
        if self._index_state(conn) != "valid":
            missing.add("index")
        return missing

    def _index_state(self, conn: sa.Connection) -> str:
        valid = conn.exec_driver_sql(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (self.index,)
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
    ) -> list[RecordedEvent]:
        self.require_ready(conn)
        return super().read(conn, after, limit, until=until, below_txid=below_txid)

    def horizon(self, conn: sa.Connection) -> int:
        self.require_ready(conn)
        return super().horizon(conn)

    def count_after(self, conn: sa.Connection, after: Cursor) -> int:
        self.require_ready(conn)
        return super().count_after(conn, after)

"""Any event table of the application's own: ``TableReader``.

Such a table's writers usually insert with no lock, so transactions commit out of
order: position 11 can be visible while 10 is still in an open transaction, and a
reader that pages by position alone passes over 10 for good. zdr reads a log by
position up to the safe position, below which nothing can still commit
(``zdr.store``); for that, each transaction that appends announces itself before it
draws a position. ``prepare`` installs what does it:

* a statement trigger on the table (``BEFORE INSERT ... FOR EACH STATEMENT``), with its
  function in the table's schema (prepare creates nothing in zdr's), which takes, once
  per transaction, a shared transaction-level advisory lock naming the sequence's last
  value, and refuses appends from a replay's transaction (a projector writes read
  models only).

It needs the position to come from a sequence with ``CACHE 1`` (a ``bigserial`` or
identity column, or a default ``nextval``), drawn in the INSERT statement itself (the
column's default): a writer that draws ``nextval`` in a statement of its own before
the INSERT is not announced in time, and may be passed over. Prepare refuses a table
whose position has no sequence or whose sequence caches.

Writers pay for it: each INSERT statement runs the trigger once (it reads two
settings; the first in a transaction also reads the sequence and takes the lock);
``bench/replay_bench.py`` (``writers``) measures it. The trigger is added under a
short ``lock_timeout``, retried with backoff, so the application's writers wait a
moment at most.

Tables prepared by an earlier zdr version, which read by transaction id, carry a
column ``zdr_txid``, a check and an index: they stay (``zdr.ordering`` reads the
column once to move checkpoints of that order), and can be dropped after that.
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
    StampedLog,
    StampedReader,
    append_trigger,
    last_position_function,
)

log = logging.getLogger("zdr")

#: The trigger ``prepare`` adds.
TRIGGER_NAME = "zdr_append_trigger"
#: What an earlier version's prepare added: its stamp column (read once by
#: ``zdr.ordering``) and its trigger, which the new one takes the place of.
STAMP_COLUMN = "zdr_txid"
_EARLIER_TRIGGER = "zdr_refuse_runner_appends"
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
        self.function = f'{self.schema}."zdr_append_trigger_{tag}"'
        #: The function that reads the position's sequence for appenders and readers.
        self.last_position_function = f'{self.schema}."zdr_last_position_{tag}"'
        #: The position's sequence, by database (found by ``require_ready``).
        self._sequences: dict[str, str] = {}
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
        """Add the trigger (see the module's docstring); idempotent: a table that is
        prepared already takes no lock at all.

        The trigger and its function (in the table's schema) are added in one short
        transaction under ``lock_timeout_s``, tried ``attempts`` times (LockTimeout names
        the table after that; nothing is changed). Two prepares of one table take turns.
        Run it as the table's owner.
        """
        engine = make_engine(url_or_engine)
        try:
            with engine.connect() as conn:
                self._take_turn(conn)
                try:
                    with conn.begin():
                        missing, sequence = self._missing(conn)
                    if missing:
                        under_short_lock_timeout(
                            conn,
                            lambda conn: self._install(conn, sequence),
                            lock_timeout_s=lock_timeout_s,
                            attempts=attempts,
                            what=f"prepare {self.stamps.table} (the application's writers hold it)",
                        )
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
        """Wait for another prepare of this table to end (a session lock), tried rather than
        waited for in a statement, which would hold a snapshot meanwhile."""
        while True:
            taken = conn.exec_driver_sql(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, self._lock_key)
            ).scalar_one()
            conn.commit()
            if taken:
                return
            time.sleep(0.2)

    def _install(self, conn: sa.Connection, sequence: str) -> None:
        missing, _ = self._missing(conn)
        table = self.stamps.table
        if "function" in missing:
            conn.exec_driver_sql(last_position_function(self.last_position_function, sequence))
            conn.exec_driver_sql(append_trigger(self.function, self.last_position_function))
        if "trigger" in missing:
            # The earlier version's trigger goes: this one refuses what it refused.
            # ALWAYS: it fires under session_replication_role = replica too.
            conn.exec_driver_sql(
                f'CREATE TRIGGER "{TRIGGER_NAME}" BEFORE INSERT ON {table} '
                f"FOR EACH STATEMENT EXECUTE FUNCTION {self.function}();"
                f'ALTER TABLE {table} ENABLE ALWAYS TRIGGER "{TRIGGER_NAME}";'
                f'DROP TRIGGER IF EXISTS "{_EARLIER_TRIGGER}" ON {table}'
            )

    # -- the check before reading --------------------------------------------

    def _missing(self, conn: sa.Connection) -> tuple[set[str], str]:
        """What ``prepare`` still has to add, and the position's sequence; ConfigurationError
        where the table cannot be read this way (no such table or column, a partitioned
        table, a position that is not a unique integer drawn from a sequence of CACHE 1,
        a disabled trigger of zdr's)."""
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
                "zdr reads a plain table only"
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
                 (SELECT format('%%I.%%I', sn.nspname, sc.relname)  -- with its schema:
                  FROM pg_class sc JOIN pg_namespace sn ON sn.oid = sc.relnamespace
                  WHERE sc.oid = coalesce(  -- the functions that read it see pg_catalog only
                   pg_get_serial_sequence(%(table)s, %(position)s)::regclass,
                   (SELECT d.refobjid::regclass FROM pg_attrdef ad
                    JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
                    JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                    AND d.refclassid = 'pg_class'::regclass
                    JOIN pg_class c ON c.oid = d.refobjid AND c.relkind = 'S'
                    WHERE ad.adrelid = to_regclass(%(table)s) AND a.attname = %(position)s
                    LIMIT 1))),
                 (SELECT tgenabled FROM pg_trigger
                  WHERE tgrelid = to_regclass(%(table)s) AND tgname = %(trigger)s),
                 to_regprocedure(%(function)s) IS NOT NULL,
                 (SELECT pg_get_functiondef(to_regprocedure(%(last)s)))""",
            {
                "table": table,
                "position": position,
                "trigger": TRIGGER_NAME,
                "function": f"{self.function}()",
                "last": f"{self.last_position_function}()",
            },
        ).one()
        unique, sequence, trigger, function, reads = row
        if not unique:
            raise ConfigurationError(
                f"TableReader: the position column {position} of {table} has no unique "
                "index of its own (a primary key, say): two events at one position would "
                "be read once or twice"
            )
        if sequence is None:
            raise ConfigurationError(
                f"TableReader: the position column {position} of {table} is not drawn from a "
                "sequence (a bigserial or identity column, or a default nextval): zdr reads "
                "up to what appending transactions announced of the sequence, and cannot "
                "read a position the application computes itself"
            )
        cache = conn.exec_driver_sql(
            "SELECT seqcache FROM pg_sequence WHERE seqrelid = %s::regclass", (sequence,)
        ).scalar_one()
        if cache > 1:
            raise ConfigurationError(
                f"TableReader: the sequence {sequence} of {table}'s positions has CACHE "
                f"{cache}: each session then draws from a block of its own, and a position "
                "drawn later can be lower, which a reader by position would pass over. "
                f"ALTER SEQUENCE {sequence} CACHE 1"
            )
        if trigger == "D":
            raise ConfigurationError(
                f'TableReader: the trigger "{TRIGGER_NAME}" on {table} is disabled (a bulk '
                "load?), so appends do not announce themselves and could be passed over: "
                f'enable it again (ALTER TABLE {table} ENABLE ALWAYS TRIGGER "{TRIGGER_NAME}")'
            )
        missing = set()
        # The sequence's name is in the function that reads it: one whose column took
        # another sequence since is made again.
        literal = "'" + sequence.replace("'", "''") + "'"
        if not function or reads is None or literal not in reads:
            missing.add("function")
        if trigger is None:
            missing.add("trigger")
        return missing, sequence

    def require_ready(self, conn: sa.Connection) -> None:
        """Refuse (NotSetUp) to read a table ``prepare`` has not prepared: by position alone
        it would skip events. Checked once per database and reader (and by every runner
        as it starts)."""
        where = str(conn.engine.url)
        if where in self._checked:
            return
        missing, sequence = self._missing(conn)
        if missing:
            raise NotSetUp(
                f"{self.stamps.table} is not prepared for this zdr version (missing: "
                f"{', '.join(sorted(missing))}): its writers commit out of order, and read "
                "by position without their announcements it would skip events. Run the "
                "reader's prepare() once (`zdr prepare-reader --reader ...`); it adds a "
                "trigger, without rewriting the table"
            )
        with self._checked_lock:
            self._sequences[where] = sequence
            self._checked.add(where)

    def sequence(self, conn: sa.Connection) -> str:
        self.require_ready(conn)
        return self._sequences[str(conn.engine.url)]

    def last_position(self, conn: sa.Connection) -> str:
        return self.last_position_function

"""Row projectors: plain Python per event, on a row, written at batch speed.

Most read models are one keyed table whose rows each event changes a little. A
``RowProjector`` lets its handlers say just that, ``row["times_lent"] += 1``,
with no SQL; zdr does the database work once per batch instead of once per event:

1. the keys the batch touches are read in one query (``= ANY(array)``);
2. the handlers run in memory, in log order, on one ``Row`` (a dict) per key;
3. the rows that changed go back in one COPY into a temporary table and one
   ``INSERT ... ON CONFLICT DO UPDATE`` from it; the deleted ones in one DELETE.

So a batch of 10,000 events over 500 accounts costs four statements, not 10,000.
It runs inside the batch's transaction like any projector: exactly once, rolled
back with its checkpoint.

A row holds, after each event, what its columns can hold: a value of a column that
keeps less than Python does (``numeric(12,2)``, ``varchar(n)``, ``char(n)``,
``timestamp(p)``, ``real``) is stored the way PostgreSQL would store it before the
next event sees it. So the rows do not depend on where batches are cut: one event
per batch (live) and 50,000 (a replay) give the same rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import operator
import struct
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any, ClassVar

import sqlalchemy as sa
from psycopg import sql
from psycopg.types.json import Json, Jsonb
from sqlalchemy.dialects import postgresql

from zdr.errors import ConfigurationError
from zdr.projector import Projector, _copy_json, physical_name
from zdr.store import RecordedEvent

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


class Row(dict[str, Any]):
    """One row of a RowProjector's table, as its handlers see and change it.

    ``new`` is true when the table held no row for this key before this event
    (the key columns and the columns' ``default=`` values are filled in).
    ``delete()`` removes the row (or, for a new one, does not create it); a later
    event of the same key in the batch starts a new row.
    """

    __slots__ = ("new", "deleted")

    def __init__(self, values: dict[str, Any], *, new: bool) -> None:
        super().__init__(values)
        self.new = new
        self.deleted = False

    def delete(self) -> None:
        self.deleted = True


class RowProjector(Projector):
    """A projector of one keyed table, written as per-event handlers on rows.

    Set ``name`` and ``table`` (a SQLAlchemy ``Table`` with a primary key), mark
    handlers ``(self, row, event)`` with ``@zdr.handles``, and say which row an
    event changes with ``key(event)`` (default: the event's stream id; a tuple in
    primary-key order for a key of several columns). A handler changes ``row`` in
    place; it returns nothing.

    Every column of ``table`` is written: a column that a new row may leave unset
    needs a Python ``default=`` (a ``server_default`` is refused, since zdr writes
    the value itself and would silently store NULL instead).
    """

    table: ClassVar[sa.Table]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        table = cls.__dict__.get("table")
        if table is not None:
            cls.tables = [table]
        super().__init_subclass__(**kwargs)

    def key(self, event: RecordedEvent) -> Any:
        """The primary key of the row ``event`` changes."""
        return event.stream_id

    @classmethod
    def check(cls) -> None:
        table = getattr(cls, "table", None)
        name = getattr(cls, "name", cls.__qualname__)
        if not isinstance(table, sa.Table):
            raise ConfigurationError(
                f"row projector {name!r} needs `table`, one sqlalchemy.Table with a primary key"
            )
        if not table.primary_key.columns:
            raise ConfigurationError(
                f"row projector {name!r}: table {table.name!r} has no primary key"
            )
        for column in table.columns:
            if column.default is not None and _scalar_default(column) is None:
                raise ConfigurationError(
                    f"row projector {name!r}: column {table.name}.{column.name} has a "
                    "default that is computed (a function or SQL), which zdr does not run; "
                    "give it a plain value, or set it in the handler that creates the row"
                )
            if column.server_default is not None:
                raise ConfigurationError(
                    f"row projector {name!r}: column {table.name}.{column.name} has a "
                    "server_default, which zdr cannot apply (it writes every column); give "
                    "it a Python default= instead"
                )

    def handle_batch(self, events: Sequence[RecordedEvent], conn: sa.Connection) -> None:
        plan = _plan(type(self))
        keys = [self.key(event) for event in events]  # `event` names a failing one
        if plan.key_stores:  # a char(n) key is padded: the row is found by what is stored
            keys = [plan.stored_key(key) for key in keys]
        stored = plan.load(conn, keys)
        plan.write(conn, self._fold(plan, events, keys, stored), stored)

    def _fold(
        self,
        plan: _Plan,
        events: Sequence[RecordedEvent],
        keys: list[Any],
        stored: dict[Any, tuple[Any, ...]],
    ) -> dict[Any, Row]:
        """Apply every event to its row, in order (``event`` names the failing one)."""
        handlers = {t: getattr(self, m) for t, m in self._handlers.items()}
        stores = plan.stores
        rows: dict[Any, Row] = {}
        for event, key in zip(events, keys, strict=True):
            row = rows.get(key)
            if row is None or row.deleted:
                values = stored.get(key) if row is None else None
                row = rows[key] = plan.row(key, values)
            handlers[event.type](row, event)
            row.new = False  # the next event of this key finds the row there
            if stores and not row.deleted:
                # What the columns keep, as the next batch would load it.
                for name, store in stores:
                    value = row.get(name)
                    if value is not None:
                        row[name] = store(value)
        return rows


class _Plan:
    """What a RowProjector's table needs at run time, worked out once per class."""

    def __init__(self, table: sa.Table, where: str) -> None:
        self.table = table
        self.where = where
        self.columns = [c.name for c in table.columns]
        self.key_columns = [c.name for c in table.primary_key.columns]
        self.single = len(self.key_columns) == 1
        self.defaults = {c.name: _scalar_default(c) for c in table.columns}
        #: A row's values as a tuple in column order, at C speed.
        self.values = (
            operator.itemgetter(*self.columns)
            if len(self.columns) > 1
            else (lambda row, name=self.columns[0]: (row[name],))
        )
        #: JSON columns, by position, with the psycopg wrapper that writes them.
        self.json = [
            (i, Jsonb if isinstance(c.type, postgresql.JSONB) else Json)
            for i, c in enumerate(table.columns)
            if isinstance(c.type, sa.JSON)
        ]
        #: Columns whose values a handler can change in place (JSON, arrays): copied.
        self.mutable = [
            i for i, c in enumerate(table.columns) if isinstance(c.type, sa.JSON | sa.ARRAY)
        ]
        self.types = {c.name: c.type.compile(dialect=_DIALECT) for c in table.columns}
        #: The table's columns and their types: the scratch table is made for one shape.
        self.shape = ", ".join(f"{name} {kind}" for name, kind in self.types.items())
        #: Columns that keep less than a Python value holds, with what they keep of one.
        self.stores = [
            (c.name, store)
            for c in table.columns
            if (store := _storing(c, f"{self.where}: column {table.name}.{c.name}")) is not None
        ]
        #: What the key columns keep of a key (a char(n) pads it), where they change it.
        stores = dict(self.stores)
        self.key_stores = [stores.get(c) for c in self.key_columns]
        if not any(self.key_stores):
            self.key_stores = []

    def stored_key(self, key: Any) -> Any:
        """The key as its columns store it (a tuple of several columns' values)."""
        if self.single:
            [store] = self.key_stores
            return key if store is None else store(key)
        if not isinstance(key, tuple) or len(key) != len(self.key_columns):
            return key  # row() says what is wrong with it
        return tuple(
            v if store is None else store(v) for v, store in zip(key, self.key_stores, strict=True)
        )

    def row(self, key: Any, values: tuple[Any, ...] | None) -> Row:
        if values is not None:
            return Row(dict(zip(self.columns, self._own(values), strict=True)), new=False)
        fresh = dict(zip(self.columns, self._own(tuple(self.defaults.values())), strict=True))
        if self.single:
            fresh[self.key_columns[0]] = key
        else:
            if not isinstance(key, tuple) or len(key) != len(self.key_columns):
                raise ConfigurationError(
                    f"{self.where}: key() must return a tuple of {len(self.key_columns)} "
                    f"values ({', '.join(self.key_columns)}), got {key!r}"
                )
            fresh.update(zip(self.key_columns, key, strict=True))
        return Row(fresh, new=True)

    def _dumpable(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """JSON columns' values wrapped so that psycopg writes them as JSON (a list would
        otherwise go as a PostgreSQL array)."""
        if not self.json:
            return values
        wrapped = list(values)
        for i, wrap in self.json:
            if wrapped[i] is not None:
                wrapped[i] = wrap(wrapped[i])
        return tuple(wrapped)

    def _own(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """Values a handler may change in place (JSON, arrays) copied, so that the stored
        (or default) ones stay as they were and the change is seen."""
        if not self.mutable:
            return values
        owned = list(values)
        for i in self.mutable:
            owned[i] = _copy_json(owned[i])
        return tuple(owned)

    def load(self, conn: sa.Connection, keys: list[Any]) -> dict[Any, tuple[Any, ...]]:
        """The stored rows of these keys, by key (a row as a tuple in column order)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        match, params = self._keys_in(unique)
        query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            cols, physical_name(conn, self.table), match
        )
        positions = [self.columns.index(c) for c in self.key_columns]
        with conn.connection.driver_connection.cursor() as cur:  # type: ignore[union-attr]
            cur.execute(query, params)
            found = cur.fetchall()
        if self.single:
            [at] = positions
            by_key = {values[at]: values for values in found}
        else:
            by_key = {tuple(values[i] for i in positions): values for values in found}
        strange = by_key.keys() - set(unique)
        if strange:
            # key() gave values of another type than the column's (1 for '1'): the rows
            # would look new and be overwritten.
            raise ConfigurationError(
                f"{self.where}: key() returned keys the table stores differently "
                f"(e.g. {next(iter(strange))!r} came back from {self.table.fullname}); "
                f"return values of the key columns' own types"
            )
        return by_key

    def write(
        self,
        conn: sa.Connection,
        rows: dict[Any, Row],
        stored: dict[Any, tuple[Any, ...]],
    ) -> None:
        """Upsert the rows that changed, delete the deleted ones that were stored."""
        columns = self.columns
        unknown = {name for row in rows.values() for name in row} - set(columns)
        if unknown:
            raise ConfigurationError(
                f"{self.where}: a handler set {', '.join(sorted(unknown))}, not a column of "
                f"{self.table.fullname} ({', '.join(columns)})"
            )
        changed = []
        gone = []
        for key, row in rows.items():
            if row.deleted:
                if key in stored:
                    gone.append(key)
                continue
            values = self.values(row)
            if values != stored.get(key):
                changed.append(self._dumpable(values))
        self.write_changes(conn, changed, gone)

    def write_changes(
        self, conn: sa.Connection, changed: list[tuple[Any, ...]], gone: list[Any]
    ) -> None:
        """Delete the rows of the keys ``gone``, then upsert ``changed`` (rows as tuples in
        column order): one DELETE, one COPY and one INSERT at most, in the caller's
        transaction. Shared by the row and frame projectors."""
        raw = conn.connection.driver_connection
        target = physical_name(conn, self.table)
        with raw.cursor() as cur:  # type: ignore[union-attr]
            if gone:
                self._delete(cur, target, gone)
            if changed:
                self._upsert(cur, target, changed)

    def _delete(self, cur: Any, target: sql.Composable, keys: list[Any]) -> None:
        match, params = self._keys_in(keys)
        cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(target, match), params)

    def _keys_in(self, keys: list[Any]) -> tuple[sql.Composable, list[list[Any]]]:
        """``(key columns) IN (SELECT * FROM unnest(arrays))`` and its arrays, one per key
        column: one statement for any number of keys, of one column or several."""
        names = sql.SQL(", ").join(map(sql.Identifier, self.key_columns))
        arrays = sql.SQL(", ").join(
            sql.SQL("%s::{}[]").format(sql.SQL(self.types[c])) for c in self.key_columns
        )
        match = sql.SQL("({}) IN (SELECT * FROM unnest({}))").format(names, arrays)
        if self.single:
            return match, [keys]
        return match, [[k[i] for k in keys] for i in range(len(self.key_columns))]

    def _upsert(self, cur: Any, target: sql.Composable, changed: list[tuple[Any, ...]]) -> None:
        # A temporary table of the target's shape, one per session, target copy and
        # shape: after a promotion or a rollback the same name holds another version of
        # the table, which must not be written through the old one's columns. Its rows
        # go at commit, and the upsert empties it so that a second batch in one
        # transaction starts empty too.
        scratch = sql.Identifier(
            "zdr_rows_"
            + hashlib.sha1(f"{target.as_string(cur)} {self.shape}".encode()).hexdigest()[:20]
        )
        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        # Its columns' types without their constraints: a NOT NULL a handler left unset
        # is reported by the table itself, under its own name.
        cur.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS "
                "AS SELECT {} FROM {} WITH NO DATA"
            ).format(scratch, cols, target)
        )
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(scratch, cols)) as copy:
            for values in changed:
                copy.write_row(values)
        others = [c for c in self.columns if c not in self.key_columns]
        update = (
            sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                    for c in others
                )
            )
            if others
            else sql.SQL("DO NOTHING")
        )
        cur.execute(
            sql.SQL(
                "WITH batch AS (DELETE FROM {} RETURNING {}) "
                "INSERT INTO {} ({}) SELECT {} FROM batch ON CONFLICT ({}) {}"
            ).format(
                scratch,
                cols,
                target,
                cols,
                cols,
                sql.SQL(", ").join(map(sql.Identifier, self.key_columns)),
                update,
            )
        )


def _storing(column: sa.Column[Any], where: str) -> Callable[[Any], Any] | None:
    """What the column keeps of a value, as a function (None: all of it).

    PostgreSQL's own rules: numeric rounds half away from zero to its scale and
    refuses what overflows its precision; varchar(n) and char(n) refuse a longer
    value unless the rest is spaces (cut), char(n) pads; timestamp(p) rounds to p
    digits; real keeps a float's nearest single-precision value (read back as its
    shortest text). Values of another Python type than the column's are left alone.
    """
    kind = column.type
    if isinstance(kind, sa.Float):
        precision = kind.precision
        if isinstance(kind, sa.REAL) or (precision is not None and precision <= 24):
            return _real
        return None
    if isinstance(kind, sa.Numeric):
        if kind.precision is None:
            return _decimal  # any number as a Decimal, as it is read back
        return _numeric(kind.precision, kind.scale or 0, where)
    if isinstance(kind, sa.String) and not isinstance(kind, sa.Enum):
        if kind.length is None:
            return None
        return _characters(kind.length, pad=isinstance(kind, sa.CHAR), where=where)
    precision = getattr(kind, "precision", None)
    if isinstance(kind, sa.DateTime) and isinstance(precision, int) and 0 <= precision < 6:
        return _timestamp(precision)
    return None


def _decimal(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return Decimal(repr(value))


def _numeric(precision: int, scale: int, where: str) -> Callable[[Any], Any]:
    exponent = Decimal(1).scaleb(-scale)
    digits = precision - scale

    def store(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, Decimal | int | float):
            return value
        number = value if isinstance(value, Decimal) else Decimal(repr(value))
        if not number.is_finite():
            return number
        # Digits enough for the value at the column's scale, whatever the thread's
        # decimal context says (28 by default: numeric(38,18) would not fit).
        room = Context(prec=max(number.adjusted(), 0) + scale + 2, rounding=ROUND_HALF_UP)
        kept = number.quantize(exponent, context=room)
        if kept and kept.adjusted() >= digits:
            raise ValueError(
                f"{where}: {value} overflows numeric({precision},{scale}) (numeric field "
                f"overflow: its absolute value must be below 10^{digits})"
            )
        return kept

    return store


def _characters(length: int, *, pad: bool, where: str) -> Callable[[Any], Any]:
    kind = f"character({length})" if pad else f"character varying({length})"

    def store(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if len(value) > length:
            if value[length:].strip(" "):
                raise ValueError(
                    f"{where}: value too long for type {kind} ({len(value)} characters: "
                    f"{value[:20]!r}...)"
                )
            value = value[:length]
        return value.ljust(length) if pad else value

    return store


#: PostgreSQL's timestamps count from here; it rounds a tie away from it.
_PG_EPOCH = dt.datetime(2000, 1, 1)
_PG_EPOCH_UTC = _PG_EPOCH.replace(tzinfo=dt.UTC)


def _timestamp(precision: int) -> Callable[[Any], Any]:
    unit = 10 ** (6 - precision)

    def store(value: Any) -> Any:
        if not isinstance(value, dt.datetime):
            return value
        extra = value.microsecond % unit
        if not extra:
            return value
        down = value - dt.timedelta(microseconds=extra)
        if extra * 2 < unit:
            return down
        if extra * 2 == unit and value < (_PG_EPOCH_UTC if value.tzinfo else _PG_EPOCH):
            return down
        return down + dt.timedelta(microseconds=unit)

    return store


_FLOAT4 = struct.Struct("f")
_BITS = struct.Struct("I")


def _real(value: Any) -> Any:
    """A float as a real column gives it back: the nearest single-precision value, read
    from the shortest text PostgreSQL prints for it (the shortest decimal strictly
    nearer to it than to either neighbour: a tie is not taken)."""
    if isinstance(value, bool) or not isinstance(value, float | int | Decimal):
        return value
    single = _FLOAT4.unpack(_FLOAT4.pack(float(value)))[0]
    if single != single or single in (float("inf"), float("-inf")) or single == 0:
        return single
    size = abs(single)
    bits = _BITS.unpack(_FLOAT4.pack(size))[0]
    below = Decimal(_FLOAT4.unpack(_BITS.pack(bits - 1))[0])
    above = Decimal(_FLOAT4.unpack(_BITS.pack(bits + 1))[0])
    exact = Decimal(size)
    low, high = (exact + below) / 2, (exact + above) / 2
    for digits in range(1, 10):
        text = f"{size:.{digits}g}"
        if low < Decimal(text) < high:
            return float(text) if single > 0 else -float(text)
    return single


def _scalar_default(column: sa.Column[Any]) -> Any:
    """A column's Python ``default=`` value (None without one, or for a callable one)."""
    default = column.default
    if isinstance(default, sa.ColumnDefault) and default.is_scalar:
        return default.arg
    return None


_PLANS: dict[type, _Plan] = {}


def _plan(cls: type[RowProjector]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        cls.check()
        plan = _PLANS[cls] = _Plan(cls.table, f"row projector {cls.name!r}")
    return plan

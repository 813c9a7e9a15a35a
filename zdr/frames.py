"""Frame projectors: a batch of events as a pandas DataFrame, the rows to write as another.

A ``RowProjector`` runs Python once per event; a ``FrameProjector`` runs it once per
batch. Its handler gets the batch as a DataFrame with Arrow-backed columns (position,
stream_id, type, recorded_at and the payload fields it names, each of its declared
type) and the table's current rows for the keys the batch touches, and returns the
new rows: group-bys, joins and sums in C, not a Python loop over events.

zdr does the database work the way it does for row projectors, with the same code
(``zdr.rows._Plan``): the keys' stored rows in one query, the returned rows by COPY
into a temporary table and one ``INSERT ... ON CONFLICT DO UPDATE``, deleted keys in
one DELETE, all inside the batch's transaction, so exactly once like every projector.

What zdr checks, because a frame is easy to get subtly wrong: every column of the
table is returned and nothing else, keys are unique and not null, and each column's
values fit its SQL type (a float 1.5 is not silently stored as the bigint 2); a
mistake fails the batch with a message naming the projector and the column.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from zdr.errors import ConfigurationError
from zdr.projector import Projector
from zdr.rows import _Plan
from zdr.store import RecordedEvent, driver_connection

#: The columns every events frame has, with their Arrow types.
EVENT_COLUMNS: dict[str, pa.DataType] = {
    "position": pa.int64(),
    "stream_id": pa.string(),
    "type": pa.string(),
    "recorded_at": pa.timestamp("us", tz="UTC"),
}

#: What a handler may return: the rows to write, or (rows, keys to delete).
FrameResult = pd.DataFrame | tuple[pd.DataFrame | None, Any]


def arrow_type(kind: Any) -> pa.DataType | None:
    """The Arrow type a column or payload field of this SQL type is given (None: not
    supported). Types whose values Arrow would keep differently than PostgreSQL does
    (char(n) padding, numeric, JSON) are left out rather than half right."""
    kind = sa.types.to_instance(kind)
    if isinstance(kind, sa.Boolean):
        return pa.bool_()
    if isinstance(kind, sa.SmallInteger):
        return pa.int16()
    if isinstance(kind, sa.BigInteger):
        return pa.int64()
    if isinstance(kind, sa.Integer):
        return pa.int32()
    if isinstance(kind, sa.Float):
        precision = kind.precision
        if isinstance(kind, sa.REAL) or (precision is not None and precision <= 24):
            return pa.float32()
        return pa.float64()
    if isinstance(kind, sa.String) and not isinstance(kind, sa.CHAR | sa.Enum):
        return pa.string()
    if isinstance(kind, sa.DateTime):
        return pa.timestamp("us", tz="UTC" if kind.timezone else None)
    if isinstance(kind, sa.Date):
        return pa.date32()
    return None


#: Payload fields: the JSON kinds (numbers, booleans, strings), converted as they are.
_FIELD_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string)


class FrameProjector(Projector):
    """A projector of one keyed table whose handler works on whole batches as DataFrames.

    Set ``name``, ``table`` (a SQLAlchemy ``Table`` with a primary key), ``event_types``,
    ``fields`` (the payload fields the handler reads, name -> SQL type, e.g.
    ``{"amount": sa.BigInteger}``: each becomes a column of the events frame, missing or
    JSON null as NA), and ``key``, the events column(s) holding the key of the row an
    event changes, in primary-key order (default ``"stream_id"``). Then write
    ``handle_frame(events, current)``:

    * ``events``: the batch's events of ``event_types``, in log order, one row each:
      ``position``, ``stream_id``, ``type``, ``recorded_at`` and the ``fields``;
    * ``current``: the table's stored rows for the keys in ``events`` (all columns);

    and return the new rows (a DataFrame with every column of the table, one row per
    key), or ``(rows, deleted)`` where ``deleted`` holds keys to delete (a DataFrame of
    the key columns, or a list or Series for a key of one column). Every returned row is
    written: return only the rows the batch changed. A missing value (NA, None, or NaN in
    a numpy float column, as pandas counts it) is written as NULL.

    Columns are Arrow-backed (``pd.ArrowDtype``). A fold whose result depends on
    rounding at each event (a ``real`` column summed event by event) must do that
    rounding itself to give the same rows whatever the batch size; sums of integers and
    last values do not depend on it.
    """

    table: ClassVar[sa.Table]
    fields: ClassVar[Mapping[str, Any]] = {}
    key: ClassVar[str | tuple[str, ...]] = "stream_id"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        table = cls.__dict__.get("table")
        if table is not None:
            cls.tables = [table]
        super().__init_subclass__(**kwargs)

    def handle_frame(self, events: pd.DataFrame, current: pd.DataFrame) -> FrameResult:
        """The rows to write for this batch (see the class's docstring)."""
        raise NotImplementedError

    @classmethod
    def check(cls) -> None:
        name = getattr(cls, "name", cls.__qualname__)
        where = f"frame projector {name!r}"
        table = getattr(cls, "table", None)
        if not isinstance(table, sa.Table):
            raise ConfigurationError(
                f"{where} needs `table`, one sqlalchemy.Table with a primary key"
            )
        if not table.primary_key.columns:
            raise ConfigurationError(f"{where}: table {table.name!r} has no primary key")
        if cls.handle_frame is FrameProjector.handle_frame:
            raise ConfigurationError(f"{where} needs a handle_frame(events, current) method")
        for column in table.columns:
            if arrow_type(column.type) is None:
                raise ConfigurationError(
                    f"{where}: column {table.name}.{column.name} is {column.type}, which a "
                    "frame projector does not write (it takes integers, floats, booleans, "
                    "text and varchar, timestamps and dates)"
                )
        if not isinstance(cls.fields, Mapping):
            raise ConfigurationError(f"{where}: `fields` must map payload field names to types")
        for field, kind in cls.fields.items():
            if field in EVENT_COLUMNS:
                raise ConfigurationError(
                    f"{where}: payload field {field!r} has the name of an events column "
                    f"({', '.join(EVENT_COLUMNS)})"
                )
            found = arrow_type(kind)
            if found is None or not any(test(found) for test in _FIELD_TYPES):
                raise ConfigurationError(
                    f"{where}: payload field {field!r} is declared {kind!r}: fields are "
                    "JSON numbers, booleans or strings (sa.BigInteger, sa.Integer, "
                    "sa.Float, sa.Boolean, sa.Text); convert others in handle_frame"
                )
        keys = (cls.key,) if isinstance(cls.key, str) else tuple(cls.key)
        pk = list(table.primary_key.columns)
        if len(keys) != len(pk):
            raise ConfigurationError(
                f"{where}: `key` names {len(keys)} events column(s) ({', '.join(keys)}) "
                f"for a primary key of {len(pk)} ({', '.join(c.name for c in pk)})"
            )
        types = cls._events_schema()
        for key, column in zip(keys, pk, strict=True):
            if key not in types:
                raise ConfigurationError(
                    f"{where}: key column {key!r} is neither an events column "
                    f"({', '.join(EVENT_COLUMNS)}) nor one of `fields`"
                )
            have, want = types[key], arrow_type(column.type)
            assert want is not None  # every column was checked above
            if pa.types.is_floating(want):
                raise ConfigurationError(
                    f"{where}: key column {table.name}.{column.name} is {column.type}: a "
                    "float is no key (0.1 stored as a real reads back as another float)"
                )
            same_kind = have == want or (pa.types.is_integer(have) and pa.types.is_integer(want))
            if not same_kind:
                raise ConfigurationError(
                    f"{where}: key column {key!r} is {have}, the table's "
                    f"{table.name}.{column.name} is {column.type}: declare the field with "
                    "the column's type"
                )

    @classmethod
    def _events_schema(cls) -> dict[str, pa.DataType]:
        """The events frame's columns and their Arrow types."""
        types = dict(EVENT_COLUMNS)
        for field, kind in cls.fields.items():
            found = arrow_type(kind)
            assert found is not None  # check() refuses the others
            types[field] = found
        return types

    def handle_batch(self, events: Sequence[RecordedEvent], conn: sa.Connection) -> None:
        plan = _frame_plan(type(self))
        frame = plan.events_frame(events, zone=driver_connection(conn).info.timezone)
        keys = plan.keys_of(frame)
        stored = plan.rows.load(conn, keys)
        current = plan.frame_of(list(stored.values()))
        try:
            result = self.handle_frame(frame, current)
        except Exception as exc:
            exc.add_note(
                f"in handle_frame of {plan.where}, on the frame of events "
                f"{events[0].position}..{events[-1].position} ({len(events)} events)"
            )
            raise
        changed, gone = plan.changes(result)
        plan.rows.write_changes(conn, changed, gone)


class _FramePlan:
    """What a FrameProjector needs at run time, worked out once per class."""

    def __init__(self, cls: type[FrameProjector]) -> None:
        self.where = f"frame projector {cls.name!r}"
        self.rows = _Plan(cls.table, self.where)
        self.table = cls.table
        self.fields = list(cls.fields)
        self.events_schema = cls._events_schema()
        self.key = [cls.key] if isinstance(cls.key, str) else list(cls.key)
        self.columns = self.rows.columns
        self.column_types = {c.name: arrow_type(c.type) for c in cls.table.columns}
        self.key_columns = self.rows.key_columns

    def events_frame(
        self, events: Sequence[RecordedEvent], zone: dt.tzinfo | None = None
    ) -> pd.DataFrame:
        """The batch as a DataFrame: one column at a time, each converted by Arrow in C.
        ``zone``: the session's time zone, which a naive ``recorded_at`` (a ``timestamp
        without time zone`` column of an application's table) is in, as PostgreSQL
        reads it when a row projector writes it to a ``timestamptz``."""
        recorded = [e.recorded_at for e in events]
        if zone is not None and any(r is not None and r.tzinfo is None for r in recorded):
            recorded = [r if r is None or r.tzinfo else r.replace(tzinfo=zone) for r in recorded]
        columns: dict[str, Sequence[Any]] = {
            "position": [e.position for e in events],
            "stream_id": [e.stream_id for e in events],
            "type": [e.type for e in events],
            "recorded_at": recorded,
        }
        payloads = [e.data for e in events]
        for field in self.fields:
            columns[field] = [data.get(field) for data in payloads]
        arrays = []
        for name, values in columns.items():
            kind = self.events_schema[name]
            try:
                if pa.types.is_integer(kind):  # Arrow truncates 1.5 to 1: refuse it
                    _refuse_fractions(values)
                arrays.append(pa.array(values, type=kind))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                at = _first_unconvertible(values, kind)
                event = events[at] if at is not None else None
                raise ConfigurationError(
                    f"{self.where}: payload field {name!r} of event "
                    + (
                        f"{event.position} ({event.type}, stream {event.stream_id!r}) is "
                        f"{values[at]!r}, not a {kind}"  # type: ignore[index]
                        if event is not None
                        else f"cannot be read as {kind}"
                    )
                    + f": {exc}"
                ) from exc
        return _to_pandas(arrays, list(columns))

    def keys_of(self, frame: pd.DataFrame) -> list[Any]:
        """The keys the batch touches, as Python values (tuples for several columns)."""
        lists = []
        for name in self.key:
            column = frame[name]
            if column.isna().any():
                positions = frame.loc[column.isna(), "position"].head(5).tolist()
                raise ConfigurationError(
                    f"{self.where}: events without a key ({name!r}): positions "
                    f"{', '.join(map(str, positions))}"
                )
            lists.append(pa.array(column))
        if len(lists) == 1:  # Arrow's unique keeps the order of first appearance
            unique: list[Any] = lists[0].unique().to_pylist()
            return unique
        lists = [values.to_pylist() for values in lists]
        return list(dict.fromkeys(zip(*lists, strict=True)))

    def frame_of(self, rows: list[tuple[Any, ...]]) -> pd.DataFrame:
        """Stored rows (tuples in column order) as a DataFrame of the table's columns."""
        values = list(zip(*rows, strict=True)) if rows else [()] * len(self.columns)
        arrays = [
            pa.array(list(v), type=self.column_types[c])
            for c, v in zip(self.columns, values, strict=True)
        ]
        return _to_pandas(arrays, self.columns)

    def changes(self, result: Any) -> tuple[list[tuple[Any, ...]], list[Any]]:
        """The handler's result as (rows to upsert as tuples, keys to delete), checked."""
        if isinstance(result, tuple) and len(result) != 2:
            raise ConfigurationError(
                f"{self.where}: handle_frame returned a tuple of {len(result)}; return "
                "rows, or (rows, deleted keys)"
            )
        rows, deleted = result if isinstance(result, tuple) else (result, None)
        if rows is None:
            rows = pd.DataFrame(columns=self.columns)
        if not isinstance(rows, pd.DataFrame):
            raise ConfigurationError(
                f"{self.where}: handle_frame returned {type(rows).__name__}; return a "
                "pandas DataFrame with the table's columns, or (rows, deleted keys)"
            )
        names = [str(c) for c in rows.columns]
        missing = [c for c in self.columns if c not in names]
        extra = [c for c in names if c not in self.columns]
        doubled = sorted({c for c in names if names.count(c) > 1})
        if missing or extra or doubled:
            wrong = []
            if missing:
                wrong.append(f"without the column(s) {', '.join(missing)}")
            if extra:
                wrong.append(f"with column(s) {', '.join(extra)} that the table has not")
            if doubled:
                wrong.append(f"with column(s) {', '.join(doubled)} more than once")
            raise ConfigurationError(
                f"{self.where}: handle_frame returned rows {' and '.join(wrong)} (the "
                f"table {self.table.fullname} has {', '.join(self.columns)})"
            )
        rows = rows.set_axis(names, axis=1)
        for c in self.key_columns:
            if rows[c].isna().any():
                raise ConfigurationError(
                    f"{self.where}: handle_frame returned rows with no value in the key column {c}"
                )
        duplicated = rows.duplicated(subset=self.key_columns, keep=False)
        if duplicated.any():
            sample = rows.loc[duplicated, self.key_columns].head(3).to_dict("records")
            raise ConfigurationError(
                f"{self.where}: handle_frame returned several rows for one key "
                f"({', '.join(self.key_columns)}), e.g. {sample}: return one row per key"
            )
        values = [self._column(rows[c], c, "rows") for c in self.columns]
        changed = list(zip(*values, strict=True))
        gone = self._deleted(deleted)
        if gone and changed:
            both = set(gone) & set(self._keys(changed))
            if both:
                raise ConfigurationError(
                    f"{self.where}: handle_frame returned key(s) both to write and to "
                    f"delete, e.g. {next(iter(both))!r}"
                )
        return changed, gone

    def _keys(self, rows: list[tuple[Any, ...]]) -> list[Any]:
        at = [self.columns.index(c) for c in self.key_columns]
        if len(at) == 1:
            return [row[at[0]] for row in rows]
        return [tuple(row[i] for i in at) for row in rows]

    def _deleted(self, deleted: Any) -> list[Any]:
        """Keys to delete, as Python values (tuples for several key columns)."""
        if deleted is None:
            return []
        if isinstance(deleted, pd.DataFrame):
            missing = [c for c in self.key_columns if c not in deleted.columns]
            if missing:
                raise ConfigurationError(
                    f"{self.where}: the deleted keys handle_frame returned lack the key "
                    f"column(s) {', '.join(missing)}"
                )
            lists = [self._column(deleted[c], c, "deleted keys") for c in self.key_columns]
        elif (
            len(self.key_columns) == 1
            and isinstance(deleted, Iterable)
            and not isinstance(deleted, str | bytes | Mapping)
        ):
            [name] = self.key_columns
            lists = [self._column(pd.Series(list(deleted)), name, "deleted keys")]
        else:
            raise ConfigurationError(
                f"{self.where}: handle_frame returned deleted keys as "
                f"{type(deleted).__name__}; give a DataFrame of the key columns "
                f"({', '.join(self.key_columns)})"
                + (" or a list" if len(self.key_columns) == 1 else "")
            )
        if any(v is None for values in lists for v in values):
            raise ConfigurationError(f"{self.where}: a deleted key has no value")
        if len(lists) == 1:
            return list(dict.fromkeys(lists[0]))
        return list(dict.fromkeys(zip(*lists, strict=True)))

    def _column(self, series: pd.Series, name: str, what: str) -> list[Any]:
        """A returned column's values as Python values of the table column's type; a
        value that would change on the way (1.5 into a bigint) fails here, named."""
        want = self.column_types[name]
        assert want is not None
        try:
            values = pa.array(series, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
            raise ConfigurationError(
                f"{self.where}: the {what}' column {name} holds values Arrow cannot read "
                f"({series.dtype}): {exc}"
            ) from exc
        if values.type != want:
            if not _castable(values.type, want):
                raise ConfigurationError(
                    f"{self.where}: the {what}' column {name} is {values.type} "
                    f"({series.dtype}); {self.table.fullname}.{name} takes {want}"
                )
            try:
                cast = values.cast(want)  # safe: refuses what would change
                if pa.types.is_floating(want) and pa.types.is_floating(values.type):
                    _refuse_overflow(values, cast)  # a safe cast to float32 gives inf
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ConfigurationError(
                    f"{self.where}: the {what}' column {name} has values that do not fit "
                    f"{self.table.fullname}.{name} ({want}): {exc}"
                ) from exc
            values = cast
        found: list[Any] = values.to_pylist()
        return found


def _refuse_overflow(values: pa.Array, cast: pa.Array) -> None:
    """ArrowInvalid if a finite value became infinite (1e300 into a real), as PostgreSQL
    refuses it ("value out of range")."""
    became = pc.and_(pc.is_inf(cast), pc.invert(pc.is_inf(values)))
    if pc.any(became).as_py():
        at = pc.index(became, True).as_py()
        raise pa.ArrowInvalid(f"{values[at].as_py()!r} is out of range for {cast.type}")


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether values of ``have`` may go to a column of ``want`` (checked value by value
    by a safe cast): numbers to numbers, text to text, times to times of the same kind;
    never a number to text or the reverse, which would hide a mix-up of columns."""
    if pa.types.is_null(have):
        return True
    numbers = (pa.types.is_integer, pa.types.is_floating)
    if any(t(want) for t in numbers):
        return any(t(have) for t in numbers)
    if pa.types.is_string(want):
        return bool(pa.types.is_string(have) or pa.types.is_large_string(have))
    if pa.types.is_timestamp(want):
        return bool(pa.types.is_timestamp(have) and (have.tz is None) == (want.tz is None))
    if pa.types.is_date(want):
        return bool(pa.types.is_date(have))
    return False


def _refuse_fractions(values: Sequence[Any]) -> None:
    """ArrowInvalid if a float that is not a whole number is among the values of an
    integer field (Arrow would truncate it; PostgreSQL refuses it)."""
    for value in values:
        if type(value) is float and not value.is_integer():
            raise pa.ArrowInvalid(f"{value!r} is not a whole number")


def _first_unconvertible(values: Sequence[Any], kind: pa.DataType) -> int | None:
    """Where the first value Arrow cannot convert to ``kind`` is (for the message)."""
    for at, value in enumerate(values):
        try:
            if pa.types.is_integer(kind):
                _refuse_fractions([value])
            pa.array([value], type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return at
    return None


def _to_pandas(arrays: list[pa.Array], names: list[str]) -> pd.DataFrame:
    """Arrow arrays as a DataFrame of Arrow-backed columns (``pd.ArrowDtype``), without a
    copy into numpy (and faster than ``pa.Table.to_pandas``, which reads its metadata)."""
    return pd.DataFrame(
        {
            name: pd.arrays.ArrowExtensionArray(array)
            for name, array in zip(names, arrays, strict=True)
        },
        copy=False,
    )


_PLANS: dict[type, _FramePlan] = {}


def _frame_plan(cls: type[FrameProjector]) -> _FramePlan:
    plan = _PLANS.get(cls)
    if plan is None:
        cls.check()
        plan = _PLANS[cls] = _FramePlan(cls)
    return plan

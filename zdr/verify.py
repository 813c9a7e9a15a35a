"""Verification: is the replay's copy what the live copy should be?

Everything is read in one REPEATABLE READ snapshot, so live and replay are
compared at one position: in dual write the live runner moves both copies in
the same transaction, so any snapshot sees them level (the report says so, or
says that they were not).

Per table: row counts, a checksum per column (an order-free sum of hashes,
computed by PostgreSQL), and where counts or checksums differ, the first
differing rows by primary key, found by walking both copies in key order,
``chunk_rows`` at a time, so a table of millions of rows never sits in memory.
Columns are compared when both copies have them with the same type; when the
replay is a new shape, per-column summaries of both sides are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import sqlalchemy as sa
from psycopg import sql

from zdr import records
from zdr.names import validate_key
from zdr.replay import Replay
from zdr.targets import tables_in

NOT_LEVEL = "not level: verify with dual write on and the live runner running"

SUMMARY_TYPES = {
    "integer",
    "bigint",
    "smallint",
    "numeric",
    "real",
    "double precision",
    "text",
    "character varying",
    "date",
    "timestamp with time zone",
    "timestamp without time zone",
}


@dataclass(frozen=True)
class Difference:
    """One row that differs: ``missing`` from the replay, ``extra`` in it, or ``changed``."""

    table: str
    kind: str
    key: dict[str, Any]
    columns: list[str] = field(default_factory=list)
    live: dict[str, Any] | None = None
    replay: dict[str, Any] | None = None


@dataclass(frozen=True)
class TableReport:
    """One table, live beside replay."""

    table: str
    live_rows: int | None
    replay_rows: int | None
    compared_columns: list[str]
    differing_columns: list[str]
    only_live_columns: list[str]
    only_replay_columns: list[str]
    primary_key: list[str]
    summary: list[dict[str, Any]] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return (
            self.live_rows is not None
            and self.live_rows == self.replay_rows
            and not self.differing_columns
        )


@dataclass(frozen=True)
class VerificationReport:
    """What ``verify`` found; ``equal`` is what an approver wants to read first."""

    key: str
    state: str
    same_version: bool
    live_position: int
    replay_position: int
    tables: list[TableReport]
    differences: list[Difference]
    truncated: bool

    @property
    def level(self) -> bool:
        """Whether live and replay were at the same position in the snapshot compared."""
        return self.live_position == self.replay_position

    @property
    def equal(self) -> bool:
        return self.level and not self.differences and all(t.equal for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "equal": self.equal,
            "state": self.state,
            "same_version": self.same_version,
            "level": self.level,
            "live_position": self.live_position,
            "replay_position": self.replay_position,
            "tables": [{**t.__dict__, "equal": t.equal} for t in self.tables],
            "differences": [d.__dict__ for d in self.differences],
            "truncated": self.truncated,
        }

    def to_markdown(self) -> str:
        """The report as markdown, as the approver reads it (see ``zdr.reports``)."""
        from zdr.reports import verification_markdown  # reports renders; it imports this module

        return verification_markdown(self)


def verify(
    engine: sa.Engine,
    replay: Replay,
    live_projectors: dict[str, str],
    *,
    max_differences: int = 20,
    chunk_rows: int = 50_000,
) -> VerificationReport:
    """Compare the replay's copy with the live one, in one snapshot."""
    validate_key(replay.key)
    snapshot = engine.connect().execution_options(isolation_level="REPEATABLE READ")
    with snapshot as conn, conn.begin():
        replay_position = records.replay_cursor(conn, replay.key).position
        live_cursors = records.live_cursors(conn, list(replay.projectors))
        live_position = min((c.position for c in live_cursors.values()), default=0)
        # Rows of copies at different positions differ for that reason alone.
        level = live_position == replay_position
        tables: list[TableReport] = []
        differences: list[Difference] = []
        truncated = False
        for live_schema, side_schema in sorted(replay.schemas.items()):
            for table in sorted(_table_names(conn, live_schema, side_schema)):
                report, found, more = _compare_table(
                    conn,
                    live_schema,
                    side_schema,
                    table,
                    budget=max_differences - len(differences) if level else 0,
                    chunk_rows=chunk_rows,
                )
                tables.append(report)
                differences += found
                truncated = truncated or more
    return VerificationReport(
        key=replay.key,
        state=replay.state.value,
        same_version=_same_version(replay, live_projectors),
        live_position=live_position,
        replay_position=replay_position,
        tables=tables,
        differences=differences,
        truncated=truncated,
    )


def _same_version(replay: Replay, live_projectors: dict[str, str]) -> bool:
    return all(live_projectors.get(name) == path for name, path in replay.projectors.items())


def _compare_table(
    conn: sa.Connection, live: str, side: str, table: str, *, budget: int, chunk_rows: int
) -> tuple[TableReport, list[Difference], bool]:
    live_cols = _columns(conn, live, table)
    side_cols = _columns(conn, side, table)
    shared = [c for c in live_cols if c in side_cols and live_cols[c] == side_cols[c]]
    key = _primary_key(conn, live, table)
    if key != _primary_key(conn, side, table) or not set(key) <= set(shared):
        key = []
    live_rows = _count(conn, live, table) if live_cols else None
    side_rows = _count(conn, side, table) if side_cols else None
    differing: list[str] = []
    if live_cols and side_cols and shared:
        live_sums = _checksums(conn, live, table, shared)
        side_sums = _checksums(conn, side, table, shared)
        differing = [c for c in shared if live_sums[c] != side_sums[c]]
    found: list[Difference] = []
    more = False
    if key and budget > 0 and (differing or live_rows != side_rows):
        found, more = _row_differences(
            conn, live, side, table, key, shared, budget=budget, chunk_rows=chunk_rows
        )
    report = TableReport(
        table=f"{live}.{table}",
        live_rows=live_rows,
        replay_rows=side_rows,
        compared_columns=shared,
        differing_columns=differing,
        only_live_columns=[c for c in live_cols if c not in shared],
        only_replay_columns=[c for c in side_cols if c not in shared],
        primary_key=key,
        summary=_summaries(conn, live, side, table, live_cols, side_cols)
        if list(live_cols.items()) != list(side_cols.items())
        else [],
    )
    return report, found, more


def _row_differences(
    conn: sa.Connection,
    live: str,
    side: str,
    table: str,
    key: list[str],
    columns: list[str],
    *,
    budget: int,
    chunk_rows: int,
) -> tuple[list[Difference], bool]:
    """Walk both copies in key order, a chunk at a time, until ``budget`` differences."""
    name = f"{live}.{table}"
    found: list[Difference] = []
    after: tuple[Any, ...] | None = None
    while True:
        live_chunk = _chunk(
            conn, live, table, key, columns, after=after, upto=None, limit=chunk_rows
        )
        last = tuple(live_chunk.iloc[-1][key]) if len(live_chunk) == chunk_rows else None
        side_chunk = _chunk(conn, side, table, key, columns, after=after, upto=last, limit=None)
        merged = live_chunk.merge(
            side_chunk, on=key, how="outer", suffixes=("_live", "_replay"), indicator=True
        ).sort_values(key)
        both = merged["_merge"] == "both"
        differs = ~both
        for c in columns:
            if c not in key:
                left, right = merged[f"{c}_live"], merged[f"{c}_replay"]
                differs |= both & ~((left == right) | (left.isna() & right.isna()))
        for _, row in merged[differs].iterrows():
            row_key = {k: _plain(row[k]) for k in key}
            if row["_merge"] == "left_only":
                live_row = _side(row, columns, key, "_live")
                found.append(Difference(name, "missing", row_key, live=live_row))
            elif row["_merge"] == "right_only":
                replay_row = _side(row, columns, key, "_replay")
                found.append(Difference(name, "extra", row_key, replay=replay_row))
            else:
                changed = [
                    c
                    for c in columns
                    if c not in key and not _same(row[f"{c}_live"], row[f"{c}_replay"])
                ]
                found.append(
                    Difference(
                        name,
                        "changed",
                        row_key,
                        changed,
                        live={c: _plain(row[f"{c}_live"]) for c in changed},
                        replay={c: _plain(row[f"{c}_replay"]) for c in changed},
                    )
                )
            if len(found) > budget:
                return found[:budget], True
        if last is None:
            return found, False
        after = last


def _chunk(
    conn: sa.Connection,
    schema: str,
    table: str,
    key: list[str],
    columns: list[str],
    *,
    after: tuple[Any, ...] | None,
    upto: tuple[Any, ...] | None,
    limit: int | None,
) -> pd.DataFrame:
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    values = sql.SQL(", ").join([sql.Placeholder()] * len(key))
    where: list[sql.Composable] = []
    params: list[Any] = []
    if after is not None:
        where.append(sql.SQL("({}) > ({})").format(keys, values))
        params += after
    if upto is not None:
        where.append(sql.SQL("({}) <= ({})").format(keys, values))
        params += upto
    statement = sql.SQL("SELECT {} FROM {} {} ORDER BY {} {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.Identifier(schema, table),
        sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        keys,
        sql.SQL(f"LIMIT {int(limit)}") if limit else sql.SQL(""),
    )
    rows = conn.exec_driver_sql(_text(conn, statement), tuple(params)).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=columns, dtype=object)


def _summaries(
    conn: sa.Connection,
    live: str,
    side: str,
    table: str,
    live_cols: dict[str, str],
    side_cols: dict[str, str],
) -> list[dict[str, Any]]:
    """Per column: type, non-null values, distinct values, min and max, live beside replay."""
    columns = list(live_cols) + [c for c in side_cols if c not in live_cols]
    return [
        {
            "column": column,
            "live": _summary(conn, live, table, column, live_cols.get(column)),
            "replay": _summary(conn, side, table, column, side_cols.get(column)),
        }
        for column in columns
    ]


def _summary(
    conn: sa.Connection, schema: str, table: str, column: str, kind: str | None
) -> dict[str, Any] | None:
    if kind is None:
        return None
    ident = sql.Identifier(column)
    ordered = kind in SUMMARY_TYPES
    statement = sql.SQL("SELECT count({c}), count(DISTINCT {c}), {lo}, {hi} FROM {t}").format(
        c=ident,
        lo=sql.SQL("min({})::text").format(ident) if ordered else sql.SQL("NULL"),
        hi=sql.SQL("max({})::text").format(ident) if ordered else sql.SQL("NULL"),
        t=sql.Identifier(schema, table),
    )
    non_null, distinct, low, high = conn.exec_driver_sql(_text(conn, statement)).one()
    return {"type": kind, "non_null": non_null, "distinct": distinct, "min": low, "max": high}


def _table_names(conn: sa.Connection, *schemas: str) -> set[str]:
    return {table for _, table in tables_in(conn, schemas)}


def _columns(conn: sa.Connection, schema: str, table: str) -> dict[str, str]:
    rows = conn.exec_driver_sql(
        """SELECT column_name, data_type FROM information_schema.columns
           WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position""",
        (schema, table),
    ).all()
    return dict(rows)


def _primary_key(conn: sa.Connection, schema: str, table: str) -> list[str]:
    rows = conn.exec_driver_sql(
        """SELECT a.attname FROM pg_index i
           JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary ORDER BY k.ord""",
        (schema, table),
    ).scalars()
    return list(rows)


def _count(conn: sa.Connection, schema: str, table: str) -> int:
    statement = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    return int(conn.exec_driver_sql(_text(conn, statement)).scalar_one())


def _checksums(conn: sa.Connection, schema: str, table: str, columns: list[str]) -> dict[str, Any]:
    """An order-free checksum per column: the sum of 64-bit hashes of the values as text."""
    parts = [
        sql.SQL("coalesce(sum(hashtextextended(coalesce({}::text, '<null>'), 0)), 0)").format(
            sql.Identifier(c)
        )
        for c in columns
    ]
    statement = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(parts), sql.Identifier(schema, table)
    )
    return dict(zip(columns, conn.exec_driver_sql(_text(conn, statement)).one(), strict=True))


def _text(conn: sa.Connection, statement: sql.Composable) -> str:
    return statement.as_string(conn.connection.driver_connection)


def _side(row: pd.Series, columns: list[str], key: list[str], suffix: str) -> dict[str, Any]:
    return {c: _plain(row[c if c in key else f"{c}{suffix}"]) for c in columns}


def _same(a: Any, b: Any) -> bool:
    if _missing(a) and _missing(b):
        return True
    return bool(a == b)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _plain(value: Any) -> Any:
    """A value fit for JSON: numpy scalars to Python, NaN to None, the rest as is or text."""
    if _missing(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)

"""Verification: is the replay's copy what the live copy should be?

Everything is read in one REPEATABLE READ, READ ONLY snapshot, so live and replay
are compared at one position: in dual write the live runner moves both copies in
the same transaction, so any snapshot sees them level (the report says so, or
says that they were not). It takes no transaction id, so it never holds the safe
horizon, and only ACCESS SHARE locks, what any SELECT takes: live writes never
wait for it (DDL on
these tables would, and writes would queue behind that DDL). It stays open for
the whole comparison, 2-3 s for a table of a million rows on 2 busy cores
(``bench/verify_bench.py``; per-column sums took about 1 s and missed swapped rows),
and while it is open vacuum keeps the row versions it can still see.

Rows are compared bound to their keys, never as column sums. Per table with a
primary key (the same on both sides, over columns both compare), both copies are
cut into the same key ranges, ``chunk_rows`` live rows each, and PostgreSQL sums,
per range and side, a 64-bit hash of each whole row (key and every compared
column, as one text): a value moved to another row or another column, two rows
swapped, or one row +1 and another -1 all change the sum. Where a range's count
or sum differs, the two copies are joined on the key inside it to name the rows
(``missing``, ``extra``, ``changed`` with its columns), up to ``max_differences``
in all, and to count every differing row and column. Nothing but the named rows
leaves the database, so a table of millions of rows never sits in memory.

What "the same value" means: the text PostgreSQL prints for it, NULL distinct
from every value (an empty string too), except that numerics compare without
their scale (1.0 = 1.00) and floating point -0 = 0. Other types whose text
differs while ``=`` holds (an interval of '1 day' and one of '24 hours', jsonb
numbers of different scale) count as different: readers see them differently.

Columns the database generates (identity or serial columns whose sequence has given
out values) are not compared: they number rows in the order each copy wrote them,
which says nothing about the events; a table whose primary key is generated is
compared as a multiset of its other columns.

A table without a primary key is compared as a multiset of whole rows: row
count, the sum of row hashes and, when those differ, rows only live has and rows
only the replay has (``EXCEPT ALL``), counted, not listed (there is no key to
name them by); its differing columns are those whose multiset of values differs.

Columns are compared when both copies have them with types whose values compare
as readers see them: the same type (as information_schema names it: numeric(12, 4)
and numeric are one, so are timestamps of any precision), integers of any width and
numerics (1 = 1.00), text and varchar, real and double precision. A column both
copies have with types that cannot be compared so (text and jsonb, say) is named in
``uncomparable_columns`` and makes the table not equal. When the replay is a new
shape, per-column summaries of both sides are reported too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from psycopg import sql

from zdr import records
from zdr.errors import ConfigurationError
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
    """One table, live beside replay.

    ``differing_columns``: with a primary key, the columns that differ on a row both
    copies have; without one, the columns whose multiset of values differs.
    ``missing_rows``, ``extra_rows`` and ``changed_rows`` count every differing row,
    listed or not (without a primary key rows are never ``changed``, only missing
    or extra)."""

    table: str
    live_rows: int | None
    replay_rows: int | None
    compared_columns: list[str]
    differing_columns: list[str]
    only_live_columns: list[str]
    only_replay_columns: list[str]
    primary_key: list[str]
    summary: list[dict[str, Any]] = field(default_factory=list)
    missing_rows: int = 0
    extra_rows: int = 0
    changed_rows: int = 0
    #: Columns both copies have, with types whose values cannot be compared.
    uncomparable_columns: list[str] = field(default_factory=list)
    #: Columns whose values the database generates (identity, serial): not compared; a
    #: primary key of them makes the table compared as a multiset of the other columns.
    generated_columns: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return (
            self.live_rows is not None
            and self.live_rows == self.replay_rows
            and not self.differing_columns
            and not self.uncomparable_columns
            and not (self.missing_rows or self.extra_rows or self.changed_rows)
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
    #: How long the one snapshot everything was read in stayed open.
    snapshot_seconds: float | None = None

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
            "snapshot_seconds": self.snapshot_seconds,
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
    """Compare the replay's copy with the live one, row by row, in one snapshot."""
    validate_key(replay.key)
    if chunk_rows < 1:
        raise ConfigurationError(f"verify: chunk_rows must be at least 1, not {chunk_rows}")
    # Read only: it cannot write by mistake, and it never takes a transaction id.
    snapshot = engine.connect().execution_options(
        isolation_level="REPEATABLE READ", postgresql_readonly=True
    )
    started = time.perf_counter()
    with snapshot as conn, conn.begin():
        replay_position = records.replay_cursor(conn, replay.key).position
        live_cursors = records.live_cursors(conn, list(replay.projectors))
        live_position = min((c.position for c in live_cursors.values()), default=0)
        # Rows of copies at different positions differ for that reason alone: they are
        # compared and counted, but none is listed.
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
                truncated = truncated or (more and level)
    return VerificationReport(
        key=replay.key,
        state=replay.state.value,
        same_version=_same_version(replay, live_projectors),
        live_position=live_position,
        replay_position=replay_position,
        tables=tables,
        differences=differences,
        truncated=truncated,
        snapshot_seconds=time.perf_counter() - started,
    )


def _same_version(replay: Replay, live_projectors: dict[str, str]) -> bool:
    return all(live_projectors.get(name) == path for name, path in replay.projectors.items())


def _compare_table(
    conn: sa.Connection, live: str, side: str, table: str, *, budget: int, chunk_rows: int
) -> tuple[TableReport, list[Difference], bool]:
    live_cols = _columns(conn, live, table)
    side_cols = _columns(conn, side, table)
    both = [c for c in live_cols if c in side_cols]
    # A key the database generates (identity, serial) numbers rows in the order each
    # copy wrote them, not from the events: the copies' numbers differ and say nothing.
    generated = _generated(conn, live, table) | _generated(conn, side, table)
    shared = [
        c for c in both if c not in generated and _family(live_cols[c]) == _family(side_cols[c])
    ]
    key = _primary_key(conn, live, table)
    if key != _primary_key(conn, side, table) or not set(key) <= set(shared):
        key = []
    outcome = _Outcome()
    if live_cols and side_cols and shared:
        pair = _Pair(
            live,
            side,
            table,
            {c: live_cols[c] for c in shared},
            {c: side_cols[c] for c in shared},
            key,
        )
        if key:
            outcome = pair.by_key(conn, budget=budget, chunk_rows=chunk_rows)
        else:
            outcome = pair.as_multiset(conn)
    else:
        outcome.live_rows = _count(conn, live, table) if live_cols else None
        outcome.replay_rows = _count(conn, side, table) if side_cols else None
    report = TableReport(
        table=f"{live}.{table}",
        live_rows=outcome.live_rows,
        replay_rows=outcome.replay_rows,
        compared_columns=list(shared),
        differing_columns=[c for c in shared if c in outcome.differing_columns],
        only_live_columns=[c for c in live_cols if c not in side_cols],
        only_replay_columns=[c for c in side_cols if c not in live_cols],
        uncomparable_columns=[c for c in both if c not in shared and c not in generated],
        generated_columns=[c for c in both if c in generated],
        primary_key=key,
        summary=_summaries(conn, live, side, table, live_cols, side_cols)
        if list(live_cols.items()) != list(side_cols.items())
        else [],
        missing_rows=outcome.missing,
        extra_rows=outcome.extra,
        changed_rows=outcome.changed,
    )
    # Rows of a table without a key are never listed: more --max-differences would not help.
    unlisted = outcome.missing + outcome.extra + outcome.changed - len(outcome.differences)
    return report, outcome.differences, bool(key) and unlisted > 0


@dataclass
class _Outcome:
    """What comparing one table found, added up over its key ranges."""

    live_rows: int | None = 0
    replay_rows: int | None = 0
    missing: int = 0
    extra: int = 0
    changed: int = 0
    differing_columns: set[str] = field(default_factory=set)
    differences: list[Difference] = field(default_factory=list)


class _Pair:
    """The statements that compare one table's live copy with the replay's, built once.

    Every row is read as its values (``v0``, ``v1``, ...) and, per column, the text
    that decides equality (``t0``, ``t1``, ...: ``quote_nullable(value)``, so NULL
    reads ``NULL``, the text 'NULL' ``'NULL'`` and an empty string ``''``); a row's
    hash is ``hashtextextended`` of those texts joined by commas, key included, which
    no other row's values can spell (quotes inside a literal are doubled). This is
    about a third cheaper than ``ROW(...)::text`` (measured on 1M rows).
    """

    def __init__(
        self,
        live: str,
        side: str,
        table: str,
        live_types: dict[str, str],
        side_types: dict[str, str],
        key: list[str],
    ) -> None:
        self.name = f"{live}.{table}"
        self.columns = list(live_types)
        self.key = key
        self.live = sql.Identifier(live, table)
        self.side = sql.Identifier(side, table)
        #: Each copy's expressions, from its own column types (a new version may have
        #: changed them).
        self.live_texts, self.side_texts = _Texts(live_types), _Texts(side_types)
        self.keys = sql.SQL(", ").join(map(sql.Identifier, key))
        n = len(self.columns)
        at = [self.columns.index(k) for k in key]
        differs = [sql.SQL("l.{0} IS DISTINCT FROM r.{0}").format(_t(i)) for i in range(n)]
        self.pairs = sql.SQL(
            """d AS (
              SELECT {keys}, l.{k} IS NOT NULL AS in_live, r.{k} IS NOT NULL AS in_replay,
                     {differs}, {live_values}, {replay_values}
              FROM l FULL JOIN r ON {join}
              WHERE l.{k} IS NULL OR r.{k} IS NULL OR {any_differs})"""
        ).format(
            keys=sql.SQL(", ").join(
                sql.SQL("coalesce(l.{0}, r.{0}) AS {1}").format(_v(i), _k(j))
                for j, i in enumerate(at)
            ),
            k=_v(at[0]) if at else sql.SQL("NULL"),
            differs=sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(d, _d(i)) for i, d in enumerate(differs)
            ),
            live_values=sql.SQL(", ").join(
                sql.SQL("l.{} AS {}").format(_v(i), sql.Identifier(f"lv{i}")) for i in range(n)
            ),
            replay_values=sql.SQL(", ").join(
                sql.SQL("r.{} AS {}").format(_v(i), sql.Identifier(f"rv{i}")) for i in range(n)
            ),
            join=sql.SQL(" AND ").join(sql.SQL("l.{0} = r.{0}").format(_v(i)) for i in at),
            any_differs=sql.SQL(" OR ").join(differs),
        )
        self.counts = sql.SQL(
            """count(*) FILTER (WHERE NOT in_replay), count(*) FILTER (WHERE NOT in_live),
               count(*) FILTER (WHERE in_live AND in_replay), {}"""
        ).format(
            sql.SQL(", ").join(
                sql.SQL("coalesce(bool_or({}) FILTER (WHERE in_live AND in_replay), false)").format(
                    _d(i)
                )
                for i in range(n)
            )
        )
        self.order = sql.SQL(", ").join(_k(j) for j in range(len(key)))

    # -- with a primary key: key ranges, a checksum each, rows where they differ ------

    def by_key(self, conn: sa.Connection, *, budget: int, chunk_rows: int) -> _Outcome:
        found = _Outcome()
        live_rows = replay_rows = 0
        after: tuple[Any, ...] | None = None
        while True:
            upto = self._boundary(conn, after, chunk_rows)
            where, params = self._range(after, upto)
            statement = sql.SQL(
                """SELECT 0, count(*), coalesce(sum({lh}), 0) FROM {live} {where}
                   UNION ALL SELECT 1, count(*), coalesce(sum({rh}), 0) FROM {side} {where}"""
            ).format(
                lh=self.live_texts.row_hash,
                rh=self.side_texts.row_hash,
                live=self.live,
                side=self.side,
                where=where,
            )
            sums = {side: (rows, total) for side, rows, total in _rows(conn, statement, params * 2)}
            live_rows += sums[0][0]
            replay_rows += sums[1][0]
            if sums[0] != sums[1]:
                self._differences(conn, where, params, found, budget=budget)
            if upto is None:
                found.live_rows, found.replay_rows = live_rows, replay_rows
                return found
            after = upto

    def _boundary(
        self, conn: sa.Connection, after: tuple[Any, ...] | None, chunk_rows: int
    ) -> tuple[Any, ...] | None:
        """The last key of the next ``chunk_rows`` live rows; None when fewer remain."""
        where, params = self._range(after, None)
        statement = sql.SQL("SELECT {k} FROM {live} {where} ORDER BY {k} OFFSET %s LIMIT 1").format(
            k=self.keys, live=self.live, where=where
        )
        rows = _rows(conn, statement, [*params, chunk_rows - 1])
        return rows[0] if rows else None

    def _range(
        self, after: tuple[Any, ...] | None, upto: tuple[Any, ...] | None
    ) -> tuple[sql.Composable, list[Any]]:
        values = sql.SQL(", ").join([sql.Placeholder()] * len(self.key))
        where: list[sql.Composable] = []
        params: list[Any] = []
        if after is not None:
            where.append(sql.SQL("({}) > ({})").format(self.keys, values))
            params += after
        if upto is not None:
            where.append(sql.SQL("({}) <= ({})").format(self.keys, values))
            params += upto
        if not where:
            return sql.SQL(""), params
        return sql.SQL("WHERE ") + sql.SQL(" AND ").join(where), params

    def _differences(
        self,
        conn: sa.Connection,
        where: sql.Composable,
        params: list[Any],
        found: _Outcome,
        *,
        budget: int,
    ) -> None:
        """Join the two copies on the key inside one range: count, and list what fits."""
        pairs = sql.SQL(
            """WITH l AS (SELECT {lvt} FROM {live} {where}),
                    r AS (SELECT {rvt} FROM {side} {where}),
                    {pairs}"""
        ).format(
            lvt=self.live_texts.values_and_texts,
            rvt=self.side_texts.values_and_texts,
            live=self.live,
            side=self.side,
            where=where,
            pairs=self.pairs,
        )
        both = params + params
        [(missing, extra, changed, *columns)] = _rows(
            conn, pairs + sql.SQL(" SELECT {} FROM d").format(self.counts), both
        )
        found.missing += missing
        found.extra += extra
        found.changed += changed
        found.differing_columns |= {c for c, d in zip(self.columns, columns, strict=True) if d}
        room = budget - len(found.differences)
        if room <= 0:
            return
        listing = pairs + sql.SQL(" SELECT * FROM d ORDER BY {} LIMIT %s").format(self.order)
        n, k = len(self.columns), len(self.key)
        for row in _rows(conn, listing, [*both, room]):
            key = {c: _plain(v) for c, v in zip(self.key, row[:k], strict=True)}
            in_live, in_replay = row[k], row[k + 1]
            differs = row[k + 2 : k + 2 + n]
            live = dict(zip(self.columns, row[k + 2 + n : k + 2 + 2 * n], strict=True))
            replay = dict(zip(self.columns, row[k + 2 + 2 * n :], strict=True))
            if not in_replay:
                found.differences.append(
                    Difference(self.name, "missing", key, live=_plain_row(live))
                )
            elif not in_live:
                found.differences.append(
                    Difference(self.name, "extra", key, replay=_plain_row(replay))
                )
            else:
                changed_columns = [c for c, d in zip(self.columns, differs, strict=True) if d]
                found.differences.append(
                    Difference(
                        self.name,
                        "changed",
                        key,
                        changed_columns,
                        live={c: _plain(live[c]) for c in changed_columns},
                        replay={c: _plain(replay[c]) for c in changed_columns},
                    )
                )

    # -- without a primary key: the whole table as a multiset of rows -----------------

    def as_multiset(self, conn: sa.Connection) -> _Outcome:
        lt, rt = self.live_texts, self.side_texts
        statement = sql.SQL(
            """SELECT 0, count(*), coalesce(sum({lh}), 0), {lc} FROM {live}
               UNION ALL SELECT 1, count(*), coalesce(sum({rh}), 0), {rc} FROM {side}"""
        ).format(
            lh=lt.row_hash,
            lc=lt.column_hashes,
            rh=rt.row_hash,
            rc=rt.column_hashes,
            live=self.live,
            side=self.side,
        )
        sums = {row[0]: row[1:] for row in _rows(conn, statement, [])}
        live, replay = sums[0], sums[1]
        found = _Outcome(live_rows=live[0], replay_rows=replay[0])
        found.differing_columns = {
            c for c, a, b in zip(self.columns, live[2:], replay[2:], strict=True) if a != b
        }
        if live[:2] != replay[:2]:
            only = sql.SQL(
                """SELECT (SELECT count(*) FROM (SELECT {lt} FROM {live}
                                                 EXCEPT ALL SELECT {rt} FROM {side}) o),
                          (SELECT count(*) FROM (SELECT {rt} FROM {side}
                                                 EXCEPT ALL SELECT {lt} FROM {live}) o)"""
            ).format(lt=lt.row_text, rt=rt.row_text, live=self.live, side=self.side)
            [(found.missing, found.extra)] = _rows(conn, only, [])
        return found


class _Texts:
    """One copy's expressions of a row as compared: per column the text that decides
    equality, the row's text and hash, per-column hashes, and the row's values and
    texts under names no column can clash with (``v0``..., ``t0``...)."""

    def __init__(self, types: dict[str, str]) -> None:
        texts = [
            sql.SQL('quote_nullable({}) COLLATE "C"').format(_canonical(c, t))
            for c, t in types.items()
        ]
        self.row_text = sql.SQL(" || ',' || ").join(texts)
        self.row_hash = sql.SQL("hashtextextended({}, 0)").format(self.row_text)
        self.column_hashes = sql.SQL(", ").join(
            sql.SQL("coalesce(sum(hashtextextended({}, 0)), 0)").format(t) for t in texts
        )
        self.values_and_texts = sql.SQL(", ").join(
            [sql.SQL("{} AS {}").format(sql.Identifier(c), _v(i)) for i, c in enumerate(types)]
            + [sql.SQL("{} AS {}").format(t, _t(i)) for i, t in enumerate(texts)]
        )


#: Types whose values compare across each other by the text readers see (numerics
#: without their scale, floats without -0); any other type compares only with itself.
_FAMILIES = {
    "smallint": "number",
    "integer": "number",
    "bigint": "number",
    "numeric": "number",
    "real": "float",
    "double precision": "float",
    "text": "text",
    "character varying": "text",
}


def _family(kind: str) -> str:
    return _FAMILIES.get(kind, kind)


def _canonical(column: str, kind: str) -> sql.Composable:
    """The column as compared: numerics without their scale, floats without -0."""
    ident = sql.Identifier(column)
    if kind == "numeric":
        return sql.SQL("trim_scale({})").format(ident)
    if kind == "real":
        return sql.SQL("({} + 0::real)").format(ident)
    if kind == "double precision":
        return sql.SQL("({} + 0::float8)").format(ident)
    return ident


def _v(i: int) -> sql.Identifier:
    return sql.Identifier(f"v{i}")


def _t(i: int) -> sql.Identifier:
    return sql.Identifier(f"t{i}")


def _d(i: int) -> sql.Identifier:
    return sql.Identifier(f"d{i}")


def _k(j: int) -> sql.Identifier:
    return sql.Identifier(f"k{j}")


def _rows(
    conn: sa.Connection, statement: sql.Composable, params: Sequence[Any]
) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.exec_driver_sql(_text(conn, statement), tuple(params))]


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


def _generated(conn: sa.Connection, schema: str, table: str) -> set[str]:
    """Columns the database numbers itself: identity or serial columns whose sequence has
    given out a value (a serial key the projector always fills, as SQLAlchemy makes an
    integer primary key, is no generated one)."""
    rows = conn.exec_driver_sql(
        """SELECT a.attname FROM pg_attribute a,
                  LATERAL pg_get_serial_sequence(format('%%I.%%I', %s::text, %s::text),
                                                 a.attname) AS s(sequence)
           WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
             AND a.attnum > 0 AND NOT a.attisdropped AND s.sequence IS NOT NULL
             AND CASE WHEN has_sequence_privilege(s.sequence, 'SELECT, USAGE')
                      THEN pg_sequence_last_value(s.sequence::regclass) IS NOT NULL
                      ELSE false END""",
        (schema, table, schema, table),
    ).scalars()
    return set(rows)


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


def _text(conn: sa.Connection, statement: sql.Composable) -> str:
    return statement.as_string(conn.connection.driver_connection)


def _plain_row(row: dict[str, Any]) -> dict[str, Any]:
    return {c: _plain(v) for c, v in row.items()}


def _plain(value: Any) -> Any:
    """A value fit for JSON: NaN to None, numbers, text and booleans as they are, the rest
    as text."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)

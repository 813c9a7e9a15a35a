"""Checks a person looks at before approving a promotion."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from psycopg import sql

from zdr.replay import Replay


@dataclass(frozen=True)
class TableCount:
    """Rows of one table in the live copy and in the replay's copy (None: no such table)."""

    schema: str
    table: str
    live_rows: int | None
    replay_rows: int | None

    @property
    def difference(self) -> int | None:
        if self.live_rows is None or self.replay_rows is None:
            return None
        return self.replay_rows - self.live_rows


def row_counts(engine: sa.Engine, replay: Replay) -> list[TableCount]:
    """Row counts per table, live beside replay, read in one snapshot."""
    counts: list[TableCount] = []
    with engine.connect() as conn:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        raw = conn.connection.driver_connection
        for live, side in sorted(replay.schemas.items()):
            tables = _tables(conn, live) | _tables(conn, side)
            for table in sorted(tables):
                counts.append(
                    TableCount(
                        schema=live,
                        table=table,
                        live_rows=_count(conn, raw, live, table),
                        replay_rows=_count(conn, raw, side, table),
                    )
                )
        conn.rollback()
    return counts


def _tables(conn: sa.Connection, schema: str) -> set[str]:
    return set(
        conn.exec_driver_sql(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relkind IN ('r', 'p')""",
            (schema,),
        ).scalars()
    )


def _count(conn: sa.Connection, raw: object, schema: str, table: str) -> int | None:
    if table not in _tables(conn, schema):
        return None
    statement = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    return int(conn.exec_driver_sql(statement.as_string(raw)).scalar_one())

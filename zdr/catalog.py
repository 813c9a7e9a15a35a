"""zdr's own metadata tables, in the ``zdr`` schema beside the event table.

Everything that must survive a crash lives here, never in memory: which
projector version is live for each projection, each replay's state and where
its copy is, every target's checkpoint, and the history of runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from zdr import cluster

#: (object, statement): each statement runs only when its object is missing.
CREATE_STATEMENTS = [
    ("zdr", "CREATE SCHEMA IF NOT EXISTS zdr"),
    # One row per target: 'live:<projection>' or 'replay:<key>'. A batch's writes
    # and its checkpoint advance commit in one transaction (exactly once).
    (
        "zdr.checkpoints",
        """CREATE TABLE IF NOT EXISTS zdr.checkpoints (
        name text PRIMARY KEY,
        txid bigint NOT NULL DEFAULT 0,
        position bigint NOT NULL DEFAULT 0,
        events_applied bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    ),
    # The live copy of each projection: which projector class writes it, and where.
    (
        "zdr.projections",
        """CREATE TABLE IF NOT EXISTS zdr.projections (
        name text PRIMARY KEY,
        projector text NOT NULL,
        schemas text[] NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    ),
    # A replay owns one side schema per live schema it rebuilds: before promotion
    # the side holds the new copy, after it the previous live copy (for rollback).
    # ``projectors`` are the classes that write the side copy. ``superseded_by``: the
    # replay whose promotion took over a live replay's projections (state superseded).
    (
        "zdr.replays",
        """CREATE TABLE IF NOT EXISTS zdr.replays (
        key text PRIMARY KEY,
        state text NOT NULL,
        projectors jsonb NOT NULL,
        schemas jsonb NOT NULL,
        error text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        caught_up_at timestamptz,
        dual_write_at timestamptz,
        promoted_at timestamptz,
        rolled_back_at timestamptz,
        superseded_by text
    )""",
    ),
    # Added after the first release: an install made before gets the column here.
    (
        "zdr.replays(superseded_by)",
        "ALTER TABLE zdr.replays ADD COLUMN IF NOT EXISTS superseded_by text",
    ),
    # Added later: why a live read model stands still (its projector raised on an event
    # or cannot be loaded), for `zdr status`; empty while it is written.
    (
        "zdr.projections(error)",
        """ALTER TABLE zdr.projections ADD COLUMN IF NOT EXISTS error text,
           ADD COLUMN IF NOT EXISTS error_position bigint,
           ADD COLUMN IF NOT EXISTS failing_since timestamptz""",
    ),
    (
        "zdr.runs",
        """CREATE TABLE IF NOT EXISTS zdr.runs (
        id bigserial PRIMARY KEY,
        replay_key text NOT NULL REFERENCES zdr.replays (key) ON DELETE CASCADE,
        kind text NOT NULL,
        status text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        from_position bigint,
        to_position bigint,
        events bigint NOT NULL DEFAULT 0,
        error text
    )""",
    ),
    # Events a checkpoint moved to position order (``zdr.ordering``) had already applied
    # above its position: the runners skip them once, and delete them as they pass.
    (
        "zdr.applied_ahead",
        """CREATE TABLE IF NOT EXISTS zdr.applied_ahead (
        name text NOT NULL REFERENCES zdr.checkpoints (name) ON DELETE CASCADE,
        position bigint NOT NULL,
        PRIMARY KEY (name, position)
    )""",
    ),
    ("zdr.runs_replay", "CREATE INDEX IF NOT EXISTS runs_replay ON zdr.runs (replay_key, id)"),
    # Where a replay stood over time, about once a second while it runs: for
    # rate and ETA in `zdr status` and the lag chart in the approval report.
    (
        "zdr.samples",
        """CREATE TABLE IF NOT EXISTS zdr.samples (
        replay_key text NOT NULL REFERENCES zdr.replays (key) ON DELETE CASCADE,
        at timestamptz NOT NULL DEFAULT clock_timestamp(),
        position bigint NOT NULL,
        events_applied bigint NOT NULL,
        lag bigint NOT NULL
    )""",
    ),
    (
        "zdr.samples_replay",
        "CREATE INDEX IF NOT EXISTS samples_replay ON zdr.samples (replay_key, at)",
    ),
]


def create(conn: sa.Connection) -> None:
    """Create the metadata tables if missing, and remember the cluster they are in
    (``zdr.cluster``); the caller holds the setup lock."""
    create_missing(conn, [*CREATE_STATEMENTS, *cluster.CREATE_STATEMENTS])
    cluster.record(conn)


def create_missing(conn: sa.Connection, objects: Sequence[tuple[str, str]]) -> None:
    """Run the statements whose object is missing: a schema (``zdr``), a relation
    (``zdr.events``), a function (``zdr.f()``), a trigger (``zdr.events/name``) or a
    column (``zdr.replays(superseded_by)``).

    Why look first: ``CREATE INDEX IF NOT EXISTS`` takes its lock on the table
    before it finds the index there, so on a live event table it would wait for
    every open transaction that appended, and every append after it would queue
    behind it (2.5 s in a test, for as long as the application's longest
    transaction). Looking in the catalog takes no lock, so a set-up with nothing
    to create never makes the application wait.
    """
    present = set(
        conn.exec_driver_sql(
            """SELECT name FROM unnest(%s::text[]) AS name
               WHERE CASE WHEN strpos(name, '.') = 0
                          THEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = name)
                          WHEN strpos(name, '/') > 0
                          THEN EXISTS (SELECT 1 FROM pg_trigger
                                       WHERE tgrelid = to_regclass(split_part(name, '/', 1))
                                         AND tgname = split_part(name, '/', 2))
                          WHEN name LIKE '%%()'
                          THEN to_regprocedure(name) IS NOT NULL
                          WHEN name LIKE '%%(%%)'
                          THEN EXISTS (SELECT 1 FROM pg_attribute
                                       WHERE attrelid = to_regclass(split_part(name, '(', 1))
                                         AND attname = rtrim(split_part(name, '(', 2), ')')
                                         AND NOT attisdropped)
                          ELSE to_regclass(name) IS NOT NULL END""",
            ([name for name, _ in objects],),
        ).scalars()
    )
    for name, statement in objects:
        if name not in present:
            conn.exec_driver_sql(statement)


def is_set_up(conn: sa.Connection) -> bool:
    """Whether the event table and every metadata table exist (asked when a statement
    found one missing)."""
    return bool(
        conn.exec_driver_sql(
            """SELECT to_regclass('zdr.events') IS NOT NULL
                  AND to_regclass('zdr.checkpoints') IS NOT NULL
                  AND to_regclass('zdr.projections') IS NOT NULL
                  AND to_regclass('zdr.replays') IS NOT NULL
                  AND to_regclass('zdr.runs') IS NOT NULL
                  AND to_regclass('zdr.samples') IS NOT NULL
                  AND to_regclass('zdr.applied_ahead') IS NOT NULL"""
        ).scalar_one()
    )

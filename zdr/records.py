"""Every statement on zdr's own tables: projections, replays, checkpoints, runs, samples.

Every function works in the caller's transaction, so a record changes together
with what it describes (a batch's checkpoint with its writes, a state with the
swap that caused it). The tables themselves are declared in ``zdr.catalog``;
the names of checkpoint rows come from ``zdr.names``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from zdr.errors import ReplayNotFound
from zdr.names import (
    PARTITION_CHECKPOINT_PREFIX,
    live_checkpoint,
    partition_checkpoint,
    partition_checkpoints,
    projection_of,
    replay_checkpoint,
)
from zdr.partitions import PartitionPlan
from zdr.replay import TRANSITIONS, Replay, ReplayState, Run
from zdr.store import Cursor

#: Columns stamped when a replay reaches a state; our own names, never user input.
STAMPS = frozenset({"caught_up_at", "dual_write_at", "promoted_at", "rolled_back_at"})

# -- checkpoints ------------------------------------------------------------------


def add_checkpoint(conn: sa.Connection, name: str) -> None:
    """A new target's checkpoint, at the start of the log."""
    conn.exec_driver_sql("INSERT INTO zdr.checkpoints (name) VALUES (%s)", (name,))


def claim_checkpoint(
    conn: sa.Connection, name: str, *, expected: Cursor, to: Cursor, events: int
) -> bool:
    """Move a checkpoint from ``expected`` to ``to``; False if it was not at ``expected``.

    This is exactly once: the claim and the batch's writes commit or roll back
    together, and a second runner that started from the same checkpoint finds
    it moved (the row lock makes it wait for the first one's commit).
    """
    claimed = conn.exec_driver_sql(
        """UPDATE zdr.checkpoints SET txid = %s, position = %s,
               events_applied = events_applied + %s, updated_at = now()
           WHERE name = %s AND txid = %s AND position = %s""",
        (to.txid, to.position, events, name, expected.txid, expected.position),
    ).rowcount
    return claimed == 1


def applied_ahead(conn: sa.Connection) -> dict[str, frozenset[int]]:
    """The events each checkpoint applied above its position before it was moved to
    position order (``zdr.ordering``), by checkpoint name: to be skipped once."""
    rows = conn.exec_driver_sql(
        "SELECT name, array_agg(position) FROM zdr.applied_ahead GROUP BY name"
    ).all()
    return {name: frozenset(positions) for name, positions in rows}


def applied_ahead_of(conn: sa.Connection, name: str) -> frozenset[int]:
    """``applied_ahead`` of one checkpoint."""
    rows = conn.exec_driver_sql(
        "SELECT position FROM zdr.applied_ahead WHERE name = %s", (name,)
    ).scalars()
    return frozenset(rows)


def pass_applied_ahead(conn: sa.Connection, name: str, *, upto: int) -> None:
    """A checkpoint moved to ``upto``: the events it had applied ahead up to there are
    passed (in the batch's transaction)."""
    conn.exec_driver_sql(
        "DELETE FROM zdr.applied_ahead WHERE name = %s AND position <= %s", (name, upto)
    )


def reset_checkpoint(conn: sa.Connection, name: str) -> None:
    """Back to the start of the log (a replay started again from zero)."""
    conn.exec_driver_sql("DELETE FROM zdr.applied_ahead WHERE name = %s", (name,))
    conn.exec_driver_sql(
        """UPDATE zdr.checkpoints SET txid = 0, position = 0, events_applied = 0,
           updated_at = now() WHERE name = %s""",
        (name,),
    )


def replay_cursor(conn: sa.Connection, key: str) -> Cursor:
    """Where the replay's copy stands. Raises ReplayNotFound."""
    row = conn.exec_driver_sql(
        "SELECT txid, position FROM zdr.checkpoints WHERE name = %s", (replay_checkpoint(key),)
    ).first()
    if row is None:
        raise replay_not_found(conn, key)
    return Cursor(row[0], row[1])


def live_cursors(conn: sa.Connection, projections: Sequence[str]) -> dict[str, Cursor]:
    """Where the live copies of these projections stand."""
    rows = conn.exec_driver_sql(
        "SELECT name, txid, position FROM zdr.checkpoints WHERE name = ANY(%s)",
        ([live_checkpoint(n) for n in projections],),
    )
    return {projection_of(name): Cursor(txid, pos) for name, txid, pos in rows}


def live_checkpoints(conn: sa.Connection) -> dict[str, Cursor]:
    """Where every live copy stands, by projection name."""
    rows = conn.exec_driver_sql(
        """SELECT p.name, c.txid, c.position FROM zdr.projections p
           JOIN zdr.checkpoints c ON c.name = %s || p.name ORDER BY p.name""",
        (live_checkpoint(""),),
    )
    return {name: Cursor(txid, position) for name, txid, position in rows}


def followed_cursors(conn: sa.Connection) -> dict[str, Cursor]:
    """The checkpoints the live runner moves, by name: every live copy's and every
    dual-writing replay's."""
    rows = conn.exec_driver_sql(
        """SELECT c.name, c.txid, c.position FROM zdr.checkpoints c
           WHERE c.name IN (SELECT %s || name FROM zdr.projections)
              OR c.name IN (SELECT %s || key FROM zdr.replays WHERE state = %s)""",
        (live_checkpoint(""), replay_checkpoint(""), ReplayState.DUAL_WRITING.value),
    )
    return {name: Cursor(txid, position) for name, txid, position in rows}


def failed_in_dual_write(conn: sa.Connection) -> list[tuple[str, str]]:
    """The replays that failed after dual write began, with their errors (key order)."""
    rows = conn.exec_driver_sql(
        "SELECT key, coalesce(error, '') FROM zdr.replays "
        "WHERE state = %s AND dual_write_at IS NOT NULL ORDER BY key",
        (ReplayState.FAILED.value,),
    )
    return [(key, error) for key, error in rows]


def all_checkpoints(conn: sa.Connection) -> dict[str, Cursor]:
    """Every checkpoint row by name (for operators and tests)."""
    rows = conn.exec_driver_sql("SELECT name, txid, position FROM zdr.checkpoints ORDER BY name")
    return {name: Cursor(txid, pos) for name, txid, pos in rows}


def add_partition_plan(
    conn: sa.Connection, key: str, partitions: int, *, start: Cursor, until: Cursor
) -> None:
    """The rows of a partition plan: each partition's checkpoint at ``start`` (where the
    replay stands), and ``until``, the point they replay up to."""
    conn.exec_driver_sql(
        """INSERT INTO zdr.checkpoints (name, txid, position)
           SELECT name, txid, position FROM unnest(%s::text[], %s::bigint[], %s::bigint[])
                AS plan (name, txid, position)""",
        (
            [partition_checkpoint(key, i, partitions) for i in range(partitions)]
            + [partition_checkpoint(key, "until", partitions)],
            [start.txid] * partitions + [until.txid],
            [start.position] * partitions + [until.position],
        ),
    )


def partition_plan(conn: sa.Connection, key: str) -> PartitionPlan | None:
    """The replay's partition plan, or None if it has none."""
    prefix = partition_checkpoints(key)
    rows = conn.exec_driver_sql(
        """SELECT substr(name, length(%(prefix)s) + 1), txid, position, events_applied
           FROM zdr.checkpoints WHERE starts_with(name, %(prefix)s)""",
        {"prefix": prefix},
    ).all()
    if not rows:
        return None
    cursors: dict[int, Cursor] = {}
    events: dict[int, int] = {}
    until = None
    count = 0
    for name, txid, position, applied in rows:
        count_text, _, index = name.partition("/")
        count = int(count_text)
        if index == "until":
            until = Cursor(txid, position)
        else:
            cursors[int(index)] = Cursor(txid, position)
            events[int(index)] = applied
    assert until is not None, f"partition plan of {key!r} without its point"
    return PartitionPlan(key, count, until, cursors, events)


def delete_partition_plan(conn: sa.Connection, key: str) -> None:
    conn.exec_driver_sql(
        "DELETE FROM zdr.checkpoints WHERE starts_with(name, %s)", (partition_checkpoints(key),)
    )


# -- projections (the live copies) -----------------------------------------------


def live_projector_path(conn: sa.Connection, projection: str) -> str | None:
    """The import path of the projector writing a projection's live copy (None: not live)."""
    path = conn.exec_driver_sql(
        "SELECT projector FROM zdr.projections WHERE name = %s", (projection,)
    ).scalar()
    return None if path is None else str(path)


def live_projector_paths(
    conn: sa.Connection, projections: Sequence[str] | None = None
) -> dict[str, str]:
    """Projection name -> import path of its live projector (all of them, or these)."""
    if projections is None:
        rows = conn.exec_driver_sql("SELECT name, projector FROM zdr.projections")
    else:
        rows = conn.exec_driver_sql(
            "SELECT name, projector FROM zdr.projections WHERE name = ANY(%s)",
            (list(projections),),
        )
    return {name: path for name, path in rows}


def live_schemas(conn: sa.Connection) -> dict[str, list[str]]:
    """Projection name -> the live schemas it writes."""
    rows = conn.exec_driver_sql("SELECT name, schemas FROM zdr.projections")
    return {name: list(schemas) for name, schemas in rows}


def add_projection(conn: sa.Connection, name: str, path: str, schemas: Sequence[str]) -> None:
    """A new live projection, with its checkpoint at the start of the log."""
    conn.exec_driver_sql(
        "INSERT INTO zdr.projections (name, projector, schemas) VALUES (%s, %s, %s)",
        (name, path, list(schemas)),
    )
    add_checkpoint(conn, live_checkpoint(name))


@dataclass(frozen=True)
class LiveProjection:
    """A live copy as zdr's records hold it: who writes it, where it stands, and why it
    stands still if it does (``error``: its projector raised on the event at
    ``error_position``, or cannot be loaded)."""

    name: str
    projector: str
    cursor: Cursor
    error: str | None = None
    error_position: int | None = None
    failing_since: dt.datetime | None = None


def live_projections(conn: sa.Connection) -> list[LiveProjection]:
    """Every live copy, by name (an install from before the error columns reads none)."""
    rows = conn.exec_driver_sql(
        """SELECT p.name, p.projector, c.txid, c.position, to_jsonb(p) ->> 'error',
                  (to_jsonb(p) ->> 'error_position')::bigint,
                  (to_jsonb(p) ->> 'failing_since')::timestamptz
           FROM zdr.projections p
           JOIN zdr.checkpoints c ON c.name = %s || p.name ORDER BY p.name""",
        (live_checkpoint(""),),
    )
    return [
        LiveProjection(name, path, Cursor(txid, position), error, at, since)
        for name, path, txid, position, error, at, since in rows
    ]


def set_live_error(conn: sa.Connection, projection: str, error: str, position: int | None) -> None:
    """Record why a live read model stands still (kept from the first failure on); on an
    install set up before these columns existed, only the log says it (``setup`` adds
    them)."""
    has_columns = conn.exec_driver_sql(
        """SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'zdr.projections'::regclass
                          AND attname = 'failing_since' AND NOT attisdropped)"""
    ).scalar_one()
    if not has_columns:
        return
    conn.exec_driver_sql(
        """UPDATE zdr.projections SET error = %s, error_position = %s,
                  failing_since = coalesce(failing_since, now())
           WHERE name = %s""",
        (error, position, projection),
    )


def clear_live_error(conn: sa.Connection, projection: str) -> None:
    """The live read model is written again."""
    conn.exec_driver_sql(
        """UPDATE zdr.projections SET error = NULL, error_position = NULL, failing_since = NULL
           WHERE name = %s AND error IS NOT NULL""",
        (projection,),
    )


def set_live_projector(conn: sa.Connection, projection: str, path: str) -> str:
    """Record the projector that now writes the live copy; return the one it replaces."""
    return str(
        conn.exec_driver_sql(
            """UPDATE zdr.projections p SET projector = %s, updated_at = now()
               FROM zdr.projections old WHERE p.name = %s AND old.name = p.name
               RETURNING old.projector""",
            (path, projection),
        ).scalar_one()
    )


# -- replays -------------------------------------------------------------------------


def replay_exists(conn: sa.Connection, key: str) -> bool:
    return (
        conn.exec_driver_sql("SELECT 1 FROM zdr.replays WHERE key = %s", (key,)).first() is not None
    )


def add_replay(
    conn: sa.Connection, key: str, projectors: dict[str, str], schemas: dict[str, str]
) -> None:
    """A new replay in state created, with its checkpoint at the start of the log."""
    conn.exec_driver_sql(
        "INSERT INTO zdr.replays (key, state, projectors, schemas) VALUES (%s, %s, %s, %s)",
        (key, ReplayState.CREATED.value, json.dumps(projectors), json.dumps(schemas)),
    )
    add_checkpoint(conn, replay_checkpoint(key))


def delete_replay(conn: sa.Connection, key: str) -> None:
    """Forget a replay: its record, runs, samples and checkpoint.

    The replays it superseded stay superseded, by nobody now: their copies can never
    be live again (a later replay with the same key must not bring them back).
    """
    conn.exec_driver_sql(
        "UPDATE zdr.replays SET superseded_by = NULL WHERE superseded_by = %s", (key,)
    )
    conn.exec_driver_sql("DELETE FROM zdr.replays WHERE key = %s", (key,))
    conn.exec_driver_sql("DELETE FROM zdr.checkpoints WHERE name = %s", (replay_checkpoint(key),))
    delete_partition_plan(conn, key)


def set_replay_projectors(conn: sa.Connection, key: str, projectors: dict[str, str]) -> None:
    """Record which projector classes write the replay's side copy."""
    conn.exec_driver_sql(
        "UPDATE zdr.replays SET projectors = %s WHERE key = %s", (json.dumps(projectors), key)
    )


def replay_keys(conn: sa.Connection, state: ReplayState | None = None) -> list[str]:
    """Keys of every replay (or those in ``state``), oldest first."""
    if state is None:
        rows = conn.exec_driver_sql("SELECT key FROM zdr.replays ORDER BY created_at, key")
    else:
        rows = conn.exec_driver_sql(
            "SELECT key FROM zdr.replays WHERE state = %s ORDER BY key", (state.value,)
        )
    return [str(key) for key in rows.scalars()]


def replay_not_found(conn: sa.Connection, key: str, most: int = 20) -> ReplayNotFound:
    """The error for an unknown key, naming the replays there are (the first ``most``)."""
    keys = sorted(replay_keys(conn))
    if key in keys:  # its record without its checkpoint: a listing would only confuse
        return ReplayNotFound(f"no replay with key {key!r}")
    if not keys:
        return ReplayNotFound(f"no replay with key {key!r} (this database has no replays)")
    shown = ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")
    return ReplayNotFound(f"no replay with key {key!r} (replays in this database: {shown})")


def load_replay(conn: sa.Connection, key: str, *, lock: bool = False, runs: bool = True) -> Replay:
    """The replay with its checkpoint (and runs); ``lock`` holds its row to the end of the
    transaction. Raises ReplayNotFound."""
    row = conn.exec_driver_sql(
        f"""SELECT r.key, r.state, r.projectors, r.schemas, c.position, c.txid,
                   c.events_applied + coalesce(
                       (SELECT sum(p.events_applied) FROM zdr.checkpoints p
                        WHERE starts_with(p.name, %s || r.key || '/')), 0)::bigint
                       AS events_applied,
                   r.error, r.created_at, r.updated_at, r.caught_up_at,
                   r.dual_write_at, r.promoted_at, r.rolled_back_at, r.superseded_by
            FROM zdr.replays r JOIN zdr.checkpoints c ON c.name = %s || r.key
            WHERE r.key = %s {"FOR UPDATE OF r" if lock else ""}""",
        (PARTITION_CHECKPOINT_PREFIX, replay_checkpoint(""), key),
    ).first()
    if row is None:
        raise replay_not_found(conn, key)
    history = []
    if runs:
        history = [
            Run(*r)
            for r in conn.exec_driver_sql(
                """SELECT id, kind, status, started_at, finished_at, from_position,
                          to_position, events, error
                   FROM zdr.runs WHERE replay_key = %s ORDER BY id""",
                (key,),
            )
        ]
    fields = dict(row._mapping)
    fields["state"] = ReplayState(fields["state"])
    plan = partition_plan(conn, key)
    if plan is not None:
        fields.update(partitions=plan.partitions, partitions_left=len(plan.pending))
    return Replay(**fields, runs=history)


def set_state(
    conn: sa.Connection,
    key: str,
    state: ReplayState,
    *,
    error: str | None = None,
    stamp: str | None = None,
) -> None:
    if stamp is not None and stamp not in STAMPS:
        raise ValueError(f"unknown state stamp {stamp!r}")
    extra = f", {stamp} = now()" if stamp else ""
    conn.exec_driver_sql(
        f"UPDATE zdr.replays SET state = %s, error = %s, updated_at = now(){extra} WHERE key = %s",
        (state.value, error, key),
    )


def set_error(conn: sa.Connection, key: str, error: str | None) -> None:
    """Record why an operation on the replay failed, leaving its state as it is."""
    conn.exec_driver_sql(
        "UPDATE zdr.replays SET error = %s, updated_at = now() WHERE key = %s", (error, key)
    )


def live_replays(conn: sa.Connection, projections: Sequence[str], *, lock: bool) -> list[Replay]:
    """The replays in state live that rebuilt any of these projections (``lock``: their
    rows held to the end of the transaction), by key."""
    keys = conn.exec_driver_sql(
        f"""SELECT key FROM zdr.replays WHERE state = %s AND projectors ?| %s::text[]
            ORDER BY key {"FOR UPDATE" if lock else ""}""",
        (ReplayState.LIVE.value, list(projections)),
    ).scalars()
    return [load_replay(conn, key, runs=False) for key in keys.all()]


def supersede(conn: sa.Connection, keys: Sequence[str], *, by: str) -> None:
    """Record that the promotion of replay ``by`` took over these live replays' projections
    (``TRANSITIONS["supersede"]``)."""
    move = TRANSITIONS["supersede"]
    conn.exec_driver_sql(
        """UPDATE zdr.replays SET state = %s, superseded_by = %s, updated_at = now()
           WHERE key = ANY(%s) AND state = ANY(%s)""",
        (move.to.value, by, list(keys), [s.value for s in move.allowed]),
    )


def reinstate(conn: sa.Connection, *, superseded_by: str) -> list[str]:
    """Make the replays that ``superseded_by`` superseded live again, as it was rolled back
    (``TRANSITIONS["reinstate"]``); return their keys."""
    move = TRANSITIONS["reinstate"]
    return [
        str(key)
        for key in conn.exec_driver_sql(
            """UPDATE zdr.replays SET state = %s, superseded_by = NULL, updated_at = now()
               WHERE superseded_by = %s AND state = ANY(%s) RETURNING key""",
            (move.to.value, superseded_by, [s.value for s in move.allowed]),
        ).scalars()
    ]


# -- runs and samples ----------------------------------------------------------------


def start_run(conn: sa.Connection, key: str, kind: str, position: int) -> int:
    return int(
        conn.exec_driver_sql(
            """INSERT INTO zdr.runs (replay_key, kind, status, from_position, to_position)
               VALUES (%s, %s, 'running', %s, %s) RETURNING id""",
            (key, kind, position, position),
        ).scalar_one()
    )


def count_run_events(conn: sa.Connection, run_id: int, events: int, to_position: int) -> None:
    """Add a batch to a run's tally, in the batch's own transaction."""
    conn.exec_driver_sql(
        "UPDATE zdr.runs SET events = events + %s, to_position = %s WHERE id = %s",
        (events, to_position, run_id),
    )


def finish_run(
    conn: sa.Connection,
    run_id: int,
    status: str,
    *,
    error: str | None = None,
    to_position: int | None = None,
) -> None:
    conn.exec_driver_sql(
        """UPDATE zdr.runs SET status = %s, error = %s, finished_at = clock_timestamp(),
               to_position = COALESCE(%s, to_position) WHERE id = %s""",
        (status, error, to_position, run_id),
    )


def add_sample(conn: sa.Connection, key: str, lag: int) -> None:
    """Record the replay's checkpoint as of this transaction, with its lag."""
    conn.exec_driver_sql(
        """INSERT INTO zdr.samples (replay_key, position, events_applied, lag)
           SELECT %s, position, events_applied, %s FROM zdr.checkpoints WHERE name = %s""",
        (key, lag, replay_checkpoint(key)),
    )


@dataclass(frozen=True)
class LagSample:
    """Where a replay stood at ``at``, and its rate since the sample before (0.0 for the
    first, or when no time passed)."""

    at: dt.datetime
    position: int
    events_applied: int
    lag: int
    events_per_s: float


def samples(conn: sa.Connection, key: str, since: dt.datetime | None) -> list[LagSample]:
    rows = conn.exec_driver_sql(
        """SELECT at, position, events_applied, lag FROM zdr.samples
           WHERE replay_key = %s AND at >= %s ORDER BY at""",
        (key, since or dt.datetime.min.replace(tzinfo=dt.UTC)),
    ).all()
    found: list[LagSample] = []
    for at, position, applied, lag in rows:
        rate = 0.0
        if found and (seconds := (at - found[-1].at).total_seconds()) > 0:
            rate = (applied - found[-1].events_applied) / seconds
        found.append(LagSample(at, position, applied, lag, rate))
    return found

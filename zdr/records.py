"""Reading and writing zdr's own records: replays, checkpoints, runs, samples.

Every function works in the caller's transaction, so a record changes together
with what it describes (a batch's checkpoint with its writes, a state with the
swap that caused it).
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import sqlalchemy as sa

from zdr.errors import ReplayNotFound
from zdr.replay import Replay, ReplayState, Run
from zdr.store import Cursor

#: Columns stamped when a replay reaches a state; our own names, never user input.
STAMPS = frozenset({"caught_up_at", "dual_write_at", "promoted_at", "rolled_back_at"})


def live_checkpoint(name: str) -> str:
    """The checkpoint row of a projection's live copy."""
    return f"live:{name}"


def replay_checkpoint(key: str) -> str:
    """The checkpoint row of a replay's copy (after promotion: the previous live copy)."""
    return f"replay:{key}"


def load_replay(conn: sa.Connection, key: str, *, lock: bool = False, runs: bool = True) -> Replay:
    """The replay with its checkpoint (and runs); ``lock`` holds its row to the end of the
    transaction. Raises ReplayNotFound."""
    row = conn.exec_driver_sql(
        f"""SELECT r.key, r.state, r.projectors, r.schemas, c.position, c.txid,
                   c.events_applied, r.error, r.created_at, r.updated_at, r.caught_up_at,
                   r.dual_write_at, r.promoted_at, r.rolled_back_at
            FROM zdr.replays r JOIN zdr.checkpoints c ON c.name = 'replay:' || r.key
            WHERE r.key = %s {"FOR UPDATE OF r" if lock else ""}""",
        (key,),
    ).first()
    if row is None:
        raise ReplayNotFound(f"no replay with key {key!r}")
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
    values = list(row)
    values[1] = ReplayState(values[1])
    return Replay(*values, runs=history)


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


def start_run(conn: sa.Connection, key: str, kind: str, position: int) -> int:
    return int(
        conn.exec_driver_sql(
            """INSERT INTO zdr.runs (replay_key, kind, status, from_position, to_position)
               VALUES (%s, %s, 'running', %s, %s) RETURNING id""",
            (key, kind, position, position),
        ).scalar_one()
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


def replay_cursor(conn: sa.Connection, key: str) -> Cursor:
    txid, position = conn.exec_driver_sql(
        "SELECT txid, position FROM zdr.checkpoints WHERE name = %s", (replay_checkpoint(key),)
    ).one()
    return Cursor(txid, position)


def add_sample(conn: sa.Connection, key: str, lag: int) -> None:
    """Record the replay's checkpoint as of this transaction, with its lag."""
    conn.exec_driver_sql(
        """INSERT INTO zdr.samples (replay_key, position, events_applied, lag)
           SELECT %s, position, events_applied, %s FROM zdr.checkpoints WHERE name = %s""",
        (key, lag, replay_checkpoint(key)),
    )


def samples(conn: sa.Connection, key: str, since: dt.datetime | None) -> pd.DataFrame:
    rows = conn.exec_driver_sql(
        """SELECT at, position, events_applied, lag FROM zdr.samples
           WHERE replay_key = %s AND at >= %s ORDER BY at""",
        (key, since or dt.datetime.min.replace(tzinfo=dt.UTC)),
    ).all()
    return pd.DataFrame(rows, columns=["at", "position", "events_applied", "lag"])

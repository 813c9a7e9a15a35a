"""Advisory locks: one runner per target, and no live batch during a swap.

Two kinds are used, both keyed in zdr's own lock space (first key 0x7a6472, "zdr"):

* a *runner* lock, session level, taken with ``pg_try_advisory_lock`` for the
  whole time one process runs a replay or the live projection. A second runner
  fails at once with RunnerBusy instead of queueing. PostgreSQL frees it when the
  session ends, so a killed process never leaves a replay locked.
* the *live batch* lock, transaction level, taken by every live batch and by the
  transactions that swap, remove or switch on dual write, so those never
  interleave with a batch. It is held for one batch (milliseconds), and the
  swap asks for it under a short ``lock_timeout``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from zdr.errors import RunnerBusy

ZDR_LOCK_SPACE = 0x7A6472
LIVE_RUNNER = "live-runner"
LIVE_BATCH = "live-batch"


def replay_lock_name(key: str) -> str:
    return f"replay:{key}"


@contextmanager
def runner_lock(conn: sa.Connection, name: str, *, busy_message: str) -> Iterator[None]:
    """Hold the session-level lock ``name`` on ``conn`` or raise RunnerBusy at once."""
    got = conn.exec_driver_sql(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, name)
    ).scalar_one()
    conn.commit()
    if not got:
        raise RunnerBusy(busy_message)
    try:
        yield
    finally:
        if conn.in_transaction():
            conn.rollback()
        if not conn.closed and not conn.invalidated:
            conn.exec_driver_sql(
                "SELECT pg_advisory_unlock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, name)
            )
            conn.commit()


def lock_setup(conn: sa.Connection) -> None:
    """Serialise set-up: two processes running CREATE ... IF NOT EXISTS at once would race."""
    conn.exec_driver_sql(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, "setup")
    )


def lock_live_batch(conn: sa.Connection) -> None:
    """Wait for the live batch lock, until the end of the current transaction."""
    conn.exec_driver_sql(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, LIVE_BATCH)
    )

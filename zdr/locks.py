"""Advisory locks: one runner per target, and no live batch during a swap.

Two kinds are used, both keyed in zdr's own lock space (first key 0x7a6472, "zdr"):

* a *runner* lock, session level, taken with ``pg_try_advisory_lock`` for the
  whole time one process runs a replay or the live projection. A second runner
  fails at once with RunnerBusy instead of queueing, unless it asked to wait and
  take over (the scheduled live runner does: each run waits for the one before to
  end). PostgreSQL frees it when the session ends, so a killed process never
  leaves a replay locked.
* the *live batch* lock, transaction level, taken by every live batch and by the
  transactions that swap, remove or switch on dual write, so those never
  interleave with a batch. It is held for one batch (milliseconds), and the
  swap asks for it under a short ``lock_timeout``.

The lock names are spelled in ``zdr.names``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg.errors
import sqlalchemy as sa

from zdr.errors import ConfigurationError, LockLost, LockTimeout, RunnerBusy
from zdr.names import (
    LIVE_BATCH_LOCK,
    LIVE_RUNNER_LOCK,
    SETUP_LOCK,
    partition_lock,
    pipeline_lock,
    replay_lock,
    waiting_for,
)
from zdr.settings import lock_timeout_setting

log = logging.getLogger("zdr")

ZDR_LOCK_SPACE = 0x7A6472
#: How often a runner that waits to take over asks for the lock again.
TAKE_OVER_POLL_S = 0.05

#: The advisory lock ``pg_advisory_lock(ZDR_LOCK_SPACE, hashtext(name))`` as pg_locks shows it.
#: Advisory locks are per database: the same name in another database is another lock.
_HELD = """locktype = 'advisory' AND granted AND classid::bigint = %s AND objsubid = 2
           AND objid::bigint = (hashtext(%s)::bigint & 4294967295)
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""


@dataclass(frozen=True)
class Wait:
    """How a runner waits for a lock another runner holds: until the monotonic time
    ``until`` (``math.inf``: no end) or until ``stop`` is set."""

    until: float
    stop: threading.Event | None = None

    def over(self) -> bool:
        return time.monotonic() >= self.until or (self.stop is not None and self.stop.is_set())

    def pause(self) -> None:
        pause = max(0.0, min(TAKE_OVER_POLL_S, self.until - time.monotonic()))
        if self.stop is not None:
            self.stop.wait(pause)
        else:
            time.sleep(pause)


@contextmanager
def runner_lock(
    conn: sa.Connection,
    name: str,
    *,
    busy_message: str,
    wait: Wait | None = None,
    shared: bool = False,
    on_locked: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold the session-level lock ``name`` on ``conn``, or raise RunnerBusy.

    ``shared``: held beside other shared holders, never beside the exclusive one (the
    partitions of a replay run at once; the replay's other runs wait for all of them).

    Without ``wait`` RunnerBusy comes at once. With it, the lock is asked for again
    every ``TAKE_OVER_POLL_S`` until it is free, so the runner takes over within
    that of the holder's end; between tries the session holds no transaction and
    no snapshot (a blocking ``pg_advisory_lock`` would hold one the whole wait).
    The message names the holder's pid and application.

    ``on_locked`` is called the moment the lock is granted, before the checks that
    follow it: from then on others see this session as the runner, so a caller that
    reconnects a runner after a lost connection must count it as running already.
    """
    require_a_session_of_its_own(conn)
    started = time.monotonic()
    waiting = False
    try:
        while not _advisory(conn, f"pg_try_advisory_lock{'_shared' if shared else ''}", name):
            if wait is None or wait.over():
                raise RunnerBusy(f"{busy_message}{_holder(conn, name)}")
            if not waiting:
                # Seen by the holder (``others_waiting``): it may hand over now.
                _advisory(conn, "pg_advisory_lock_shared", waiting_for(name))
                waiting = True
                log.info(
                    "%s%s: waiting for it to end, then taking over",
                    busy_message,
                    _holder(conn, name),
                )
            wait.pause()
    finally:
        # A connection lost while waiting: its session took the lock with it, and the
        # error that ended the wait matters more than this one.
        if waiting and not conn.invalidated:
            with contextlib.suppress(sa.exc.DBAPIError, sa.exc.PendingRollbackError):
                _advisory(conn, "pg_advisory_unlock_shared", waiting_for(name))
    if on_locked is not None:
        on_locked()
    if waiting:
        log.info("took over after waiting %.1f s", time.monotonic() - started)
    if not _held_here(conn, name):  # the next transaction ran in another session
        _let_go_where_held(conn, name, shared=shared)
        raise ConfigurationError(SHARED_SESSIONS)
    locked_in = _backend_pid(conn)
    try:
        _notice_a_lost_client(conn)
        yield
    finally:
        # A session that died took its lock with it: nothing to release, and the error
        # that ended the block matters more than this one.
        with contextlib.suppress(sa.exc.DBAPIError, sa.exc.PendingRollbackError):
            if conn.in_transaction():
                conn.rollback()
            if not conn.closed and not conn.invalidated:
                unlock = f"pg_advisory_unlock{'_shared' if shared else ''}"
                # Not held here: this session is a new one (the old one died, its lock
                # with it), or a pooler moved it and the old session still holds it.
                if not _advisory(conn, unlock, name) and _held_by(conn, locked_in, name):
                    _let_go_where_held(conn, name, shared=shared)


#: Why a runner refuses to run through a transaction pooler.
SHARED_SESSIONS = (
    "zdr's runners need a database session of their own (they hold a session lock for "
    "as long as they run), and this connection goes through a pooler that hands each "
    "transaction to any server session (PgBouncer's pool_mode = transaction or "
    "statement): give zdr a direct connection to PostgreSQL, or one through session "
    "pooling; the application's own appends may stay on the transaction pooler"
)

#: Engines whose connections were seen to keep their session (checked once per engine).
_OWN_SESSIONS: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def _backend_pid(conn: sa.Connection) -> int:
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    conn.commit()
    return int(pid)


def require_a_session_of_its_own(conn: sa.Connection) -> None:
    """Refuse (ConfigurationError) a connection whose transactions may run in different
    server sessions, before a session lock is taken on it: there, the lock would stay
    in a pooled session after the runner ends, and another client in that session would
    hold it too (two runners on one target).

    Two connections of one client never share a server session unless a pooler hands
    out sessions per transaction: then the session a transaction of ``conn`` just left
    is the one the next client gets (PgBouncer reuses the last one freed), and it sees
    the same backend pid. A connection whose own pid changes between two transactions
    is refused too. Session pooling and direct connections pass; once per engine.
    """
    if conn.engine in _OWN_SESSIONS:
        return
    first = _backend_pid(conn)
    beside = _pid_of_another_connection(conn.engine)
    if beside == first or _backend_pid(conn) != first:
        raise ConfigurationError(SHARED_SESSIONS)
    _OWN_SESSIONS.add(conn.engine)


#: How long the check waits for a second connection's session. A session pool with
#: no session free (PgBouncer's pool_mode = session, default_pool_size = 1) makes it
#: wait: that pooler keeps sessions, which is all the check wants to know.
SECOND_SESSION_WAIT_S = 5.0


def _pid_of_another_connection(engine: sa.Engine) -> int | None:
    """The backend pid a second connection gets, or None if it got no session in
    ``SECOND_SESSION_WAIT_S`` (it goes on waiting in its thread, and is let go after)."""
    found: list[int | BaseException] = []

    def probe() -> None:
        try:
            with engine.connect() as other:
                found.append(_backend_pid(other))
        except BaseException as exc:  # given to the caller
            found.append(exc)

    thread = threading.Thread(target=probe, name="zdr-session-check", daemon=True)
    thread.start()
    thread.join(SECOND_SESSION_WAIT_S)
    if not found:
        return None
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0]


def require_live_runner_lock(conn: sa.Connection) -> None:
    """Raise LockLost unless this session still holds the live runner's lock: through a
    transaction pooler that let the start-up check pass by chance (the application's
    traffic took the session it used), a later transaction lands in another session."""
    if not _held_here(conn, LIVE_RUNNER_LOCK):
        raise LockLost(
            "the live runner's session no longer holds its lock, so another live runner "
            f"could start: it stops here. {SHARED_SESSIONS}"
        )


def _held_by(conn: sa.Connection, pid: int, name: str) -> bool:
    """Whether session ``pid`` holds the lock ``name``."""
    held = conn.exec_driver_sql(
        f"SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND {_HELD})",
        (pid, ZDR_LOCK_SPACE, name),
    ).scalar_one()
    conn.commit()
    return bool(held)


def _held_here(conn: sa.Connection, name: str) -> bool:
    """Whether this session (the one running the next transaction) holds the lock."""
    held = conn.exec_driver_sql(
        f"SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND {_HELD})",
        (ZDR_LOCK_SPACE, name),
    ).scalar_one()
    conn.commit()
    return bool(held)


def _let_go_where_held(conn: sa.Connection, name: str, *, shared: bool) -> None:
    """A lock taken in a pooled session stays there: unlock it in the transaction that
    lands in that session again (a pooler hands it out again soon), for a few tries."""
    unlock = f"pg_advisory_unlock{'_shared' if shared else ''}"
    for _ in range(50):
        released = conn.exec_driver_sql(
            f"""SELECT {unlock}(%s, hashtext(%s)) FROM pg_locks
                WHERE pid = pg_backend_pid() AND {_HELD}""",
            (ZDR_LOCK_SPACE, name, ZDR_LOCK_SPACE, name),
        ).scalar()
        conn.commit()
        if released:
            return
        time.sleep(0.01)
    log.warning(
        "a session lock (%s) stays behind in a pooled server session%s", name, _holder(conn, name)
    )


#: How soon the server notices that a runner's machine is gone (its TCP connection
#: silent, not closed): keepalive probes after 5 s idle, every 2 s, 3 unanswered, and
#: 10 s for unacknowledged data. Then the session ends and its runner lock is free for
#: a standby to take over, instead of after the operating system's default (2 hours).
#: A killed process needs none of this: its connection closes at once.
LOST_CLIENT_SETTINGS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def _notice_a_lost_client(conn: sa.Connection) -> None:
    """Set ``LOST_CLIENT_SETTINGS`` on the session that holds a runner lock (ignored over
    a Unix socket, where a lost client cannot happen)."""
    for name, value in LOST_CLIENT_SETTINGS.items():
        conn.exec_driver_sql("SELECT set_config(%s, %s, false)", (name, value))
    conn.commit()


def _advisory(conn: sa.Connection, function: str, name: str) -> Any:
    """``SELECT function(zdr's lock space, hashtext(name))``, committed at once: a session
    that waits or holds a runner lock keeps no transaction open."""
    value = conn.exec_driver_sql(
        f"SELECT {function}(%s, hashtext(%s))", (ZDR_LOCK_SPACE, name)
    ).scalar_one()
    conn.commit()
    return value


def others_waiting(conn: sa.Connection, name: str) -> bool:
    """Whether another runner waits to take over the runner lock ``name``."""
    waiting = conn.exec_driver_sql(
        f"SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid <> pg_backend_pid() AND {_HELD})",
        (ZDR_LOCK_SPACE, waiting_for(name)),
    ).scalar_one()
    conn.commit()
    return bool(waiting)


def _holder(conn: sa.Connection, name: str) -> str:
    """``": held by pid N (application A)"`` for a busy message, or "" if it was let go."""
    row = conn.exec_driver_sql(
        f"""SELECT l.pid, a.application_name FROM pg_locks l
            LEFT JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE {_HELD} LIMIT 1""",
        (ZDR_LOCK_SPACE, name),
    ).first()
    conn.commit()
    if row is None:
        return ""
    application = f", application {row.application_name!r}" if row.application_name else ""
    return f"; held by pid {row.pid}{application}"


def holder_pid(conn: sa.Connection, name: str) -> int | None:
    """The pid of the session holding the runner lock ``name``, or None if nobody holds
    it: a runner whose process died holds nothing (its session ended)."""
    pid = conn.exec_driver_sql(
        f"SELECT pid FROM pg_locks WHERE {_HELD} LIMIT 1", (ZDR_LOCK_SPACE, name)
    ).scalar()
    return None if pid is None else int(pid)


def live_runner_pid(conn: sa.Connection) -> int | None:
    """The pid of the live runner's session, or None if no live runner runs."""
    return holder_pid(conn, LIVE_RUNNER_LOCK)


def replay_runner_pid(conn: sa.Connection, key: str) -> int | None:
    """The pid of the session running replay ``key`` (replay, switch, promotion) or a
    pipeline run of it (between its steps too), or None."""
    return holder_pid(conn, replay_lock(key)) or holder_pid(conn, pipeline_lock(key))


def end_session(conn: sa.Connection, pid: int) -> bool:
    """End session ``pid`` if it holds the live runner's lock (this runner's own old
    session, cut off by the network); True if it did."""
    ended = conn.exec_driver_sql(
        f"""SELECT pg_terminate_backend(l.pid) FROM pg_locks l
            WHERE l.pid = %s AND {_HELD}""",
        (pid, ZDR_LOCK_SPACE, LIVE_RUNNER_LOCK),
    ).scalar()
    conn.commit()
    if ended:
        for _ in range(100):  # its locks go when it has exited
            held = conn.exec_driver_sql(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)", (pid,)
            ).scalar_one()
            conn.commit()
            if not held:
                break
            time.sleep(0.02)
    return bool(ended)


def live_runner_wanted(conn: sa.Connection) -> bool:
    """Whether another live runner waits to take over from this one."""
    return others_waiting(conn, LIVE_RUNNER_LOCK)


def live_runner(
    conn: sa.Connection,
    wait: Wait | None = None,
    on_locked: Callable[[], None] | None = None,
) -> AbstractContextManager[None]:
    """The one live runner of a database (``wait``: take over when the running one ends;
    ``on_locked``: see ``runner_lock``)."""
    return runner_lock(
        conn,
        LIVE_RUNNER_LOCK,
        busy_message="another live runner is already running on this database "
        "(only one may apply events to the live read models)",
        wait=wait,
        on_locked=on_locked,
    )


def replay_runner(
    conn: sa.Connection, key: str, *, shared: bool = False
) -> AbstractContextManager[None]:
    """The one run of a replay at a time (replay, dual-write switch, promotion, removal);
    ``shared``: a partition's run (the partitions run at once, nothing else does)."""
    return runner_lock(
        conn,
        replay_lock(key),
        busy_message=f"replay {key!r} is busy: another run holds it (one runner per replay)",
        shared=shared,
    )


def partition_runner(conn: sa.Connection, key: str, index: int) -> AbstractContextManager[None]:
    """The one run of one partition of a replay at a time."""
    return runner_lock(
        conn,
        partition_lock(key, index),
        busy_message=f"partition {index} (0-based) of replay {key!r} is busy: another run holds it",
    )


def pipeline_runner(conn: sa.Connection, key: str) -> AbstractContextManager[None]:
    """The one pipeline run of a replay key at a time, in any process."""
    return runner_lock(
        conn,
        pipeline_lock(key),
        busy_message=f"a pipeline run for replay {key!r} is already running "
        "(one at a time per key)",
    )


class PipelineLock:
    """The session lock a pipeline run holds for its whole length, with a way to check
    that it still holds it: a lost connection loses the lock with it, silently, and a
    second run of the same key could then start."""

    def __init__(self, conn: sa.Connection, key: str) -> None:
        self.conn = conn
        self.key = key

    def require(self) -> None:
        """Raise LockLost unless this session is alive and still holds the lock."""
        try:
            held = _held_here(self.conn, pipeline_lock(self.key))
        except sa.exc.DBAPIError as exc:
            raise LockLost(
                f"the pipeline run of replay {self.key!r} lost its lock (its connection "
                "failed); it stops here, before changing anything more: run it again"
            ) from exc
        if not held:
            raise LockLost(
                f"the pipeline run of replay {self.key!r} no longer holds its lock; it "
                "stops here, before changing anything more: run it again"
            )


T = TypeVar("T")


def under_short_lock_timeout(
    conn: sa.Connection,
    body: Callable[[sa.Connection], T],
    *,
    lock_timeout_s: float,
    attempts: int,
    what: str,
) -> tuple[T, int]:
    """Run ``body`` in one transaction under ``lock_timeout_s``, retried with backoff;
    return its value and the attempt that committed.

    For statements whose locks conflict with the application's (a swap, DDL on the
    event table): waiting for a lock queues everyone who comes after, so a short
    wait, rolled back and tried again later, is what keeps their wait short. After
    ``attempts`` LockTimeout names ``what``; nothing was changed.
    """
    timeout = lock_timeout_setting(lock_timeout_s)
    last: Exception | None = None
    blockers: list[str] = []
    for attempt in range(1, attempts + 1):
        # Who makes this transaction wait, looked up from another session while it waits:
        # once the wait has timed out, the server no longer knows.
        pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        watch = threading.Timer(lock_timeout_s * 0.7, _note_blockers, (conn.engine, pid, blockers))
        watch.daemon = True
        watch.start()
        try:
            with conn.begin():
                conn.exec_driver_sql("SELECT set_config('lock_timeout', %s, true)", (timeout,))
                return body(conn), attempt
        except sa.exc.OperationalError as exc:
            if not isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                raise
            last = exc
            pause = min(0.05 * 2**attempt, 2.0) * random.uniform(0.5, 1.0)
            log.info("%s: locks busy (attempt %d), retrying in %.2fs", what, attempt, pause)
            time.sleep(pause)
        finally:
            watch.cancel()
            watch.join()
    held = f"; held by {blockers[-1]}" if blockers else ""
    raise LockTimeout(
        f"could not {what}: the locks were busy for {attempts} attempts of "
        f"{lock_timeout_s}s each{held}; nothing was changed"
    ) from last


def _note_blockers(engine: sa.Engine, pid: int, found: list[str]) -> None:
    """Append who blocks session ``pid`` now (``pid N (user U, application A, state S:
    query)``), if anyone does."""
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                """SELECT a.pid, a.usename, a.application_name, a.state,
                          left(regexp_replace(a.query, '\\s+', ' ', 'g'), 80)
                   FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(%s))
                   ORDER BY a.pid""",
                (pid,),
            ).all()
    except Exception:  # only a message is at stake
        return
    if rows:
        found.append(
            ", ".join(
                f"pid {p} (user {u}, application {a or '-'}, {s}: {q})" for p, u, a, s, q in rows
            )
        )


def lock_setup(conn: sa.Connection) -> None:
    """Serialise set-up: two processes running CREATE ... IF NOT EXISTS at once would race."""
    _xact_lock(conn, SETUP_LOCK)


def lock_live_batch(conn: sa.Connection) -> None:
    """Wait for the live batch lock, until the end of the current transaction."""
    _xact_lock(conn, LIVE_BATCH_LOCK)


@contextmanager
def holding_live_batch_lock(conn: sa.Connection) -> Iterator[None]:
    """Hold the live batch lock at session level until the block ends.

    For tests and drills: it stands for a live batch that takes as long as the
    block, so promotion, removal and the live runner wait for it.
    """
    _advisory(conn, "pg_advisory_lock", LIVE_BATCH_LOCK)
    try:
        yield
    finally:
        _advisory(conn, "pg_advisory_unlock", LIVE_BATCH_LOCK)


def _xact_lock(conn: sa.Connection, name: str) -> None:
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ZDR_LOCK_SPACE, name))

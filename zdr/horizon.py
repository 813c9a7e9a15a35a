"""The safe horizon, and what holds it back, as an operator needs to see it.

Readers (replays and the live runner) read only events whose transaction id is
below the safe horizon (``zdr.store.HORIZON``): the oldest transaction in progress
(the current snapshot's xip list) that could append an event. A write transaction
left open in zdr's database, by any user or application, holds it back, and so does
a prepared transaction there (``PREPARE TRANSACTION`` without ``COMMIT PREPARED``);
transactions of the cluster's other databases and zdr's own runner transactions do
not. Events committed after the holder wait (nothing is skipped) until it ends.

What does *not* hold this horizon: a read-only session with an old snapshot
(its ``backend_xmin`` holds vacuum back, not the snapshot's xmin) and a
replication slot's ``xmin`` (same). A slot is still named if its xmin ever
equals the horizon, but PostgreSQL does not make one the holder.

``inspect_horizon`` finds the holder in ``pg_stat_activity`` (by ``backend_xid``),
``pg_prepared_xacts`` and ``pg_replication_slots``, in one statement, leaving
out the session that asks.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from zdr import records
from zdr.store import RUNNER_XIDS, EventReader

log = logging.getLogger("zdr")

#: A 32-bit transaction id is the low half of the 64-bit one (xid8) the horizon is.
_XID32 = 2**32

# Every candidate holder whose transaction id is the horizon's, oldest first.
# Transaction ids in the catalog views are 32-bit ``xid``; the horizon is 64-bit.
_HOLDERS = """
    SELECT 'session' AS kind, a.pid, a.datname::text, a.usename::text, a.application_name,
           a.state, extract(epoch FROM clock_timestamp() - a.xact_start)::float8,
           a.query, NULL::text, a.xact_start
    FROM pg_stat_activity a
    WHERE a.pid <> pg_backend_pid() AND a.backend_xid::text::bigint = %(xid)s
      AND a.backend_xid::text::bigint NOT IN ({runners})
  UNION ALL
    SELECT 'prepared transaction', NULL::int, p.database::text, p.owner::text, NULL::text,
           'prepared', extract(epoch FROM clock_timestamp() - p.prepared)::float8,
           NULL::text, p.gid, p.prepared
    FROM pg_prepared_xacts p
    WHERE p.transaction::text::bigint = %(xid)s
  UNION ALL
    SELECT 'replication slot', s.active_pid, s.database::text, NULL::text, NULL::text,
           CASE WHEN s.active THEN 'active' ELSE 'inactive' END, NULL::float8,
           NULL::text, s.slot_name::text, NULL::timestamptz
    FROM pg_replication_slots s
    WHERE s.xmin::text::bigint = %(xid)s OR s.catalog_xmin::text::bigint = %(xid)s
  ORDER BY 10 NULLS LAST
""".replace("{runners}", RUNNER_XIDS)


@dataclass(frozen=True)
class HorizonHolder:
    """The transaction whose id is the safe horizon: everything committed after it waits."""

    #: ``session``, ``prepared transaction`` or ``replication slot``.
    kind: str
    #: Its transaction id (64-bit, like the horizon).
    txid: int
    #: The backend's process id (a slot's active walsender; None for a prepared transaction).
    pid: int | None
    database: str | None
    user: str | None
    application_name: str | None
    #: ``active``, ``idle in transaction``, ... (``prepared``; a slot: ``active``/``inactive``).
    state: str | None
    #: Seconds since its transaction began (since PREPARE for a prepared one).
    age_s: float | None
    #: The first line of its current or last query.
    query: str | None
    #: A prepared transaction's gid or a slot's name.
    name: str | None = None

    def describe(self) -> str:
        """One line for a log or a terminal: who it is, where, for how long, doing what."""
        if self.kind == "session":
            who = f"pid {self.pid}"
        else:
            who = f"{self.kind} {self.name!r}" + (f" (pid {self.pid})" if self.pid else "")
        parts = [f"database {self.database or '-'}"]
        if self.user:
            parts.append(f"user {self.user}")
        if self.kind == "session":
            parts.append(f"application {self.application_name or '-'}")
        if self.state:
            parts.append(self.state)
        if self.age_s is not None:
            parts.append(f"open {age(self.age_s)}")
        line = f"{who} ({', '.join(parts)})"
        if self.query:
            line += f": {self.query}"
        return line


@dataclass(frozen=True)
class Horizon:
    """The safe horizon as of ``checked_at``, and its holder if a transaction holds it."""

    #: Events whose transaction id is below this are readable; the rest wait.
    txid: int
    #: Whatever holds the horizon back; None when nothing does (or it ended meanwhile).
    holder: HorizonHolder | None
    checked_at: dt.datetime
    #: The log commits in position order (an eventsourcing application's table lock):
    #: no transaction can hold its readers back, and ``txid`` means nothing.
    by_position: bool = False

    @property
    def held(self) -> bool:
        """True when an open transaction holds the horizon back."""
        return self.holder is not None

    def held_longer_than(self, seconds: float) -> bool:
        """True when the holder's transaction is older than ``seconds`` (or of unknown age)."""
        if self.holder is None:
            return False
        return self.holder.age_s is None or self.holder.age_s > seconds

    def describe(self) -> str:
        """One line: the horizon and who holds it."""
        if self.by_position:
            return (
                "this event log commits in position order (its writers lock the table): "
                "nothing holds the readers back"
            )
        if self.holder is None:
            return f"safe horizon at transaction {self.txid:,}: nothing holds it back"
        return f"safe horizon held at transaction {self.txid:,} by {self.holder.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "txid": self.txid,
            "held": self.held,
            "holder": None if self.holder is None else asdict(self.holder),
            "checked_at": self.checked_at.isoformat(),
            "by_position": self.by_position,
        }


def inspect_horizon(conn: sa.Connection, reader: EventReader) -> Horizon:
    """The reader's safe horizon and its holder, seen from ``conn`` (read only).

    Run it in a transaction of its own: a stale statistics snapshot would show
    sessions as they were when the transaction began.
    """
    txid = reader.horizon(conn)
    if not getattr(reader, "transaction_ids", True):
        return Horizon(txid, None, dt.datetime.now(dt.UTC), by_position=True)
    stamps = getattr(reader, "stamps", None)
    event_table = "zdr.events" if stamps is None else stamps.name
    # No shortcut on pg_snapshot_xmax: it is the last completed id + 1, and a
    # transaction given exactly that id (the newest one, still open) holds the horizon.
    row = conn.exec_driver_sql(_HOLDERS, {"xid": txid % _XID32, "event_table": event_table}).first()
    holder = None
    if row is not None:
        kind, pid, database, user, app, state, age, query, name, _ = row
        holder = HorizonHolder(
            kind=kind,
            txid=txid,
            pid=pid,
            database=database,
            user=user,
            application_name=app or None,
            state=state,
            age_s=None if age is None else max(float(age), 0.0),
            query=first_line(query),
            name=name,
        )
    return Horizon(txid, holder, dt.datetime.now(dt.UTC))


def age(seconds: float) -> str:
    """``4.2 s``, ``17 min``, ``3 h 05 min``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


def first_line(query: str | None, limit: int = 200) -> str | None:
    """The first non-blank line of a query, cut at ``limit`` characters."""
    if not query:
        return None
    for line in query.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return None


class HorizonWatch:
    """Tells the operator when a runner has found nothing to apply while events wait
    above the safe horizon for longer than ``threshold_s``: one warning per holder,
    naming it, not one per poll.

    The live runner calls ``idle`` after a poll that applied nothing and
    ``progressed`` after one that applied something.
    """

    def __init__(
        self,
        reader: EventReader,
        threshold_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.threshold_s = threshold_s
        self.clock = clock
        #: Once events wait, look again at most this often (a count and the holder query).
        self.interval_s = min(max(threshold_s, 0.05), 1.0)
        self.waiting_since: float | None = None
        self.next_check = 0.0
        self.warned: set[tuple[str, int | None, str | None, int] | None] = set()

    def progressed(self) -> None:
        """Events were applied: the stall, if there was one, is over."""
        if self.warned:
            log.info("the safe horizon moved on: the live runner applies events again")
        self.waiting_since = None
        self.warned.clear()

    def idle(self, conn: sa.Connection, resting: Collection[str] = ()) -> None:
        """Nothing was applied: are events waiting, and for how long? Warn once per holder.

        ``resting``: checkpoints the runner leaves out for now (a read model whose
        projector raised): their events wait for the projector, not for the horizon.
        ``conn`` must be outside a transaction. A failure here is logged, never
        raised: the watch must not stop the runner it watches.
        """
        try:
            self._idle(conn, resting)
        except Exception:
            log.debug("could not inspect the safe horizon", exc_info=True)
            if conn.in_transaction():
                conn.rollback()

    def _idle(self, conn: sa.Connection, resting: Collection[str]) -> None:
        now = self.clock()
        if self.waiting_since is not None and now < self.next_check:
            return
        with conn.begin():
            followed = records.followed_cursors(conn)
            cursors = [cursor for name, cursor in followed.items() if name not in resting]
            waiting = self.reader.count_after(conn, min(cursors)) if cursors else 0
        if not waiting:
            self.progressed()
            return
        if self.waiting_since is None:
            self.waiting_since = now
        self.next_check = now + self.interval_s
        waited = now - self.waiting_since
        if waited <= self.threshold_s:
            return
        with conn.begin():  # a transaction of its own: fresh activity statistics
            horizon = inspect_horizon(conn, self.reader)
        holder = horizon.holder
        key = None if holder is None else (holder.kind, holder.pid, holder.name, holder.txid)
        if key in self.warned:
            return
        self.warned.add(key)
        if holder is None:
            log.warning(
                "the live runner has found nothing to apply for %s while %d events wait "
                "above the safe horizon (transaction %d), and no open transaction holding it "
                "was found; see `zdr horizon`",
                age(waited),
                waiting,
                horizon.txid,
            )
            return
        log.warning(
            "the live runner has found nothing to apply for %s: %d events wait above the "
            "safe horizon (transaction %d), held by %s; they are applied once it ends",
            age(waited),
            waiting,
            horizon.txid,
            holder.describe(),
        )

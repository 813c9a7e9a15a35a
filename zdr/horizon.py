"""The safe position, and what holds it back, as an operator needs to see it.

Readers (replays and the live runner) read events up to the safe position
(``zdr.store``): the sequence's last value, lowered to what an appending transaction
still in progress announced. Only such a transaction holds readers back, for as long
as it is open (its application's request, an import, a prepared transaction that
appended and waits for COMMIT PREPARED); events committed above it wait (nothing is
skipped) until it ends. A write transaction that appends nothing (an UPDATE, a DBA's
index build, a long ETL), a transaction in another database, a replication slot or an
old snapshot holds nothing.

``inspect_horizon`` finds the holder in ``pg_locks`` (the announcement), with its
session in ``pg_stat_activity`` or its prepared transaction in ``pg_prepared_xacts``,
in one statement, leaving out the session that asks.
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
from zdr.store import ANNOUNCEMENTS, EventReader, StampedReader

log = logging.getLogger("zdr")

# The appending transactions in progress, lowest announcement first (see ANNOUNCEMENTS
# in zdr.store for the lock's parts).
_HOLDERS = """
    SELECT CASE WHEN x.pid IS NULL THEN 'prepared transaction' ELSE 'session' END,
           x.pid, coalesce(a.datname::text, p.database::text), coalesce(a.usename, p.owner)::text,
           a.application_name, CASE WHEN x.pid IS NULL THEN 'prepared' ELSE a.state END,
           extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, p.prepared))::float8,
           a.query, p.gid::text, coalesce(a.backend_xid, p.transaction)::text::bigint, x.bound
    FROM (SELECT to_regclass(%(log)s)::oid::bigint AS log) AS g,
         LATERAL {announcements} AS x
    LEFT JOIN pg_stat_activity a ON a.pid = x.pid
    LEFT JOIN pg_locks t ON x.pid IS NULL AND t.locktype = 'transactionid'
                        AND t.virtualtransaction = x.virtualtransaction
    LEFT JOIN pg_prepared_xacts p ON p.transaction = t.transactionid
    ORDER BY x.bound, 7 DESC NULLS FIRST
    LIMIT 1
""".replace("{announcements}", ANNOUNCEMENTS.format(log="g.log"))


@dataclass(frozen=True)
class HorizonHolder:
    """The appending transaction that holds the safe position: events committed above
    what it announced wait for it."""

    #: ``session`` or ``prepared transaction``.
    kind: str
    #: Its transaction id (64-bit; 0 when it has none yet).
    txid: int
    #: The backend's process id (None for a prepared transaction).
    pid: int | None
    database: str | None
    user: str | None
    application_name: str | None
    #: ``active``, ``idle in transaction``, ... (``prepared``).
    state: str | None
    #: Seconds since its transaction began (since PREPARE for a prepared one).
    age_s: float | None
    #: The first line of its current or last query.
    query: str | None
    #: A prepared transaction's gid.
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
    """How far readers can read as of ``checked_at``, and the transaction that holds them
    back, if one does."""

    #: A log read by transaction id (an earlier zdr version's order): events whose
    #: transaction id is below this are readable. 0 for a log read by position.
    txid: int
    #: The appending transaction that holds readers back; None when none does.
    holder: HorizonHolder | None
    checked_at: dt.datetime
    #: The log commits in position order (an eventsourcing application's table lock):
    #: no transaction can hold its readers back, and ``txid`` means nothing.
    by_position: bool = False
    #: The safe position of a log whose appends announce themselves (``zdr.store``):
    #: events up to it are readable.
    position: int | None = None

    @property
    def held(self) -> bool:
        """True when an open transaction holds readers back."""
        return self.holder is not None

    def held_longer_than(self, seconds: float) -> bool:
        """True when the holder's transaction is older than ``seconds`` (or of unknown age)."""
        if self.holder is None:
            return False
        return self.holder.age_s is None or self.holder.age_s > seconds

    def describe(self) -> str:
        """One line: how far readers read and who holds them back."""
        if self.by_position:
            return (
                "this event log commits in position order (its writers lock the table): "
                "nothing holds the readers back"
            )
        if self.position is not None:
            if self.holder is None:
                return f"safe position {self.position:,}: no appending transaction holds it back"
            return (
                f"safe position held at {self.position:,} by an appending transaction, "
                f"{self.holder.describe()}"
            )
        if self.holder is None:
            return f"safe horizon at transaction {self.txid:,}: nothing holds it back"
        return f"safe horizon held at transaction {self.txid:,} by {self.holder.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "txid": self.txid,
            "position": self.position,
            "held": self.held,
            "holder": None if self.holder is None else asdict(self.holder),
            "checked_at": self.checked_at.isoformat(),
            "by_position": self.by_position,
        }


def inspect_horizon(conn: sa.Connection, reader: EventReader) -> Horizon:
    """How far the reader reads and what holds it back, seen from ``conn`` (read only).

    Run it in a transaction of its own: a stale statistics snapshot would show
    sessions as they were when the transaction began.
    """
    now = dt.datetime.now(dt.UTC)
    if not isinstance(reader, StampedReader):
        return Horizon(reader.horizon(conn), None, now, by_position=True)
    safe = reader.safe_position(conn)
    row = conn.exec_driver_sql(_HOLDERS, {"log": reader.stamps.name}).first()
    holder = None
    # Held: an announcement at or below the safe position, with events committed above
    # it that wait (one announced at the sequence's last value holds nothing yet).
    log_ = reader.stamps
    waiting = f"SELECT EXISTS (SELECT 1 FROM {log_.table} WHERE {log_.position} > %s)"
    if row is not None and row[10] <= safe and conn.exec_driver_sql(waiting, (safe,)).scalar():
        kind, pid, database, user, app, state, age_s, query, name, txid, _ = row
        holder = HorizonHolder(
            kind=kind,
            txid=txid or 0,
            pid=pid,
            database=database,
            user=user,
            application_name=app or None,
            state=state,
            age_s=None if age_s is None else max(float(age_s), 0.0),
            query=first_line(query),
            name=name,
        )
    return Horizon(0, holder, now, position=safe)


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
    above the safe position for longer than ``threshold_s``: one warning per holder,
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
                "(%s), and no appending transaction holding them was found; see `zdr horizon`",
                age(waited),
                waiting,
                horizon.describe(),
            )
            return
        log.warning(
            "the live runner has found nothing to apply for %s: %d events wait, %s; they "
            "are applied once it ends",
            age(waited),
            waiting,
            horizon.describe(),
        )

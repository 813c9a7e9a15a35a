"""Putting a replay live, rolling it back and removing it: the swap protocol.

Where the invariants of DESIGN.md are kept in this module:

* **Atomic promotion**: one transaction swaps every schema of the replay
  (``zdr.targets.swap``: a schema rename takes no lock on the tables, so readers
  never queue behind it), under the live-batch lock and a short
  ``lock_timeout``, retried with backoff and jitter (``with_swap_lock``), and
  only when the replay's checkpoint equals every live checkpoint
  (``require_at_live_position``). LockTimeout means nothing changed.
* **Nothing is dropped by surprise**: promotion keeps the previous live copy in
  the replay's side schema for rollback; only ``remove`` drops it, never a live
  table, and never an object zdr did not create (see ``zdr.targets.drop``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg.errors
import sqlalchemy as sa
from psycopg import sql

from zdr import carryover, records, targets
from zdr.errors import DependentObjects, InvalidState, ProjectorError, ReplayLagging, one_line
from zdr.locks import lock_live_batch, under_short_lock_timeout
from zdr.names import live_checkpoint, replay_checkpoint, swap_schema
from zdr.registry import Registry
from zdr.replay import Replay, ReplayState, SwapReport, Transition, require_state
from zdr.runner import BatchRun, apply_batch, failure_message, replay_target
from zdr.settings import Settings, lock_timeout_setting
from zdr.store import Cursor, EventReader

log = logging.getLogger("zdr")

#: The run recorded for each kind of swap (its name in messages -> its run kind).
RUN_KINDS = {"promotion": "promote", "rollback": "rollback"}


@dataclass(frozen=True)
class Swapped:
    """What a transaction under the swap lock returned, and how long it took."""

    value: Replay
    report: SwapReport


class Promotion:
    """Promote, roll back and remove replays of one database.

    The caller holds the replay's runner lock (one run per replay).
    """

    def __init__(
        self, engine: sa.Engine, reader: EventReader, registry: Registry, settings: Settings
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.registry = registry
        self.settings = settings

    def promote(self, conn: sa.Connection, key: str) -> SwapReport:
        """Make the replay's copy live, atomically; keep the previous copy for rollback.

        A live replay of the same projections is superseded in the same transaction
        (rolling this one back makes it live again).
        """

        with conn.begin():
            replay = records.load_replay(conn, key, runs=False)
            require_state(replay, "promote")
        base = self.prepare(conn, replay, "promotion")
        # Fresh statistics for the copy, if it is level now: an attempt that is going to
        # be refused as not level does not pay for an ANALYZE (the swap checks again).
        analyzed: tuple[str, ...] = ()
        if self._level(conn, key):
            analyzed = analyze(conn, replay.schemas.values(), self.settings.lock_timeout_s)

        def body(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True, runs=False)
            transition = require_state(replay, "promote")
            superseded = self.superseded_by_promotion(conn, replay)
            self.require_at_live_position(conn, replay)
            self.require_swap_names_free(conn, replay)
            records.supersede(conn, [r.key for r in superseded], by=key)
            return self._swap(conn, replay, transition.to, "promoted_at", "promotion", base)

        report = self.with_swap_lock(conn, key, "promote", body).report
        return dataclasses.replace(report, analyzed=analyzed)

    def prepare(self, conn: sa.Connection, replay: Replay, what: str) -> carryover.Baselines:
        """Before a swap, outside its lock: measure what zdr creates for the live
        projectors and for the replay's (the baselines), build on the replay's copy
        the indexes a DBA added to the live tables (concurrently: dual write goes on),
        and give the copy what the live copy has, so the swap's own pass has little
        left to do (whatever changes in between, it does)."""
        with conn.begin():
            paths = records.live_projector_paths(conn, list(replay.projectors))
        base = carryover.Baselines(
            live=carryover.baseline(conn, [self.registry.for_path(p) for p in paths.values()]),
            side=carryover.baseline(
                conn, [self.registry.for_path(p) for p in replay.projectors.values()]
            ),
        )
        for built in carryover.build_indexes(self.engine, replay.schemas, base.live, what):
            log.info("replay %r: built index %s, as the live copy has it", replay.key, built)
        if what == "rollback":
            for gone in carryover.drop_indexes_gone_from_live(
                self.engine, replay.schemas, base.side
            ):
                log.info("replay %r: dropped index %s, as the live copy has none", replay.key, gone)
        with conn.begin():
            carryover.refusals(conn, replay.schemas, base.live, what)
        under_short_lock_timeout(
            conn,
            lambda conn: carryover.carry(conn, replay.schemas, base, what),
            lock_timeout_s=self.settings.lock_timeout_s,
            attempts=self.settings.swap_attempts,
            what=f"{what} of replay {replay.key!r}: giving its copy the live copy's grants",
        )
        return base

    def rollback(self, conn: sa.Connection, key: str, *, batch_size: int) -> SwapReport:
        """Make the previous live copy live again, brought up to date with its own projector.

        Most of the catching up happens outside the swap lock, in batches; the
        last events inside it, so the copies are level at the swap. Everything that
        could refuse is checked before anything runs. A projector that raises while
        catching up leaves the replay live, with the error in its run and its
        ``error``: roll back again once it is fixed. The replays this one superseded
        are live again after it.
        """
        with conn.begin():
            replay = records.load_replay(conn, key, lock=True)
            self.require_rollback(conn, replay)
        base = self.prepare(conn, replay, "rollback")
        with conn.begin():
            replay = records.load_replay(conn, key, lock=True)
            self.require_rollback(conn, replay)
            live_at = self.common_live_position(conn, replay)
            run_id = records.start_run(conn, key, "rollback catch-up", replay.position)
        target = replay_target(self.registry, replay, where=f"previous live copy of replay {key!r}")
        catch_up = BatchRun(
            self.engine,
            self.reader,
            target,
            run_id=run_id,
            batch_size=batch_size,
            sample_interval_s=self.settings.sample_interval_s,
            failed_state=None,  # still live: the swap has not happened
        )
        # Rounds outside the swap lock until what is left is small (at most
        # lag_threshold events, as for dual write): whatever arrived during a long round
        # would otherwise be applied under the lock, and live batches wait for it.
        for _ in range(self.settings.catch_up_rounds):
            catch_up.run(conn, until=live_at)
            with conn.begin():
                live_at = self.common_live_position(conn, replay)
                left = self.reader.count_after(conn, target.cursor) - self.reader.count_after(
                    conn, live_at
                )
            if left <= self.settings.lag_threshold:
                break
        with conn.begin():
            records.finish_run(conn, run_id, "succeeded")

        def body(conn: sa.Connection) -> Replay:
            current = records.load_replay(conn, key, lock=True, runs=False)
            transition = self.require_rollback(conn, current)
            live_now = self.common_live_position(conn, current)
            target.cursor = Cursor(current.txid, current.position)
            while target.cursor < live_now:
                events = self.reader.read(conn, target.cursor, batch_size, until=live_now)
                if not events:
                    break
                apply_batch(conn, target, events)
                target.cursor = events[-1].cursor
            current = records.load_replay(conn, key, runs=False)
            self.require_at_live_position(conn, current)
            records.reinstate(conn, superseded_by=key)
            return self._swap(conn, current, transition.to, "rolled_back_at", "rollback", base)

        try:
            return self.with_swap_lock(conn, key, "roll back", body).report
        except ProjectorError as exc:
            # The swap's transaction was rolled back: the replay is still live.
            with conn.begin():
                message = failure_message(exc)
                at = records.replay_cursor(conn, key).position
                failed = records.start_run(conn, key, "rollback", at)
                records.finish_run(conn, failed, "failed", error=message)
                records.set_error(conn, key, message)
            raise

    def remove(self, conn: sa.Connection, key: str) -> Replay:
        """Drop the replay's copy (after promotion: the previous live copy) and its records.

        One transaction: a refusal (objects outside zdr depend on the copy, the locks
        stay busy) leaves everything as it was, dual write included.
        """

        def drop(conn: sa.Connection) -> Replay:
            if records.load_replay(conn, key, runs=False).state is ReplayState.DUAL_WRITING:
                # Taken before the replay's row: the live runner takes it before the row
                # too (to mark a replay failed). Held to the commit, so no live batch
                # writes into the copy while it goes, and the next one no longer sees it.
                lock_live_batch(conn)
            replay = records.load_replay(conn, key, lock=True)
            require_state(replay, "remove_replay")
            targets.drop(conn, list(replay.schemas.values()))
            records.delete_replay(conn, key)
            return replay

        removed = self.with_swap_lock(conn, key, "remove", drop, live_batch=False).value
        return dataclasses.replace(removed, state=ReplayState.REMOVED)

    def _swap(
        self,
        conn: sa.Connection,
        replay: Replay,
        state: ReplayState,
        stamp: str,
        kind: str,
        base: carryover.Baselines,
    ) -> Replay:
        """Exchange live and side copies (data and projector versions) of every schema,
        the side copy given first what the live copy has beyond zdr's own objects
        (``zdr.carryover``; DependentObjects, nothing changed, for what cannot be)."""
        measured = carryover.refusals(conn, replay.schemas, base.live, kind)
        carryover.carry(conn, replay.schemas, base, kind, measured)
        targets.swap(conn, replay.schemas)
        swapped = {
            name: records.set_live_projector(conn, name, side_path)
            for name, side_path in replay.projectors.items()
        }
        records.set_replay_projectors(conn, replay.key, swapped)
        records.set_state(conn, replay.key, state, stamp=stamp)
        run_id = records.start_run(conn, replay.key, RUN_KINDS[kind], replay.position)
        records.finish_run(conn, run_id, "succeeded", to_position=replay.position)
        return records.load_replay(conn, replay.key)

    def with_swap_lock(
        self,
        conn: sa.Connection,
        key: str,
        what: str,
        body: Callable[[sa.Connection], Replay],
        *,
        live_batch: bool = True,
    ) -> Swapped:
        """Run ``body`` in one transaction under a short lock_timeout, retried with backoff.

        The live-batch lock makes the transaction wait for the live batch in flight
        (milliseconds) and keeps the next one out until commit. Readers of the read
        models take no lock that conflicts with it.
        """
        started = time.perf_counter()
        locked = started

        def swap(conn: sa.Connection) -> Replay:
            nonlocal started, locked
            started = time.perf_counter()
            if live_batch:
                lock_live_batch(conn)
            locked = time.perf_counter()
            return body(conn)

        replay, attempt = under_short_lock_timeout(
            conn,
            swap,
            lock_timeout_s=self.settings.lock_timeout_s,
            attempts=self.settings.swap_attempts,
            what=f"{what} replay {key!r}",
        )
        return Swapped(
            value=replay,
            report=SwapReport(
                key=key,
                state=replay.state,
                position=replay.position,
                lock_wait_ms=(locked - started) * 1000,
                duration_ms=(time.perf_counter() - started) * 1000,
                attempts=attempt,
                schemas=replay.schemas,
            ),
        )

    def _level(self, conn: sa.Connection, key: str) -> bool:
        """Whether the replay is at the live position now (no lock taken)."""
        with conn.begin():
            try:
                self.require_at_live_position(conn, records.load_replay(conn, key, runs=False))
            except ReplayLagging:
                return False
        return True

    def require_at_live_position(self, conn: sa.Connection, replay: Replay) -> None:
        """Refuse (ReplayLagging) unless the replay is exactly where every live copy is."""
        at = Cursor(replay.txid, replay.position)
        for name, cursor in records.live_cursors(conn, replay.projections).items():
            if cursor != at:
                behind = self.reader.count_after(conn, at) - self.reader.count_after(conn, cursor)
                if behind > 0:
                    why = f"the replay is {behind} events behind live projection {name!r}"
                    fix = "switch dual write on and keep the live runner going"
                else:
                    why = f"live projection {name!r} is {-behind} events behind the replay"
                    fix = "run the live runner until it catches up"
                raise ReplayLagging(
                    f"cannot swap replay {replay.key!r} (at position {at.position}) with live "
                    f"(at {cursor.position}): {why}; the copies must be at the same "
                    f"position: {fix}",
                    lag=behind,
                )
        # At one position, the copies hold the same events unless one applied some above
        # it before its checkpoint was moved to position order (zdr.ordering).
        ahead = records.applied_ahead(conn)
        names = [replay_checkpoint(replay.key), *map(live_checkpoint, replay.projections)]
        if len({ahead.get(name, frozenset()) for name in names}) > 1:
            raise ReplayLagging(
                f"cannot swap replay {replay.key!r} with live yet: at position {at.position}, "
                "one copy holds events above it that it applied before its checkpoint was "
                "moved to position order, and the other does not; keep the live runner going: "
                "it passes them within a batch or two",
                lag=0,
            )

    def common_live_position(self, conn: sa.Connection, replay: Replay) -> Cursor:
        """The one position every live copy of the replay's projections is at."""
        positions = set(records.live_cursors(conn, replay.projections).values())
        if len(positions) != 1:
            raise InvalidState(
                f"the live projections of replay {replay.key!r} are at different positions: "
                "run the live runner until they agree"
            )
        return positions.pop()

    def superseded_by_promotion(self, conn: sa.Connection, replay: Replay) -> list[Replay]:
        """The live replays whose projections this promotion takes over (their rows held).

        Refused (InvalidState) when one of them rebuilt a projection this replay does
        not: it would be half superseded, and rolling either back would swap a copy
        the other one holds. zdr does not guess which copy belongs where.
        """
        others = records.live_replays(conn, replay.projections, lock=True)
        for other in others:
            left = sorted(set(other.projections) - set(replay.projections))
            if left:
                raise InvalidState(
                    f"promote is refused for replay {replay.key!r}: live replay "
                    f"{other.key!r} also rebuilt {_projections(left)}, which {replay.key!r} "
                    f"does not, so it would be live for part of its projections only. Roll "
                    f"back {other.key!r} first, remove it (which gives up its rollback), or "
                    f"promote a replay that rebuilds {_projections(other.projections)}. "
                    "Nothing was changed"
                )
        return [other for other in others if other.key != replay.key]

    def require_rollback(self, conn: sa.Connection, replay: Replay) -> Transition:
        """Refuse a rollback unless the replay's copy is the one live now."""
        transition = require_state(replay, "rollback")
        later = [
            other
            for other in records.live_replays(conn, replay.projections, lock=False)
            if other.key != replay.key
            and (other.promoted_at or _EPOCH) > (replay.promoted_at or _EPOCH)
        ]
        if later:
            # Never so since superseding was recorded; an install from before may hold it.
            other = later[0]
            raise InvalidState(
                f"rollback is refused for replay {replay.key!r}: replay {other.key!r}, "
                f"promoted after it, is live for {_projections(other.projections)}, so the "
                f"live copy is {other.key!r}'s: roll back {other.key!r} first. "
                "Nothing was changed"
            )
        self.require_swap_names_free(conn, replay)
        return transition

    def require_swap_names_free(self, conn: sa.Connection, replay: Replay) -> None:
        """Refuse (DependentObjects) a swap whose temporary schema names are taken.

        No replay key can produce them (``zdr.names.swap_schema``), so only a schema
        made by hand can be in the way.
        """
        taken = conn.exec_driver_sql(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) ORDER BY 1",
            ([swap_schema(side) for side in replay.schemas.values()],),
        ).scalars()
        names = ", ".join(repr(name) for name in taken)
        if names:
            raise DependentObjects(
                f"cannot swap replay {replay.key!r}: schema {names} exists, and zdr names a "
                "live schema so for an instant while it swaps; zdr did not create it. "
                "Drop or rename it. Nothing was changed"
            )


_EPOCH = dt.datetime.min.replace(tzinfo=dt.UTC)


def analyze(conn: sa.Connection, schemas: Iterable[str], lock_timeout_s: float) -> tuple[str, ...]:
    """ANALYZE every table of ``schemas``, one transaction each, before a swap and outside
    its lock: a copy filled by a replay has no planner statistics until autovacuum comes
    (a minute or more after the swap). ANALYZE's lock lets dual write go on; a table
    whose lock it cannot get at once (autovacuum is on it), or whose ANALYZE a
    statement_timeout cancels, is left to autovacuum, with a line in the log, and so is
    one zdr's role does not own (only an owner may analyze). Returns the tables
    analyzed, as ``schema.table``."""
    with conn.begin():
        tables = conn.exec_driver_sql(
            """SELECT n.nspname, c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p', 'm')
                 AND pg_has_role(c.relowner, 'MEMBER')
               ORDER BY 1, 2""",
            (list(schemas),),
        ).all()
    done = []
    for schema, table in tables:
        try:
            with conn.begin():
                conn.exec_driver_sql(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (lock_timeout_setting(lock_timeout_s),),
                )
                statement = sql.SQL("ANALYZE {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
                conn.exec_driver_sql(statement.as_string(conn.connection.driver_connection))
            done.append(f"{schema}.{table}")
        except sa.exc.OperationalError as exc:
            if not isinstance(
                exc.orig, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled
            ):
                raise
            log.info(
                "ANALYZE of %s.%s did not run now (%s): left to autovacuum",
                schema,
                table,
                one_line(exc),
            )
    return tuple(done)


def _projections(names: Iterable[str]) -> str:
    """``projection 'a'`` or ``projections 'a', 'b'``."""
    listed = sorted(names)
    return ("projection " if len(listed) == 1 else "projections ") + ", ".join(map(repr, listed))

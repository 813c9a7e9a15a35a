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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from zdr import carryover, records, targets
from zdr.errors import InvalidState, ReplayLagging
from zdr.locks import lock_live_batch, under_short_lock_timeout
from zdr.registry import Registry
from zdr.replay import PROMOTABLE, Replay, ReplayState, SwapReport, require_state
from zdr.runner import BatchRun, apply_batch, replay_target
from zdr.settings import Settings
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
        """Make the replay's copy live, atomically; keep the previous copy for rollback."""

        with conn.begin():
            replay = records.load_replay(conn, key, runs=False)
            require_state(replay, PROMOTABLE, "promote")
        base = self.prepare(conn, replay)

        def body(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True, runs=False)
            require_state(replay, PROMOTABLE, "promote")
            self.require_at_live_position(conn, replay)
            return self._swap(conn, replay, ReplayState.LIVE, "promoted_at", "promotion", base)

        return self.with_swap_lock(conn, key, "promote", body).report

    def prepare(self, conn: sa.Connection, replay: Replay) -> dict[str, carryover.Inventory]:
        """Before a swap, outside its lock: measure what zdr creates for the live
        projectors (the baseline), and build on the replay's copy the indexes a DBA
        added to the live tables (concurrently: dual write goes on)."""
        with conn.begin():
            paths = records.live_projector_paths(conn, list(replay.projectors))
        base = carryover.baseline(conn, [self.registry.for_path(p) for p in paths.values()])
        for built in carryover.build_indexes(self.engine, replay.schemas, base):
            log.info("replay %r: built index %s, as the live copy has it", replay.key, built)
        return base

    def rollback(self, conn: sa.Connection, key: str, *, batch_size: int) -> SwapReport:
        """Make the previous live copy live again, brought up to date with its own projector.

        Most of the catching up happens outside the swap lock, in batches; the
        last events inside it, so the copies are level at the swap.
        """
        with conn.begin():
            replay = records.load_replay(conn, key, lock=True)
            require_state(replay, {ReplayState.LIVE}, "rollback")
            live_at = self.common_live_position(conn, replay)
            run_id = records.start_run(conn, key, "rollback catch-up", replay.position)
        base = self.prepare(conn, replay)
        target = replay_target(self.registry, replay, where=f"previous live copy of replay {key!r}")
        BatchRun(
            self.engine,
            self.reader,
            target,
            run_id=run_id,
            batch_size=batch_size,
            sample_interval_s=self.settings.sample_interval_s,
        ).run(conn, until=live_at)
        with conn.begin():
            records.finish_run(conn, run_id, "succeeded")

        def body(conn: sa.Connection) -> Replay:
            current = records.load_replay(conn, key, lock=True, runs=False)
            require_state(current, {ReplayState.LIVE}, "rollback")
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
            return self._swap(
                conn, current, ReplayState.ROLLED_BACK, "rolled_back_at", "rollback", base
            )

        return self.with_swap_lock(conn, key, "roll back", body).report

    def remove(self, conn: sa.Connection, key: str) -> Replay:
        """Drop the replay's copy (after promotion: the previous live copy) and its records."""

        def stop_dual_write(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True)
            if replay.state is ReplayState.DUAL_WRITING:
                records.set_state(conn, key, ReplayState.CAUGHT_UP)
            return replay

        def drop(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True, runs=False)
            targets.drop(conn, list(replay.schemas.values()))
            records.delete_replay(conn, key)
            return replay

        before = self.with_swap_lock(conn, key, "remove", stop_dual_write)
        self.with_swap_lock(conn, key, "remove", drop, live_batch=False)
        return dataclasses.replace(before.value, state=ReplayState.REMOVED)

    def _swap(
        self,
        conn: sa.Connection,
        replay: Replay,
        state: ReplayState,
        stamp: str,
        kind: str,
        base: dict[str, carryover.Inventory],
    ) -> Replay:
        """Exchange live and side copies (data and projector versions) of every schema,
        the side copy given first what the live copy has beyond zdr's own objects
        (``zdr.carryover``; DependentObjects, nothing changed, for what cannot be)."""
        carryover.refusals(conn, replay.schemas, base, kind)
        carryover.carry(conn, replay.schemas, kind)
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

    def common_live_position(self, conn: sa.Connection, replay: Replay) -> Cursor:
        """The one position every live copy of the replay's projections is at."""
        positions = set(records.live_cursors(conn, replay.projections).values())
        if len(positions) != 1:
            raise InvalidState(
                f"the live projections of replay {replay.key!r} are at different positions: "
                "run the live runner until they agree"
            )
        return positions.pop()

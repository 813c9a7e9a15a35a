"""Applying events to targets: one batch exactly once, runs of batches, and the live runner.

Where the invariants of DESIGN.md are kept in this module:

* **Exactly once** (``apply_batch``): a batch claims its target's checkpoint with
  a conditional UPDATE (``WHERE txid = old AND position = old``) and writes the
  read models in the same transaction. A crash rolls both back; a second runner
  finds the checkpoint moved and fails with RunnerBusy instead of applying
  events twice.
* **No skipped events**: events are read by the (transaction id, position)
  cursor below the safe horizon (see ``zdr.store``); ``run_batches`` and the
  live runner only ever ask the reader for what follows a target's checkpoint.
* **No gap at the switch to dual write** (``LiveRunner``): the live runner
  applies to every target from *that target's own* checkpoint. Switching dual
  write on only adds the replay to the runner's targets; whatever happened
  between the last replay batch and the switch is after the replay's
  checkpoint, so the runner applies it.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import sqlalchemy as sa

from zdr import records, targets
from zdr.errors import ProjectorError, RunnerBusy
from zdr.locks import lock_live_batch
from zdr.names import live_checkpoint, replay_checkpoint
from zdr.projector import Projector, apply_events
from zdr.registry import Registry
from zdr.replay import Progress, Replay, ReplayState
from zdr.store import Cursor, EventReader, RecordedEvent, mark_runner_transaction

log = logging.getLogger("zdr")


@dataclass
class Target:
    """One physical copy being written: its checkpoint row, projectors and schema map."""

    checkpoint: str
    projectors: list[Projector]
    schema_map: dict[str, str] | None
    where: str
    cursor: Cursor
    replay_key: str | None = None


def replay_target(registry: Registry, replay: Replay, *, where: str | None = None) -> Target:
    """The replay's side copy, written by the projector classes recorded for it."""
    return Target(
        checkpoint=replay_checkpoint(replay.key),
        projectors=[registry.for_path(p) for _, p in sorted(replay.projectors.items())],
        schema_map=dict(replay.schemas),
        where=where or f"replay {replay.key!r}",
        cursor=Cursor(replay.txid, replay.position),
        replay_key=replay.key,
    )


def apply_batch(conn: sa.Connection, target: Target, events: Sequence[RecordedEvent]) -> None:
    """Claim the checkpoint, then write; both commit or roll back with the caller.

    The caller's transaction must be open. Raises RunnerBusy if the checkpoint is
    no longer where ``target.cursor`` says (another runner moved it), and
    ProjectorError if a projector raises.
    """
    last = events[-1].cursor
    if not records.claim_checkpoint(
        conn, target.checkpoint, expected=target.cursor, to=last, events=len(events)
    ):
        raise RunnerBusy(
            f"the checkpoint of {target.where} moved under this runner: another runner "
            "wrote to it; nothing was applied"
        )
    with targets.writing_to(conn, target.schema_map):
        for projector in target.projectors:
            apply_events(projector, events, conn, where=target.where)


class BatchRun:
    """Batches of short transactions into one target, each committing writes and checkpoint
    together, with the next batch read ahead and the replay's lag sampled now and then."""

    def __init__(
        self,
        engine: sa.Engine,
        reader: EventReader,
        target: Target,
        *,
        run_id: int,
        batch_size: int,
        sample_interval_s: float,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.target = target
        self.run_id = run_id
        self.batch_size = batch_size
        self.sample_interval_s = sample_interval_s

    def run(
        self,
        conn: sa.Connection,
        *,
        below_txid: int | None = None,
        until: Cursor | None = None,
        max_events: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        total: int = 0,
    ) -> bool:
        """Apply batches until the reader runs dry (True) or ``max_events`` is reached (False).

        The next batch is read on a second connection while this one is applied
        (reading and decoding is half the work). That is safe: each batch still
        claims the checkpoint it starts from, so a batch read ahead is applied only
        after the one before it committed, and thrown away otherwise.
        """
        target = self.target

        def read_after(cursor: Cursor) -> list[RecordedEvent]:
            with self.engine.connect() as reader, reader.begin():
                return self.reader.read(
                    reader, cursor, self.batch_size, until=until, below_txid=below_txid
                )

        started = time.monotonic()
        sampled = 0.0
        done = 0
        read_ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdr-read-ahead")
        try:
            upcoming = read_ahead.submit(read_after, target.cursor)
            while max_events is None or done < max_events:
                events = upcoming.result()
                if not events:
                    with conn.begin():
                        self._sample(conn, lag=None)
                    return True
                upcoming = read_ahead.submit(read_after, events[-1].cursor)
                with conn.begin():
                    mark_runner_transaction(conn)  # the live runner's horizon passes it
                    apply_batch(conn, target, events)
                    records.count_run_events(conn, self.run_id, len(events), events[-1].position)
                    if time.monotonic() - sampled >= self.sample_interval_s:
                        # The lag as known at the start minus what was done since:
                        # a count per sample would cost as much as a batch.
                        self._sample(conn, lag=max(total - done - len(events), 0))
                        sampled = time.monotonic()
                target.cursor = events[-1].cursor
                done += len(events)
                if on_progress is not None:
                    on_progress(
                        Progress(
                            key=target.replay_key or "",
                            events_done=done,
                            events_total=max(total, done),
                            position=target.cursor.position,
                            seconds=time.monotonic() - started,
                        )
                    )
        except ProjectorError as exc:
            self.record_failure(conn, exc, ReplayState.FAILED)
            raise
        except BaseException as exc:
            self.record_failure(conn, exc, None)
            raise
        finally:
            read_ahead.shutdown(wait=True, cancel_futures=True)
        return False

    def _sample(self, conn: sa.Connection, *, lag: int | None) -> None:
        """Record where the replay stands as of this transaction (lag None: count it)."""
        key = self.target.replay_key
        if key is None:
            return
        if lag is None:
            lag = self.reader.count_after(conn, records.replay_cursor(conn, key))
        records.add_sample(conn, key, lag)

    def record_failure(
        self, conn: sa.Connection, exc: BaseException, state: ReplayState | None
    ) -> None:
        """Write down why a run stopped, if the database still answers."""
        try:
            if conn.in_transaction():
                conn.rollback()
            with conn.begin():
                message = f"{type(exc).__name__}: {exc}"
                if state is not None and self.target.replay_key is not None:
                    records.set_state(conn, self.target.replay_key, state, error=message)
                records.finish_run(conn, self.run_id, "failed", error=message)
        except Exception:  # the original error matters more than the bookkeeping
            log.warning("could not record the failure of run %s", self.run_id, exc_info=True)


class LiveRunner:
    """Applies new events to every live copy and every dual-writing replay, batch by batch.

    The caller holds the live runner lock (one live runner per database).
    """

    def __init__(self, reader: EventReader, registry: Registry) -> None:
        self.reader = reader
        self.registry = registry

    def until_idle(self, conn: sa.Connection, batch_size: int, max_batches: int | None) -> int:
        """Apply batches until nothing is left (or ``max_batches``); return the count."""
        total = batches = 0
        while max_batches is None or batches < max_batches:
            applied = self.batch(conn, batch_size)
            if not applied:
                break
            total += applied
            batches += 1
        return total

    def follow(
        self,
        conn: sa.Connection,
        *,
        stop: threading.Event,
        poll_interval_s: float,
        deadline: float | None,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
        horizon_warning_s: float | None = None,
    ) -> int:
        """Keep applying until ``stop`` is set or the monotonic ``deadline`` passes.

        With ``horizon_warning_s``: when nothing could be applied for longer than
        that while events wait above the safe horizon, log a warning naming the
        transaction that holds it (once per holder; see ``zdr.horizon.HorizonWatch``).
        """
        from zdr.horizon import HorizonWatch

        watch = None if horizon_warning_s is None else HorizonWatch(self.reader, horizon_warning_s)
        total = 0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            applied = self.until_idle(conn, batch_size, 1)
            total += applied
            if on_batch is not None and applied:
                on_batch(applied)
            if watch is not None:
                if applied:
                    watch.progressed()
                else:
                    watch.idle(conn)
            if not applied:
                stop.wait(poll_interval_s)
        return total

    def batch(self, conn: sa.Connection, batch_size: int) -> int:
        """One batch to every target, from each target's own checkpoint; return its size."""
        with conn.begin():
            # Held for this batch only; a swap waits for it and we wait for a swap.
            lock_live_batch(conn)
            live_targets = self.targets(conn)
            if not live_targets:
                return 0
            events = self.reader.read(conn, min(t.cursor for t in live_targets), batch_size)
            if not events:
                return 0
            cursors = [e.cursor for e in events]
            for target in live_targets:
                todo = events[bisect.bisect_right(cursors, target.cursor) :]
                if not todo:
                    continue
                if target.replay_key is None:
                    apply_batch(conn, target, todo)
                    continue
                # A broken new projector must not stop the live read model: its
                # replay leaves dual write (state failed) and live goes on.
                try:
                    with conn.begin_nested():
                        apply_batch(conn, target, todo)
                except ProjectorError as exc:
                    log.error("replay %r left dual write: %s", target.replay_key, exc)
                    records.set_state(conn, target.replay_key, ReplayState.FAILED, error=str(exc))
            return len(events)

    def targets(self, conn: sa.Connection) -> list[Target]:
        """Every live copy, then every dual-writing replay, each at its own checkpoint."""
        found = [
            Target(
                checkpoint=live_checkpoint(name),
                projectors=[self.registry.for_path(path)],
                schema_map=None,
                where=f"live projection {name!r}",
                cursor=cursor,
            )
            for name, path, cursor in records.live_targets(conn)
        ]
        for key in records.replay_keys(conn, ReplayState.DUAL_WRITING):
            replay = records.load_replay(conn, key, runs=False)
            found.append(replay_target(self.registry, replay))
        return found

"""Applying events to targets: one batch exactly once, runs of batches, and the live runner.

Where the invariants of DESIGN.md are kept in this module:

* **Exactly once** (``apply_batch``): a batch claims its target's checkpoint with
  a conditional UPDATE (``WHERE txid = old AND position = old``) and writes the
  read models in the same transaction. A crash rolls both back; a second runner
  finds the checkpoint moved and fails with RunnerBusy instead of applying
  events twice.
* **No skipped events**: events are read by position up to the safe position
  (see ``zdr.store``); ``run_batches`` and the
  live runner only ever ask the reader for what follows a target's checkpoint.
* **No gap at the switch to dual write** (``LiveRunner``): the live runner
  applies to every target from *that target's own* checkpoint. Switching dual
  write on only adds the replay to the runner's targets; whatever happened
  between the last replay batch and the switch is after the replay's
  checkpoint, so the runner applies it.
* **Live never waits** (``LiveRunner``): a dual-writing replay's writes run in a
  savepoint under a short lock timeout, after the live copies'. A replay that
  meets a lock or another transient error stays behind (its checkpoint did not
  move) and catches up from its own checkpoint on a later batch; one whose
  projector raises or cannot be loaded leaves dual write (state failed).
* **One broken read model stops no other**: each live copy is written in a
  savepoint of its own; one whose projector raises stays behind at its last good
  checkpoint and is tried again later, while the others (and the runner) go on.
* Each projector gets its own copy of the event payloads when another projector
  sees the same events after it, so nothing one does to ``event.data`` reaches
  another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import sqlalchemy as sa

from zdr import records, targets
from zdr.errors import PrivilegeMissing, ProjectorError, RunnerBusy, is_transient, one_line
from zdr.locks import live_runner_wanted, lock_live_batch, require_live_runner_lock
from zdr.names import live_checkpoint, replay_checkpoint
from zdr.projector import Projector, apply_events
from zdr.registry import Registry
from zdr.replay import Progress, Replay, ReplayState
from zdr.settings import DEFAULTS, Settings, lock_timeout_setting
from zdr.store import (
    Cursor,
    EventReader,
    RecordedEvent,
    forget_prepared_statements,
    mark_runner_transaction,
)

log = logging.getLogger("zdr")

#: Events in the first slice of a target whose speed is not measured yet (then sized
#: from ``Settings.slice_budget_s``): small, because a projector may cost 20 ms an event.
FIRST_SLICE = 10


@dataclass
class Target:
    """One physical copy being written: its checkpoint row, projectors and schema map."""

    checkpoint: str
    projectors: list[Projector]
    schema_map: dict[str, str] | None
    where: str
    cursor: Cursor
    replay_key: str | None = None
    #: A live copy's projection, and why it stood still when last written (or None).
    projection: str | None = None
    error: str | None = None
    #: Events above ``cursor`` applied already, before the checkpoint was moved to
    #: position order (``zdr.ordering``): skipped once, forgotten as the cursor passes.
    ahead: frozenset[int] = frozenset()


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


def apply_batch(
    conn: sa.Connection,
    target: Target,
    events: Sequence[RecordedEvent],
    *,
    shared: bool = False,
) -> None:
    """Claim the checkpoint, then write; both commit or roll back with the caller.

    The caller's transaction must be open. Raises RunnerBusy if the checkpoint is
    no longer where ``target.cursor`` says (another runner moved it), and
    ProjectorError if a projector raises. ``shared``: other projectors see these
    same event objects after this target's, so every projector here gets its own
    copy of the payloads (otherwise only those followed by another one here).
    """
    last = events[-1].cursor
    if target.ahead:
        events = [e for e in events if e.position not in target.ahead]
    if not records.claim_checkpoint(
        conn, target.checkpoint, expected=target.cursor, to=last, events=len(events)
    ):
        raise RunnerBusy(
            f"the checkpoint of {target.where} moved under this runner: another runner "
            "wrote to it; nothing was applied"
        )
    if target.ahead:
        records.pass_applied_ahead(conn, target.checkpoint, upto=last.position)
    if not events:
        return
    final = len(target.projectors) - 1
    with targets.writing_to(conn, target.schema_map):
        for i, projector in enumerate(target.projectors):
            own_copy = shared or i < final
            apply_events(projector, events, conn, where=target.where, own_copy=own_copy)


#: How often a live runner checks that its session still holds its lock.
LOCK_CHECK_S = 10.0

#: A run's first batch where the server ends long transactions: short, to measure what
#: an event costs before the batches grow to what fits.
FIRST_TIMED_BATCH = 500


def server_time_limit(conn: sa.Connection) -> float | None:
    """Seconds a batch's transaction may take before the server ends it: half the
    shortest of idle_in_transaction_session_timeout (a projector working between two
    statements leaves the transaction idle), statement_timeout and transaction_timeout
    (PostgreSQL 17) as this session has them; None when none is set."""
    with conn.begin():
        limits = (
            conn.exec_driver_sql(
                """SELECT setting::bigint FROM pg_settings
               WHERE name IN ('idle_in_transaction_session_timeout', 'statement_timeout',
                              'transaction_timeout') AND setting::bigint > 0"""
            )
            .scalars()
            .all()
        )
    return min(limits) / 1000 / 2 if limits else None


class BatchSizes:
    """How many events the next batch reads: ``batch_size``, or, under a server time
    limit, as many as fit in it at the cost per event measured so far (a short first
    batch measures it), so that a slow projector's batches are never cut by the server."""

    def __init__(self, batch_size: int, time_limit_s: float | None) -> None:
        self.batch_size = batch_size
        self.time_limit_s = time_limit_s
        self.next = batch_size if time_limit_s is None else min(batch_size, FIRST_TIMED_BATCH)

    def took(self, events: int, seconds: float) -> None:
        if self.time_limit_s is None or events == 0:
            return
        per_event = max(seconds / events, 1e-7)
        fits = int(self.time_limit_s / per_event)
        self.next = max(1, min(self.batch_size, fits))


@dataclass(frozen=True)
class ReadAhead:
    """The batch a run read ahead and did not apply (it stopped at ``max_events``): the
    events right after the cursor ``after``, below the horizon the run read under (which
    only grows, so they are the start of what the next run reads). The next run starts
    with them instead of waiting for its first read; like every batch, they are applied
    only if the checkpoint is still ``after`` when their transaction claims it."""

    after: Cursor
    events: list[RecordedEvent]


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
        failed_state: ReplayState | None = ReplayState.FAILED,
        samples: bool = True,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.target = target
        self.run_id = run_id
        self.batch_size = batch_size
        self.sample_interval_s = sample_interval_s
        #: The replay's state after a projector raised (None: its state stays, the error
        #: is recorded on it: a rollback's catch-up leaves the replay live).
        self.failed_state = failed_state
        #: Whether it records the replay's lag now and then (not a partition's run).
        self.samples = samples
        #: Events applied by ``run`` so far.
        self.applied = 0
        #: The batch the last ``run`` read ahead and did not apply, if it stopped at
        #: ``max_events`` before the end of the log.
        self.left_over: ReadAhead | None = None

    def run(
        self,
        conn: sa.Connection,
        *,
        below_txid: int | None = None,
        until: Cursor | None = None,
        max_events: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        total: int = 0,
        read_ahead_batch: ReadAhead | None = None,
    ) -> bool:
        """Apply batches until the reader runs dry (True) or ``max_events`` is reached
        (False, unless the log ended there too: a run of exactly what was left is done).

        The next batch is read on a second connection while this one is applied
        (reading and decoding is half the work). That is safe: each batch still
        claims the checkpoint it starts from, so a batch read ahead is applied only
        after the one before it committed, and thrown away otherwise.
        """
        target = self.target

        def read_after(cursor: Cursor, size: int) -> list[RecordedEvent]:
            with self.engine.connect() as reader, reader.begin():
                return self.reader.read(reader, cursor, size, until=until, below_txid=below_txid)

        started = time.monotonic()
        sampled = 0.0
        done = 0
        sizes = BatchSizes(self.batch_size, server_time_limit(conn))
        with conn.begin():
            target.ahead = records.applied_ahead_of(conn, target.checkpoint)
        read_ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdr-read-ahead")
        self.left_over = None
        try:
            if read_ahead_batch is not None and read_ahead_batch.after == target.cursor:
                upcoming: Future[list[RecordedEvent]] = Future()  # read by the run before
                upcoming.set_result(read_ahead_batch.events)
            else:
                upcoming = read_ahead.submit(read_after, target.cursor, sizes.next)
            while max_events is None or done < max_events:
                events = upcoming.result()
                if not events:
                    with conn.begin():
                        self._sample(conn, lag=None)
                    return True
                upcoming = read_ahead.submit(read_after, events[-1].cursor, sizes.next)
                batch_started = time.monotonic()
                with conn.begin():
                    mark_runner_transaction(conn)  # a projector may not append
                    apply_batch(conn, target, events)
                    records.count_run_events(conn, self.run_id, len(events), events[-1].position)
                    if time.monotonic() - sampled >= self.sample_interval_s:
                        # The lag as known at the start minus what was done since:
                        # a count per sample would cost as much as a batch.
                        self._sample(conn, lag=max(total - done - len(events), 0))
                        sampled = time.monotonic()
                sizes.took(len(events), time.monotonic() - batch_started)
                target.cursor = events[-1].cursor
                done += len(events)
                self.applied = done
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
            # ``max_events`` reached. The batch read ahead is waited for anyway (below):
            # if it is empty, this run ended at the end of the log, and says so; else
            # the next run may start with it (``left_over``).
            try:
                following = upcoming.result()
            except Exception:  # a look ahead that failed fails nothing that committed
                log.debug("the batch read ahead failed; the next run reads it again", exc_info=True)
                return False
            if not following:
                with conn.begin():
                    self._sample(conn, lag=None)
                return True
            self.left_over = ReadAhead(after=target.cursor, events=following)
        except ProjectorError as exc:
            self.record_failure(conn, exc, on_replay=True)
            raise
        except BaseException as exc:
            self.record_failure(conn, exc, on_replay=False)
            raise
        finally:
            read_ahead.shutdown(wait=True, cancel_futures=True)
        return False

    def _sample(self, conn: sa.Connection, *, lag: int | None) -> None:
        """Record where the replay stands as of this transaction (lag None: count it)."""
        key = self.target.replay_key
        if key is None or not self.samples:
            return
        if lag is None:
            lag = self.reader.count_after(conn, records.replay_cursor(conn, key))
        records.add_sample(conn, key, lag)

    def record_failure(self, conn: sa.Connection, exc: BaseException, *, on_replay: bool) -> None:
        """Write down why a run stopped, if the database still answers; ``on_replay``: on
        the replay too (``failed_state``, or only its error when that is None)."""
        try:
            if conn.in_transaction():
                conn.rollback()
            with conn.begin():
                message = failure_message(exc)
                key = self.target.replay_key
                if on_replay and key is not None:
                    if self.failed_state is None:
                        records.set_error(conn, key, message)
                    else:
                        records.set_state(conn, key, self.failed_state, error=message)
                # Ctrl-C or a signal stopped it: nothing failed, it resumes where it was.
                stopped = isinstance(exc, KeyboardInterrupt | SystemExit)
                status = "interrupted" if stopped else "failed"
                records.finish_run(conn, self.run_id, status, error=message)
        except Exception:  # the original error matters more than the bookkeeping
            log.warning("could not record the failure of run %s", self.run_id, exc_info=True)


def failure_message(exc: BaseException) -> str:
    """How a failure is written into a run's and a replay's ``error``."""
    return f"{type(exc).__name__}: {exc}"


class LiveRunner:
    """Applies new events to every live copy and every dual-writing replay, batch by batch.

    The caller holds the live runner lock (one live runner per database).
    """

    def __init__(
        self, reader: EventReader, registry: Registry, settings: Settings = DEFAULTS
    ) -> None:
        self.reader = reader
        self.registry = registry
        #: dual_write_lock_timeout_s, dual_write_retry_s and catch_up_slice are read here.
        self.settings = settings
        #: Replays that stayed behind: key -> monotonic time of their next try.
        #: Targets left out for now, by checkpoint name: monotonic time of their next try.
        self._resting: dict[str, float] = {}
        #: Dual-writing replays whose record holds a missing grant's error.
        self._not_granted_replays: set[str] = set()
        #: Measured seconds per event of the targets that get slices, by checkpoint name.
        self._cost: dict[str, float] = {}
        self._turn = 0  # which target that is behind gets the next catch-up slice
        self._unloadable: set[str] = set()  # live projectors said to be unloadable
        #: Whether zdr.applied_ahead may still hold rows (looked at per batch until empty).
        self._ahead_pending = True
        #: The live copies and their projectors' paths at the last batch (a swap changes them).
        self._versions: frozenset[tuple[str, tuple[str, ...]]] | None = None
        #: Projector errors of live read models, collected while ``until_idle`` runs
        #: (None otherwise: ``follow`` logs them and keeps nothing).
        self._failed: list[ProjectorError] | None = None

    def until_idle(self, conn: sa.Connection, batch_size: int, max_batches: int | None) -> int:
        """Apply batches until nothing is left for any target (or ``max_batches``); return
        the number of events the live copies got.

        A one-off call: every target is tried again (none rests from an earlier call),
        and if a live read model's projector raised, its first ProjectorError is raised
        at the end, after everything the other read models could get was applied (that
        one stays at its last good checkpoint).
        """
        self._resting.clear()
        failed: list[ProjectorError] = []
        self._failed = failed
        try:
            total = batches = 0
            while max_batches is None or batches < max_batches:
                live, work = self.batch(conn, batch_size)
                if not work:
                    break
                total += live
                batches += 1
        finally:
            self._failed = None
        if failed:
            raise failed[0]
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
        hand_over_by: float | None = None,
        on_tick: Callable[[], None] | None = None,
        hand_over_after_s: float | None = None,
    ) -> int:
        """Keep applying until ``stop`` is set or the monotonic ``deadline`` passes.

        With ``hand_over_after_s``: that long after this call (the lock just taken),
        end as soon as another live runner waits to take over, and not before.

        ``on_tick`` is called after every round (a batch, or a look that found none:
        about every ``poll_interval_s``), in this thread: it says the runner is at work
        (a heartbeat); it must return at once, or live waits for it.

        With ``hand_over_by`` (a later monotonic time): past the deadline, go on until
        another live runner waits to take over, or that time passes, so the live read
        models do not stand still while the next runner is late.

        With ``horizon_warning_s``: when nothing could be applied for longer than
        that while events wait above the safe position, log a warning naming the
        appending transaction that holds it (once per holder; see ``zdr.horizon.HorizonWatch``).
        """
        from zdr.horizon import HorizonWatch

        watch = None if horizon_warning_s is None else HorizonWatch(self.reader, horizon_warning_s)
        total = 0
        overtime = False

        began = time.monotonic()

        def done() -> bool:
            nonlocal overtime
            now = time.monotonic()
            if (
                not stop.is_set()
                and hand_over_after_s is not None
                and now - began >= hand_over_after_s
                and live_runner_wanted(conn)
            ):
                log.info(
                    "this live runner's %g s are over: handing over to the one that waits",
                    hand_over_after_s,
                )
                return True
            if stop.is_set() or deadline is None or now < deadline:
                return stop.is_set()
            if hand_over_by is None or now >= hand_over_by:
                return True
            if live_runner_wanted(conn):
                log.info("handing over to the live runner that waits to take over")
                return True
            if not overtime:
                overtime = True
                log.info("no live runner waits to take over yet: going on until one does")
            return False

        checked = time.monotonic()
        while not done():
            applied, work = self.batch(conn, batch_size)
            total += applied
            if time.monotonic() - checked >= LOCK_CHECK_S:
                require_live_runner_lock(conn)
                checked = time.monotonic()
            if on_batch is not None and applied:
                on_batch(applied)
            if on_tick is not None:
                on_tick()
            if watch is not None:
                if applied:
                    watch.progressed()
                else:
                    watch.idle(conn, resting=set(self._resting))
            if not work:
                stop.wait(poll_interval_s)
        return total

    def batch(self, conn: sa.Connection, batch_size: int) -> tuple[int, int]:
        """One batch to the live copies at the front, a share of it to each dual-writing
        replay there, and one slice to a target behind them; return (events the live
        copies at the front got, events applied to any target): the first is how far
        the live read models moved, the second says whether there is more to do.

        Each target goes from its own checkpoint. The live copies at the front (in
        steady state: all of them) share one read of up to ``batch_size`` events and
        are written first, whole. Every other target gets only what it can apply in
        about ``settings.slice_budget_s``, sized from its measured speed (and at most
        ``settings.catch_up_slice`` for one behind): a dual-writing replay takes a
        first part of the batch (the rest waits for it as a slice), a target behind
        the front (a new read model, a replay back from a pause) catches up by slices,
        one such target per batch in turn. So a slow projector costs the live read
        models at most its budget per batch, never its whole history. Those targets
        write in savepoints of their own (``_side_write``); one that stays behind is
        left out for ``settings.dual_write_retry_s``. A replay ahead of the live copies
        waits for them.
        """
        with conn.begin():
            # Held for this batch only; a swap waits for it and we wait for a swap.
            lock_live_batch(conn)
            now = time.monotonic()
            every = self.targets(conn)
            self._forget_plans_after_swap(conn, every)
            found = [t for t in every if self._resting.get(t.checkpoint, 0.0) <= now]
            if not found:
                return 0, 0
            live = [t for t in found if t.replay_key is None]
            front = max(t.cursor for t in live or found)
            leaders = [t for t in found if t.cursor == front]
            behind = [t for t in found if t.cursor < front]
            events = self.reader.read(conn, front, batch_size)
            live_applied = work = 0
            own_setting: str | None = None
            if events:
                # Live copies first; the last projector to see the events may have the originals.
                leaders.sort(key=lambda t: t.replay_key is not None)
                for i, target in enumerate(leaders):
                    shared = i < len(leaders) - 1
                    if target.replay_key is None:
                        if self._apply_live(conn, target, events, shared=shared):
                            live_applied = work = len(events)
                    else:
                        share = events[: self._slice(target, len(events))]
                        done, own_setting = self._side_write(
                            conn, target, share, shared=shared, own_setting=own_setting
                        )
                        work = max(work, done)
            if behind:
                self._turn = (self._turn + 1) % len(behind)
                target = sorted(behind, key=lambda t: t.checkpoint)[self._turn]
                reached = events[-1].cursor if events else front
                size = self._slice(target, self.settings.catch_up_slice)
                slice_ = self.reader.read(conn, target.cursor, size, until=reached)
                if slice_:
                    done, _ = self._side_write(
                        conn, target, slice_, shared=False, own_setting=own_setting
                    )
                    work += done
            return live_applied, work

    def _forget_plans_after_swap(self, conn: sa.Connection, targets: list[Target]) -> None:
        """After a promotion or rollback put another projector version live, drop the
        statements this connection prepared on the tables it replaced.

        The live tables keep their names across a swap but may change shape (a column
        added, a type changed): a statement prepared on the old shape would fail with
        "cached plan must not change result type".
        """
        versions = frozenset(
            (t.checkpoint, tuple(p.import_path() for p in t.projectors))
            for t in targets
            if t.replay_key is None
        )
        if self._versions is not None and versions != self._versions:
            forget_prepared_statements(conn)
        self._versions = versions

    def _apply_live(
        self, conn: sa.Connection, target: Target, events: Sequence[RecordedEvent], *, shared: bool
    ) -> bool:
        """Write a live copy at the front in a savepoint of its own, so that a projector
        that raises on an event leaves its read model behind (tried again after
        ``settings.failed_retry_s``) and never the others; return whether it was written.
        Any other error fails the batch, as before."""
        try:
            with conn.begin_nested():
                apply_batch(conn, target, events, shared=shared)
        except Exception as exc:
            if conn.invalidated or not conn.in_transaction():
                raise  # a lost connection fails the whole live batch (and is retried)
            if isinstance(exc, PrivilegeMissing):
                self._not_granted(conn, target, exc)
                return False
            if isinstance(exc, ProjectorError) and not is_transient(exc):
                self._broken(conn, target, exc)
                return False
            if is_transient(exc):  # a lock, a timeout: only this read model waits
                self._stay_behind(target, exc)
                return False
            raise
        self._written(conn, target)
        return True

    def _written(self, conn: sa.Connection, target: Target) -> None:
        """A live copy that stood still moved again: its recorded error goes (and a
        dual-writing replay's, recorded for a missing grant)."""
        if target.projection is not None and target.error is not None:
            records.clear_live_error(conn, target.projection)
            log.info("%s is written again", target.where)
            target.error = None
        if target.replay_key in self._not_granted_replays:
            records.set_error(conn, target.replay_key, None)
            self._not_granted_replays.discard(target.replay_key)
            log.info("%s is written again", target.where)

    def _slice(self, target: Target, most: int) -> int:
        """How many events ``target`` can apply in about ``settings.slice_budget_s``: from
        its measured seconds per event (``FIRST_SLICE`` while there is no measure yet)."""
        cost = self._cost.get(target.checkpoint)
        if cost is None:
            return max(1, min(most, FIRST_SLICE))
        return max(1, min(most, int(self.settings.slice_budget_s / max(cost, 1e-7))))

    def _side_write(
        self,
        conn: sa.Connection,
        target: Target,
        events: Sequence[RecordedEvent],
        *,
        shared: bool,
        own_setting: str | None,
    ) -> tuple[int, str]:
        """Apply to a target other than a live copy at the front, without ever making
        the live batch wait on it or fail for it; return (events applied, the live
        batch's own lock_timeout, read once).

        Its writes run in a savepoint under a short ``lock_timeout``. A lock timeout
        or another transient error rolls the savepoint back: the target stays behind
        (its checkpoint did not move) and catches up from its own checkpoint on a
        later batch. A projector's own error takes a replay out of dual write (state
        failed) and leaves a live read model that is catching up behind, tried again
        after ``settings.failed_retry_s``; the other read models go on.
        """
        if own_setting is None:
            own_setting = str(
                conn.exec_driver_sql("SELECT current_setting('lock_timeout')").scalar_one()
            )
        name = target.checkpoint
        started = time.perf_counter()
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (lock_timeout_setting(self.settings.dual_write_lock_timeout_s),),
                )
                apply_batch(conn, target, events, shared=shared)
                # SET LOCAL in a savepoint outlives its RELEASE (only ROLLBACK TO undoes
                # it): the rest of the live batch gets its own setting back.
                conn.exec_driver_sql("SELECT set_config('lock_timeout', %s, true)", (own_setting,))
        except Exception as exc:
            if isinstance(exc, PrivilegeMissing) and conn.in_transaction():
                self._not_granted(conn, target, exc)
                return 0, own_setting
            if isinstance(exc, ProjectorError) and not is_transient(exc):
                self._broken(conn, target, exc)
                return 0, own_setting
            if not is_transient(exc) or conn.invalidated or not conn.in_transaction():
                raise  # a lost connection fails the whole live batch, as anywhere else
            self._stay_behind(target, exc)
            return 0, own_setting
        took = (time.perf_counter() - started) / len(events)
        old = self._cost.get(name)
        self._cost[name] = took if old is None else (old + took) / 2
        if self._resting.pop(name, None) is not None and target.error is None:
            log.info("%s is written again", target.where)
        self._written(conn, target)
        return len(events), own_setting

    def _stay_behind(self, target: Target, exc: Exception) -> None:
        """A transient error (a lock, a timeout) in ``target``'s savepoint: it catches up
        from its own checkpoint on a later batch; the others do not wait for it."""
        if target.checkpoint not in self._resting:
            log.warning(
                "%s stays behind (its copy is locked or the database is busy: %s); it "
                "catches up from its own checkpoint, next try in %.1f s",
                target.where,
                one_line(exc),
                self.settings.dual_write_retry_s,
            )
        self._resting[target.checkpoint] = time.monotonic() + self.settings.dual_write_retry_s

    def _not_granted(self, conn: sa.Connection, target: Target, exc: PrivilegeMissing) -> None:
        """A grant is missing for ``target`` (its savepoint is rolled back): it stays
        behind, a replay in dual write too (nothing is wrong with its copy), and is
        tried again after ``settings.failed_retry_s``: once granted it catches up from
        its own checkpoint, with no restart."""
        if target.projection is not None:  # `zdr status` shows it until it is written
            records.set_live_error(conn, target.projection, str(exc), None)
        if target.replay_key is not None:  # so does the replay's record (state kept)
            records.set_error(conn, target.replay_key, str(exc))
            self._not_granted_replays.add(target.replay_key)
        if target.checkpoint not in self._resting or target.error != str(exc):
            log.error(
                "%s stays behind: %s; the other read models go on, and it is tried again "
                "every %.0f s",
                target.where,
                exc,
                self.settings.failed_retry_s,
            )
        target.error = str(exc)
        self._resting[target.checkpoint] = time.monotonic() + self.settings.failed_retry_s

    def _broken(self, conn: sa.Connection, target: Target, exc: ProjectorError) -> None:
        """A projector raised on an event of ``target`` (its savepoint is rolled back)."""
        if target.replay_key is not None:
            log.error("replay %r left dual write: %s", target.replay_key, exc)
            records.set_state(conn, target.replay_key, ReplayState.FAILED, error=str(exc))
            self._resting.pop(target.checkpoint, None)
            return
        if target.projection is not None:  # `zdr status` shows it until it is written
            records.set_live_error(conn, target.projection, str(exc), exc.position)
        if self._failed is not None:
            self._failed.append(exc)
        log.error(
            "%s stays behind: %s; the other read models go on, and it is tried again in "
            "%.0f s (fix the projector and restart the live runner)",
            target.where,
            exc,
            self.settings.failed_retry_s,
        )
        self._resting[target.checkpoint] = time.monotonic() + self.settings.failed_retry_s

    def targets(self, conn: sa.Connection) -> list[Target]:
        """Every live copy, then every dual-writing replay, each at its own checkpoint.

        A live projection whose projector cannot be loaded in this process (another
        process registered it) is left out, with one error in the log; a dual-writing
        replay whose projector cannot be loaded leaves dual write (state failed, the
        error names the path). Either way the other read models go on.
        """
        found = []
        for live in records.live_projections(conn):
            name, path = live.name, live.projector
            try:
                projector = self.registry.for_path(path)
            except Exception as exc:  # an import runs arbitrary code: anything may come out
                if path not in self._unloadable:
                    self._unloadable.add(path)
                    message = (
                        f"live projection {name!r} stands still: its projector {path} cannot "
                        f"be loaded by this live runner ({one_line(exc)}); the other read "
                        "models go on. Give the live runner that projector (zdr live -p "
                        "...) or make it importable"
                    )
                    log.error("%s", message)
                    records.set_live_error(conn, name, message, None)
                continue
            found.append(
                Target(
                    checkpoint=live_checkpoint(name),
                    projectors=[projector],
                    schema_map=None,
                    where=f"live projection {name!r}",
                    cursor=live.cursor,
                    projection=name,
                    error=live.error,
                )
            )
        for key in records.replay_keys(conn, ReplayState.DUAL_WRITING):
            replay = records.load_replay(conn, key, runs=False)
            unloadable = _unloadable(self.registry, replay)
            if unloadable is not None:
                log.error("replay %r left dual write: %s", key, unloadable)
                records.set_state(conn, key, ReplayState.FAILED, error=unloadable)
                self._resting.pop(replay_checkpoint(key), None)
                continue
            target = replay_target(self.registry, replay)
            if replay.error is not None:  # a dual-writing replay's error: a missing grant
                self._not_granted_replays.add(key)
            found.append(target)
        if self._ahead_pending:  # until none is left (zdr.ordering adds none after start)
            ahead = records.applied_ahead(conn)
            self._ahead_pending = bool(ahead)
            for target in found:
                target.ahead = ahead.get(target.checkpoint, frozenset())
        return found


def _unloadable(registry: Registry, replay: Replay) -> str | None:
    """Why one of the replay's projector classes cannot be loaded here (None: all can)."""
    for name, path in sorted(replay.projectors.items()):
        try:
            registry.for_path(path)
        except Exception as exc:  # an import runs arbitrary code: anything may come out
            return (
                f"projector {path} (projection {name!r}) of replay {replay.key!r} cannot be "
                f"loaded by the live runner: {one_line(exc)}. Make it importable in the live "
                f"runner's process, then `zdr replay {replay.key}` and `zdr enable-dual-write "
                f"{replay.key}`; a class defined in __main__ never is: remove the replay and "
                "create it again from a module"
            )
    return None

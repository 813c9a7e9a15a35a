"""ReplayManager: the replay life cycle and the live projection runner.

How the invariants of DESIGN.md are kept, in one place:

* Exactly once: every batch claims its target's checkpoint with a conditional
  UPDATE (``WHERE txid = old AND position = old``) and commits its read-model
  writes in the same transaction. A crash rolls both back; a second writer finds
  the checkpoint moved and fails instead of applying events twice.
* No skipped events: events are read by the (transaction id, position) cursor
  below the safe horizon (see ``zdr.store``).
* No gap at the switch to dual write: the live runner applies to each target
  from that target's own checkpoint. Switching dual write on only adds the
  replay to the runner's targets; whatever happened between the last replay
  batch and the switch is after the replay's checkpoint, so the runner applies it.
* Atomic promotion: one transaction swaps every schema of the replay, under the
  live-batch lock and a short ``lock_timeout``, retried with backoff and jitter,
  and only when the replay's checkpoint equals every live checkpoint.
* One runner per target: session advisory locks, see ``zdr.locks``.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd
import psycopg.errors
import sqlalchemy as sa

from zdr import catalog, records, targets
from zdr.config import make_engine
from zdr.errors import (
    ConfigurationError,
    DuplicateReplay,
    InvalidState,
    LockTimeout,
    NotSetUp,
    ProjectorError,
    ReplayLagging,
    ReplayNotFound,
    RunnerBusy,
    UnknownProjector,
)
from zdr.locks import LIVE_RUNNER, lock_live_batch, lock_setup, replay_lock_name, runner_lock
from zdr.names import validate_key
from zdr.projector import Projector, apply_events, check_projector, load_projector
from zdr.replay import (
    DUAL_WRITABLE,
    PROMOTABLE,
    REPLAYABLE,
    Progress,
    Replay,
    ReplayState,
    SwapReport,
)
from zdr.store import Cursor, EventReader, EventStore, RecordedEvent
from zdr.verify import VerificationReport, verify

log = logging.getLogger("zdr")

#: How often a running replay records a sample of its position and lag.
SAMPLE_EVERY_S = 1.0

T = TypeVar("T")
ProjectorRef = str | Projector


def _needs_setup(method: Callable[..., T]) -> Callable[..., T]:
    """Turn "relation zdr.x does not exist" into one clear instruction."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except sa.exc.ProgrammingError as exc:
            if isinstance(exc.orig, psycopg.errors.UndefinedTable) and "zdr." in str(exc.orig):
                raise NotSetUp(
                    "zdr is not set up in this database: call ReplayManager.setup() "
                    "(or run `zdr setup`) first"
                ) from exc
            raise

    return wrapper


@dataclass
class _Target:
    """One physical copy being written: its checkpoint row, projectors and schema map."""

    checkpoint: str
    projectors: list[Projector]
    schema_map: dict[str, str] | None
    where: str
    cursor: Cursor
    replay_key: str | None = None


class ReplayManager:
    """The replay life cycle (create, start, state, lag, dual write, promote, roll back,
    remove) and the live projection runner, over one PostgreSQL database.

    Safe to share between threads: every operation takes its own connection, and
    projectors must be stateless.
    """

    def __init__(
        self,
        url_or_engine: str | sa.Engine | None = None,
        *,
        projectors: Iterable[Projector] = (),
        batch_size: int = 10_000,
        lag_threshold: int = 1_000,
        lock_timeout: float = 0.5,
        swap_attempts: int = 8,
        reader: EventReader | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
        if lag_threshold < 0:
            raise ConfigurationError(f"lag_threshold must be 0 or more, got {lag_threshold}")
        if lock_timeout <= 0 or swap_attempts < 1:
            raise ConfigurationError("lock_timeout must be > 0 s and swap_attempts >= 1")
        self.engine = make_engine(url_or_engine)
        self.store = EventStore(self.engine)
        self.reader: EventReader = reader or self.store
        self.batch_size = batch_size
        self.lag_threshold = lag_threshold
        self.lock_timeout = lock_timeout
        self.swap_attempts = swap_attempts
        self._registered: dict[str, Projector] = {}
        self._by_path: dict[str, Projector] = {}
        self._paths_lock = threading.Lock()
        for projector in projectors:
            check_projector(projector)
            if projector.name in self._registered:
                raise ConfigurationError(f"two projectors are named {projector.name!r}")
            self._registered[projector.name] = projector
            self._by_path[projector.import_path()] = projector

    # -- set-up ----------------------------------------------------------------

    def setup(self) -> None:
        """Create the event table, zdr's metadata and the live tables of new projections.

        Idempotent. A projection that is already live keeps the projector version
        recorded for it; a different registered version is only used by replays.
        """
        with self.engine.begin() as conn:
            lock_setup(conn)
            self.store.create(conn)
            catalog.create(conn)
            for projector in self._registered.values():
                self._register_live(conn, projector)

    def _register_live(self, conn: sa.Connection, projector: Projector) -> None:
        live_path = conn.exec_driver_sql(
            "SELECT projector FROM zdr.projections WHERE name = %s", (projector.name,)
        ).scalar()
        path = projector.import_path()
        if live_path is None:
            targets.create_live(conn, projector)
            conn.exec_driver_sql(
                "INSERT INTO zdr.projections (name, projector, schemas) VALUES (%s, %s, %s)",
                (projector.name, path, projector.schemas()),
            )
            conn.exec_driver_sql(
                "INSERT INTO zdr.checkpoints (name) VALUES (%s)",
                (records.live_checkpoint(projector.name),),
            )
            log.info("projection %r is live with %s", projector.name, path)
        elif live_path != path:
            log.warning(
                "projection %r is live with %s; %s is registered and will be used by "
                "replays until one of them is promoted",
                projector.name,
                live_path,
                path,
            )

    # -- the live side ---------------------------------------------------------

    @_needs_setup
    def project_live(self, *, batch_size: int | None = None, max_batches: int | None = None) -> int:
        """Apply what is available to the live targets and dual-writing replays; return the count.

        Raises RunnerBusy at once if another live runner is running.
        """
        with self.engine.connect() as conn, self._live_runner(conn):
            return self._live_until_idle(conn, batch_size or self.batch_size, max_batches)

    @_needs_setup
    def follow(
        self,
        *,
        stop: threading.Event | None = None,
        poll_interval: float = 0.2,
        max_seconds: float | None = None,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Keep tailing the log until ``stop`` is set or ``max_seconds`` pass; return the count."""
        stop = stop or threading.Event()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        total = 0
        with self.engine.connect() as conn, self._live_runner(conn):
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                applied = self._live_until_idle(conn, batch_size or self.batch_size, 1)
                total += applied
                if on_batch is not None and applied:
                    on_batch(applied)
                if not applied:
                    stop.wait(poll_interval)
        return total

    def _live_runner(self, conn: sa.Connection) -> Any:
        return runner_lock(
            conn,
            LIVE_RUNNER,
            busy_message="another live runner is already running on this database "
            "(only one may apply events to the live read models)",
        )

    def _live_until_idle(
        self, conn: sa.Connection, batch_size: int, max_batches: int | None
    ) -> int:
        total = batches = 0
        while max_batches is None or batches < max_batches:
            applied = self._live_batch(conn, batch_size)
            if not applied:
                break
            total += applied
            batches += 1
        return total

    def _live_batch(self, conn: sa.Connection, batch_size: int) -> int:
        with conn.begin():
            # Held for this batch only; a swap waits for it and we wait for a swap.
            lock_live_batch(conn)
            live_targets = self._live_targets(conn)
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
                    self._apply(conn, target, todo)
                    continue
                # A broken new projector must not stop the live read model: its
                # replay leaves dual write (state failed) and live goes on.
                try:
                    with conn.begin_nested():
                        self._apply(conn, target, todo)
                except ProjectorError as exc:
                    log.error("replay %r left dual write: %s", target.replay_key, exc)
                    records.set_state(conn, target.replay_key, ReplayState.FAILED, error=str(exc))
            return len(events)

    def _live_targets(self, conn: sa.Connection) -> list[_Target]:
        found = [
            _Target(
                checkpoint=records.live_checkpoint(name),
                projectors=[self._projector_for_path(path)],
                schema_map=None,
                where=f"live projection {name!r}",
                cursor=Cursor(txid, position),
            )
            for name, path, txid, position in conn.exec_driver_sql(
                """SELECT p.name, p.projector, c.txid, c.position FROM zdr.projections p
                   JOIN zdr.checkpoints c ON c.name = 'live:' || p.name ORDER BY p.name"""
            )
        ]
        for key in conn.exec_driver_sql(
            "SELECT key FROM zdr.replays WHERE state = %s ORDER BY key",
            (ReplayState.DUAL_WRITING.value,),
        ).scalars():
            found.append(self._replay_target(records.load_replay(conn, key, runs=False)))
        return found

    # -- the replay life cycle -------------------------------------------------

    @_needs_setup
    def create_replay(self, key: str, projectors: Sequence[ProjectorRef]) -> Replay:
        """Validate, then clone the projectors' tables into side schemas of the replay's own.

        ``projectors`` are registered names, import paths (``pkg.mod:Class``) or
        Projector instances; a new version of a live projection is given by path
        or instance. Nothing is created when anything is refused.
        """
        validate_key(key)
        if isinstance(projectors, str | Projector) or not projectors:
            raise ConfigurationError("create_replay needs a non-empty list of projectors")
        resolved = [self._resolve(ref) for ref in projectors]
        names = [p.name for p in resolved]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"a replay rebuilds each projection once, got {names}")
        with self.engine.begin() as conn:
            if conn.exec_driver_sql("SELECT 1 FROM zdr.replays WHERE key = %s", (key,)).first():
                raise DuplicateReplay(f"a replay with key {key!r} already exists")
            schemas = self._check_coverage(conn, resolved)
            schema_map = {live: targets.side_schema(key, i) for i, live in enumerate(schemas, 1)}
            try:
                targets.clone(conn, resolved, schema_map)
            except sa.exc.ProgrammingError as exc:
                if isinstance(exc.orig, psycopg.errors.DuplicateSchema):
                    raise DuplicateReplay(
                        f"schema {exc.orig.diag.message_primary} of replay {key!r} is left over "
                        "from an earlier replay: drop it or choose another key"
                    ) from exc
                raise
            conn.exec_driver_sql(
                "INSERT INTO zdr.replays (key, state, projectors, schemas) VALUES (%s, %s, %s, %s)",
                (
                    key,
                    ReplayState.CREATED.value,
                    json.dumps({p.name: p.import_path() for p in resolved}),
                    json.dumps(schema_map),
                ),
            )
            conn.exec_driver_sql(
                "INSERT INTO zdr.checkpoints (name) VALUES (%s)", (records.replay_checkpoint(key),)
            )
            return records.load_replay(conn, key)

    @_needs_setup
    def ensure_replay(self, key: str, projectors: Sequence[ProjectorRef]) -> Replay:
        """The replay ``key`` rebuilding these projectors: created, or the existing one.

        For pipelines that are run again after a crash: the same key with the
        same projectors resumes; the same key with other projectors is refused.
        """
        validate_key(key)
        wanted = {p.name: p.import_path() for p in map(self._resolve, projectors)}
        existing = self.get_replay(key)
        if existing is None:
            try:
                return self.create_replay(key, projectors)
            except DuplicateReplay:  # created by a concurrent caller just now
                existing = self.get_replay(key)
                assert existing is not None
        building = existing.projectors
        if existing.state is ReplayState.LIVE:
            with self.engine.connect() as conn:
                building = dict(
                    conn.exec_driver_sql(
                        "SELECT name, projector FROM zdr.projections WHERE name = ANY(%s)",
                        (list(existing.projectors),),
                    ).all()
                )
        if building != wanted:
            raise DuplicateReplay(
                f"replay {key!r} already exists and rebuilds {_describe_paths(building)}, "
                f"not {_describe_paths(wanted)}: choose another key or remove it"
            )
        return existing

    @contextmanager
    def pipeline_lock(self, key: str) -> Iterator[None]:
        """Hold the replay's pipeline lock for a whole pipeline run (one run per key).

        Raises RunnerBusy at once if another pipeline run, in any process, holds it.
        """
        validate_key(key)
        with (
            self.engine.connect() as conn,
            runner_lock(
                conn,
                f"pipeline:{key}",
                busy_message=f"a pipeline run for replay {key!r} is already running "
                "(one at a time per key)",
            ),
        ):
            yield

    def _check_coverage(self, conn: sa.Connection, projectors: list[Projector]) -> list[str]:
        """The live schemas a replay swaps; refuse one that would swap others' tables away."""
        live = {
            name: list(schemas)
            for name, schemas in conn.exec_driver_sql("SELECT name, schemas FROM zdr.projections")
        }
        wanted: set[str] = set()
        for projector in projectors:
            if projector.name not in live:
                raise UnknownProjector(
                    f"no live projection named {projector.name!r}: register its projector "
                    "with the ReplayManager and call setup() first"
                )
            if projector.schemas() != sorted(live[projector.name]):
                raise ConfigurationError(
                    f"projector {projector.import_path()} writes schemas {projector.schemas()} "
                    f"but the live projection {projector.name!r} is in "
                    f"{sorted(live[projector.name])}"
                )
            wanted.update(projector.schemas())
        included = {p.name for p in projectors}
        for name, schemas in live.items():
            shared = wanted.intersection(schemas)
            if name not in included and shared:
                raise ConfigurationError(
                    f"schema {sorted(shared)[0]!r} also holds projection {name!r}: a replay "
                    "swaps whole schemas, so include that projection in the replay"
                )
        return sorted(wanted)

    @_needs_setup
    def start_replay(
        self,
        key: str,
        *,
        restart: bool = False,
        batch_size: int | None = None,
        max_events: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Replay:
        """Replay history into the replay's copy, from its checkpoint up to the head as of now.

        Resumable: after a crash or kill, call it again and it goes on from the
        last committed batch. ``restart=True`` empties the copy and starts from zero.
        ``max_events`` stops after the batch that reaches it (state stays
        ``replaying``; call again to go on), so a caller can cut a long replay
        into retryable pieces. Raises RunnerBusy if the replay is being run
        elsewhere, ProjectorError (state failed, checkpoint at the last good
        batch) if a projector raises.
        """
        validate_key(key)
        with self.engine.connect() as conn, self._replay_runner(conn, key):
            with conn.begin():
                replay = records.load_replay(conn, key, lock=True)
                _require(replay, REPLAYABLE, "start_replay")
                if restart:
                    targets.truncate(conn, replay.schemas)
                    conn.exec_driver_sql(
                        """UPDATE zdr.checkpoints SET txid = 0, position = 0, events_applied = 0,
                           updated_at = now() WHERE name = %s""",
                        (records.replay_checkpoint(key),),
                    )
                    replay = records.load_replay(conn, key)
                head = self.reader.horizon(conn)
                total = self.reader.count_after(conn, Cursor(replay.txid, replay.position))
                records.set_state(conn, key, ReplayState.REPLAYING)
                run_id = records.start_run(conn, key, "replay", replay.position)
            target = self._replay_target(replay)
            finished = self._run_batches(
                conn,
                target,
                run_id=run_id,
                batch_size=batch_size or self.batch_size,
                below_txid=head,
                max_events=max_events,
                on_progress=on_progress,
                total=total,
            )
            with conn.begin():
                if finished:
                    records.set_state(conn, key, ReplayState.CAUGHT_UP, stamp="caught_up_at")
                records.finish_run(conn, run_id, "succeeded")
                return records.load_replay(conn, key)

    def _run_batches(
        self,
        conn: sa.Connection,
        target: _Target,
        *,
        run_id: int,
        batch_size: int,
        below_txid: int | None = None,
        until: Cursor | None = None,
        max_events: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        total: int = 0,
    ) -> bool:
        """Batches of short transactions, each committing writes and checkpoint together.

        The next batch is read on a second connection while this one is applied
        (reading and decoding is half the work). That is safe: each batch still
        claims the checkpoint it starts from, so a batch read ahead is applied only
        after the one before it committed, and thrown away otherwise.
        True when it ran out of events, False when it stopped at ``max_events``.
        """

        def read_after(cursor: Cursor) -> list[RecordedEvent]:
            with self.engine.connect() as reader, reader.begin():
                return self.reader.read(
                    reader, cursor, batch_size, until=until, below_txid=below_txid
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
                        self._sample(conn, target.replay_key, lag=None)
                    return True
                upcoming = read_ahead.submit(read_after, events[-1].cursor)
                with conn.begin():
                    self._apply(conn, target, events)
                    conn.exec_driver_sql(
                        "UPDATE zdr.runs SET events = events + %s, to_position = %s WHERE id = %s",
                        (len(events), events[-1].position, run_id),
                    )
                    if time.monotonic() - sampled >= SAMPLE_EVERY_S:
                        # The lag as known at the start minus what was done since:
                        # a count per sample would cost as much as a batch.
                        self._sample(
                            conn, target.replay_key, lag=max(total - done - len(events), 0)
                        )
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
            self._record_failure(conn, target, run_id, exc, ReplayState.FAILED)
            raise
        except BaseException as exc:
            self._record_failure(conn, target, run_id, exc, None)
            raise
        finally:
            read_ahead.shutdown(wait=True, cancel_futures=True)
        return False

    def _record_failure(
        self,
        conn: sa.Connection,
        target: _Target,
        run_id: int,
        exc: BaseException,
        state: ReplayState | None,
    ) -> None:
        """Write down why a run stopped, if the database still answers."""
        try:
            if conn.in_transaction():
                conn.rollback()
            with conn.begin():
                message = f"{type(exc).__name__}: {exc}"
                if state is not None and target.replay_key is not None:
                    records.set_state(conn, target.replay_key, state, error=message)
                records.finish_run(conn, run_id, "failed", error=message)
        except Exception:  # the original error matters more than the bookkeeping
            log.warning("could not record the failure of run %s", run_id, exc_info=True)

    def _apply(self, conn: sa.Connection, target: _Target, events: Sequence[RecordedEvent]) -> None:
        """Claim the checkpoint, then write; both commit or roll back with the caller."""
        last = events[-1].cursor
        claimed = conn.exec_driver_sql(
            """UPDATE zdr.checkpoints SET txid = %s, position = %s,
                   events_applied = events_applied + %s, updated_at = now()
               WHERE name = %s AND txid = %s AND position = %s""",
            (last.txid, last.position, len(events), target.checkpoint, *target.cursor),
        ).rowcount
        if claimed != 1:
            raise RunnerBusy(
                f"the checkpoint of {target.where} moved under this runner: another runner "
                "wrote to it; nothing was applied"
            )
        try:
            targets.translated(conn, target.schema_map)
            for projector in target.projectors:
                apply_events(projector, events, conn, where=target.where)
        finally:
            targets.translated(conn, None)

    @_needs_setup
    def get_replay(self, key: str) -> Replay | None:
        """The replay's state, checkpoint, counts and runs; None for an unknown key."""
        validate_key(key)
        with self.engine.connect() as conn:
            try:
                return records.load_replay(conn, key)
            except ReplayNotFound:
                return None

    @_needs_setup
    def list_replays(self) -> list[Replay]:
        """Every replay, oldest first."""
        with self.engine.connect() as conn:
            keys = conn.exec_driver_sql("SELECT key FROM zdr.replays ORDER BY created_at, key")
            return [records.load_replay(conn, key) for key in keys.scalars().all()]

    @_needs_setup
    def get_replay_lag(self, key: str) -> int:
        """How many committed events sort after the replay's checkpoint (index-only count)."""
        validate_key(key)
        with self.engine.connect() as conn:
            replay = records.load_replay(conn, key, runs=False)
            return self.reader.count_after(conn, Cursor(replay.txid, replay.position))

    @_needs_setup
    def verify(
        self, key: str, *, max_differences: int = 20, chunk_rows: int = 50_000
    ) -> VerificationReport:
        """Compare the replay's copy with the live copy in one snapshot (see zdr.verify)."""
        validate_key(key)
        with self.engine.connect() as conn:
            replay = records.load_replay(conn, key, runs=False)
            live = dict(conn.exec_driver_sql("SELECT name, projector FROM zdr.projections").all())
        return verify(
            self.engine, replay, live, max_differences=max_differences, chunk_rows=chunk_rows
        )

    @_needs_setup
    def start_projecting_to_replay(self, key: str, *, lag_threshold: int | None = None) -> Replay:
        """Switch dual write on: from now on the live runner also writes the replay's copy.

        Refused (ReplayLagging) when more than ``lag_threshold`` events are still to
        replay. No event can fall through the switch: the live runner continues
        the replay from the replay's own checkpoint, whatever happened since.
        """
        validate_key(key)
        threshold = self.lag_threshold if lag_threshold is None else lag_threshold
        with self.engine.connect() as conn, self._replay_runner(conn, key), conn.begin():
            replay = records.load_replay(conn, key, lock=True)
            _require(replay, DUAL_WRITABLE, "start_projecting_to_replay")
            lag = self.reader.count_after(conn, Cursor(replay.txid, replay.position))
            if lag > threshold:
                raise ReplayLagging(
                    f"replay {key!r} is {lag} events behind (threshold {threshold}): run "
                    "start_replay again to catch up before switching dual write on",
                    lag=lag,
                )
            records.set_state(conn, key, ReplayState.DUAL_WRITING, stamp="dual_write_at")
            return records.load_replay(conn, key)

    @_needs_setup
    def put_replay_live(self, key: str) -> SwapReport:
        """Make the replay's copy the live one, atomically; keep the previous copy for rollback.

        Refused unless the replay is at exactly the live position. Readers see the
        old rows until the commit and the new rows after it. If the locks cannot be
        had within ``lock_timeout`` after ``swap_attempts`` tries, raises LockTimeout
        and nothing changes.
        """
        validate_key(key)

        def promote(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True, runs=False)
            _require(replay, PROMOTABLE, "put_replay_live")
            self._require_at_live_position(conn, replay)
            return self._swap(conn, replay, ReplayState.LIVE, "promoted_at", "promote")

        with self.engine.connect() as conn, self._replay_runner(conn, key):
            return self._with_swap_lock(conn, key, "promote", promote).report

    @_needs_setup
    def rollback(self, key: str, *, batch_size: int | None = None) -> SwapReport:
        """Make the previous live copy live again, brought up to date with its own projector."""
        validate_key(key)
        with self.engine.connect() as conn, self._replay_runner(conn, key):
            with conn.begin():
                replay = records.load_replay(conn, key, lock=True)
                _require(replay, {ReplayState.LIVE}, "rollback")
                live_at = self._common_live_position(conn, replay)
                run_id = records.start_run(conn, key, "rollback catch-up", replay.position)
            target = self._replay_target(replay, where=f"previous live copy of replay {key!r}")
            # Most of the way outside the swap lock, in batches; the rest inside it.
            self._run_batches(
                conn, target, run_id=run_id, batch_size=batch_size or self.batch_size, until=live_at
            )
            with conn.begin():
                records.finish_run(conn, run_id, "succeeded")

            def roll_back(conn: sa.Connection) -> Replay:
                current = records.load_replay(conn, key, lock=True, runs=False)
                _require(current, {ReplayState.LIVE}, "rollback")
                live_now = self._common_live_position(conn, current)
                target.cursor = Cursor(current.txid, current.position)
                while target.cursor < live_now:
                    events = self.reader.read(conn, target.cursor, self.batch_size, until=live_now)
                    if not events:
                        break
                    self._apply(conn, target, events)
                    target.cursor = events[-1].cursor
                current = records.load_replay(conn, key, runs=False)
                self._require_at_live_position(conn, current)
                return self._swap(
                    conn, current, ReplayState.ROLLED_BACK, "rolled_back_at", "rollback"
                )

            return self._with_swap_lock(conn, key, "roll back", roll_back).report

    @_needs_setup
    def remove_replay(self, key: str) -> Replay:
        """Drop the replay's copy (after promotion: the previous live copy) and its metadata.

        Never touches live tables. Refused (DependentObjects) if objects zdr did not
        create depend on the copy.
        """
        validate_key(key)

        def stop_dual_write(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True)
            if replay.state is ReplayState.DUAL_WRITING:
                records.set_state(conn, key, ReplayState.CAUGHT_UP)
            return replay

        def drop(conn: sa.Connection) -> Replay:
            replay = records.load_replay(conn, key, lock=True, runs=False)
            targets.drop(conn, list(replay.schemas.values()))
            conn.exec_driver_sql("DELETE FROM zdr.replays WHERE key = %s", (key,))
            conn.exec_driver_sql(
                "DELETE FROM zdr.checkpoints WHERE name = %s", (records.replay_checkpoint(key),)
            )
            return replay

        with self.engine.connect() as conn, self._replay_runner(conn, key):
            before = self._with_swap_lock(conn, key, "remove", stop_dual_write)
            self._with_swap_lock(conn, key, "remove", drop, live_batch=False)
        return dataclasses.replace(before.value, state=ReplayState.REMOVED)

    # -- swapping ----------------------------------------------------------------

    def _swap(
        self, conn: sa.Connection, replay: Replay, state: ReplayState, stamp: str, kind: str
    ) -> Replay:
        """Exchange live and side copies (data and projector versions) of every schema."""
        targets.preflight(conn, replay.schemas)
        targets.copy_grants(conn, replay.schemas)
        targets.swap(conn, replay.schemas)
        swapped = {}
        for name, side_path in replay.projectors.items():
            swapped[name] = conn.exec_driver_sql(
                """UPDATE zdr.projections p SET projector = %s, updated_at = now()
                   FROM zdr.projections old WHERE p.name = %s AND old.name = p.name
                   RETURNING old.projector""",
                (side_path, name),
            ).scalar_one()
        conn.exec_driver_sql(
            "UPDATE zdr.replays SET projectors = %s WHERE key = %s",
            (json.dumps(swapped), replay.key),
        )
        records.set_state(conn, replay.key, state, stamp=stamp)
        run_id = records.start_run(conn, replay.key, kind, replay.position)
        records.finish_run(conn, run_id, "succeeded", to_position=replay.position)
        return records.load_replay(conn, replay.key)

    def _with_swap_lock(
        self,
        conn: sa.Connection,
        key: str,
        what: str,
        body: Callable[[sa.Connection], Replay],
        *,
        live_batch: bool = True,
    ) -> _Swapped:
        """Run ``body`` in one transaction under a short lock_timeout, retried with backoff.

        The live-batch lock makes the transaction wait for the live batch in flight
        (milliseconds) and keeps the next one out until commit. Readers of the read
        models take no lock that conflicts with it.
        """
        timeout_ms = max(int(self.lock_timeout * 1000), 1)
        last: Exception | None = None
        for attempt in range(1, self.swap_attempts + 1):
            started = time.perf_counter()
            try:
                with conn.begin():
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{timeout_ms}ms'")
                    if live_batch:
                        lock_live_batch(conn)
                    locked = time.perf_counter()
                    replay = body(conn)
                return _Swapped(
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
            except sa.exc.OperationalError as exc:
                if not isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                    raise
                last = exc
                pause = min(0.05 * 2**attempt, 2.0) * random.uniform(0.5, 1.0)
                log.info(
                    "%s %r: locks busy (attempt %d), retrying in %.2fs", what, key, attempt, pause
                )
                time.sleep(pause)
        raise LockTimeout(
            f"could not {what} replay {key!r}: the locks were busy for {self.swap_attempts} "
            f"attempts of {self.lock_timeout}s each; nothing was changed"
        ) from last

    def _require_at_live_position(self, conn: sa.Connection, replay: Replay) -> None:
        at = Cursor(replay.txid, replay.position)
        for name, cursor in self._live_positions(conn, replay.projections).items():
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

    def _common_live_position(self, conn: sa.Connection, replay: Replay) -> Cursor:
        positions = set(self._live_positions(conn, replay.projections).values())
        if len(positions) != 1:
            raise InvalidState(
                f"the live projections of replay {replay.key!r} are at different positions: "
                "run the live runner until they agree"
            )
        return positions.pop()

    def _live_positions(self, conn: sa.Connection, names: list[str]) -> dict[str, Cursor]:
        rows = conn.exec_driver_sql(
            "SELECT name, txid, position FROM zdr.checkpoints WHERE name = ANY(%s)",
            ([records.live_checkpoint(n) for n in names],),
        )
        return {name.removeprefix("live:"): Cursor(txid, pos) for name, txid, pos in rows}

    # -- records -----------------------------------------------------------------

    def _replay_runner(self, conn: sa.Connection, key: str) -> Any:
        return runner_lock(
            conn,
            replay_lock_name(key),
            busy_message=f"replay {key!r} is busy: another run holds it (one runner per replay)",
        )

    def _replay_target(self, replay: Replay, *, where: str | None = None) -> _Target:
        return _Target(
            checkpoint=records.replay_checkpoint(replay.key),
            projectors=[self._projector_for_path(p) for _, p in sorted(replay.projectors.items())],
            schema_map=dict(replay.schemas),
            where=where or f"replay {replay.key!r}",
            cursor=Cursor(replay.txid, replay.position),
            replay_key=replay.key,
        )

    def _sample(self, conn: sa.Connection, key: str | None, *, lag: int | None) -> None:
        """Record where the replay stands as of this transaction (lag None: count it)."""
        if key is None:
            return
        if lag is None:
            lag = self.reader.count_after(conn, records.replay_cursor(conn, key))
        records.add_sample(conn, key, lag)

    @_needs_setup
    def lag_history(self, key: str, *, since: dt.datetime | None = None) -> pd.DataFrame:
        """Samples of the replay's position, events applied and lag over time, with the rate.

        Columns: at, position, events_applied, lag, events_per_s (between samples).
        """
        validate_key(key)
        with self.engine.connect() as conn:
            records.load_replay(conn, key, runs=False)
            history = records.samples(conn, key, since)
        history["at"] = pd.to_datetime(history["at"], utc=True)
        seconds = history["at"].diff().dt.total_seconds()
        history["events_per_s"] = (history["events_applied"].diff() / seconds).fillna(0.0)
        return history

    # -- projectors ----------------------------------------------------------------

    def _resolve(self, ref: ProjectorRef) -> Projector:
        if isinstance(ref, Projector):
            check_projector(ref)
            with self._paths_lock:
                # Later runs in this process (dual write, rollback) use this very instance.
                return self._by_path.setdefault(ref.import_path(), ref)
        if not isinstance(ref, str):
            raise UnknownProjector(
                f"{ref!r} is neither a projector name, an import path nor a Projector"
            )
        if ":" in ref:
            return self._projector_for_path(ref)
        validate_key(ref, what="projector name")
        if ref in self._registered:
            return self._registered[ref]
        with self.engine.connect() as conn:
            path = conn.exec_driver_sql(
                "SELECT projector FROM zdr.projections WHERE name = %s", (ref,)
            ).scalar()
        if path is None:
            known = sorted(self._registered) or ["(none registered)"]
            raise UnknownProjector(f"unknown projector {ref!r}; known: {', '.join(known)}")
        return self._projector_for_path(path)

    def _projector_for_path(self, path: str) -> Projector:
        with self._paths_lock:
            projector = self._by_path.get(path)
            if projector is None:
                projector = load_projector(path)
                self._by_path[path] = projector
            return projector


@dataclass(frozen=True)
class _Swapped:
    value: Replay
    report: SwapReport


def _require(replay: Replay, allowed: Iterable[ReplayState], operation: str) -> None:
    allowed = set(allowed)
    if replay.state not in allowed:
        raise InvalidState(
            f"{operation} is not allowed for replay {replay.key!r} in state "
            f"{replay.state.value!r} (allowed: {', '.join(sorted(s.value for s in allowed))})"
        )


def _describe_paths(paths: dict[str, str]) -> str:
    return ", ".join(f"{name} with {path}" for name, path in sorted(paths.items()))

"""ReplayManager: the replay life cycle and the live runner, behind one facade.

The facade validates input, takes the runner lock a step needs, translates
database errors, and delegates. Where each invariant of DESIGN.md is kept:

=====================================  ==========================================
invariant                              where
=====================================  ==========================================
exactly once                           ``zdr.runner.apply_batch`` (checkpoint claim,
                                       ``zdr.records.claim_checkpoint``)
no skipped events                      ``zdr.store`` (the safe position: appends
                                       announce themselves)
no gap at the switch to dual write     ``zdr.runner.LiveRunner`` (each target from
                                       its own checkpoint)
atomic promotion                       ``zdr.promotion`` (one transaction, schema
                                       rename, lock retry) and ``zdr.targets.swap``
nothing dropped by surprise            ``zdr.promotion.Promotion.remove``,
                                       ``zdr.targets.drop``
one runner per target                  ``zdr.locks`` (session advisory locks)
no SQL from raw input                  ``zdr.names`` (validation), identifiers
                                       quoted by psycopg everywhere
clear errors                           ``zdr.errors``; translated here
=====================================  ==========================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg.errors
import sqlalchemy as sa

from zdr import catalog, cluster, locks, records, reports, targets
from zdr.config import describe, make_engine
from zdr.errors import (
    ConfigurationError,
    DuplicateReplay,
    InvalidState,
    LiveLagging,
    NotPartitionable,
    NotSetUp,
    ReplayLagging,
    ReplayNotFound,
    RunnerBusy,
    cannot_connect,
    interrupted,
    is_transient,
    one_line,
    privilege_missing,
)
from zdr.horizon import Horizon, inspect_horizon
from zdr.locks import (
    PipelineLock,
    Wait,
    end_session,
    live_runner,
    lock_setup,
    pipeline_runner,
    replay_runner,
    under_short_lock_timeout,
)
from zdr.names import (
    live_checkpoint,
    partition_checkpoint,
    replay_checkpoint,
    side_schema,
    validate_key,
)
from zdr.partitions import PartitionPlan, PartitionReader, PartitionRun, why_not_partitioned
from zdr.projector import Projector
from zdr.promotion import Promotion
from zdr.registry import (
    ProjectorRef,
    Registry,
    check_coverage,
    describe_paths,
    register_live,
    require_own_tables,
)
from zdr.replay import (
    FOLLOWING,
    MOVING,
    Progress,
    Replay,
    ReplayState,
    SwapReport,
    require_state,
)
from zdr.runner import BatchRun, LiveRunner, ReadAhead, replay_target
from zdr.settings import DEFAULTS, Settings, seconds, whole
from zdr.store import Cursor, EventReader, EventStore, Partition, mark_runner_transaction
from zdr.verify import VerificationReport, verify

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
log = logging.getLogger("zdr")

#: At most this many partitions per replay (``plan_partitions``).
MAX_PARTITIONS = 256

#: A live runner that lost its connection tries again after this long, doubling up to
#: RECONNECT_MAX_S, and waits up to RECONNECT_TAKE_OVER_S for the server to let go of
#: the lock its lost session held.
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 5.0
RECONNECT_TAKE_OVER_S = 10.0
#: ``wait_for_live`` waits this long for a live runner to start before it says none runs.
RUNNER_START_S = 5.0

#: Connected this long without a failure, a live runner's next reconnect starts from
#: RECONNECT_FIRST_S again (a failure that comes back at once keeps doubling the pause).
RECONNECT_HEALTHY_S = 30.0

__all__ = ["ProjectorRef", "ReplayManager"]


def _by_transaction_id(reader: EventReader) -> bool:
    return bool(getattr(reader, "transaction_ids", True))


def _settled(reader: EventReader, conn: sa.Connection, point: Cursor) -> bool:
    """Whether no event up to ``point`` can still commit (a reader without a safe
    position reads only what is settled)."""
    safe_position = getattr(reader, "safe_position", None)
    return safe_position is None or safe_position(conn) >= point.position


def _require_same_cluster(conn: sa.Connection, reader: EventReader) -> None:
    with conn.begin():
        cluster.require_same(conn, reader)


@contextmanager
def _privileges_named(engine: sa.Engine) -> Iterator[None]:
    """A refused privilege as PrivilegeMissing, where ``_translate_errors`` is not used."""
    try:
        yield
    except (sa.exc.DBAPIError, psycopg.Error) as exc:
        missing = privilege_missing(exc, engine.url.username)
        if missing is not None:
            raise missing from exc
        raise


def _translate_errors(method: Callable[..., T]) -> Callable[..., T]:
    """The one boundary where database errors become zdr errors.

    A missing table of zdr's own (SQLSTATE 42P01, and the catalog confirms that
    zdr is not set up) becomes NotSetUp with the instruction to fix it.
    """

    @functools.wraps(method)
    def wrapper(self: ReplayManager, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (sa.exc.DBAPIError, psycopg.Error) as exc:
            failed = cannot_connect(exc, describe(str(self.engine.url)))
            if failed is not None:
                raise failed from exc
            # SQLAlchemy wraps the driver's error; the hot path (psycopg directly) does not.
            cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
            if isinstance(cause, psycopg.errors.UndefinedTable) and not self._is_set_up():
                raise NotSetUp(
                    "zdr is not set up in this database: call ReplayManager.setup() "
                    "(or run `zdr setup`) first"
                ) from exc
            missing = privilege_missing(exc, self.engine.url.username)
            if missing is not None:
                raise missing from exc
            if not is_transient(exc):
                raise
            subject = f" {args[0]!r}" if args and isinstance(args[0], str) else ""
            raise interrupted(f"{method.__name__}{subject}", exc) from exc

    return wrapper


class ReplayManager:
    """The replay life cycle (create, replay, state, lag, dual write, promote, roll back,
    remove) and the live projection runner, over one PostgreSQL database.

    Safe to share between threads: every operation takes its own connection, and
    projectors must be stateless. ``settings`` holds the tuning; the keyword
    arguments ``batch_size``, ``lag_threshold``, ``lock_timeout`` (seconds) and
    ``swap_attempts`` override it one by one. ``reader``: the event log, when it is
    not zdr's own ``zdr.events`` (``zdr.readers``: an application's table, an
    eventsourcing application's notifications); a database's checkpoints belong to
    one log.
    """

    def __init__(
        self,
        url_or_engine: str | sa.Engine | None = None,
        *,
        projectors: Iterable[Projector] = (),
        settings: Settings = DEFAULTS,
        batch_size: int | None = None,
        lag_threshold: int | None = None,
        lock_timeout: float | None = None,
        swap_attempts: int | None = None,
        reader: EventReader | None = None,
    ) -> None:
        overrides = {
            "batch_size": batch_size,
            "lag_threshold": lag_threshold,
            "lock_timeout_s": lock_timeout,
            "swap_attempts": swap_attempts,
        }
        if not isinstance(settings, Settings):
            raise ConfigurationError(f"settings must be a zdr.Settings, got {settings!r}")
        self.engine = make_engine(url_or_engine)
        self.store = EventStore(self.engine)
        self.reader: EventReader = reader or self.store
        self.registry = Registry(projectors)
        self._live = LiveRunner(self.reader, self.registry, settings)
        #: Per replay key, the batch its last bounded run read ahead and did not apply.
        self._left_over: dict[str, ReadAhead] = {}
        self._promotion = Promotion(self.engine, self.reader, self.registry, settings)
        self.settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})

    @property
    def settings(self) -> Settings:
        """The tuning in force; assign a new ``Settings`` (or set one of the attributes
        below) to change it for every later operation."""
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        if not isinstance(settings, Settings):
            raise ConfigurationError(f"settings must be a zdr.Settings, got {settings!r}")
        self._settings = settings
        self._promotion.settings = settings
        self._live.settings = settings
        self.store.max_batch_bytes = settings.batch_max_bytes
        if hasattr(self.reader, "max_batch_bytes"):  # a reader of zdr's (zdr.readers)
            setattr(self.reader, "max_batch_bytes", settings.batch_max_bytes)  # noqa: B010

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.settings = self.settings.replace(batch_size=value)

    @property
    def lag_threshold(self) -> int:
        return self.settings.lag_threshold

    @lag_threshold.setter
    def lag_threshold(self, value: int) -> None:
        self.settings = self.settings.replace(lag_threshold=value)

    @property
    def lock_timeout(self) -> float:
        """Seconds (``settings.lock_timeout_s``)."""
        return self.settings.lock_timeout_s

    @lock_timeout.setter
    def lock_timeout(self, value: float) -> None:
        self.settings = self.settings.replace(lock_timeout_s=value)

    @property
    def swap_attempts(self) -> int:
        return self.settings.swap_attempts

    @swap_attempts.setter
    def swap_attempts(self, value: int) -> None:
        self.settings = self.settings.replace(swap_attempts=value)

    def _batch_size(self, batch_size: int | None) -> int:
        """A call's own batch size (validated like the setting), else the setting."""
        if batch_size is None:
            return self.settings.batch_size
        return self.settings.replace(batch_size=batch_size).batch_size

    # -- set-up ----------------------------------------------------------------

    def setup(self) -> None:
        """Create the event table, zdr's metadata and the live tables of new projections.

        Idempotent. A projection that is already live keeps the projector version
        recorded for it; a different registered version is only used by replays.
        Raises LockTimeout if what it must create stayed locked for ``swap_attempts``
        tries of ``lock_timeout_s`` (nothing is created then).
        """

        def create(conn: sa.Connection) -> None:
            lock_setup(conn)
            self.store.create(conn)
            catalog.create(conn)
            cluster.require_same_log(conn, self.reader)
            for projector in self.registry.registered:
                register_live(conn, projector)

        # What is missing is created under the short lock timeout of a swap: DDL on a
        # live event table (a trigger or index added by an upgrade) that waited for an
        # open application transaction would make every append after it wait too.
        with self.engine.connect() as conn, _privileges_named(self.engine):
            under_short_lock_timeout(
                conn,
                create,
                lock_timeout_s=self.settings.lock_timeout_s,
                attempts=self.settings.swap_attempts,
                what="set up zdr",
            )

    # -- the live side ---------------------------------------------------------

    @_translate_errors
    def project_live(self, *, batch_size: int | None = None, max_batches: int | None = None) -> int:
        """Apply what is available to the live targets and dual-writing replays; return the count.

        Raises RunnerBusy at once if another live runner is running.
        """
        with self.engine.connect() as conn, live_runner(conn):
            _require_same_cluster(conn, self.reader)
            return self._live.until_idle(conn, self._batch_size(batch_size), max_batches)

    @_translate_errors
    def follow(
        self,
        *,
        stop: threading.Event | None = None,
        poll_interval: float = 0.2,
        max_seconds: float | None = None,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        take_over: bool = False,
        overtime_s: float = 0.0,
        on_tick: Callable[[], None] | None = None,
        hand_over_after_s: float | None = None,
    ) -> int:
        """Keep tailing the log until ``stop`` is set or ``max_seconds`` pass; return the count.

        With ``take_over``, a live runner that is running already is waited for and
        taken over within 50 ms of its end, instead of raising RunnerBusy at once;
        and with ``overtime_s`` too, this runner goes on past ``max_seconds`` until
        another one waits to take over from it (at most ``overtime_s`` longer). Runs
        that overlap thus hand over with no gap even when the next one is late: the
        scheduled live-projection flow works this way. ``on_tick``: called in this
        thread after every round while this runner holds the lock (about every
        ``poll_interval``); it must return at once. ``hand_over_after_s``: that long
        after taking the lock, hand over to a runner that waits for it (checked on
        this runner's own connection just before it lets go), and go on while none
        waits: a standby's way.
        """
        overtime_s = seconds("overtime_s", overtime_s)
        if max_seconds is not None:
            max_seconds = seconds("max_seconds", max_seconds)
        started = time.monotonic()
        deadline = None if max_seconds is None else started + max_seconds
        wait = hand_over_by = None
        if take_over:
            last = math.inf if deadline is None else deadline + overtime_s
            wait = Wait(until=last, stop=stop)
            hand_over_by = last if overtime_s and deadline is not None else None
        poll_interval = seconds("poll_interval", poll_interval, above_zero=True)
        stop = stop or threading.Event()
        applied = 0

        def count(n: int) -> None:
            nonlocal applied
            applied += n
            if on_batch is not None:
                on_batch(n)

        pause = RECONNECT_FIRST_S
        running = False
        session: int | None = None  # this runner's last database session
        connected = 0.0
        while True:
            try:
                with self.engine.connect() as conn, contextlib.ExitStack() as held:
                    was_running = running

                    def locked() -> None:
                        # From here on this runner holds the lock, seen by all as the
                        # live runner: a connection lost from now on (even before its
                        # first batch) is reconnected, not raised.
                        nonlocal running, connected, session
                        running, connected = True, time.monotonic()
                        session = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]

                    try:
                        # Back after a lost connection: the lock died with it, unless
                        # the server has not noticed yet; wait that long for it.
                        again = Wait(until=time.monotonic() + RECONNECT_TAKE_OVER_S, stop=stop)
                        held.enter_context(
                            live_runner(conn, again if running else wait, on_locked=locked)
                        )
                    except RunnerBusy:
                        if running and session is not None and end_session(conn, session):
                            # Its own old session, cut off from it (the network): the
                            # server had not noticed. Ended, the lock is free again.
                            log.warning(
                                "the live runner's old session (pid %d) still held its lock: "
                                "ended it",
                                session,
                            )
                            session = None
                            continue
                        if stop.is_set() or running:
                            if running:
                                log.warning(
                                    "another live runner took over while this one "
                                    "reconnected: this one ends"
                                )
                            return applied
                        raise
                    if was_running:
                        log.warning("the live runner is connected again and goes on")
                    _require_same_cluster(conn, self.reader)
                    self._live.follow(
                        conn,
                        stop=stop,
                        poll_interval_s=poll_interval,
                        deadline=deadline,
                        batch_size=self._batch_size(batch_size),
                        on_batch=count,
                        hand_over_by=hand_over_by,
                        horizon_warning_s=self.settings.horizon_warning_s,
                        on_tick=on_tick,
                        hand_over_after_s=hand_over_after_s,
                    )
                    return applied
            except Exception as exc:
                # Running, or waiting to take over (a standby's whole job): a lost
                # connection is reconnected, not raised.
                if not (running or take_over) or not is_transient(exc):
                    raise
                if time.monotonic() - connected > RECONNECT_HEALTHY_S:
                    pause = RECONNECT_FIRST_S  # it ran well for a while: a new failure
                log.warning(
                    "the live runner lost its database (%s): connecting again in %.1f s",
                    one_line(exc),
                    pause,
                )
            if stop.wait(pause) or (deadline is not None and time.monotonic() >= deadline):
                return applied
            pause = min(pause * 2, RECONNECT_MAX_S)

    # -- the replay life cycle -------------------------------------------------

    @_translate_errors
    def create_replay(self, key: str, projectors: Sequence[ProjectorRef]) -> Replay:
        """Validate, then clone the projectors' tables into side schemas of the replay's own.

        ``projectors`` are registered names, import paths (``pkg.mod:Class``) or
        Projector instances; a new version of a live projection is given by path
        or instance. Nothing is created when anything is refused.
        """
        validate_key(key)
        if isinstance(projectors, str | Projector) or not projectors:
            raise ConfigurationError("create_replay needs a non-empty list of projectors")
        resolved = self._resolve_all(projectors)
        names = [p.name for p in resolved]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"a replay rebuilds each projection once, got {names}")
        require_own_tables(resolved)
        with self.engine.begin() as conn:
            if records.replay_exists(conn, key):
                raise DuplicateReplay(f"a replay with key {key!r} already exists")
            schemas = check_coverage(conn, resolved)
            schema_map = {live: side_schema(key, i) for i, live in enumerate(schemas, 1)}
            try:
                targets.clone(conn, resolved, schema_map)
            except sa.exc.ProgrammingError as exc:
                if isinstance(exc.orig, psycopg.errors.DuplicateSchema):
                    raise DuplicateReplay(
                        f"schema {exc.orig.diag.message_primary} of replay {key!r} is left over "
                        "from an earlier replay: drop it or choose another key"
                    ) from exc
                raise
            records.add_replay(conn, key, {p.name: p.import_path() for p in resolved}, schema_map)
            return records.load_replay(conn, key)

    @_translate_errors
    def ensure_replay(self, key: str, projectors: Sequence[ProjectorRef]) -> Replay:
        """The replay ``key`` rebuilding these projectors: created, or the existing one.

        For pipelines that are run again after a crash: the same key with the
        same projectors resumes; the same key with other projectors is refused.
        """
        validate_key(key)
        wanted = {p.name: p.import_path() for p in self._resolve_all(projectors)}
        existing = self.get_replay(key)
        if existing is None:
            try:
                return self.create_replay(key, projectors)
            except DuplicateReplay:  # created by a concurrent caller just now
                existing = self.get_replay(key)
                assert existing is not None
        if existing.state is ReplayState.SUPERSEDED:
            by = existing.superseded_by
            again = f" (rolling {by!r} back makes it live again)" if by else ""
            raise InvalidState(
                f"replay {key!r} was superseded by {f'replay {by!r}' if by else 'a replay'}"
                f"{again}: choose another key, or remove it"
            )
        building = existing.projectors
        if existing.state is ReplayState.LIVE:
            with self.engine.connect() as conn:
                building = records.live_projector_paths(conn, list(existing.projectors))
        if building != wanted:
            raise DuplicateReplay(
                f"replay {key!r} already exists and rebuilds {describe_paths(building)}, "
                f"not {describe_paths(wanted)}: choose another key or remove it"
            )
        return existing

    @contextmanager
    def pipeline_lock(self, key: str) -> Iterator[PipelineLock]:
        """Hold the replay's pipeline lock for a whole pipeline run (one run per key).

        Raises RunnerBusy at once if another pipeline run, in any process, holds it.
        The lock's ``require()`` raises LockLost if the lock was lost since (call it
        before a step that must not run twice at once, such as promotion).
        """
        validate_key(key)
        with self.engine.connect() as conn, pipeline_runner(conn, key):
            yield PipelineLock(conn, key)

    @_translate_errors
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
        size = self._batch_size(batch_size)  # refused before anything changes
        if max_events is not None and (isinstance(max_events, bool) or max_events < 1):
            raise ConfigurationError(f"max_events must be at least 1, got {max_events!r}")
        with self.engine.connect() as conn, replay_runner(conn, key):
            with conn.begin():
                cluster.require_same(conn, self.reader)
                # Its row lock takes a transaction id, held while it counts the log.
                mark_runner_transaction(conn)
                replay = records.load_replay(conn, key, lock=True)
                transition = require_state(replay, "start_replay")
                if restart:
                    targets.truncate(conn, replay.schemas)
                    records.reset_checkpoint(conn, replay_checkpoint(key))
                    records.delete_partition_plan(conn, key)
                    replay = records.load_replay(conn, key)
                elif self._join_partitions(conn, replay):
                    replay = records.load_replay(conn, key)
                # Where this run ends: the last event up to the safe position as of now (a
                # log read by transaction id: below the horizon as of now), so that a run
                # ends even while the application appends faster than it replays.
                head = self.reader.horizon(conn) if _by_transaction_id(self.reader) else None
                last_cursor = getattr(self.reader, "last_cursor", None)
                end = None if head is not None or last_cursor is None else last_cursor(conn)
                total = self.reader.count_after(conn, Cursor(replay.txid, replay.position))
                records.set_state(conn, key, ReplayState.REPLAYING)
                run_id = records.start_run(conn, key, "replay", replay.position)
            run = BatchRun(
                self.engine,
                self.reader,
                replay_target(self.registry, replay),
                run_id=run_id,
                batch_size=size,
                sample_interval_s=self.settings.sample_interval_s,
            )
            finished = run.run(
                conn,
                below_txid=head,
                until=end,
                max_events=max_events,
                on_progress=on_progress,
                total=total,
                # A run bounded by max_events (a pipeline task) starts with what the one
                # before it read ahead, instead of waiting for a first read.
                read_ahead_batch=self._left_over.pop(key, None),
            )
            if run.left_over is not None:
                self._left_over[key] = run.left_over
            with conn.begin():
                if finished:
                    records.set_state(conn, key, transition.to, stamp="caught_up_at")
                records.finish_run(conn, run_id, "succeeded")
                return records.load_replay(conn, key)

    @_translate_errors
    def plan_partitions(self, key: str, partitions: int) -> PartitionPlan:
        """Cut the rest of the replay's history into ``partitions`` partitions of streams
        (``zdr.partitions``), to be replayed at once by ``replay_partition``, each in a
        process of its own if you like; then ``start_replay`` brings them together.

        Returns the existing plan if there is one of that many partitions (a pipeline run
        again after a crash goes on with it). Refused (ConfigurationError) for a
        projector without ``partition_by = "stream"``, a reader that reads in one order
        only, or a plan of another count; RunnerBusy while the replay runs.
        """
        validate_key(key)
        count = whole("partitions", partitions, minimum=2)
        if count > MAX_PARTITIONS:
            raise ConfigurationError(
                f"partitions must be at most {MAX_PARTITIONS}, got {count:,}: each partition "
                "reads through the whole log, and partitions beyond the cores that run them "
                "gain nothing"
            )
        with self.engine.connect() as conn, replay_runner(conn, key), conn.begin():
            cluster.require_same(conn, self.reader)
            replay = records.load_replay(conn, key, lock=True)
            require_state(replay, "start_replay")
            plan = records.partition_plan(conn, key)
            if plan is not None:
                if plan.partitions != count:
                    raise ConfigurationError(
                        f"replay {key!r} is replayed in {plan.partitions} partitions already: "
                        f"go on with {plan.partitions}, or start it again from zero "
                        "(start_replay(restart=True), `zdr replay --restart`)"
                    )
                return plan
            projectors = replay_target(self.registry, replay).projectors
            reason = why_not_partitioned(self.reader, projectors)
            if reason is not None:
                raise NotPartitionable(f"replay {key!r} cannot run in partitions: {reason}")
            start = Cursor(replay.txid, replay.position)
            last = self.reader.last_cursor(conn)  # type: ignore[attr-defined]
            until = last if last is not None and last > start else start
            records.add_partition_plan(conn, key, count, start=start, until=until)
            records.set_state(conn, key, ReplayState.REPLAYING)
            plan = records.partition_plan(conn, key)
            assert plan is not None
            return plan

    @_translate_errors
    def partition_plan(self, key: str) -> PartitionPlan | None:
        """The replay's partition plan (where each partition stands), None if it has none."""
        validate_key(key)
        with self.engine.connect() as conn:
            records.replay_cursor(conn, key)  # ReplayNotFound for an unknown key
            return records.partition_plan(conn, key)

    @_translate_errors
    def replay_partition(
        self,
        key: str,
        partition: int,
        *,
        batch_size: int | None = None,
        max_events: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> PartitionRun:
        """Replay partition ``partition`` (0-based) of the replay's plan, from its own
        checkpoint up to the plan's point, or ``max_events`` of it.

        Partitions run at once (each holds the replay's lock shared and its own
        exclusively); a killed one resumes alone from its last committed batch.
        Raises InvalidState without a plan, RunnerBusy if this partition runs
        elsewhere, ProjectorError (the replay failed) if a projector raises.
        """
        validate_key(key)
        index = whole("partition", partition, minimum=0)
        size = self._batch_size(batch_size)
        if max_events is not None and (isinstance(max_events, bool) or max_events < 1):
            raise ConfigurationError(f"max_events must be at least 1, got {max_events!r}")
        with (
            self.engine.connect() as conn,
            replay_runner(conn, key, shared=True),
            locks.partition_runner(conn, key, index),
        ):
            with conn.begin():
                cluster.require_same(conn, self.reader)
                # Its row locked: a failure another partition records meanwhile is seen.
                replay = records.load_replay(conn, key, lock=True)
                require_state(replay, "start_replay")
                plan = records.partition_plan(conn, key)
                if plan is None:
                    raise InvalidState(
                        f"replay {key!r} is not cut into partitions (plan_partitions first, "
                        "or its partitions were brought together already)"
                    )
                if index >= plan.partitions:
                    raise ConfigurationError(
                        f"replay {key!r} has partitions 0 to {plan.partitions - 1} (0-based: "
                        f"1/{plan.partitions} to {plan.partitions}/{plan.partitions}), "
                        f"not {index}"
                    )
                part = Partition(index, plan.partitions)
                cursor = plan.cursors[index]
                if cursor == plan.until:
                    return PartitionRun(key, part, events=0, done=True)
                if replay.state is not ReplayState.FAILED:
                    # A failure stays on the replay until the partitions are brought
                    # together (the others' runs must not hide it).
                    records.set_state(conn, key, ReplayState.REPLAYING)
                run_id = records.start_run(conn, key, f"partition {part}", cursor.position)
            target = dataclasses.replace(
                replay_target(self.registry, replay),
                checkpoint=partition_checkpoint(key, index, plan.partitions),
                cursor=cursor,
                where=f"replay {key!r} (partition {part})",
            )
            run = BatchRun(
                self.engine,
                PartitionReader(self.reader, part),
                target,
                run_id=run_id,
                batch_size=size,
                sample_interval_s=self.settings.sample_interval_s,
                samples=False,  # the replay's lag is the sum over its partitions
            )
            finished = run.run(
                conn, until=plan.until, max_events=max_events, on_progress=on_progress
            )
            with conn.begin():
                if finished and target.cursor != plan.until:
                    # Nothing of this partition is left up to the point, unless the point is
                    # above the safe position (a plan moved from the earlier order while an
                    # appender below it was open): then it stands where it is for now.
                    finished = _settled(self.reader, conn, plan.until)
                    if finished:
                        records.claim_checkpoint(
                            conn,
                            target.checkpoint,
                            expected=target.cursor,
                            to=plan.until,
                            events=0,
                        )
                records.finish_run(conn, run_id, "succeeded")
                return PartitionRun(key, part, events=run.applied, done=finished)

    def _join_partitions(self, conn: sa.Connection, replay: Replay) -> bool:
        """Bring a replay's partitions together if it has a plan (in the caller's
        transaction, under the replay's lock): its checkpoint moves to the plan's point,
        the plan's rows go. True if it did; InvalidState while a partition is short."""
        plan = records.partition_plan(conn, replay.key)
        if plan is None:
            return False
        if plan.pending:
            short = ", ".join(str(Partition(i, plan.partitions)) for i in plan.pending)
            many = len(plan.pending) > 1
            raise InvalidState(
                f"replay {replay.key!r} is replayed in {plan.partitions} partitions, and "
                f"partition{'s' if many else ''} {short} {'have' if many else 'has'} not "
                "replayed all their events yet: run them (the pipeline again with "
                f"partitions={plan.partitions}, `zdr run KEY -p ... --partitions "
                f"{plan.partitions}`, or replay_partition), or start the replay again from "
                "zero with one reader (`zdr replay KEY --restart`, restart=True)"
            )
        moved = records.claim_checkpoint(
            conn,
            replay_checkpoint(replay.key),
            expected=Cursor(replay.txid, replay.position),
            to=plan.until,
            events=plan.events_applied,
        )
        if not moved:
            raise RunnerBusy(f"the checkpoint of replay {replay.key!r} moved under this runner")
        records.delete_partition_plan(conn, replay.key)
        return True

    @_translate_errors
    def enable_dual_write(self, key: str, *, lag_threshold: int | None = None) -> Replay:
        """Switch dual write on: from now on the live runner also writes the replay's copy.

        Refused (ReplayLagging) when more than ``lag_threshold`` events are still to
        replay. No event can fall through the switch: the live runner continues
        the replay from the replay's own checkpoint, whatever happened since.
        (``start_projecting_to_replay`` is the same, by the PHP original's name.)
        """
        validate_key(key)
        threshold = (
            self.lag_threshold
            if lag_threshold is None
            else self.settings.replace(lag_threshold=lag_threshold).lag_threshold
        )
        with self.engine.connect() as conn, replay_runner(conn, key), conn.begin():
            cluster.require_same(conn, self.reader)
            mark_runner_transaction(conn)  # it appends nothing: the log's trigger says so
            replay = records.load_replay(conn, key, lock=True)
            transition = require_state(replay, "enable_dual_write")
            plan = records.partition_plan(conn, key)
            if plan is not None:
                raise ReplayLagging(
                    f"replay {key!r} is replayed in partitions: replay it again "
                    f"(`zdr replay {key}`, start_replay) to bring them together before "
                    "switching dual write on",
                    lag=self.reader.count_after(conn, Cursor(replay.txid, replay.position))
                    - plan.events_applied,
                )
            lag = self.reader.count_after(conn, Cursor(replay.txid, replay.position))
            if lag > threshold:
                raise ReplayLagging(
                    f"replay {key!r} is {lag:,} events behind (threshold {threshold:,}): "
                    f"replay it again to catch up (`zdr replay {key}`, start_replay) before "
                    "switching dual write on",
                    lag=lag,
                )
            records.set_state(conn, key, transition.to, stamp="dual_write_at")
            return records.load_replay(conn, key)

    @_translate_errors
    def promote(self, key: str) -> SwapReport:
        """Make the replay's copy the live one, atomically; keep the previous copy for rollback.

        Refused unless the replay is at exactly the live position. Readers see the
        old rows until the commit and the new rows after it. If the locks cannot be
        had within ``lock_timeout_s`` after ``swap_attempts`` tries, raises LockTimeout
        and nothing changes. (``put_replay_live`` is the same, by the PHP original's name.)
        """
        validate_key(key)
        with self.engine.connect() as conn, replay_runner(conn, key):
            _require_same_cluster(conn, self.reader)
            return self._promotion.promote(conn, key)

    # The PHP original's names for these two steps, kept as aliases. They call the
    # new names, so a subclass that overrides enable_dual_write or promote is used
    # whichever name the caller knows.

    def start_projecting_to_replay(self, key: str, *, lag_threshold: int | None = None) -> Replay:
        """Alias of :meth:`enable_dual_write` (the PHP original's name)."""
        return self.enable_dual_write(key, lag_threshold=lag_threshold)

    def put_replay_live(self, key: str) -> SwapReport:
        """Alias of :meth:`promote` (the PHP original's name)."""
        return self.promote(key)

    @_translate_errors
    def rollback(self, key: str, *, batch_size: int | None = None) -> SwapReport:
        """Make the previous live copy live again, brought up to date with its own projector."""
        validate_key(key)
        with self.engine.connect() as conn, replay_runner(conn, key):
            _require_same_cluster(conn, self.reader)
            return self._promotion.rollback(conn, key, batch_size=self._batch_size(batch_size))

    @_translate_errors
    def live_runner_has_standby(self) -> bool:
        """Whether a live runner waits to take over from the running one."""
        with self.engine.connect() as conn:
            return locks.live_runner_wanted(conn)

    @_translate_errors
    def database_tag(self) -> str:
        """Eight hex digits naming this database, the same from any URL (its cluster's
        system identifier and its name): pipeline runs and artifacts carry it."""
        with self.engine.connect() as conn:
            return cluster.database_tag(conn)

    @_translate_errors
    def rebase(self, *, kept_transaction_ids: bool = False) -> cluster.Rebased:
        """After the database moved to another PostgreSQL cluster (a dump and restore):
        give the event log and the checkpoints transaction ids of this cluster, so the
        runners run again and no event appended from now on is skipped.

        Holds the application's appends off while it runs (readers go on), so stop
        the application first; with the live runner and every replay run stopped too
        (it takes their locks, and RunnerBusy says which one runs). A no-op where the
        log belongs to this cluster. ``kept_transaction_ids``: the cluster was
        upgraded in place (pg_upgrade) or copied physically; only its new identifier
        is recorded.
        """
        with self.engine.connect() as conn, contextlib.ExitStack() as held:
            held.enter_context(live_runner(conn))
            with conn.begin():
                keys = list(
                    conn.exec_driver_sql("SELECT key FROM zdr.replays ORDER BY key").scalars()
                )
            for key in keys:
                held.enter_context(replay_runner(conn, key))
            rebased, _ = under_short_lock_timeout(
                conn,
                lambda conn: cluster.rebase(
                    conn, self.reader, kept_transaction_ids=kept_transaction_ids
                ),
                lock_timeout_s=self.settings.lock_timeout_s,
                attempts=self.settings.swap_attempts,
                what="rebase the event log (an application transaction keeps it locked)",
            )
            return rebased

    @_translate_errors
    def remove_replay(self, key: str) -> Replay:
        """Drop the replay's copy (after promotion: the previous live copy) and its metadata.

        Never touches live tables. Refused (DependentObjects) if objects zdr did not
        create depend on the copy.
        """
        validate_key(key)
        self._left_over.pop(key, None)
        with self.engine.connect() as conn, replay_runner(conn, key):
            return self._promotion.remove(conn, key)

    # -- inspection --------------------------------------------------------------

    @_translate_errors
    def get_replay(self, key: str) -> Replay | None:
        """The replay's state, checkpoint, counts and runs; None for an unknown key."""
        validate_key(key)
        with self.engine.connect() as conn:
            try:
                return records.load_replay(conn, key)
            except ReplayNotFound:
                return None

    def require_replay(self, key: str) -> Replay:
        """The replay ``key``; raises ReplayNotFound for an unknown key."""
        validate_key(key)
        with self.engine.connect() as conn:
            return records.load_replay(conn, key)  # its ReplayNotFound names the replays

    def status(self, key: str | None = None) -> list[dict[str, Any]]:
        """Where every replay (or the one ``key``) stands: state, position, lag, recent
        rate, ETA, last run, age (rows of ``zdr.reports.status_row``). Lag, rate and ETA
        only where the state gives them a meaning: a live, superseded or rolled-back
        replay's copy follows nothing, so it has none."""
        replays = self.list_replays() if key is None else [self.require_replay(key)]
        since = dt.datetime.now(dt.UTC) - reports.RATE_WINDOW
        with self.engine.connect() as conn:
            runners = {r.key: locks.replay_runner_pid(conn, r.key) for r in replays}
            live_runner = locks.live_runner_pid(conn)
        return [
            reports.status_row(
                replay,
                lag=self.get_replay_lag(replay.key) if replay.state in FOLLOWING else None,
                history=(
                    self.lag_history_samples(replay.key, since=since)
                    if replay.state in MOVING
                    else None
                ),
                runners=reports.Runners(runners[replay.key], live_runner),
            )
            for replay in replays
        ]

    @_translate_errors
    def live_runner_pid(self) -> int | None:
        """The pid of the database session of the running live runner, or None when no
        live runner runs (then nothing applies new events to the live read models, nor
        to a dual-writing replay)."""
        with self.engine.connect() as conn:
            return locks.live_runner_pid(conn)

    @_translate_errors
    def list_replays(self) -> list[Replay]:
        """Every replay, oldest first."""
        with self.engine.connect() as conn:
            return [records.load_replay(conn, key) for key in records.replay_keys(conn)]

    @_translate_errors
    def get_replay_lag(self, key: str) -> int:
        """How many committed events sort after the replay's checkpoint (index-only count)."""
        validate_key(key)
        with self.engine.connect() as conn:
            cluster.require_same_log(conn, self.reader, record=False)
            lag = self.reader.count_after(conn, records.replay_cursor(conn, key))
            plan = records.partition_plan(conn, key)
            # The partitions' events are events after the replay's own checkpoint.
            return lag - (plan.events_applied if plan is not None else 0)

    @_translate_errors
    def live_lag(self) -> dict[str, int]:
        """How many committed events sort after each live copy's checkpoint, by projection."""
        with self.engine.connect() as conn, conn.begin():
            cluster.require_same_log(conn, self.reader, record=False)
            cursors = records.live_checkpoints(conn)
            return {name: self.reader.count_after(conn, c) for name, c in cursors.items()}

    @_translate_errors
    def live_status(self) -> list[dict[str, Any]]:
        """Every live read model: its projector, position and lag, and whether the live
        runner writes it (``state`` "following") or it stands still (``"failing"``, with
        the error, the event it failed on, and since when)."""
        with self.engine.connect() as conn, conn.begin():
            cluster.require_same_log(conn, self.reader, record=False)
            return [
                {
                    "kind": "live",
                    "projection": live.name,
                    "projector": live.projector,
                    "position": live.cursor.position,
                    "lag": self.reader.count_after(conn, live.cursor),
                    "state": "following" if live.error is None else "failing",
                    "error": live.error,
                    "error_position": live.error_position,
                    "failing_since": live.failing_since,
                }
                for live in records.live_projections(conn)
            ]

    @_translate_errors
    def wait_for_live(self, timeout_s: float = 30.0) -> Cursor | None:
        """Wait until the live runner has applied every event committed before the call
        to the live read models and the dual-writing replays; return where that is (None:
        an empty log).

        Read-your-writes for scripts, examples and tests: append, wait, then read a live
        read model. It only watches (the running live runner, `zdr live` or
        ``follow()``, does the work) and raises LiveLagging when none runs (after
        ``RUNNER_START_S``: one started just before may be starting) or a read model that
        is behind stands still (its projector raised), else after ``timeout_s``; also
        when a replay failed in dual write, before the call or while it waits: it left
        dual write, so nothing brings it along any more, and a script's next step would
        compare a copy that no longer follows (resuming it, `zdr replay KEY`, or removing
        it ends that). A log whose reader has no ``last_cursor`` is waited on until
        nothing is left after the checkpoints."""
        timeout_s = seconds("timeout_s", timeout_s)
        started = time.monotonic()
        deadline = started + timeout_s
        with self.engine.connect() as conn, conn.begin():
            cluster.require_same_log(conn, self.reader, record=False)
            last_cursor = getattr(self.reader, "last_cursor", None)
            target: Cursor | None = last_cursor(conn) if last_cursor is not None else None
        while True:
            with self.engine.connect() as conn, conn.begin():
                failed = records.failed_in_dual_write(conn)
                if failed:
                    why = "; ".join(
                        f"replay {key!r} failed in dual write and receives no events until "
                        f"it is resumed (fix it, then `zdr replay {key}`): {error}"
                        for key, error in failed
                    )
                    raise LiveLagging(why)
                cursors = records.followed_cursors(conn)
                if target is not None:  # compared, not counted: counts only for the message
                    behind = [name for name, cursor in cursors.items() if cursor < target]
                else:  # no last cursor: behind while anything is left after it
                    behind = [n for n, c in cursors.items() if self.reader.count_after(conn, c)]
                if not behind:
                    return target
                standing = [
                    live
                    for live in records.live_projections(conn)
                    if live.error is not None and live_checkpoint(live.name) in behind
                ]
                runner = locks.live_runner_pid(conn)
                # A live runner started just before (`zdr live &`) takes a moment to start,
                # and one restarted after a fix tries a read model that stood still first.
                settled = time.monotonic() - started >= RUNNER_START_S
                if (settled and (runner is None or standing)) or time.monotonic() >= deadline:
                    lags = {name: self.reader.count_after(conn, cursors[name]) for name in behind}
                    what = ", ".join(f"{name} ({lag:,} events)" for name, lag in lags.items())
                    if runner is None:
                        why = "no live runner is running: start one (`zdr live`)"
                    elif standing:
                        why = "; ".join(
                            f"live projection {live.name!r} stands still: {live.error}"
                            for live in standing
                        )
                    else:
                        why = f"the live runner did not get there within {timeout_s:g} s"
                    raise LiveLagging(f"still behind: {what}; {why}", behind=lags)
            time.sleep(0.05)

    def horizon(self) -> Horizon:
        """The safe position the runners read up to and, when an appending transaction
        holds it back, that transaction: pid, database, user, application, state, age and
        the first line of its query (see ``zdr.horizon``)."""
        with self.engine.connect() as conn, conn.begin():
            cluster.require_same_log(conn, self.reader, record=False)
            return inspect_horizon(conn, self.reader)

    @_translate_errors
    def checkpoints(self) -> dict[str, Cursor]:
        """Where every target stands, by checkpoint name (``live:<projection>``,
        ``replay:<key>``): for operators' checks and tests."""
        with self.engine.connect() as conn:
            return records.all_checkpoints(conn)

    @_translate_errors
    def verify(
        self,
        key: str,
        *,
        max_differences: int = 20,
        chunk_rows: int = 50_000,
        wait_level_s: float = 0.0,
    ) -> VerificationReport:
        """Compare the replay's copy with the live copy in one snapshot (see zdr.verify).

        With ``wait_level_s``: a report of copies that are not level (right after dual
        write starts, the replay is up to ``lag_threshold`` events behind) is no
        verdict: wait until the live runner has brought them to one position, and
        verify again, for at most that long (then the report says not level)."""
        validate_key(key)
        wait_level_s = seconds("wait_level_s", wait_level_s)
        deadline = time.monotonic() + wait_level_s
        while True:
            with self.engine.connect() as conn:
                replay = records.load_replay(conn, key, runs=False)
                live = records.live_projector_paths(conn)
            report = verify(
                self.engine, replay, live, max_differences=max_differences, chunk_rows=chunk_rows
            )
            if (
                report.level
                or replay.state is not ReplayState.DUAL_WRITING
                or self.live_runner_pid() is None  # nothing would level them
            ):
                return report
            while not self._level(key, replay.projections):
                if time.monotonic() >= deadline:
                    return report
                time.sleep(0.1)

    def _level(self, key: str, projections: Sequence[str]) -> bool:
        """Whether the replay and every live copy of its projections are at one position."""
        with self.engine.connect() as conn, conn.begin():
            at = records.replay_cursor(conn, key)
            return set(records.live_cursors(conn, projections).values()) == {at}

    @_translate_errors
    def lag_history(self, key: str, *, since: dt.datetime | None = None) -> pd.DataFrame:
        """Samples of the replay's position, events applied and lag over time, with the rate.

        Columns: at, position, events_applied, lag, events_per_s (between samples).
        """
        import pandas as pd  # here only: the commands and steps that need no frame skip it

        columns = ["at", "position", "events_applied", "lag", "events_per_s"]
        history = pd.DataFrame(
            [dataclasses.astuple(s) for s in self.lag_history_samples(key, since=since)],
            columns=columns,
        )
        history["at"] = pd.to_datetime(history["at"], utc=True)
        return history

    @_translate_errors
    def lag_history_samples(
        self, key: str, *, since: dt.datetime | None = None
    ) -> list[records.LagSample]:
        """``lag_history`` as plain samples (no pandas), oldest first."""
        validate_key(key)
        with self.engine.connect() as conn:
            records.load_replay(conn, key, runs=False)
            return records.samples(conn, key, since)

    # -- helpers -------------------------------------------------------------------

    def _resolve_all(self, refs: Sequence[ProjectorRef]) -> list[Projector]:
        with self.engine.connect() as conn:
            return [self.registry.resolve(ref, conn) for ref in refs]

    def _is_set_up(self) -> bool:
        with self.engine.connect() as conn:
            return catalog.is_set_up(conn)

"""What a replay is: its states, its record, its runs, and the progress of a run."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum

from zdr.errors import InvalidState


class ReplayState(StrEnum):
    """The life cycle of a replay (``TRANSITIONS`` says which operation leads where).

    created -> replaying -> caught_up -> dual_writing -> live -> rolled_back;
    live -> superseded when a later replay of its projections is promoted, and
    back to live when that one is rolled back; failed when a projector raised
    (resumable); removed once dropped.
    """

    CREATED = "created"
    REPLAYING = "replaying"
    CAUGHT_UP = "caught_up"
    DUAL_WRITING = "dual_writing"
    LIVE = "live"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REMOVED = "removed"


@dataclass(frozen=True)
class Transition:
    """Which states an operation may start from and the state it leaves the replay in."""

    allowed: frozenset[ReplayState]
    to: ReplayState
    #: False for the transitions zdr makes by itself, never asked for by an operator.
    operator: bool = True


_S = ReplayState

#: The one table of the life cycle: operation -> allowed from-states -> to-state.
#: ``start_replay`` passes through ``replaying`` (and stays there when cut short by
#: ``max_events`` or a crash). The last three rows are zdr's own doing: a projector
#: that raises in a replay run or in dual write, and a promotion or rollback of
#: *another* replay of the same projections. docs/how-it-works.md's "States" table is this one.
TRANSITIONS: dict[str, Transition] = {
    "start_replay": Transition(
        frozenset({_S.CREATED, _S.REPLAYING, _S.CAUGHT_UP, _S.FAILED, _S.ROLLED_BACK}),
        _S.CAUGHT_UP,
    ),
    "enable_dual_write": Transition(
        frozenset({_S.CREATED, _S.REPLAYING, _S.CAUGHT_UP, _S.ROLLED_BACK}), _S.DUAL_WRITING
    ),
    "promote": Transition(frozenset({_S.CAUGHT_UP, _S.DUAL_WRITING}), _S.LIVE),
    "rollback": Transition(frozenset({_S.LIVE}), _S.ROLLED_BACK),
    "remove_replay": Transition(frozenset(_S) - {_S.REMOVED}, _S.REMOVED),
    "fail": Transition(frozenset({_S.REPLAYING, _S.DUAL_WRITING}), _S.FAILED, operator=False),
    "supersede": Transition(frozenset({_S.LIVE}), _S.SUPERSEDED, operator=False),
    "reinstate": Transition(frozenset({_S.SUPERSEDED}), _S.LIVE, operator=False),
}

#: Aliases kept for callers of the earlier names.
REPLAYABLE = TRANSITIONS["start_replay"].allowed
DUAL_WRITABLE = TRANSITIONS["enable_dual_write"].allowed
PROMOTABLE = TRANSITIONS["promote"].allowed

#: States whose copy is not live and still has the log to follow: its lag means something.
FOLLOWING = frozenset({_S.CREATED, _S.REPLAYING, _S.CAUGHT_UP, _S.DUAL_WRITING, _S.FAILED})
#: States in which the copy moves (or is about to) towards the head: a rate and an ETA
#: mean something. A failed replay stands still until its projector is fixed.
MOVING = FOLLOWING - {_S.FAILED}


def require_state(replay: Replay, operation: str) -> Transition:
    """Refuse (InvalidState) an operation the replay's state does not allow; return its
    transition. The message names the state, the states that allow it and, for a
    superseded replay, what to do instead."""
    transition = TRANSITIONS[operation]
    if replay.state not in transition.allowed:
        allowed = ", ".join(s.value for s in ReplayState if s in transition.allowed)
        hint = ""
        if replay.state is _S.SUPERSEDED and replay.superseded_by is None:
            hint = "; the replay that superseded it was removed, so only remove_replay is left"
        elif replay.state is _S.SUPERSEDED:
            by = replay.superseded_by
            hint = f"; replay {by!r} superseded it"
            hint += f": roll back {by!r} first" if operation == "rollback" else ""
        raise InvalidState(
            f"{operation} is not allowed for replay {replay.key!r} in state "
            f"{replay.state.value!r} (allowed in: {allowed}){hint}"
        )
    return transition


@dataclass(frozen=True)
class Run:
    """One run of an operation on a replay (the original's "plays")."""

    id: int
    kind: str
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    from_position: int | None
    to_position: int | None
    events: int
    error: str | None

    @property
    def seconds(self) -> float:
        end = self.finished_at or dt.datetime.now(dt.UTC)
        return max((end - self.started_at).total_seconds(), 0.0)

    @property
    def rate(self) -> float | None:
        """Events per second over the run, None before it has applied anything."""
        seconds = self.seconds
        return self.events / seconds if self.events and seconds > 0 else None


@dataclass(frozen=True)
class Replay:
    """A replay as stored, with its checkpoint and run history."""

    key: str
    state: ReplayState
    projectors: dict[str, str]
    schemas: dict[str, str]
    position: int
    txid: int
    events_applied: int
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    caught_up_at: dt.datetime | None = None
    dual_write_at: dt.datetime | None = None
    promoted_at: dt.datetime | None = None
    rolled_back_at: dt.datetime | None = None
    #: The replay whose promotion took over this one's projections (state superseded).
    superseded_by: str | None = None
    runs: list[Run] = field(default_factory=list)
    #: Cut into partitions (``ReplayManager.plan_partitions``): how many, and how many of
    #: them have not replayed all their events yet (1 and 0 when it is not).
    partitions: int = 1
    partitions_left: int = 0

    @property
    def projections(self) -> list[str]:
        return sorted(self.projectors)

    @property
    def rate(self) -> float | None:
        """Events per second of the latest replay run that applied events."""
        for run in reversed(self.runs):
            if run.kind == "replay" and run.rate is not None:
                return run.rate
        return None


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    """Seconds until ``remaining`` events are applied at ``rate`` events/s.

    0 when nothing remains; None when something remains but the rate is not known yet.
    """
    if remaining <= 0:
        return 0.0
    if not rate or rate <= 0:
        return None
    return remaining / rate


@dataclass(frozen=True)
class Progress:
    """Where a running replay stands; passed to ``on_progress`` after each batch."""

    key: str
    events_done: int
    events_total: int
    position: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        return eta_seconds(self.events_total - self.events_done, self.rate)


@dataclass(frozen=True)
class SwapReport:
    """What a promotion or rollback did and how long readers could have waited."""

    key: str
    state: ReplayState
    position: int
    lock_wait_ms: float
    duration_ms: float
    attempts: int
    schemas: dict[str, str]
    #: The copy's tables that got fresh planner statistics (ANALYZE) just before the
    #: swap, outside its lock, so the first queries after it are not planned blind.
    analyzed: tuple[str, ...] = ()

    @classmethod
    def unchanged(cls, replay: Replay) -> SwapReport:
        """The report of a swap that had already happened (a step retried after its commit)."""
        return cls(
            key=replay.key,
            state=replay.state,
            position=replay.position,
            lock_wait_ms=0.0,
            duration_ms=0.0,
            attempts=0,
            schemas=replay.schemas,
        )

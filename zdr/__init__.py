"""zero-downtime-replays: rebuild event-sourced read models in PostgreSQL without downtime."""

from zdr.errors import (
    ApprovalTimedOut,
    ConfigurationError,
    DatabaseUnavailable,
    DependentObjects,
    DuplicateReplay,
    EmbeddedInUse,
    InvalidEvent,
    InvalidName,
    InvalidState,
    LockLost,
    LockTimeout,
    NoPausedRun,
    NotConverged,
    NotSetUp,
    ProjectorError,
    ReplayLagging,
    ReplayNotFound,
    RunnerBusy,
    UnknownProjector,
    ZdrError,
)
from zdr.horizon import Horizon, HorizonHolder
from zdr.manager import ReplayManager
from zdr.projector import Projector, handles
from zdr.replay import Progress, Replay, ReplayState, Run, SwapReport
from zdr.settings import Settings
from zdr.store import Cursor, EventReader, EventStore, RecordedEvent

__all__ = [
    "ApprovalTimedOut",
    "ConfigurationError",
    "Cursor",
    "DatabaseUnavailable",
    "DependentObjects",
    "DuplicateReplay",
    "EmbeddedInUse",
    "EventReader",
    "EventStore",
    "Horizon",
    "HorizonHolder",
    "InvalidEvent",
    "InvalidName",
    "InvalidState",
    "LockLost",
    "LockTimeout",
    "NoPausedRun",
    "NotConverged",
    "NotSetUp",
    "Progress",
    "Projector",
    "ProjectorError",
    "RecordedEvent",
    "Replay",
    "ReplayLagging",
    "ReplayManager",
    "ReplayNotFound",
    "ReplayState",
    "Run",
    "RunnerBusy",
    "Settings",
    "SwapReport",
    "UnknownProjector",
    "ZdrError",
    "handles",
]

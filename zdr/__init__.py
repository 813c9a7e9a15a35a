"""zero-downtime-replays: rebuild event-sourced read models in PostgreSQL without downtime."""

from zdr.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DependentObjects,
    DuplicateReplay,
    InvalidName,
    InvalidState,
    LockTimeout,
    NotSetUp,
    ProjectorError,
    ReplayLagging,
    ReplayNotFound,
    RunnerBusy,
    UnknownProjector,
    ZdrError,
)
from zdr.manager import ReplayManager
from zdr.projector import Projector, handles
from zdr.replay import Progress, Replay, ReplayState, Run, SwapReport
from zdr.store import Cursor, EventReader, EventStore, RecordedEvent

__all__ = [
    "ConfigurationError",
    "Cursor",
    "DatabaseUnavailable",
    "DependentObjects",
    "DuplicateReplay",
    "EventReader",
    "EventStore",
    "InvalidName",
    "InvalidState",
    "LockTimeout",
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
    "SwapReport",
    "UnknownProjector",
    "ZdrError",
    "handles",
]

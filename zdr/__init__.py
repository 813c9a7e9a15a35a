"""zero-downtime-replays: rebuild event-sourced read models in PostgreSQL without downtime."""

from zdr.errors import (
    ApprovalTimedOut,
    ClusterChanged,
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
    NotPartitionable,
    NotSetUp,
    PrivilegeMissing,
    ProjectorError,
    ReplayLagging,
    ReplayNotFound,
    RunnerBusy,
    TransientError,
    UnknownProjector,
    ZdrError,
    is_transient,
)
from zdr.horizon import Horizon, HorizonHolder
from zdr.layout import find_pipeline_in_checkout as _find_pipeline_in_checkout
from zdr.manager import ReplayManager
from zdr.partitions import PartitionPlan, PartitionRun
from zdr.projector import Projector, handles
from zdr.replay import Progress, Replay, ReplayState, Run, SwapReport
from zdr.rows import Row, RowProjector
from zdr.settings import Settings
from zdr.store import Cursor, EventReader, EventStore, Partition, RecordedEvent

__all__ = [
    "ApprovalTimedOut",
    "ClusterChanged",
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
    "NotPartitionable",
    "PrivilegeMissing",
    "NotSetUp",
    "Partition",
    "PartitionPlan",
    "PartitionRun",
    "Progress",
    "Projector",
    "ProjectorError",
    "RecordedEvent",
    "Replay",
    "ReplayLagging",
    "ReplayManager",
    "ReplayNotFound",
    "ReplayState",
    "Row",
    "RowProjector",
    "Run",
    "RunnerBusy",
    "Settings",
    "SwapReport",
    "TransientError",
    "UnknownProjector",
    "ZdrError",
    "handles",
    "is_transient",
]

# From a checkout, zdr.flows and its siblings are the top-level folders (zdr/layout.py).
_find_pipeline_in_checkout()

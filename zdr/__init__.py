"""zero-downtime-replays: rebuild event-sourced read models in PostgreSQL without downtime.

Every public name below is imported on first use (PEP 562), not by ``import zdr``:
importing any ``zdr.x`` runs this file first, and the command line (``zdr --help``)
must not pay for SQLAlchemy, psycopg and pydantic before it needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from zdr.layout import find_pipeline_in_checkout as _find_pipeline_in_checkout

if TYPE_CHECKING:
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
        LiveLagging,
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
    from zdr.frames import FrameProjector
    from zdr.horizon import Horizon, HorizonHolder
    from zdr.manager import ReplayManager
    from zdr.partitions import PartitionPlan, PartitionRun
    from zdr.projector import Projector, handles
    from zdr.replay import Progress, Replay, ReplayState, Run, SwapReport
    from zdr.rows import Row, RowProjector
    from zdr.settings import Settings
    from zdr.store import Cursor, EventReader, EventStore, Partition, RecordedEvent

#: Public name -> the module that defines it.
_MODULES = {
    **dict.fromkeys(
        [
            "ApprovalTimedOut",
            "ClusterChanged",
            "ConfigurationError",
            "DatabaseUnavailable",
            "DependentObjects",
            "DuplicateReplay",
            "EmbeddedInUse",
            "InvalidEvent",
            "InvalidName",
            "InvalidState",
            "LiveLagging",
            "LockLost",
            "LockTimeout",
            "NoPausedRun",
            "NotConverged",
            "NotPartitionable",
            "NotSetUp",
            "PrivilegeMissing",
            "ProjectorError",
            "ReplayLagging",
            "ReplayNotFound",
            "RunnerBusy",
            "TransientError",
            "UnknownProjector",
            "ZdrError",
            "is_transient",
        ],
        "zdr.errors",
    ),
    "FrameProjector": "zdr.frames",
    **dict.fromkeys(["Horizon", "HorizonHolder"], "zdr.horizon"),
    "ReplayManager": "zdr.manager",
    **dict.fromkeys(["PartitionPlan", "PartitionRun"], "zdr.partitions"),
    **dict.fromkeys(["Projector", "handles"], "zdr.projector"),
    **dict.fromkeys(["Progress", "Replay", "ReplayState", "Run", "SwapReport"], "zdr.replay"),
    **dict.fromkeys(["Row", "RowProjector"], "zdr.rows"),
    "Settings": "zdr.settings",
    **dict.fromkeys(
        ["Cursor", "EventReader", "EventStore", "Partition", "RecordedEvent"], "zdr.store"
    ),
}

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
    "FrameProjector",
    "Horizon",
    "HorizonHolder",
    "InvalidEvent",
    "InvalidName",
    "InvalidState",
    "LiveLagging",
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


def __getattr__(name: str) -> Any:
    """``zdr.ReplayManager`` and the other public names: imported on first use, then kept
    in this module's namespace (the next lookup does not come here). A submodule
    (``zdr.errors``) is imported on first use too, as the eager imports once made it
    an attribute of the package."""
    module = _MODULES.get(name)
    if module is None:
        if name.startswith("_") or importlib.util.find_spec(f"zdr.{name}") is None:
            raise AttributeError(f"module 'zdr' has no attribute {name!r}")
        return importlib.import_module(f"zdr.{name}")  # sets the attribute itself
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# From a checkout, zdr.flows and its siblings are the top-level folders (zdr/layout.py).
_find_pipeline_in_checkout()

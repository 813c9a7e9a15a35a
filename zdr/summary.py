"""``ReplaySummary``, what a pipeline run did: the zero-downtime-replay flow's result.

A pydantic model, so apart from ``zdr.reports``: pydantic takes a tenth of a second
to import, and ``zdr status`` (which renders through ``zdr.reports``) does not need it.
Its home stays ``zdr.reports.ReplaySummary`` (its ``__module__``): results persisted
by earlier versions name that path, and ``zdr.reports`` hands this class out under it.
"""

# No `from __future__ import annotations`: the annotations are the classes themselves,
# so pydantic needs no module namespace to resolve them (the class says it lives in
# zdr.reports).

from pydantic import BaseModel

from zdr.replay import ReplayState


class ReplaySummary(BaseModel):
    """What a pipeline run did: the zero-downtime-replay flow's result.

    In the core, not in the flow's module, so a persisted result reads back as
    this class however the flow's module was loaded (a file or a module path)."""

    replay_key: str
    state: ReplayState
    events_applied: int
    position: int
    lag: int
    promoted: bool
    approved: bool | None = None
    approver: str | None = None
    comment: str | None = None
    lock_wait_ms: float | None = None
    swap_ms: float | None = None
    removed: bool = False


ReplaySummary.__module__ = "zdr.reports"

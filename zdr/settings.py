"""The numbers that tune zdr, in one frozen object with validated defaults.

The manager, the command line's defaults and the Prefect flow all read these,
so a default is written once. Units are in the names (``_s`` seconds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from zdr.errors import ConfigurationError


@dataclass(frozen=True)
class Settings:
    """How zdr replays, switches and promotes. ``Settings().replace(batch_size=...)``."""

    #: Events per transaction (per batch). Larger batches collapse more updates of one row.
    batch_size: int = 10_000
    #: Dual write may be switched on when at most this many events are left to replay.
    lag_threshold: int = 1_000
    #: How long a swap (promote, roll back, remove) waits for a lock before it retries.
    lock_timeout_s: float = 0.5
    #: How many times a swap tries before it gives up with LockTimeout (nothing changed).
    swap_attempts: int = 8
    #: How often a running replay records its position and lag (for rate, ETA, reports).
    sample_interval_s: float = 1.0
    #: Events one ``replay-batches`` task run replays (the pipeline's unit of retry).
    events_per_task: int = 200_000
    #: Catch-up rounds before the pipeline gives up (the replay is left intact).
    catch_up_rounds: int = 10
    #: How long the pipeline waits for a person's approval.
    approval_timeout_s: int = 3_600
    #: How long the pipeline keeps trying to promote while live and replay are not level.
    promotion_wait_s: float = 60.0

    def __post_init__(self) -> None:
        at_least_one = ("batch_size", "swap_attempts", "events_per_task", "catch_up_rounds")
        for name in at_least_one:
            _check(name, getattr(self, name), lambda v: v >= 1, "at least 1")
        _check("approval_timeout_s", self.approval_timeout_s, lambda v: v >= 1, "at least 1")
        _check("lag_threshold", self.lag_threshold, lambda v: v >= 0, "0 or more")
        for name in ("lock_timeout_s",):
            _check(name, getattr(self, name), lambda v: v > 0, "more than 0")
        for name in ("sample_interval_s", "promotion_wait_s"):
            _check(name, getattr(self, name), lambda v: v >= 0, "0 or more")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (validated like the original)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def _check(name: str, value: object, ok: Any, wanted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise ConfigurationError(f"{name} must be a number {wanted}, got {value!r}")


DEFAULTS = Settings()

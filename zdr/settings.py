"""The numbers that tune zdr, in one frozen object with validated defaults.

The manager, the command line's defaults and the Prefect flow all read these,
so a default is written once. Units are in the names (``_s`` seconds).
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import numbers
from dataclasses import dataclass
from typing import Any

from zdr.errors import ConfigurationError

#: PostgreSQL's lock_timeout is an int of milliseconds; a day is far beyond any sane wait.
MAX_LOCK_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class Settings:
    """How zdr replays, switches and promotes. ``Settings().replace(batch_size=...)``."""

    #: Events per transaction (per batch). Larger batches collapse more updates of one row
    #: and pay the per-batch statements less often; measured with ``bench/replay_bench.py
    #: --batch-sizes`` (docs/benchmarks.md): 50,000 replayed 1.2 to 1.7 times as fast as
    #: 10,000 for about 65 MB more memory, 100,000 only 3-5% more for another 75 MB.
    batch_size: int = 50_000
    #: Bytes of payload per batch, beside ``batch_size``, counted as read (the JSON text
    #: that is decoded, not the compressed bytes stored): a batch ends at whichever comes
    #: first (one event at least), so a history of big events does not fill memory.
    batch_max_bytes: int = 16_000_000
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
    #: When an appending transaction has held the safe position this long, ``zdr status`` warns
    #: and the live runner logs a warning naming it (events wait behind it meanwhile).
    horizon_warning_s: float = 30.0
    #: How long a dual-writing replay's writes may wait for a lock inside a live batch;
    #: past it the replay stays behind and the live batch goes on without it.
    dual_write_lock_timeout_s: float = 0.1
    #: How long a replay that stayed behind in dual write is left out before it is tried again.
    dual_write_retry_s: float = 1.0
    #: Events one target that is behind the others (a new read model building from the
    #: start of the log, a replay back from a pause) applies per live batch, so that its
    #: catch-up never makes the live batch read from its checkpoint.
    catch_up_slice: int = 2_000
    #: About how long one live batch may spend on each target that is not a live copy at
    #: the front (a dual-writing replay, a read model catching up): its share is sized
    #: from its measured speed, so a slow projector never holds the live read models up
    #: for longer than this per batch.
    slice_budget_s: float = 0.1
    #: How long a read model that is catching up and whose projector raised is left out
    #: before it is tried again (the others go on meanwhile).
    failed_retry_s: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "batch_max_bytes",
            "swap_attempts",
            "events_per_task",
            "catch_up_rounds",
            "catch_up_slice",
        ):
            _whole(self, name, minimum=1)
        _whole(self, "approval_timeout_s", minimum=1)
        _whole(self, "lag_threshold", minimum=0)
        _seconds(self, "lock_timeout_s", above_zero=True, maximum=MAX_LOCK_TIMEOUT_S)
        _seconds(self, "sample_interval_s")
        _seconds(self, "promotion_wait_s")
        _seconds(self, "horizon_warning_s")
        _seconds(self, "dual_write_lock_timeout_s", above_zero=True, maximum=MAX_LOCK_TIMEOUT_S)
        _seconds(self, "dual_write_retry_s")
        _seconds(self, "slice_budget_s", above_zero=True)
        _seconds(self, "failed_retry_s")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (validated like the original)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def _whole(settings: Settings, name: str, *, minimum: int) -> None:
    object.__setattr__(settings, name, whole(name, getattr(settings, name), minimum=minimum))


def whole(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as a plain int if it is a whole number (numpy's too) of at least
    ``minimum``, else ConfigurationError naming ``name``; for settings and arguments."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(
            f"{name} must be a whole number of at least {minimum}, got {value!r}"
        )
    return int(value)


def _seconds(
    settings: Settings, name: str, *, above_zero: bool = False, maximum: float = math.inf
) -> None:
    value = seconds(name, getattr(settings, name), above_zero=above_zero, maximum=maximum)
    object.__setattr__(settings, name, value)


def seconds(name: str, value: Any, *, above_zero: bool = False, maximum: float = math.inf) -> float:
    """``value`` as a finite float of seconds, 0 or more (or more than 0), else
    ConfigurationError naming ``name``; for a call's own arguments as for a setting."""
    wanted = "more than 0" if above_zero else "0 or more"
    number = None
    if not isinstance(value, bool) and isinstance(value, numbers.Real | decimal.Decimal):
        number = float(value)
    ok = (
        number is not None
        and math.isfinite(number)
        and (number > 0 if above_zero else number >= 0)
        and number <= maximum
    )
    if not ok or number is None:
        limit = f" and at most {maximum:g}" if math.isfinite(maximum) else ""
        raise ConfigurationError(
            f"{name} must be a number of seconds {wanted}{limit}, got {value!r}"
        )
    return number


def lock_timeout_setting(seconds: float) -> str:
    """PostgreSQL's ``lock_timeout`` for a number of seconds (whole milliseconds, at least 1:
    0 would mean "wait forever")."""
    return f"{max(int(seconds * 1000), 1)}ms"


DEFAULTS = Settings()

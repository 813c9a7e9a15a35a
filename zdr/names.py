"""Validation of the names that end up as SQL identifiers.

Names are checked against a strict pattern *and* always quoted by the driver
(``psycopg.sql.Identifier``) when they reach SQL: the pattern keeps physical
names predictable and short enough for PostgreSQL's 63-byte limit, the quoting
makes injection impossible even if a pattern were ever loosened.
"""

from __future__ import annotations

import re

from zdr.errors import InvalidName

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_SCHEMA_PREFIXES = ("pg_", "zdr")
RESERVED_SCHEMAS = {"public", "information_schema"}


def validate_key(key: object, *, what: str = "replay key") -> str:
    """Return ``key`` if it is a valid replay key or projection name, else raise InvalidName."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise InvalidName(
            f"invalid {what} {key!r}: use 1-40 characters, lower-case letters, digits "
            "and underscores, starting with a letter (pattern ^[a-z][a-z0-9_]{0,39}$)"
        )
    return key


def validate_live_schema(schema: object, *, table: str) -> str:
    """Return the schema of a projector's table if zdr can swap it, else raise InvalidName.

    A projection's tables must live in a schema of their own because promotion
    swaps whole schemas (a rename takes no lock on the tables, so readers never wait).
    """
    if schema is None:
        raise InvalidName(
            f"table {table!r} has no schema: give each projection's tables a schema of "
            "their own (Table(..., schema='my_projection')); zdr swaps whole schemas"
        )
    if not isinstance(schema, str) or not SCHEMA_PATTERN.fullmatch(schema):
        raise InvalidName(f"invalid schema {schema!r} for table {table!r}")
    if schema in RESERVED_SCHEMAS or schema.startswith(RESERVED_SCHEMA_PREFIXES):
        raise InvalidName(
            f"schema {schema!r} of table {table!r} is reserved: zdr owns schemas starting "
            "with 'zdr' and cannot swap 'public' or system schemas"
        )
    return schema


# -- physical names -----------------------------------------------------------
# Every name zdr gives to something in the database is spelled here and only
# here: checkpoint rows, side and swap schemas, advisory lock names.

LIVE_CHECKPOINT_PREFIX = "live:"
REPLAY_CHECKPOINT_PREFIX = "replay:"
PARTITION_CHECKPOINT_PREFIX = "partition:"


def live_checkpoint(projection: str) -> str:
    """The checkpoint row of a projection's live copy."""
    return LIVE_CHECKPOINT_PREFIX + projection


def replay_checkpoint(key: str) -> str:
    """The checkpoint row of a replay's copy (after promotion: the previous live copy)."""
    return REPLAY_CHECKPOINT_PREFIX + key


def partition_checkpoints(key: str) -> str:
    """The prefix of a replay's partition plan rows (``zdr.partitions``): one checkpoint per
    partition, ``partition:<key>/<count>/<index>``, and the point they all replay up to,
    ``partition:<key>/<count>/until``. Checkpoint rows, so that ``rebase`` moves them too."""
    return f"{PARTITION_CHECKPOINT_PREFIX}{key}/"


def partition_checkpoint(key: str, index: int | str, count: int) -> str:
    """The checkpoint row of partition ``index`` (0-based, or "until") of ``count``."""
    return f"{partition_checkpoints(key)}{count}/{index}"


def projection_of(checkpoint: str) -> str:
    """The projection a live checkpoint row belongs to."""
    return checkpoint.removeprefix(LIVE_CHECKPOINT_PREFIX)


def side_schema(key: str, index: int) -> str:
    """The schema holding a replay's copy of its ``index``-th live schema (1-based)."""
    return f"zdr_{key}_{index}"


def swap_schema(side: str) -> str:
    """The name a live schema passes through while it trades names with ``side``.

    It holds a ``-``, which neither a replay key (so no side schema ``zdr_<key>_<n>``)
    nor a live schema may contain: ``zdr_swap_x_1`` was replay ``swap_x``'s side schema.
    """
    return "zdr-swap-" + side.removeprefix("zdr_")


#: Advisory lock names (hashed into zdr's lock space, see zdr.locks).
LIVE_RUNNER_LOCK = "live-runner"
LIVE_BATCH_LOCK = "live-batch"
SETUP_LOCK = "setup"


def waiting_for(lock: str) -> str:
    """The lock, held shared, of the runners that wait to take ``lock`` over: the holder
    sees them in pg_locks and can hand over (the scheduled live runs do)."""
    return f"{lock}/waiting"


def replay_lock(key: str) -> str:
    """The session lock one run of a replay holds (one runner per replay)."""
    return f"replay:{key}"


def partition_lock(key: str, index: int) -> str:
    """The session lock one run of one partition of a replay holds (beside the replay's
    own lock, which partition runs hold shared)."""
    return f"replay:{key}/partition/{index}"


def pipeline_lock(key: str) -> str:
    """The session lock one pipeline run of a replay key holds for its whole length."""
    return f"pipeline:{key}"

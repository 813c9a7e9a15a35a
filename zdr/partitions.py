"""Partitioned replay: one replay's history, cut into partitions of streams.

A projector whose state is keyed by stream (``partition_by = "stream"``) writes for
one stream from that stream's events alone, so the streams can be replayed apart:
partition ``i`` of ``n`` takes the streams whose hash falls in ``i`` (PostgreSQL's
``hashtextextended`` of the stream id, modulo ``n``), each in a process of its own
if the caller likes (the pipeline submits one Prefect task per partition).

The plan (``ReplayManager.plan_partitions``) fixes the point every partition
replays up to: the last event up to the safe position when it was made, below
which no event can appear later. Each partition has a checkpoint of its own, claimed
with its batch's writes as any replay's (exactly once, resumable alone); a
partition that has replayed all its events up to the point stands at it. Once
all stand there, the replay's own checkpoint moves to the point in one
transaction with the plan's rows gone (``start_replay`` does it, then goes on as
one reader): catch-up and the switch to dual write work as without partitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from zdr.projector import Projector
from zdr.store import Cursor, EventReader, Partition, RecordedEvent


@dataclass(frozen=True)
class PartitionPlan:
    """A replay cut into ``partitions``: where each stands and the point they replay up to."""

    key: str
    partitions: int
    until: Cursor
    cursors: dict[int, Cursor] = field(default_factory=dict)
    events: dict[int, int] = field(default_factory=dict)

    @property
    def pending(self) -> list[int]:
        """The partitions (0-based) that have not reached ``until`` yet."""
        return [i for i in range(self.partitions) if self.cursors.get(i) != self.until]

    @property
    def events_applied(self) -> int:
        return sum(self.events.values())


@dataclass(frozen=True)
class PartitionRun:
    """What one run of one partition did."""

    key: str
    partition: Partition
    events: int
    done: bool  # the partition reached the plan's point


class PartitionReader:
    """One partition's view of a reader that reads partitions: the events of its streams."""

    def __init__(self, reader: EventReader, partition: Partition) -> None:
        self.reader = reader
        self.partition = partition

    @property
    def transaction_ids(self) -> bool:
        """As the reader it is a view of."""
        return bool(getattr(self.reader, "transaction_ids", True))

    def read(
        self,
        conn: sa.Connection,
        after: Cursor,
        limit: int,
        *,
        until: Cursor | None = None,
        below_txid: int | None = None,
    ) -> list[RecordedEvent]:
        return self.reader.read(  # type: ignore[call-arg]
            conn, after, limit, until=until, below_txid=below_txid, partition=self.partition
        )

    def horizon(self, conn: sa.Connection) -> int:
        return self.reader.horizon(conn)

    def count_after(self, conn: sa.Connection, after: Cursor) -> int:
        return self.reader.count_after(conn, after, partition=self.partition)  # type: ignore[call-arg]


def why_not_partitioned(reader: EventReader, projectors: Sequence[Projector]) -> str | None:
    """Why these projectors cannot be replayed in partitions from this reader, or None."""
    if not getattr(reader, "reads_partitions", False):
        return f"{reader!r} reads the log in one order only (no partitions of streams)"
    whole = sorted(p.name for p in projectors if p.partition_by != "stream")
    if whole:
        if len(whole) == 1:
            return (
                f"projector {whole[0]!r} does not declare partition_by = 'stream' (its state "
                "is not keyed by stream)"
            )
        return (
            f"projectors {', '.join(map(repr, whole))} do not declare partition_by = 'stream' "
            "(their state is not keyed by stream)"
        )
    return None

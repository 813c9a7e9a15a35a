"""Moving checkpoints of the earlier (transaction id, position) order to position order.

Earlier zdr versions read a log in (transaction id, position) order below a horizon
of transaction ids; this one reads it by position below the safe position (see
``zdr.store``). A checkpoint ``(T, P)`` of the earlier order says "every event whose
(stamp, position) is at most (T, P) is applied": not a prefix of positions. So each is
moved, once, to

* ``(0, Q)``: Q is the position just below the first event it has not applied (no
  higher than the safe position: an appending transaction in progress may still commit
  below it), and
* the events above Q it has applied already, kept in ``zdr.applied_ahead``: the
  runners skip each of them once and forget them as they pass (``zdr.runner``).

A partition's checkpoint is moved the same way among its partition's events; the point a
partition plan replays up to becomes the highest position it covered, so the plan ends
where every event it covered is applied and nothing twice.

It runs when a runner starts (``zdr.cluster.require_same``), in that runner's first
transaction, with the rows of the checkpoints it moves locked: a batch of an earlier
version's runner in progress is waited for, and after the move a trigger it installs on
``zdr.checkpoints`` refuses that runner's next claim (it would write a transaction id).
It reads the stamps of the log's rows (``zdr.events.txid``, or the ``zdr_txid`` column
that an earlier ``TableReader.prepare`` added): the moved positions mean the same in any
cluster afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa

from zdr.catalog import create_missing
from zdr.cluster import require_no_moved_checkpoints
from zdr.errors import ConfigurationError
from zdr.names import PARTITION_CHECKPOINT_PREFIX
from zdr.store import EventReader, StampedReader

log = logging.getLogger("zdr")

_LEGACY = "SELECT EXISTS (SELECT 1 FROM zdr.checkpoints WHERE txid <> 0)"

#: Installed by the move: a checkpoint in the earlier order is refused from then on, so
#: a runner of an earlier zdr version still running fails its batch instead of reading a
#: position as a transaction id.
_REFUSE_EARLIER_ORDER = [
    (
        "zdr.refuse_transaction_order()",
        """CREATE OR REPLACE FUNCTION zdr.refuse_transaction_order() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN
               RAISE EXCEPTION USING
                   ERRCODE = 'ZR002',
                   MESSAGE = 'checkpoint ' || NEW.name || ' is in position order: a '
                       || 'runner of an earlier zdr version, which reads by transaction '
                       || 'id, cannot move it (stop it, and run this version''s runners)';
           END $$""",
    ),
    (
        "zdr.checkpoints/refuse_transaction_order",
        """CREATE TRIGGER refuse_transaction_order BEFORE INSERT OR UPDATE ON zdr.checkpoints
           FOR EACH ROW WHEN (NEW.txid <> 0)
           EXECUTE FUNCTION zdr.refuse_transaction_order()""",
    ),
]


def move_to_position_order(conn: sa.Connection, reader: EventReader) -> int:
    """Move every checkpoint of the earlier order to position order (see the module's
    docstring), in the caller's transaction; return how many were moved (0, after one
    look, where none is left)."""
    if getattr(reader, "transaction_ids", True):
        return 0  # a reader of one's own that reads by transaction id keeps its order
    if not conn.exec_driver_sql(_LEGACY).scalar_one():
        return 0
    if not isinstance(reader, StampedReader) or reader.stamps.txid_column is None:
        raise ConfigurationError(
            f"zdr.checkpoints holds checkpoints in the (transaction id, position) order of an "
            f"earlier zdr version, and {reader!r} has no transaction-id stamps to move them to "
            "position order with: run this version with the reader those checkpoints were "
            "made with"
        )
    rows = conn.exec_driver_sql(
        "SELECT name, txid, position FROM zdr.checkpoints WHERE txid <> 0 ORDER BY name FOR UPDATE"
    ).all()
    require_no_moved_checkpoints(conn, reader)
    create_missing(conn, _REFUSE_EARLIER_ORDER)
    safe = reader.safe_position(conn)
    stamps = reader.stamps
    stamp, position = stamps.txid_of("e"), f"e.{stamps.position}"
    for name, txid, at in rows:
        cut = {"txid": txid, "position": at, "safe": safe}
        where = ""
        if name.startswith(PARTITION_CHECKPOINT_PREFIX):
            count, index = name.rsplit("/", 2)[1:]
            if index == "until":
                # The plan's point: the highest position it covered.
                covered = conn.exec_driver_sql(
                    f"SELECT max({position}) FROM {stamps.table} e "
                    f"WHERE ({stamp}, {position}) <= (%(txid)s, %(position)s)",
                    cut,
                ).scalar()
                _move(conn, name, covered or 0, ahead=None)
                continue
            where = reader.partition_filter
            cut.update(partition=int(index), partitions=int(count))
        first_missing = conn.exec_driver_sql(
            f"SELECT min({position}) FROM {stamps.table} e "
            f"WHERE ({stamp}, {position}) > (%(txid)s, %(position)s) {where}",
            cut,
        ).scalar()
        to = safe if first_missing is None else min(safe, first_missing - 1)
        ahead = (
            conn.exec_driver_sql(
                f"SELECT {position} FROM {stamps.table} e WHERE {position} > %(to)s "
                f"AND ({stamp}, {position}) <= (%(txid)s, %(position)s) {where}",
                {**cut, "to": to},
            )
            .scalars()
            .all()
        )
        _move(conn, name, to, ahead=ahead)
    log.info(
        "moved %d checkpoints of the (transaction id, position) order to position order",
        len(rows),
    )
    return len(rows)


def _move(conn: sa.Connection, name: str, to: int, *, ahead: Sequence[int] | None) -> None:
    conn.exec_driver_sql(
        "UPDATE zdr.checkpoints SET txid = 0, position = %s, updated_at = now() WHERE name = %s",
        (to, name),
    )
    if ahead:
        conn.exec_driver_sql(
            "INSERT INTO zdr.applied_ahead (name, position) SELECT %s, unnest(%s::bigint[])",
            (name, list(ahead)),
        )

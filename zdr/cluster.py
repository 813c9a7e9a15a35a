"""Which PostgreSQL cluster the event log's transaction ids come from.

This concerns a log read by (transaction id, position) below a horizon of transaction
ids: a reader of one's own whose ``transaction_ids`` is True. zdr's own log, a prepared
``TableReader`` and an eventsourcing application's table are read by position
(``zdr.store``), which means the same in any cluster: for them the checks below pass
and ``rebase`` has nothing to do. Earlier zdr versions read every log so.

A transaction id means something only in the cluster that assigned it: after
``pg_dump``/``pg_restore`` into another cluster, or a move by logical replication,
new events get ids below the checkpoints, and every reader would pass over them for
good, silently. So zdr records the cluster's system identifier at setup (``record``),
and every runner checks it as it starts (``require_same``): another cluster, or a
checkpoint or an event above the cluster's transaction-id counter, refuses with
ClusterChanged.

``rebase`` records the cluster it runs in. For a log read by position that is all
there is to do; a reader of one's own that reads by transaction id is refused, unless
the cluster was upgraded in place (``pg_upgrade``: a new identifier, the same
transaction ids: ``rebase(kept_transaction_ids=True)``). Checkpoints an earlier zdr
version left in (transaction id, position) order in a database moved since are
refused (``require_no_moved_checkpoints``): that version's ``zdr rebase`` re-stamps
them first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from zdr.errors import ClusterChanged, ConfigurationError, NotSetUp

if TYPE_CHECKING:  # zdr.store imports zdr.catalog, which imports this module
    from zdr.store import EventReader, StampedLog

CREATE_STATEMENTS = [
    (
        "zdr.cluster",
        """CREATE TABLE IF NOT EXISTS zdr.cluster (
        system_identifier text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    )""",
    ),
    # Which event log the checkpoints are positions in (``source_of`` a reader).
    ("zdr.cluster(event_log)", "ALTER TABLE zdr.cluster ADD COLUMN IF NOT EXISTS event_log text"),
]

_IDENTIFIER = "SELECT system_identifier::text FROM pg_control_system()"
_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"


def _highest(stamps: StampedLog | None) -> str:
    """The highest transaction id in the checkpoints and the log's stamps (the log's
    through its (txid, position) index: max() of a nullable stamp would scan the table)."""
    if stamps is None:
        return "SELECT max(txid) FROM zdr.checkpoints"
    return f"""SELECT greatest((SELECT max(txid) FROM zdr.checkpoints),
                               (SELECT {stamps.txid} FROM {stamps.table}
                                ORDER BY {stamps.txid} DESC, {stamps.position} DESC LIMIT 1))"""


def source_of(reader: EventReader) -> str:
    """The name of the log ``reader`` reads, as recorded beside the checkpoints."""
    source = getattr(reader, "source", None)
    return (
        source
        if isinstance(source, str)
        else f"{type(reader).__module__}.{type(reader).__qualname__}"
    )


@dataclass(frozen=True)
class Rebased:
    """What ``rebase`` did."""

    recorded: str | None  # the cluster the log was stamped in, if known
    current: str
    events: int  # events given a new transaction id
    checkpoints: int  # checkpoints moved to the new ids


def record(conn: sa.Connection) -> None:
    """Remember this cluster, unless one is remembered already (setup; idempotent)."""
    conn.exec_driver_sql(
        f"INSERT INTO zdr.cluster (system_identifier) SELECT ({_IDENTIFIER}) "
        "WHERE NOT EXISTS (SELECT 1 FROM zdr.cluster)"
    )


def require_same(conn: sa.Connection, reader: EventReader) -> None:
    """Refuse to run where the checkpoints mean nothing: with another event log than
    theirs (ConfigurationError), or where the log's transaction ids come from another
    cluster (ClusterChanged). The first runner of a database records its log. A reader
    with a ``require_ready(conn)`` (a TableReader) is asked first whether it can read."""
    ready = getattr(reader, "require_ready", None)
    if callable(ready):
        ready(conn)
    require_same_log(conn, reader)
    from zdr.ordering import move_to_position_order  # zdr.store imports this module

    move_to_position_order(conn, reader)
    if not getattr(reader, "transaction_ids", True):
        return  # positions only: they mean the same in any cluster
    problem = _problem(conn, getattr(reader, "stamps", None))
    if problem is not None:
        raise ClusterChanged(
            f"{problem}: the database was moved to another PostgreSQL cluster (a dump and "
            "restore, a logical-replication move), and events appended now would be "
            "skipped. Stop the application's appends and zdr's runners, run `zdr rebase` "
            "(ReplayManager.rebase()) once, then start them again; if the cluster was "
            "upgraded in place (pg_upgrade) or copied physically, `zdr rebase "
            "--kept-transaction-ids` instead. Nothing was run"
        )


#: The log of every checkpoint made before zdr recorded which log they are in.
OWN_LOG = "zdr.events"
_RECORDS_LOG = """SELECT EXISTS (SELECT 1 FROM pg_attribute
                                 WHERE attrelid = to_regclass('zdr.cluster')
                                   AND attname = 'event_log' AND NOT attisdropped)"""
_MOVED = "SELECT EXISTS (SELECT 1 FROM zdr.checkpoints WHERE (txid, position) > (0, 0))"


def require_same_log(conn: sa.Connection, reader: EventReader, *, record: bool = True) -> None:
    """Refuse (ConfigurationError) a reader of another log than the one the checkpoints
    are positions in. Until a checkpoint has moved, the log can still change: the reader
    given is recorded (``record``; it takes the row's lock, so only when it changes)."""
    source = source_of(reader)
    if not conn.exec_driver_sql(_RECORDS_LOG).scalar_one():
        if source == OWN_LOG or not record:
            return  # set up by an earlier version, where zdr.events was the log
        raise NotSetUp(
            f"zdr's metadata in this database is from an earlier version, which does not "
            f"record the event log: run setup (`zdr setup --reader ...`) before reading "
            f"{source}"
        )
    recorded = conn.exec_driver_sql("SELECT event_log FROM zdr.cluster").scalar()
    if recorded == source:
        return
    moved = conn.exec_driver_sql(_MOVED).scalar_one()
    if moved and recorded is None and source != OWN_LOG:
        raise ConfigurationError(
            f"the checkpoints in this database were made before zdr recorded which event "
            f"log they are positions in (then, by default, {OWN_LOG}), and this reads "
            f"{source}. If they were made with this reader, record it once: UPDATE "
            f"zdr.cluster SET event_log = '{source.replace(chr(39), chr(39) * 2)}'. "
            "Nothing was run"
        )
    if moved and recorded is not None:
        raise ConfigurationError(
            f"zdr's checkpoints in this database are positions in the event log {recorded}, "
            f"and this reads {source}: run it with the reader they were made with (the "
            "`reader` option, zdr --reader), or give another log a database of its own. "
            "Nothing was run"
        )
    if record:
        conn.exec_driver_sql("UPDATE zdr.cluster SET event_log = %s", (source,))


def rebase(
    conn: sa.Connection, reader: EventReader, *, kept_transaction_ids: bool = False
) -> Rebased:
    """Record this cluster as the log's, in the caller's transaction (see the module's
    docstring); a no-op where it is recorded already.

    A log read by position needs nothing else. A reader of one's own that reads by
    transaction id is refused (ClusterChanged), unless ``kept_transaction_ids``: the
    cluster was upgraded in place (``pg_upgrade``) or copied physically, so the ids go
    on (refused if the log holds ids above this cluster's counter, which contradicts it).
    """
    require_same_log(conn, reader)
    recorded, current = _identifiers(conn)
    if not getattr(reader, "transaction_ids", True):
        require_no_moved_checkpoints(conn, reader)
        if recorded != current:
            _record_anew(conn)  # positions only: nothing to re-stamp
        return Rebased(recorded, current, 0, 0)
    stamps: StampedLog | None = getattr(reader, "stamps", None)
    problem = _problem(conn, stamps)
    if problem is None:
        return Rebased(recorded, current, 0, 0)
    if not kept_transaction_ids:
        raise ClusterChanged(
            f"{problem}, and zdr cannot re-stamp the log of {source_of(reader)} (a reader "
            "of its own that reads by transaction id). Nothing was changed"
        )
    highest = conn.exec_driver_sql(_highest(stamps)).scalar()
    if highest is not None and highest >= conn.exec_driver_sql(_NEXT_XID).scalar_one():
        raise ClusterChanged(
            f"{problem}: the transaction ids were not kept (this cluster has not reached "
            "the log's), so this is no in-place upgrade. Nothing was changed"
        )
    _record_anew(conn)
    return Rebased(recorded, current, 0, 0)


def require_no_moved_checkpoints(conn: sa.Connection, reader: EventReader) -> None:
    """Refuse (ClusterChanged) checkpoints of the earlier (transaction id, position) order
    in a database moved to another cluster since they were made: moving them to position
    order (``zdr.ordering``) compares them with the log's stamps, and events appended in
    this cluster are stamped with lower ids than the restored ones."""
    stamps: StampedLog | None = getattr(reader, "stamps", None)
    if stamps is None or stamps.txid_column is None:
        return
    if not conn.exec_driver_sql(
        "SELECT EXISTS (SELECT 1 FROM zdr.checkpoints WHERE txid <> 0)"
    ).scalar_one():
        return
    problem = _problem(conn, stamps)
    if problem is not None:
        raise ClusterChanged(
            f"{problem}, and zdr.checkpoints holds checkpoints of the (transaction id, "
            "position) order of an earlier zdr version, made before the move: run `zdr "
            "rebase` with that version once (it re-stamps them for this cluster), then "
            "this one. Nothing was changed"
        )


def _record_anew(conn: sa.Connection) -> None:
    conn.exec_driver_sql(
        f"UPDATE zdr.cluster SET system_identifier = ({_IDENTIFIER}), recorded_at = now()"
    )
    record(conn)  # an install set up before zdr.cluster existed has no row yet


def database_tag(conn: sa.Connection) -> str:
    """Eight hex digits naming this database (its cluster and name) the same from any URL:
    what tells two environments' pipeline runs and artifacts apart on one Prefect server."""
    identity = conn.exec_driver_sql(
        f"SELECT ({_IDENTIFIER}) || '/' || current_database()"
    ).scalar_one()
    return hashlib.sha256(identity.encode()).hexdigest()[:8]


def _identifiers(conn: sa.Connection) -> tuple[str | None, str]:
    recorded = None
    if conn.exec_driver_sql("SELECT to_regclass('zdr.cluster')").scalar() is not None:
        # (an install set up before zdr.cluster existed has none until its next setup)
        recorded = conn.exec_driver_sql("SELECT system_identifier FROM zdr.cluster").scalar()
    return recorded, conn.exec_driver_sql(_IDENTIFIER).scalar_one()


def _problem(conn: sa.Connection, stamps: StampedLog | None) -> str | None:
    """Why the log's transaction ids do not belong to this cluster, or None."""
    recorded, current = _identifiers(conn)
    if recorded is not None and recorded != current:
        return (
            f"zdr's event log was stamped in PostgreSQL cluster {recorded}, and this is "
            f"cluster {current}"
        )
    highest = conn.exec_driver_sql(_highest(stamps)).scalar()
    next_xid = conn.exec_driver_sql(_NEXT_XID).scalar_one()
    if highest is not None and highest >= next_xid:
        return (
            f"zdr's event log holds transaction id {highest}, above this cluster's next "
            f"one ({next_xid})"
        )
    return None

"""Which PostgreSQL cluster the event log's transaction ids come from.

zdr orders its events by (transaction id, position) and reads only below the
safe horizon (DESIGN.md, invariant 2). A transaction id means something only in
the cluster that assigned it: after ``pg_dump``/``pg_restore`` into another
cluster, or a move by logical replication, new events get ids below the
checkpoints, and every reader would pass over them for good, silently. So zdr
records the cluster's system identifier at setup (``record``), and every runner
checks it as it starts (``require_same``): another cluster, or a checkpoint or an
event above the cluster's transaction-id counter, refuses with ClusterChanged.

``rebase`` re-stamps the log and the checkpoints for the cluster it runs in, with
the application's appends held off meanwhile (an EXCLUSIVE lock on the event
table: readers go on). The checkpoints are cuts in the log's order; events
between two cuts get one new id each cut, the cuts become (that id, the
highest position before it), so every checkpoint has applied exactly the same
events as before. Events appended in this cluster since the move (their row was
written by the transaction whose id they carry) were applied by no checkpoint:
they keep their ids, above all the others, as does every event appended later.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import sqlalchemy as sa

from zdr.errors import ClusterChanged

CREATE_STATEMENT = (
    "zdr.cluster",
    """CREATE TABLE IF NOT EXISTS zdr.cluster (
    system_identifier text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
)""",
)

#: The first transaction id given to rebased events: PostgreSQL's first normal one.
REBASE_FROM = 3

#: An event appended in this cluster: stamped by the transaction that wrote its row
#: (a restored row was written by the restore's transaction, under its old stamp).
#: Such events come after every checkpoint, and keep their stamps.
_STAMPED_HERE = (
    "txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    " AND (txid & 4294967295) = xmin::text::bigint"
)

_IDENTIFIER = "SELECT system_identifier::text FROM pg_control_system()"
_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
_HIGHEST = """SELECT greatest((SELECT max(txid) FROM zdr.checkpoints),
                              (SELECT max(txid) FROM zdr.events))"""


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


def require_same(conn: sa.Connection) -> None:
    """Refuse (ClusterChanged) to run where the log's transaction ids mean nothing."""
    problem = _problem(conn)
    if problem is not None:
        raise ClusterChanged(
            f"{problem}: the database was moved to another PostgreSQL cluster (a dump and "
            "restore, a logical-replication move), and events appended now would be "
            "skipped. Stop the application's appends, run `zdr rebase` "
            "(ReplayManager.rebase()) once, then start the runners again. Nothing was run"
        )


def rebase(conn: sa.Connection) -> Rebased:
    """Re-stamp the log and the checkpoints for this cluster, in the caller's transaction
    (see the module's docstring); a no-op where the log belongs to this cluster."""
    recorded, current = _identifiers(conn)
    if _problem(conn) is None:
        return Rebased(recorded, current, 0, 0)
    conn.exec_driver_sql("LOCK TABLE zdr.events IN EXCLUSIVE MODE")
    conn.exec_driver_sql("LOCK TABLE zdr.checkpoints IN EXCLUSIVE MODE")
    conn.exec_driver_sql(
        """CREATE TEMPORARY TABLE zdr_rebase_cuts ON COMMIT DROP AS
           SELECT txid, position, row_number() OVER (ORDER BY txid, position) AS cut
           FROM (SELECT DISTINCT txid, position FROM zdr.checkpoints
                 WHERE (txid, position) > (0, 0)) AS c"""
    )
    cuts = conn.exec_driver_sql("SELECT count(*) FROM zdr_rebase_cuts").scalar_one()
    below = conn.exec_driver_sql(
        f"""SELECT least(pg_snapshot_xmin(pg_current_snapshot())::text::bigint,
                         (SELECT min(txid) FROM zdr.events WHERE {_STAMPED_HERE}))"""
    ).scalar_one()
    if REBASE_FROM + cuts >= below:
        raise ClusterChanged(
            f"cannot rebase yet: {cuts} checkpoints need transaction ids up to "
            f"{REBASE_FROM + cuts}, and this cluster has only reached {below}. Nothing "
            "was changed"
        )
    events = conn.exec_driver_sql(
        f"""UPDATE zdr.events e SET txid = %s + (
               SELECT count(*) FROM zdr_rebase_cuts c
               WHERE (c.txid, c.position) < (e.txid, e.position))
            WHERE NOT ({_STAMPED_HERE})""",
        (REBASE_FROM,),
    ).rowcount
    checkpoints = conn.exec_driver_sql(
        """UPDATE zdr.checkpoints k
           SET txid = %(first)s + c.cut - 1,
               position = coalesce((SELECT max(e.position) FROM zdr.events e
                                    WHERE e.txid = %(first)s + c.cut - 1), 0),
               updated_at = now()
           FROM zdr_rebase_cuts c WHERE (k.txid, k.position) = (c.txid, c.position)""",
        {"first": REBASE_FROM},
    ).rowcount
    conn.exec_driver_sql("DELETE FROM zdr.cluster")
    record(conn)
    return Rebased(recorded, current, events, checkpoints)


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


def _problem(conn: sa.Connection) -> str | None:
    """Why the log's transaction ids do not belong to this cluster, or None."""
    recorded, current = _identifiers(conn)
    if recorded is not None and recorded != current:
        return (
            f"zdr's event log was stamped in PostgreSQL cluster {recorded}, and this is "
            f"cluster {current}"
        )
    highest = conn.exec_driver_sql(_HIGHEST).scalar()
    next_xid = conn.exec_driver_sql(_NEXT_XID).scalar_one()
    if highest is not None and highest >= next_xid:
        return (
            f"zdr's event log holds transaction id {highest}, above this cluster's next "
            f"one ({next_xid})"
        )
    return None

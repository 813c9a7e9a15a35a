"""The journeys' domain: wallets that open, take deposits of a third, get renamed and seen.

Two projections, each in four versions, as a team writes them first:

* ``wallets``, a ``RowProjector`` (one row per wallet): V1; V2 adds a column
  (``last_seen``, a ``timestamp(0)``); V3 changes the balance's type
  (``numeric(12,2)`` -> ``numeric(14,4)``); V4 drops a column (``owner``).
* ``entries``, per-event ``@handles`` handlers that insert one row per deposit into
  a table with a generated key (``Identity()``) and update an owners table: V1; V2
  adds a column (``kind``); V3 changes a type (``amount`` ``numeric(12,2)`` ->
  ``numeric(14,4)``); V4 drops one (``kind`` again).

The deposits are a third of a unit, so every value the read models hold depends on
the column's scale: and on nothing else (not on where batches are cut). ``fold_*``
are the independent folds the journeys compare against: plain Python over the log,
written with no zdr code, rounding as PostgreSQL stores after each event.
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

import zdr

OPENED, DEPOSITED, RENAMED, SEEN = "WalletOpened", "Deposited", "WalletRenamed", "WalletSeen"
#: Schemas of the two projections.
WALLETS, ENTRIES = "journey_wallets", "journey_entries"


class Application:
    """What the application appends: a deterministic stream of wallet events."""

    def __init__(self, seed: int = 3, wallets: int = 40) -> None:
        self.random = random.Random(seed)
        self.wallets = wallets
        self.opened: list[str] = []
        self.seen = dt.datetime(2026, 1, 1, 12, 0, 0, 400_000)

    def events(self, n: int) -> Iterator[tuple[str, dict[str, Any]]]:
        for _ in range(n):
            if len(self.opened) < self.wallets and (not self.opened or self.random.random() < 0.15):
                wallet = f"w{len(self.opened):03d}"
                self.opened.append(wallet)
                yield wallet, {"type": OPENED, "data": {"wallet": wallet, "owner": f"o-{wallet}"}}
                continue
            wallet = self.random.choice(self.opened)
            roll = self.random.random()
            if roll < 0.75:
                # A third, written as text with more digits than any column keeps.
                yield wallet, {"type": DEPOSITED, "data": {"wallet": wallet, "amount": "0.333333"}}
            elif roll < 0.9:
                self.seen += dt.timedelta(seconds=1, microseconds=250_001)
                data = {"wallet": wallet, "at": self.seen.isoformat()}
                yield wallet, {"type": SEEN, "data": data}
            else:
                owner = f"o-{wallet}-{self.random.randrange(1000)}"
                yield wallet, {"type": RENAMED, "data": {"wallet": wallet, "owner": owner}}


# -- wallets: a RowProjector ---------------------------------------------------------


def _wallets_table(*, balance: sa.Numeric, last_seen: bool, owner: bool) -> sa.Table:
    columns: list[sa.Column[Any]] = [sa.Column("wallet_id", sa.String(10), primary_key=True)]
    if owner:
        columns.append(sa.Column("owner", sa.String(40), default=None))
    columns += [
        sa.Column("balance", balance, nullable=False, default=Decimal(0)),
        sa.Column("deposits", sa.Integer, nullable=False, default=0),
    ]
    if last_seen:
        columns.append(sa.Column("last_seen", postgresql.TIMESTAMP(precision=0), default=None))
    return sa.Table("wallets", sa.MetaData(), *columns, schema=WALLETS)


class WalletsV1(zdr.RowProjector):
    """One row per wallet: owner, balance (two decimals), deposits."""

    name = "wallets"
    table = _wallets_table(balance=sa.Numeric(12, 2), last_seen=False, owner=True)
    partition_by = "stream"

    @zdr.handles(OPENED)
    def opened(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["owner"] = event.data["owner"]

    @zdr.handles(DEPOSITED)
    def deposited(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["balance"] += Decimal(event.data["amount"])
        row["deposits"] += 1

    @zdr.handles(RENAMED)
    def renamed(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["owner"] = event.data["owner"]


class WalletsV2(WalletsV1):
    """V1 and a column added: when the wallet was last seen, to the second."""

    table = _wallets_table(balance=sa.Numeric(12, 2), last_seen=True, owner=True)

    @zdr.handles(SEEN)
    def seen(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["last_seen"] = dt.datetime.fromisoformat(event.data["at"])


class WalletsV3(WalletsV2):
    """V2 with the balance's type changed: four decimals."""

    table = _wallets_table(balance=sa.Numeric(14, 4), last_seen=True, owner=True)


class WalletsV4(WalletsV3):
    """V3 with a column dropped: no owner."""

    table = _wallets_table(balance=sa.Numeric(14, 4), last_seen=True, owner=False)

    @zdr.handles(OPENED, RENAMED)
    def opened(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        pass

    renamed = opened


# -- entries: per-event handlers, a generated key ------------------------------------


def _entries_tables(*, amount: sa.Numeric, kind: bool) -> tuple[sa.Table, sa.Table]:
    metadata = sa.MetaData(schema=ENTRIES)
    columns: list[sa.Column[Any]] = [
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("amount", amount, nullable=False),
    ]
    if kind:
        columns.append(sa.Column("kind", sa.Text, nullable=False))
    entries = sa.Table("entries", metadata, *columns)
    owners = sa.Table(
        "owners",
        metadata,
        sa.Column("wallet_id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("renames", sa.Integer, nullable=False),
    )
    return entries, owners


class EntriesV1(zdr.Projector):
    """A row per deposit (generated id) and an owners table, one statement per event."""

    name = "entries"
    entries, owners = _entries_tables(amount=sa.Numeric(12, 2), kind=False)
    tables = [entries, owners]

    def entry(self, event: zdr.RecordedEvent) -> dict[str, Any]:
        return {"wallet_id": event.stream_id, "amount": Decimal(event.data["amount"])}

    @zdr.handles(DEPOSITED)
    def deposited(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        conn.execute(sa.insert(self.entries).values(**self.entry(event)))

    @zdr.handles(OPENED)
    def opened(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        row = {"wallet_id": event.stream_id, "owner": event.data["owner"], "renames": 0}
        conn.execute(sa.insert(self.owners).values(**row))

    @zdr.handles(RENAMED)
    def renamed(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        conn.execute(
            sa.update(self.owners)
            .where(self.owners.c.wallet_id == event.stream_id)
            .values(owner=event.data["owner"], renames=self.owners.c.renames + 1)
        )


class EntriesV2(EntriesV1):
    """V1 and a column added: the entry's kind."""

    entries, owners = _entries_tables(amount=sa.Numeric(12, 2), kind=True)
    tables = [entries, owners]

    def entry(self, event: zdr.RecordedEvent) -> dict[str, Any]:
        return {**super().entry(event), "kind": "deposit"}


class EntriesV3(EntriesV2):
    """V2 with the amount's type changed: four decimals."""

    entries, owners = _entries_tables(amount=sa.Numeric(14, 4), kind=True)
    tables = [entries, owners]


class EntriesV4(EntriesV1):
    """V3 with a column dropped: no kind."""

    entries, owners = _entries_tables(amount=sa.Numeric(14, 4), kind=False)
    tables = [entries, owners]


VERSIONS = {
    1: (WalletsV1, EntriesV1),
    2: (WalletsV2, EntriesV2),
    3: (WalletsV3, EntriesV3),
    4: (WalletsV4, EntriesV4),
}


def paths(version: int) -> list[str]:
    return [cls.import_path() for cls in VERSIONS[version]]


# -- the independent folds -----------------------------------------------------------


def _stored(value: Decimal, scale: int) -> Decimal:
    """What numeric(p, scale) keeps of a value: PostgreSQL rounds half away from zero."""
    return value.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


def _seconds(at: dt.datetime) -> dt.datetime:
    """What timestamp(0) keeps: the nearest second (half up)."""
    whole = at.replace(microsecond=0)
    return whole + dt.timedelta(seconds=1) if at.microsecond >= 500_000 else whole


def fold_wallets(events: Iterable[zdr.RecordedEvent], version: int) -> dict[str, dict[str, Any]]:
    """Every wallet's row as version ``version`` must leave it, after each event."""
    scale = 2 if version <= 2 else 4
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        wallet = event.data["wallet"]
        row = rows.setdefault(
            wallet,
            {
                "wallet_id": wallet,
                "owner": None,
                "balance": _stored(Decimal(0), scale),
                "deposits": 0,
                "last_seen": None,
            },
        )
        if event.type in (OPENED, RENAMED):
            row["owner"] = event.data["owner"]
        elif event.type == DEPOSITED:
            row["balance"] = _stored(row["balance"] + Decimal(event.data["amount"]), scale)
            row["deposits"] += 1
        elif event.type == SEEN and version >= 2:
            row["last_seen"] = _seconds(dt.datetime.fromisoformat(event.data["at"]))
    for row in rows.values():
        if version < 2:
            del row["last_seen"]
        if version >= 4:
            del row["owner"]
    return rows


def fold_entries(events: Iterable[zdr.RecordedEvent], version: int) -> dict[str, Any]:
    """The entries (as a multiset, their generated ids left out) and the owners."""
    scale = 2 if version <= 2 else 4
    entries: Counter[tuple[Any, ...]] = Counter()
    owners: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.type == DEPOSITED:
            entry: tuple[Any, ...] = (
                event.stream_id,
                _stored(Decimal(event.data["amount"]), scale),
            )
            entries[entry + (("deposit",) if version in (2, 3) else ())] += 1
        elif event.type == OPENED:
            owners[event.stream_id] = {"owner": event.data["owner"], "renames": 0}
        elif event.type == RENAMED:
            owners[event.stream_id]["owner"] = event.data["owner"]
            owners[event.stream_id]["renames"] += 1
    return {"entries": entries, "owners": owners}


def read_wallets(engine: sa.Engine, schema: str = WALLETS) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT * FROM "{schema}".wallets').mappings().all()
    return {row["wallet_id"]: dict(row) for row in rows}


def read_entries(engine: sa.Engine, schema: str = ENTRIES) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT * FROM "{schema}".entries').mappings().all()
        owners = conn.exec_driver_sql(f'SELECT * FROM "{schema}".owners').mappings().all()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "a generated key was given twice"
    entries: Counter[tuple[Any, ...]] = Counter(
        tuple(v for k, v in row.items() if k != "id") for row in rows
    )
    return {
        "entries": entries,
        "owners": {r["wallet_id"]: {"owner": r["owner"], "renames": r["renames"]} for r in owners},
    }


# -- measures: a RowProjector whose every column keeps less than Python holds --------

measures = sa.Table(
    "measures",
    sa.MetaData(),
    sa.Column("wallet_id", sa.String(10), primary_key=True),
    sa.Column("balance", sa.Numeric(8, 2), nullable=False, default=0),
    sa.Column("ratio", sa.REAL, nullable=False, default=0.0),
    sa.Column("code", sa.CHAR(4), default=None),
    sa.Column("width", sa.Integer, nullable=False, default=0),
    sa.Column("label", sa.String(6), default=None),
    sa.Column("last_seen", postgresql.TIMESTAMP(precision=0), default=None),
    sa.Column("gap", sa.Numeric(10, 3), default=None),
    schema="journey_measures",
)


class Measures(zdr.RowProjector):
    """Handlers that read back what they wrote: each result depends on what the column
    kept of the value before (its scale, its width, its precision)."""

    name = "measures"
    table = measures
    partition_by = "stream"

    def key(self, event: zdr.RecordedEvent) -> str:
        return str(event.data["wallet"])

    @zdr.handles(OPENED, RENAMED)
    def named(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["width"] = len(row["code"] or "")  # char(4) pads what it keeps
        row["code"] = "ab"
        row["label"] = "tag" + " " * 5  # varchar(6) cuts trailing spaces past its length

    @zdr.handles(DEPOSITED)
    def deposited(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["balance"] += Decimal(event.data["amount"])
        row["ratio"] += 0.1  # real keeps single precision

    @zdr.handles(SEEN)
    def seen(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        at = dt.datetime.fromisoformat(event.data["at"])
        if row["last_seen"] is not None:  # timestamp(0) keeps whole seconds
            row["gap"] = Decimal((at - row["last_seen"]).total_seconds())
        row["last_seen"] = at


def fold_measures(events: Iterable[zdr.RecordedEvent]) -> dict[str, dict[str, Any]]:
    """Measures' rows, by plain Python: each value as its column keeps it, after each event."""
    import numpy as np

    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        wallet = event.data["wallet"]
        row = rows.setdefault(
            wallet,
            {
                "wallet_id": wallet,
                "balance": Decimal("0.00"),
                "ratio": 0.0,
                "code": None,
                "width": 0,
                "label": None,
                "last_seen": None,
                "gap": None,
            },
        )
        if event.type in (OPENED, RENAMED):
            row["width"] = len(row["code"] or "")
            row["code"] = "ab  "
            row["label"] = "tag   "
        elif event.type == DEPOSITED:
            row["balance"] = _stored(row["balance"] + Decimal(event.data["amount"]), 2)
            row["ratio"] = float(str(np.float32(row["ratio"] + 0.1)))
        elif event.type == SEEN:
            at = dt.datetime.fromisoformat(event.data["at"])
            if row["last_seen"] is not None:
                row["gap"] = _stored(Decimal((at - row["last_seen"]).total_seconds()), 3)
            row["last_seen"] = _seconds(at)
    return rows

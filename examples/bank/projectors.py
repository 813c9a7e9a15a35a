"""The bank's projectors: four live projections and a second version of one of them.

* ``Balances`` (keyed table): a row projector, plain Python per event on the
  account's row (``row["balance"] += amount``); zdr reads and writes the rows a
  batch touches in a few statements.
* ``BalancesV2`` (the same table, two more columns): a hand-written batch
  projector that folds a batch in Python and writes one array upsert.
* ``PerEventBalances``: the same table again, with per-event handlers that each
  run one SQLAlchemy statement (the benchmark's third way).
* ``FrameBalances``: the same table again, a frame projector: each batch as a pandas
  DataFrame, folded with a group-by (the benchmark's fourth way).
* ``History`` (append-only): one row per money movement, written with COPY.
* ``DailyTotals`` (aggregate): folds each batch per day, one upsert per batch.
* ``Accounts`` (directory): per-event handlers, the simplest way to write one;
  it only handles the few events that open or close an account.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import postgresql as pg

import zdr
from zdr.examples.bank.domain import (
    CLOSED,
    DEPOSITED,
    EVENT_TYPES,
    OPENED,
    WITHDRAWN,
    fold_daily_totals,
)
from zdr.projector import physical_name

v1 = sa.MetaData()
v2 = sa.MetaData()

balances_v1 = sa.Table(
    "balances",
    v1,
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text),
    sa.Column("balance", sa.BigInteger, nullable=False, default=0),
    sa.Column("events", sa.Integer, nullable=False, default=0),
    sa.Column("closed", sa.Boolean, nullable=False, default=False),
    sa.Index("balances_owner", "owner"),
    schema="bank_balances",
)

balances_v2 = sa.Table(
    "balances",
    v2,
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("closed", sa.Boolean, nullable=False),
    sa.Column("deposits", sa.Integer, nullable=False),
    sa.Column("last_position", sa.BigInteger, nullable=False),
    sa.Index("balances_owner", "owner"),
    schema="bank_balances",
)

history = sa.Table(
    "transactions",
    v1,
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("account_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("transactions_account", "account_id", "position"),
    schema="bank_history",
)

accounts = sa.Table(
    "accounts",
    v1,
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("closed_at", sa.DateTime(timezone=True)),
    schema="bank_accounts",
)

daily_totals = sa.Table(
    "daily_totals",
    v1,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("opened", sa.Integer, nullable=False, server_default="0"),
    sa.Column("closed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deposited", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("withdrawn", sa.BigInteger, nullable=False, server_default="0"),
    schema="bank_stats",
)


def _array_upsert(
    table: sa.Table, types: dict[str, Any], merge: dict[str, Any], *, key: str = "account_id"
) -> Any:
    """INSERT ... SELECT unnest(arrays) ... ON CONFLICT DO UPDATE, built once per table.

    One statement per batch whatever its size; schema_translate_map still applies
    because it is SQLAlchemy Core.
    """
    source = sa.select(
        *(
            sa.func.unnest(sa.bindparam(name, type_=pg.ARRAY(t))).label(name)
            for name, t in types.items()
        )
    )
    insert = pg.insert(table).from_select(list(types), source)
    return insert.on_conflict_do_update(
        index_elements=[table.c[key]],
        set_={name: expr(table, insert.excluded) for name, expr in merge.items()},
    )


def _added(column: str) -> Any:
    """Merge rule for a counter: the stored value plus the batch's."""
    return lambda table, excluded: table.c[column] + excluded[column]


class Balances(zdr.RowProjector):
    """One row per account: balance, owner, number of events, closed or not."""

    name = "balances"
    table = balances_v1
    partition_by = "stream"  # an account's row depends on its own stream's events only

    def key(self, event: zdr.RecordedEvent) -> str:
        return str(event.data["account_id"])

    @zdr.handles(OPENED)
    def opened(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["owner"] = event.data["owner"]
        row["events"] += 1

    @zdr.handles(DEPOSITED)
    def deposited(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["balance"] += event.data["amount"]
        row["events"] += 1

    @zdr.handles(WITHDRAWN)
    def withdrawn(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["balance"] -= event.data["amount"]
        row["events"] += 1

    @zdr.handles(CLOSED)
    def closed(self, row: zdr.Row, event: zdr.RecordedEvent) -> None:
        row["closed"] = True
        row["events"] += 1


class BalancesV2(zdr.Projector):
    """Balances, version 2: also counts deposits and remembers the last position."""

    name = "balances"
    tables = [balances_v2]
    event_types = frozenset(EVENT_TYPES)
    partition_by = "stream"

    upsert = _array_upsert(
        balances_v2,
        {
            "account_id": sa.Text,
            "owner": sa.Text,
            "balance": sa.BigInteger,
            "events": sa.Integer,
            "closed": sa.Boolean,
            "deposits": sa.Integer,
            "last_position": sa.BigInteger,
        },
        {
            "owner": lambda t, x: sa.func.coalesce(x.owner, t.c.owner),
            "balance": _added("balance"),
            "events": _added("events"),
            "closed": lambda t, x: t.c.closed.op("OR")(x.closed),
            "deposits": _added("deposits"),
            "last_position": lambda t, x: x.last_position,
        },
    )

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        rows = fold_batch(events)
        columns = ["owner", "balance", "events", "closed", "deposits", "last_position"]
        conn.execute(self.upsert, _as_arrays(rows, columns))


class PerEventBalances(zdr.Projector):
    """The same balances as ``Balances``, the simplest way: one SQLAlchemy statement per
    event (what the benchmark compares the other two ways with)."""

    name = "balances"
    tables = [balances_v1]
    pipelined = True  # its handlers only write: their statements need not wait

    @zdr.handles(OPENED)
    def opened(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        conn.execute(
            pg.insert(balances_v1)
            .values(
                account_id=event.data["account_id"],
                owner=event.data["owner"],
                balance=0,
                events=1,
                closed=False,
            )
            .on_conflict_do_update(
                index_elements=[balances_v1.c.account_id],
                set_={"owner": event.data["owner"], "events": balances_v1.c.events + 1},
            )
        )

    @zdr.handles(DEPOSITED, WITHDRAWN)
    def moved(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        sign = 1 if event.type == DEPOSITED else -1
        conn.execute(
            sa.update(balances_v1)
            .where(balances_v1.c.account_id == event.data["account_id"])
            .values(
                balance=balances_v1.c.balance + sign * event.data["amount"],
                events=balances_v1.c.events + 1,
            )
        )

    @zdr.handles(CLOSED)
    def closed(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        conn.execute(
            sa.update(balances_v1)
            .where(balances_v1.c.account_id == event.data["account_id"])
            .values(closed=True, events=balances_v1.c.events + 1)
        )


class FrameBalances(zdr.FrameProjector):
    """The same balances as ``Balances``, a batch at a time as DataFrames: one group-by
    per batch instead of Python per event."""

    name = "balances"
    table = balances_v1
    event_types = frozenset(EVENT_TYPES)
    fields = {"account_id": sa.Text, "owner": sa.Text, "amount": sa.BigInteger}
    key = "account_id"
    partition_by = "stream"

    def handle_frame(self, events: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
        kind = events["type"]
        amount = events["amount"].fillna(0)
        moves = pd.DataFrame(
            {
                "account_id": events["account_id"],
                "balance": amount.where(kind != WITHDRAWN, -amount),
                "events": 1,
                "closed": kind == CLOSED,
            }
        )
        batch = moves.groupby("account_id").agg(
            balance=("balance", "sum"), events=("events", "sum"), closed=("closed", "any")
        )
        # The owner of the batch's last AccountOpened, a missing one too (groupby's
        # last() would skip it and keep an earlier owner: not what one event a batch does).
        opened = events.loc[kind == OPENED].drop_duplicates("account_id", keep="last")
        owners = opened.set_index("account_id")["owner"].reindex(batch.index)
        before = current.set_index("account_id").reindex(batch.index)
        return pd.DataFrame(
            {
                "owner": before["owner"].where(~batch.index.isin(opened["account_id"]), owners),
                "balance": before["balance"].fillna(0) + batch["balance"],
                "events": before["events"].fillna(0) + batch["events"],
                "closed": before["closed"].fillna(False) | batch["closed"],
            },
            index=batch.index,
        ).reset_index()


def fold_batch(events: Sequence[zdr.RecordedEvent]) -> dict[str, dict[str, Any]]:
    """Collapse a batch into one change per account (many updates of a row become one)."""
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        data = event.data
        row = rows.get(data["account_id"])
        if row is None:
            row = rows[data["account_id"]] = {
                "owner": None,
                "balance": 0,
                "events": 0,
                "closed": False,
                "deposits": 0,
                "last_position": 0,
            }
        row["events"] += 1
        row["last_position"] = max(row["last_position"], event.position)
        if event.type == DEPOSITED:
            row["balance"] += data["amount"]
            row["deposits"] += 1
        elif event.type == WITHDRAWN:
            row["balance"] -= data["amount"]
        elif event.type == OPENED:
            row["owner"] = data["owner"]
        elif event.type == CLOSED:
            row["closed"] = True
    return rows


def _as_arrays(
    rows: dict[Any, dict[str, Any]], columns: Sequence[str], *, key: str = "account_id"
) -> dict[str, list[Any]]:
    """Rows keyed by ``key`` as one array per column, the parameters of an array upsert."""
    arrays: dict[str, list[Any]] = {key: list(rows)}
    for column in columns:
        arrays[column] = [row[column] for row in rows.values()]
    return arrays


class History(zdr.Projector):
    """Every deposit and withdrawal, one row each, appended with COPY."""

    name = "history"
    tables = [history]
    event_types = frozenset({DEPOSITED, WITHDRAWN})
    partition_by = "stream"  # a row per event

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        raw = conn.connection.driver_connection
        copy = sql.SQL(
            "COPY {} (position, account_id, kind, amount, recorded_at) FROM STDIN"
        ).format(physical_name(conn, history))
        with raw.cursor() as cur, cur.copy(copy) as out:
            for event in events:
                kind = "deposit" if event.type == DEPOSITED else "withdrawal"
                out.write_row(
                    (
                        event.position,
                        event.data["account_id"],
                        kind,
                        event.data["amount"],
                        event.recorded_at,
                    )
                )


TOTALS = ("opened", "closed", "deposited", "withdrawn")


class DailyTotals(zdr.Projector):
    """Per day: accounts opened and closed, money deposited and withdrawn."""

    name = "daily_totals"
    tables = [daily_totals]
    event_types = frozenset(EVENT_TYPES)

    upsert = _array_upsert(
        daily_totals,
        {
            "day": sa.Date,
            "opened": sa.Integer,
            "closed": sa.Integer,
            "deposited": sa.BigInteger,
            "withdrawn": sa.BigInteger,
        },
        {column: _added(column) for column in TOTALS},
        key="day",
    )

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        conn.execute(self.upsert, _as_arrays(fold_daily_totals(events), TOTALS, key="day"))


class Accounts(zdr.Projector):
    """A directory of accounts and their owners: the simplest kind, one event at a time."""

    name = "accounts"
    tables = [accounts]
    partition_by = "stream"
    pipelined = True  # its handlers only write: their statements need not wait

    @zdr.handles(OPENED)
    def opened(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        conn.execute(
            sa.insert(accounts).values(
                account_id=event.data["account_id"],
                owner=event.data["owner"],
                opened_at=event.recorded_at,
            )
        )

    @zdr.handles(CLOSED)
    def closed(self, event: zdr.RecordedEvent, conn: sa.Connection) -> None:
        conn.execute(
            sa.update(accounts)
            .where(accounts.c.account_id == event.data["account_id"])
            .values(closed_at=event.recorded_at)
        )


#: The projectors that are live before any replay (the demo and tests register these).
LIVE = [Balances, History, DailyTotals, Accounts]

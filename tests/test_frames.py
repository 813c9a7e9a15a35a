"""Frame projectors: a batch as a DataFrame, the rows it returns written exactly once."""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa

import zdr
from tests.support import (
    append,
    assert_balances_match_fold,
    balances,
    following,
    seed,
    wait_for,
)
from zdr.examples.bank.domain import CLOSED, DEPOSITED, OPENED, BankSimulator
from zdr.examples.bank.projectors import Balances, FrameBalances, History
from zdr.store import iter_all


@pytest.mark.parametrize("batch_size", [1, 7, 50_000])
def test_frame_balances_equal_the_fold_of_every_event_live_and_replayed(engine, batch_size):
    manager = zdr.ReplayManager(engine, projectors=[FrameBalances()], batch_size=batch_size)
    manager.setup()
    seed(manager.store, 400 if batch_size == 1 else 2_000, accounts=40)
    manager.project_live()
    assert_balances_match_fold(engine, manager.store)

    manager.create_replay("again", [FrameBalances()])
    replay = manager.start_replay("again", batch_size=batch_size)
    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert_balances_match_fold(engine, manager.store, replay.schemas["bank_balances"])
    assert manager.verify("again").equal


def test_frame_balances_on_every_kind_of_log(engine, log):
    """Built from the batch's events, whichever reader read them."""
    log.seed(1_500, accounts=30)
    manager = zdr.ReplayManager(
        engine, projectors=[FrameBalances()], batch_size=300, reader=log.reader
    )
    manager.setup()
    manager.project_live()
    assert_balances_match_fold(engine, log.reader)
    manager.create_replay("again", [FrameBalances()])
    manager.start_replay("again", batch_size=50_000)
    assert manager.verify("again").equal


def test_promoted_over_a_row_projector_then_rolled_back_under_a_running_live_runner(engine):
    """The live runner goes on with the frame projector once it is promoted, and with the
    row projector again after the rollback, without a restart; each copy equals the fold."""
    manager = zdr.ReplayManager(engine, projectors=[Balances(), History()], batch_size=50)
    manager.setup()
    sim = seed(manager.store, 1_500, accounts=60)
    manager.project_live()
    manager.create_replay("frames", [FrameBalances()])
    manager.start_replay("frames", batch_size=7)
    manager.enable_dual_write("frames")

    def live_caught_up() -> bool:
        return not any(manager.live_lag().values())

    with following(manager):
        append(manager.store, sim.events(300))
        wait_for(lambda: live_caught_up() and manager.get_replay_lag("frames") == 0)
        manager.promote("frames")
        for _ in range(3):
            append(manager.store, sim.events(100))
        wait_for(live_caught_up)
        assert_balances_match_fold(engine, manager.store)
        manager.rollback("frames")
        append(manager.store, sim.events(200))
        wait_for(live_caught_up)
    assert_balances_match_fold(engine, manager.store)
    assert manager.get_replay("frames").state is zdr.ReplayState.ROLLED_BACK


def test_a_partitioned_replay_gives_the_same_rows(engine):
    manager = zdr.ReplayManager(engine, projectors=[FrameBalances()], batch_size=500)
    manager.setup()
    seed(manager.store, 3_000, accounts=90)
    manager.project_live()
    manager.create_replay("parts", [FrameBalances()])
    manager.plan_partitions("parts", 3)
    applied = [manager.replay_partition("parts", i, batch_size=250).events for i in range(3)]
    assert all(applied), "every partition had streams of its own"
    replay = manager.start_replay("parts")
    assert replay.events_applied == 3_000
    assert_balances_match_fold(engine, manager.store, replay.schemas["bank_balances"])
    assert manager.verify("parts").equal


open_accounts = sa.Table(
    "open_accounts",
    sa.MetaData(),
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("deposits", sa.Integer, nullable=False),
    sa.Column("last_deposit_at", sa.DateTime(timezone=True)),
    schema="frame_open",
)


class OpenAccounts(zdr.FrameProjector):
    """Open accounts only: a closed account's row is deleted (the second return value)."""

    name = "open_accounts"
    table = open_accounts
    event_types = frozenset({OPENED, DEPOSITED, CLOSED})
    fields = {"account_id": sa.Text, "owner": sa.Text}
    key = "account_id"

    def handle_frame(self, events, current):
        rows = current.set_index("account_id")
        for _, event in events.iterrows():  # in log order: an account may reopen
            account = event["account_id"]
            if event["type"] == OPENED:
                rows.loc[account, ["owner", "deposits", "last_deposit_at"]] = [
                    event["owner"],
                    0,
                    None,
                ]
            elif event["type"] == CLOSED:
                rows = rows.drop(index=account, errors="ignore")
            elif account in rows.index:
                rows.loc[account, "deposits"] += 1
                rows.loc[account, "last_deposit_at"] = event["recorded_at"]
        gone = sorted(set(events["account_id"]) - set(rows.index))
        return rows.reset_index(), gone


def fold_open_accounts(events) -> dict[str, tuple]:
    rows: dict[str, list] = {}
    for e in events:
        account = e.data.get("account_id")
        if e.type == OPENED:
            rows[account] = [e.data["owner"], 0, None]
        elif e.type == CLOSED:
            rows.pop(account, None)
        elif e.type == DEPOSITED and account in rows:
            rows[account][1] += 1
            rows[account][2] = e.recorded_at
    return {k: tuple(v) for k, v in rows.items()}


def stored_open_accounts(engine, schema="frame_open"):
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f'SELECT account_id, owner, deposits, last_deposit_at FROM "{schema}".open_accounts'
        ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


@pytest.mark.parametrize("batch_size", [1, 7, 50_000])
def test_deleted_keys_and_timestamps_equal_the_fold_live_and_replayed(engine, batch_size):
    manager = zdr.ReplayManager(engine, projectors=[OpenAccounts()], batch_size=batch_size)
    manager.setup()
    sim = BankSimulator(accounts=30, seed=5)
    closing = []
    for account, event in sim.events(300):
        closing.append((account, event))
        if len(closing) % 40 == 0:  # close an account now and then, and open it again
            closing.append((account, {"type": CLOSED, "data": {"account_id": account}}))
            closing.append(
                (account, {"type": OPENED, "data": {"account_id": account, "owner": "zed"}})
            )
            closing.append((account, {"type": CLOSED, "data": {"account_id": account}}))
    append(manager.store, closing)
    manager.project_live()
    expected = fold_open_accounts(manager.store.iter_all())
    assert len(expected) > 10 and len(expected) < 30
    assert stored_open_accounts(engine) == expected
    manager.create_replay("again", [OpenAccounts()])
    replay = manager.start_replay("again", batch_size=batch_size)
    assert stored_open_accounts(engine, replay.schemas["frame_open"]) == expected


class UnluckyBalances(FrameBalances):
    """Fails, vectorised, on a batch holding a deposit of 13."""

    def handle_frame(self, events, current):
        if (events["amount"] == 13).any():
            raise ValueError("13 is unlucky")
        return super().handle_frame(events, current)


def test_a_handler_that_raises_names_the_projector_and_its_event_and_writes_nothing(engine):
    manager = zdr.ReplayManager(engine, projectors=[UnluckyBalances()], batch_size=500)
    manager.setup()
    seed(manager.store, 200, accounts=10)
    [opened] = manager.store.append(
        "acc-x", [{"type": OPENED, "data": {"account_id": "acc-x", "owner": "ada"}}]
    )
    [bad] = manager.store.append(
        "acc-x", [{"type": DEPOSITED, "data": {"account_id": "acc-x", "amount": 13}}]
    )
    seed(manager.store, 50, accounts=3, prefix="later")
    with pytest.raises(
        zdr.ProjectorError,
        match=rf"projector 'balances' failed on event {bad} \(MoneyDeposited, stream 'acc-x'\) "
        r"while projecting to live projection 'balances': ValueError: 13 is unlucky",
    ) as caught:
        manager.project_live()
    assert caught.value.position == bad
    assert "on the frame of events 1..252 (252 events)" in str(caught.value.__cause__.__notes__)
    assert balances(engine) == {}, "the batch is rolled back"
    assert manager.live_lag()["balances"] == 252


def _returning(result):
    class Returning(FrameBalances):
        def handle_frame(self, events, current):
            rows = super().handle_frame(events, current)
            return result(rows)

    return Returning()


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (
            lambda rows: rows.drop(columns=["events", "closed"]),
            r"without the column\(s\) events, closed",
        ),
        (lambda rows: rows.assign(colour="red"), r"with column\(s\) colour that the table"),
        (lambda rows: rows.to_dict(), "returned dict; return a pandas DataFrame"),
        (lambda rows: (rows, None, None), "returned a tuple of 3"),
        (
            lambda rows: rows.assign(balance=rows["balance"] + 0.5),
            "balance has values that do not fit",
        ),
        (lambda rows: rows.assign(balance="many"), "balance is (large_)?string .*takes int64"),
        (lambda rows: pd.concat([rows, rows]), "several rows for one key"),
        (lambda rows: rows.assign(account_id=None), "no value in the key column account_id"),
        (lambda rows: (rows, rows["account_id"]), "both to write and to delete"),
        (lambda rows: (rows.iloc[:0], rows[["owner"]]), "deleted keys .* lack the key column"),
        (lambda rows: (rows.iloc[:0], 5), "returned deleted keys as int"),
        (
            lambda rows: rows.assign(balance=pd.Series([2**70] * len(rows), dtype=object)),
            "column balance holds values Arrow cannot read",
        ),
    ],
)
def test_a_wrong_return_frame_is_refused_naming_what_is_wrong(engine, result, message):
    manager = zdr.ReplayManager(engine, projectors=[_returning(result)])
    manager.setup()
    seed(manager.store, 100, accounts=5)
    with pytest.raises(zdr.ProjectorError, match=f"frame projector 'balances'.*{message}"):
        manager.project_live()
    assert balances(engine) == {}
    assert manager.live_lag()["balances"] == 100


def test_a_payload_field_of_another_type_is_refused_naming_its_event(engine):
    manager = zdr.ReplayManager(engine, projectors=[FrameBalances()])
    manager.setup()
    seed(manager.store, 20, accounts=2)
    [bad] = manager.store.append(
        "acc-000001", [{"type": DEPOSITED, "data": {"account_id": "acc-000001", "amount": "5"}}]
    )
    with pytest.raises(
        zdr.ProjectorError,
        match=rf"payload field 'amount' of event {bad} \(MoneyDeposited, stream 'acc-000001'\) "
        r"is '5', not a int64",
    ):
        manager.project_live()


def test_a_fraction_in_an_integer_field_is_refused_not_truncated(engine):
    """Arrow would read 2.5 as 2 (a deposit of 2.5 stored as 2, the keys 1 and 1.5 one
    row); PostgreSQL refuses it, and so does the frame. A whole 3.0 is 3."""
    manager = zdr.ReplayManager(engine, projectors=[FrameBalances()])
    manager.setup()
    seed(manager.store, 20, accounts=2)
    manager.store.append(
        "acc-000001", [{"type": DEPOSITED, "data": {"account_id": "acc-000001", "amount": 3.0}}]
    )
    manager.project_live()
    assert_balances_match_fold(engine, manager.store)
    [bad] = manager.store.append(
        "acc-000001", [{"type": DEPOSITED, "data": {"account_id": "acc-000001", "amount": 2.5}}]
    )
    with pytest.raises(
        zdr.ProjectorError, match=rf"payload field 'amount' of event {bad} .* is 2.5, not a int64"
    ):
        manager.project_live()


@pytest.mark.parametrize("batch_size", [1, 50])
def test_an_owner_left_out_of_a_later_opening_is_none_whatever_the_batch(engine, batch_size):
    """groupby's last() skips a missing value: an AccountOpened without an owner after
    one with an owner must leave no owner, one event a batch or many, as Balances does."""
    manager = zdr.ReplayManager(engine, projectors=[FrameBalances()], batch_size=batch_size)
    manager.setup()
    opened = [
        {"type": OPENED, "data": {"account_id": "acc-x", "owner": "alice"}},
        {"type": DEPOSITED, "data": {"account_id": "acc-x", "amount": 5}},
        {"type": OPENED, "data": {"account_id": "acc-x", "owner": None}},
    ]
    manager.store.append("acc-x", opened)
    manager.project_live()
    assert balances(engine)["acc-x"]["owner"] is None
    assert_balances_match_fold(engine, manager.store)


def test_a_naive_recorded_at_is_in_the_sessions_time_zone_as_postgresql_reads_it(engine):
    """An application's table whose time column is a timestamp without time zone (a
    Laravel stored_events' created_at): written to a timestamptz, the frame projector
    stores what PostgreSQL's own cast gives in the session's zone (a row projector
    does), not the naive value read as UTC."""
    zone = "Asia/Tokyo"
    tokyo = sa.create_engine(engine.url, connect_args={"options": f"-c TimeZone={zone}"})
    with tokyo.begin() as conn:
        conn.exec_driver_sql(
            """CREATE SCHEMA app;
               CREATE TABLE app.events (id bigserial PRIMARY KEY, stream text NOT NULL,
                                        kind text NOT NULL, data jsonb NOT NULL,
                                        created_at timestamp NOT NULL DEFAULT now())"""
        )
    reader = zdr.readers.TableReader(
        "app.events",
        position="id",
        stream_id="stream",
        type="kind",
        data="data",
        recorded_at="created_at",
    )
    reader.prepare(tokyo)
    seen = sa.Table(
        "seen",
        sa.MetaData(),
        sa.Column("stream_id", sa.Text, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True)),
        schema="frame_seen",
    )

    class Seen(zdr.FrameProjector):
        name = "seen"
        table = seen
        event_types = frozenset({"A"})

        def handle_frame(self, events, current):
            return events[["stream_id", "recorded_at"]].rename(columns={"recorded_at": "at"})

    with tokyo.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO app.events (stream, kind, data, created_at) "
            "VALUES ('s', 'A', '{}', '2024-01-01 10:00')"
        )
    manager = zdr.ReplayManager(tokyo, projectors=[Seen()], reader=reader)
    manager.setup()
    manager.project_live()
    with tokyo.connect() as conn:
        stored, cast = conn.exec_driver_sql(
            "SELECT s.at, e.created_at::timestamptz FROM frame_seen.seen s "
            "JOIN app.events e ON e.stream = s.stream_id"
        ).one()
    tokyo.dispose()
    assert stored == cast, f"stored {stored}, PostgreSQL reads {cast}"


def test_a_float_too_large_for_a_real_column_is_refused_not_stored_as_infinity(engine):
    def handle_frame(self, events, current):
        return pd.DataFrame({"k": events["k"], "n": 1e300})

    table = _table(sa.Column("k", sa.Text, primary_key=True), sa.Column("n", sa.REAL))
    manager = zdr.ReplayManager(
        engine, projectors=[_projector(table=table, handle_frame=handle_frame)]
    )
    manager.setup()
    manager.store.append("s", [{"type": "X", "data": {"k": "a"}}])
    with pytest.raises(zdr.ProjectorError, match=r"column n .*1e\+300 is out of range"):
        manager.project_live()


def _table(*columns):
    return sa.Table("t", sa.MetaData(), *columns, schema="frame_t")


def _projector(**attributes):
    def handle_frame(self, events, current):
        return current

    namespace = {
        "name": "frames",
        "table": _table(sa.Column("k", sa.Text, primary_key=True), sa.Column("n", sa.BigInteger)),
        "event_types": frozenset({"X"}),
        "fields": {"k": sa.Text},
        "key": "k",
        "handle_frame": handle_frame,
    }
    namespace.update(attributes)
    return type("Checked", (zdr.FrameProjector,), namespace)()


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"handle_frame": zdr.FrameProjector.handle_frame}, "needs a handle_frame"),
        ({"fields": {"k": sa.JSON}}, "payload field 'k' is declared"),
        ({"fields": {"position": sa.Text}}, "has the name of an events column"),
        ({"key": "account"}, "key column 'account' is neither an events column"),
        ({"key": ("k", "stream_id")}, "for a primary key of 1"),
        ({"fields": {"k": sa.BigInteger}}, "key column 'k' is int64, the table's t.k is TEXT"),
        ({"table": _table(sa.Column("k", sa.Text))}, "has no primary key"),
        (
            {"table": _table(sa.Column("k", sa.REAL, primary_key=True)), "fields": {"k": sa.REAL}},
            "key column t.k is REAL: a float is no key",
        ),
        (
            {"table": _table(sa.Column("k", sa.Text, primary_key=True), sa.Column("doc", sa.JSON))},
            "column t.doc is JSON, which a frame projector does not write",
        ),
    ],
)
def test_what_cannot_run_is_refused_when_registered(engine, attributes, message):
    with pytest.raises(zdr.ConfigurationError, match=message):
        zdr.ReplayManager(engine, projectors=[_projector(**attributes)])


def test_the_events_frame_has_arrow_columns_in_log_order(engine):
    seen = []

    class Looking(FrameBalances):
        def handle_frame(self, events, current):
            seen.append((events.copy(), current.copy()))
            return super().handle_frame(events, current)

    manager = zdr.ReplayManager(engine, projectors=[Looking()], batch_size=50)
    manager.setup()
    seed(manager.store, 80, accounts=4)
    manager.project_live()
    (first, empty), (second, current) = seen
    assert list(first.columns) == [
        "position", "stream_id", "type", "recorded_at", "account_id", "owner", "amount"
    ]  # fmt: skip
    assert all(isinstance(t, pd.ArrowDtype) for t in first.dtypes)
    assert str(first["amount"].dtype) == "int64[pyarrow]"
    assert first["position"].tolist() == list(range(1, 51))
    assert empty.empty and list(empty.columns) == [
        "account_id",
        "owner",
        "balance",
        "events",
        "closed",
    ]
    events = list(iter_all(manager.store, engine))
    assert first["amount"].isna().sum() == sum(1 for e in events[:50] if "amount" not in e.data)
    assert set(current["account_id"]) == set(second["account_id"]) & set(first["account_id"])

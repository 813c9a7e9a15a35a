"""EventsourcingReader: an eventsourcing application's log, read where it is (the
``eventsourcing`` extra; CI runs these at its lowest version too)."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

import zdr
import zdr.readers
from tests.support import balances, following, wait_for
from zdr.examples.bank.eventsourced import Account, AccountOpened, bank_app
from zdr.examples.bank.projectors import Balances, BalancesV2

pytestmark = pytest.mark.eventsourcing


def _opened(account: str) -> dict:
    return {"type": "AccountOpened", "data": {"account_id": account, "owner": "zed"}}


@pytest.fixture()
def bank(engine, database_url):
    app = bank_app(database_url)  # after engine: its fixture drops the schemas
    yield app
    app.close()


def test_an_eventsourcing_application_under_load_promotes_what_its_repository_says(bank, engine):
    """Aggregates saved from several threads by the application while zdr projects
    live, replays a new version, dual-writes and promotes: the promoted read model
    equals what the application's repository says about every aggregate."""
    reader = zdr.readers.EventsourcingReader(bank)
    manager = zdr.ReplayManager(engine, projectors=[Balances()], reader=reader, batch_size=300)
    manager.setup()
    ids = [bank.open_account(f"acc-{i:03d}", "ada") for i in range(30)]
    stop, errors = threading.Event(), []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        mine = ids[seed::4]
        try:
            while not stop.is_set():
                account = bank.repository.get(rng.choice(mine))
                for _ in range(rng.randint(1, 3)):
                    if rng.random() < 0.7 or account.balance == 0:
                        account.deposit(rng.randint(1, 100))
                    else:
                        account.withdraw(rng.randint(1, account.balance))
                bank.save(account)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    with following(manager, poll_interval=0.01):
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            manager.create_replay("v2", [BalancesV2()])
            manager.start_replay("v2")
            manager.start_replay("v2")
            manager.enable_dual_write("v2", lag_threshold=100_000)
            time.sleep(0.5)
            # While the application keeps saving: up to what was committed at the call.
            reached = manager.wait_for_live(timeout_s=20)
            assert reached is not None
            assert all(cursor >= reached for cursor in manager.checkpoints().values())
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        wait_for(
            lambda: manager.get_replay_lag("v2") == 0 and sum(manager.live_lag().values()) == 0
        )
        manager.promote("v2")
    assert not errors, errors
    promoted = balances(engine)
    assert len(promoted) == len(ids)
    for aggregate_id in ids:
        account = bank.repository.get(aggregate_id)
        row = promoted[account.account_id]
        assert (row["owner"], row["balance"], row["events"], row["closed"]) == (
            account.owner,
            account.balance,
            account.events,
            account.closed,
        ), account.account_id
        assert row["events"] == account.version


def test_an_eventsourcing_writer_holds_the_next_until_it_commits(bank, engine, database_url):
    """Why no stamps are needed: the recorder's EXCLUSIVE lock makes the next writer
    wait, so notification ids become visible in order."""
    from tests.logs import make_log

    log = make_log("eventsourcing", engine, database_url)
    reader = log.reader
    with engine.connect() as first:
        tx = first.begin()
        [mine] = log.append([("acc-1", _opened("acc-1"))], conn=first)
        second = threading.Thread(target=log.append, args=([("acc-2", _opened("acc-2"))],))
        second.start()
        time.sleep(0.3)
        assert second.is_alive(), "the second writer waits for the lock"
        with engine.connect() as conn:
            assert reader.read(conn, zdr.store.START, 10) == []
        tx.commit()
        second.join(10)
    with engine.connect() as conn:
        got = [e.position for e in reader.read(conn, zdr.store.START, 10)]
    assert got == [mine, mine + 1]
    log.close()


def test_an_eventsourcing_event_is_what_the_mapper_decodes(bank, engine):
    reader = zdr.readers.EventsourcingReader(bank)
    account_id = bank.open_account("acc-x", "ada")
    account = bank.repository.get(account_id)
    account.deposit(42)
    bank.save(account)
    with engine.connect() as conn:
        opened, deposited = reader.read(conn, zdr.store.START, 10)
    assert opened.type == "AccountOpened" and deposited.type == "MoneyDeposited"
    assert opened.stream_id == str(account_id) == deposited.stream_id
    assert deposited.data["amount"] == 42 and deposited.data["originator_version"] == 2
    assert deposited.recorded_at == deposited.data["timestamp"]
    assert deposited.metadata == {"topic": "zdr.examples.bank.eventsourced:MoneyDeposited"}
    assert deposited.cursor == (0, opened.position + 1)


def test_an_eventsourcing_reader_refuses_what_it_cannot_read_in_order(database_url, engine):
    from zdr.examples.bank.eventsourced import Bank

    with pytest.raises(zdr.ConfigurationError, match="PostgreSQL.*POPOApplicationRecorder"):
        zdr.readers.EventsourcingReader(Bank())
    app = bank_app(database_url)
    app.recorder.datastore.enable_db_functions = True
    with pytest.raises(zdr.ConfigurationError, match="POSTGRES_ENABLE_DB_FUNCTIONS"):
        zdr.readers.EventsourcingReader(app)
    app.close()
    other = bank_app(database_url, schema="bank_es_elsewhere")
    reader = zdr.readers.EventsourcingReader(other)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA bank_es_elsewhere CASCADE")
    with (
        pytest.raises(zdr.NotSetUp, match="no table .*bank_events.* same database"),
        engine.connect() as conn,
    ):
        reader.read(conn, zdr.store.START, 10)
    other.close()


def test_an_undecodable_notification_stops_the_reader_naming_it(bank, engine):
    reader = zdr.readers.EventsourcingReader(bank)
    bank.open_account("acc-x", "ada")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE bank_es.bank_events SET state = 'not json'")
    with (
        pytest.raises(zdr.InvalidEvent, match=r"notification 1 .*AccountOpened.*mapper"),
        engine.connect() as conn,
    ):
        reader.read(conn, zdr.store.START, 10)


def test_an_aggregate_id_is_the_stream_id(bank, engine):
    """stream_id is str(originator_id), whatever the id's type."""
    account = Account._create(AccountOpened, id=uuid.uuid4(), account_id="z", owner="o")
    bank.save(account)
    with engine.connect() as conn:
        [event] = zdr.readers.EventsourcingReader(bank).read(conn, zdr.store.START, 10)
    assert event.stream_id == str(account.id)


def test_the_horizon_of_an_eventsourcing_log_says_nothing_holds_it(bank, engine, zdr_cli):
    bank.open_account("acc-1", "ada")
    code, out, err = zdr_cli("horizon", "--reader", "zdr.examples.bank.eventsourced:reader")
    assert code == 0, err
    assert "position order" in out + err

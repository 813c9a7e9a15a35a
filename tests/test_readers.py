"""Readers of logs zdr does not own: a prepared stored_events table, and readers named by
import path (the eventsourcing application's: test_eventsourcing_reader.py)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator

import pytest

import zdr
import zdr.readers
from tests.support import balances, following, seed
from zdr.examples.bank import stored_events
from zdr.examples.bank.domain import BankSimulator, fold_balances
from zdr.examples.bank.projectors import LIVE, Balances


@pytest.fixture()
def laravel(engine) -> Iterator[stored_events.StoredEventsLog]:
    """A stored_events table, not prepared."""
    stored_events.create(engine)
    yield stored_events.StoredEventsLog(engine)


def _fold_every_row(engine) -> dict[str, dict]:
    """The reference: a fold of every row of the table, read with plain SQL (not by zdr)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT event_class, event_properties::text FROM {stored_events.TABLE} ORDER BY id"
        ).all()

    class Row:
        def __init__(self, kind: str, data: str) -> None:
            self.type, self.data = kind, json.loads(data)

    return fold_balances(Row(*row) for row in rows)


def _assert_read_model_is_the_fold(engine, schema: str = "bank_balances") -> None:
    expected = _fold_every_row(engine)
    actual = balances(engine, schema)
    assert set(actual) == set(expected), f"missing: {sorted(set(expected) - set(actual))[:5]}"
    for account, want in expected.items():
        got = actual[account]
        assert (got["balance"], got["events"], got["closed"]) == (
            want["balance"],
            want["events"],
            want["closed"],
        ), account


def _writers(
    log, engine, stop: threading.Event, errors: list, n: int = 3
) -> list[threading.Thread]:
    """Writers on connections of their own whose transactions commit out of order:
    each takes its ids early, holds some transactions open while others commit."""

    def write(seed: int) -> None:
        rng = random.Random(seed)
        sim = BankSimulator(accounts=40, seed=seed, prefix=f"w{seed}")
        try:
            while not stop.is_set():
                with engine.begin() as conn:
                    for pair in sim.events(rng.randint(1, 6)):
                        log.append([pair], conn=conn)
                    if rng.random() < 0.3:
                        time.sleep(rng.uniform(0.005, 0.05))
        except BaseException as exc:  # pragma: no cover - reported by the test
            errors.append(exc)

    return [threading.Thread(target=write, args=(i,)) for i in range(n)]


def test_a_stored_events_table_before_and_after_prepare_loses_nothing(laravel, engine):
    """Rows written before prepare (some in a transaction still open while it runs) and
    after it, by writers committing out of order while the live runner follows: the
    read models equal a fold of every row; before prepare, reading refuses."""
    laravel.import_events(BankSimulator(accounts=100, seed=1).stream(2_000))
    reader = stored_events.table_reader()
    manager = zdr.ReplayManager(engine, projectors=[Balances()], reader=reader)
    with pytest.raises(zdr.NotSetUp, match=r"stored_events.*not prepared.*prepare\(\)"):
        manager.setup()
        manager.project_live()

    # An application transaction is open (it appended) when prepare starts: prepare
    # waits for it in short tries and goes on once it commits.
    with engine.connect() as app:
        app_tx = app.begin()
        laravel.append([("acc-open", _opened("acc-open"))], conn=app)
        preparing = threading.Thread(target=reader.prepare, args=(engine,))
        preparing.start()
        time.sleep(0.3)
        assert preparing.is_alive(), "prepare must wait for the open writer"
        app_tx.commit()
        preparing.join(30)
    assert not preparing.is_alive()
    manager.setup()
    manager.project_live()

    stop, errors = threading.Event(), []
    threads = _writers(laravel, engine, stop, errors)
    for t in threads:
        t.start()
    try:
        with following(manager, poll_interval=0.005):
            time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join(30)
    finally:
        stop.set()
    assert not errors, errors
    manager.project_live()
    _assert_read_model_is_the_fold(engine)
    assert "acc-open" in balances(engine)


def test_by_position_alone_the_same_writers_make_a_reader_skip(laravel, engine):
    """What prepare is for: the same table read by position alone (no stamps) passes
    over events committed late. The test above would fail without the stamps."""
    laravel.import_events(BankSimulator(accounts=20, seed=1).stream(100))
    reader = stored_events.table_reader()
    reader.prepare(engine)
    with engine.connect() as app:
        app_tx = app.begin()
        [late] = laravel.append([("acc-late", _opened("acc-late"))], conn=app)
        [early] = laravel.append([("acc-early", _opened("acc-early"))])
        with engine.connect() as conn:
            by_stamp = [e.position for e in reader.read(conn, zdr.store.START, 1_000)]
            by_position = (
                conn.exec_driver_sql(f"SELECT id FROM {stored_events.TABLE} ORDER BY id")
                .scalars()
                .all()
            )
        app_tx.commit()
    assert early > late
    assert early in by_position and late not in by_position, "what a position reader saw"
    assert early not in by_stamp, "nothing at or after an open writer's transaction is read"


def test_prepare_is_idempotent_and_takes_no_lock_once_done(laravel, engine):
    reader = stored_events.table_reader()
    reader.prepare(engine)
    with engine.connect() as app:
        app_tx = app.begin()
        laravel.append([("acc-a", _opened("acc-a"))], conn=app)
        started = time.monotonic()
        reader.prepare(engine, lock_timeout_s=0.05, attempts=1)  # would time out if it locked
        took = time.monotonic() - started
        app_tx.commit()
    assert took < 1.0
    with engine.connect() as conn:
        triggers = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass "
            "AND tgname = 'zdr_append_trigger'",
            (stored_events.TABLE,),
        ).scalar_one()
    assert triggers == 1


def test_a_sequence_that_caches_is_refused_with_the_way_out(laravel, engine):
    """With CACHE above 1 each session draws from a block of its own: a position drawn
    later can be lower, and a reader by position would pass over it."""
    reader = stored_events.table_reader()
    reader.prepare(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER SEQUENCE bank_laravel.stored_events_id_seq CACHE 20")
    with pytest.raises(zdr.ConfigurationError, match="CACHE 20.*ALTER SEQUENCE .* CACHE 1"):
        stored_events.table_reader().prepare(engine)
    with pytest.raises(zdr.ConfigurationError, match="CACHE 20"), engine.connect() as conn:
        reader.read(conn, zdr.store.START, 10)


def test_a_position_not_drawn_from_a_sequence_is_refused(engine):
    _events_table(engine, ", seq bigint UNIQUE")
    with pytest.raises(zdr.ConfigurationError, match="is not drawn from a sequence"):
        _reader(position="seq").prepare(engine)


def test_a_table_reader_names_what_is_wrong(laravel, engine):
    with pytest.raises(zdr.ConfigurationError, match="plain SQL identifier"):
        zdr.readers.TableReader(
            "app.events; drop", position="id", stream_id="s", type="t", data="d"
        )
    with pytest.raises(zdr.ConfigurationError, match="no table"):
        zdr.readers.TableReader(
            "nowhere.events", position="id", stream_id="s", type="t", data="d"
        ).prepare(engine)
    with pytest.raises(zdr.ConfigurationError, match=r'has no column "uuid"'):
        zdr.readers.TableReader(
            stored_events.TABLE, position="id", stream_id="uuid", type="event_class", data="x"
        ).prepare(engine)


def test_checkpoints_belong_to_one_log(laravel, engine, manager):
    """The database's checkpoints were made on zdr's own log: a runner reading another
    log refuses instead of applying its positions as if they were the same."""
    seed(manager.store, 50)
    manager.project_live()
    reader = stored_events.table_reader()
    reader.prepare(engine)
    other = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE], reader=reader)
    for call in (other.project_live, other.setup, other.live_lag):
        with pytest.raises(zdr.ConfigurationError, match=r"event log zdr.events.*stored_events"):
            call()


def test_until_a_checkpoint_moves_the_log_can_still_change(laravel, engine, manager):
    """A setup without the reader (zdr's own log recorded) applied nothing: the first
    runner with the table's reader takes the database over, and keeps it."""
    laravel.import_events(BankSimulator(accounts=10, seed=1).stream(100))
    reader = stored_events.table_reader()
    reader.prepare(engine)
    other = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE], reader=reader)
    assert other.project_live() == 100
    with pytest.raises(zdr.ConfigurationError, match="event log table"):
        manager.project_live()


def test_checkpoints_made_before_the_log_was_recorded_are_zdr_events(laravel, engine, manager):
    """An install of an earlier version has checkpoints and no recorded log: they were
    made on zdr.events (then the only log of the command line and the flows)."""
    seed(manager.store, 50)
    manager.project_live()
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr.cluster SET event_log = NULL")
    reader = stored_events.table_reader()
    reader.prepare(engine)
    other = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE], reader=reader)
    with pytest.raises(zdr.ConfigurationError, match="made before zdr recorded.*UPDATE"):
        other.project_live()
    manager.project_live()  # zdr's own reader: recorded now
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT event_log FROM zdr.cluster").scalar() == "zdr.events"


# -- readers by import path -----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon", "module:attr"),
        ("a:b:c", "module:attr"),
        ("zdr_nowhere_module:reader", "cannot be imported"),
        ("zdr.readers:missing", "has no attribute 'missing'"),
        ("tests.test_readers:_raises", "calling it raised RuntimeError: broken factory"),
        ("tests.test_readers:_not_a_reader", "not a reader"),
        ("zdr.readers:TableReader", "calling it raised TypeError"),
    ],
)
def test_a_reader_path_that_does_not_give_a_reader_is_refused_naming_why(path, message):
    with pytest.raises(zdr.ConfigurationError, match=message):
        zdr.readers.load(path)


def test_a_reader_path_names_a_reader_or_a_factory(engine, monkeypatch, database_url):
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    found = zdr.readers.load("zdr.examples.bank.stored_events:reader")
    assert isinstance(found, zdr.readers.TableReader)
    assert zdr.readers.load("tests.test_readers:_instance") is _instance


def _raises() -> None:
    raise RuntimeError("broken factory")


def _not_a_reader() -> int:
    return 42


_instance = zdr.readers.TableReader("a.b", position="p", stream_id="s", type="t", data="d")


def _opened(account: str) -> dict:
    return {"type": "AccountOpened", "data": {"account_id": account, "owner": "zed"}}


# -- the command line -------------------------------------------------------------


def test_the_command_line_prepares_and_reads_a_table_named_by_its_reader(laravel, engine, zdr_cli):
    reader = "zdr.examples.bank.stored_events:table_reader"
    laravel.import_events(BankSimulator(accounts=30, seed=3).stream(500))
    balances_path = "zdr.examples.bank.projectors:Balances"
    code, _, err = zdr_cli("setup", "-p", balances_path, "--reader", reader)
    assert code == 0, err
    code, _, err = zdr_cli("live", "-p", balances_path, "--reader", reader, "--max-seconds", "0.5")
    assert code == 1 and "not prepared" in err and "zdr prepare-reader" in err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1

    code, _, err = zdr_cli("prepare-reader", "--reader", reader)
    assert code == 0 and "prepared" in err, err
    code, _, err = zdr_cli("live", "-p", balances_path, "--reader", reader, "--max-seconds", "0.5")
    assert code == 0, err
    code, out, err = zdr_cli("horizon", "--json", "--reader", reader)
    assert code == 0 and json.loads(out)["held"] is False, err
    _assert_read_model_is_the_fold(engine)

    code, _, err = zdr_cli("status", "--reader", "zdr.nowhere:reader")
    assert code == 2 and "cannot be imported" in err
    code, _, err = zdr_cli(
        "live", "-p", balances_path, "--max-seconds", "0.5"
    )  # zdr's own log: refused
    assert code == 2 and "event log" in err and "--reader" in err


# -- what a table must be, and what prepare leaves --------------------------------------


def _events_table(engine, ddl: str = "", name: str = "app.events") -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"""CREATE SCHEMA IF NOT EXISTS app;
                CREATE TABLE {name} (id bigserial PRIMARY KEY, stream text NOT NULL,
                                     kind text NOT NULL, data jsonb, meta json{ddl})"""
        )


def _reader(name: str = "app.events", **columns) -> zdr.readers.TableReader:
    given = {"position": "id", "stream_id": "stream", "type": "kind", "data": "data"}
    return zdr.readers.TableReader(name, **{**given, **columns})


def test_a_table_in_the_public_schema_is_prepared_and_read(engine):
    """Laravel's stored_events lives in public, on the search path: its sequence's name
    must be written with its schema into the functions zdr installs (whose search path
    is pg_catalog), or prepare fails with 'relation ..._id_seq does not exist'."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """CREATE TABLE public.app_events (id bigserial PRIMARY KEY, stream text NOT NULL,
                                               kind text NOT NULL, data jsonb)"""
        )
    reader = _reader("public.app_events")
    try:
        reader.prepare(engine)
        with engine.begin() as conn:  # the application's own INSERT, through the trigger
            conn.exec_driver_sql(
                "INSERT INTO app_events (stream, kind, data) VALUES ('s', 'A', '{\"n\": 1}')"
            )
        with engine.connect() as conn:
            [event] = reader.read(conn, zdr.Cursor(0, 0), 10)
        assert (event.stream_id, event.type, event.data) == ("s", "A", {"n": 1})
    finally:  # public outlives the test (the fixture drops the other schemas)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                """DROP TABLE public.app_events;
                   DO $$ DECLARE f regprocedure; BEGIN
                     FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                              WHERE p.pronamespace = 'public'::regnamespace
                                AND p.proname LIKE 'zdr\\_%%' LOOP
                       EXECUTE 'DROP FUNCTION ' || f;
                     END LOOP; END $$"""
            )


def test_null_or_json_null_metadata_is_none_and_a_null_payload_stops_the_reader(engine):
    """Rows whose payload has no size (NULL) are read, never passed over."""
    _events_table(engine)
    reader = _reader(metadata="meta")
    reader.prepare(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """INSERT INTO app.events (stream, kind, data, meta) VALUES
               ('s', 'A', '{}', '{}'), ('s', 'B', '{}', NULL), ('s', 'C', '{}', '{"x": 1}'),
               ('s', 'D', '{}', 'null'), ('s', 'E', NULL, '{}')"""
        )
    with engine.connect() as conn:
        read = reader.read(conn, zdr.store.START, 4)
        assert [(e.type, e.metadata) for e in read] == [
            ("A", {}),
            ("B", {}),
            ("C", {"x": 1}),
            ("D", {}),
        ]
        with pytest.raises(zdr.InvalidEvent, match=r"event 5 \(E, stream 's'\)"):
            reader.read(conn, read[-1].cursor, 10)


@pytest.mark.parametrize(
    ("ddl", "columns", "message"),
    [
        ("", {"position": "stream"}, "position column stream .* is text: it must be an integer"),
        (", seq numeric", {"position": "seq"}, "is numeric"),
        (", seq bigint", {"position": "seq"}, "has no unique index of its own"),
    ],
)
def test_a_position_that_is_no_unique_integer_is_refused(engine, ddl, columns, message):
    _events_table(engine, ddl)
    with pytest.raises(zdr.ConfigurationError, match=message):
        _reader(**columns).prepare(engine)


def test_a_partitioned_table_is_refused_before_anything_changes(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """CREATE SCHEMA app;
               CREATE TABLE app.events (id bigint, stream text, kind text, data jsonb)
                   PARTITION BY RANGE (id)"""
        )
    with pytest.raises(zdr.ConfigurationError, match="is a partitioned table"):
        _reader().prepare(engine)
    with engine.connect() as conn:
        columns = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'app.events'::regclass "
            "AND attname = 'zdr_txid'"
        ).scalar_one()
    assert columns == 0


def test_a_disabled_trigger_is_named_with_the_way_out(engine):
    _events_table(engine)
    reader = _reader()
    reader.prepare(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE app.events DISABLE TRIGGER ALL")
    with pytest.raises(zdr.ConfigurationError, match="is disabled.*ENABLE ALWAYS TRIGGER"):
        _reader().prepare(engine)
    with pytest.raises(zdr.ConfigurationError, match="is disabled"), engine.connect() as conn:
        _reader().read(conn, zdr.store.START, 10)


def test_prepare_creates_nothing_in_zdrs_schema_and_long_names_get_functions_of_their_own(
    engine,
):
    long = "x" * 45
    for suffix in ("one", "two"):
        _events_table(engine, name=f"app.{long}_{suffix}")
        _reader(f"app.{long}_{suffix}").prepare(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regnamespace('zdr')").scalar() is None
        functions = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'zdr_append_trigger_%%'"
        ).scalar_one()
    assert functions == 2


def test_two_prepares_of_one_table_take_turns(engine):
    _events_table(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO app.events (stream, kind, data) "
            "SELECT 's', 'A', '{}' FROM generate_series(1, 20000)"
        )
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            _reader().prepare(engine)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with engine.connect() as conn:
        assert _reader()._missing(conn)[0] == set()


def test_seed_fills_a_stored_events_table_prepared_for_its_reader(engine, zdr_cli):
    code, _, err = zdr_cli("seed", "--events", "700", "--source", "stored-events")
    assert code == 0 and "to bank_laravel.stored_events" in err, err
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql("SELECT count(*) FROM bank_laravel.stored_events").scalar_one()
            == 700
        )

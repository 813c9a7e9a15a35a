"""zdr through a connection pooler, as production often runs PostgreSQL: PgBouncer (Debian's
package, started here on a port of its own) in front of the test server.

Through a transaction pooler (``pool_mode = transaction``, what most applications use)
the application's appends work as they are, and zdr's runners, which hold a session lock
for as long as they run, refuse at once with one sentence instead of leaving the lock in
a pooled session. Through session pooling everything works.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import zdr
from tests.support import assert_balances_match_fold, seed, wait_for
from tests.test_live_path import _opened
from zdr.examples.bank.projectors import LIVE, BalancesV2
from zdr.locks import SHARED_SESSIONS, ZDR_LOCK_SPACE

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
)

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None, reason="PgBouncer is not installed (Debian: apt-get install pgbouncer)"
)

Pooler = Callable[[str], str]  # pool mode -> the database URL through PgBouncer


@pytest.fixture()
def pgbouncer(database_url: str) -> Iterator[Pooler]:
    """Start PgBouncer in a pool mode, in front of the test database; its URL."""
    started: list[tuple[subprocess.Popen[bytes], str]] = []

    def start(mode: str, pool_size: int = 4) -> str:
        server = sa.make_url(database_url)
        folder = tempfile.mkdtemp(prefix="zdr-test-pgbouncer-")
        os.chmod(folder, 0o777)  # PgBouncer may run as another user (below)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        host = server.host or server.query.get("host") or "/var/run/postgresql"
        user = server.username or "postgres"
        Path(folder, "users.txt").write_text(f'"{user}" ""\n')
        config = Path(folder, "pgbouncer.ini")
        config.write_text(
            f"""[databases]
{server.database} = host={host} port={server.port or 5432} dbname={server.database}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
pool_mode = {mode}
default_pool_size = {pool_size}
max_client_conn = 200
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""
        )
        for path in Path(folder).iterdir():
            path.chmod(0o644)
        # PgBouncer will not run as root: as root, it runs as the user that owns the
        # server's socket folder (the embedded server's runs as a user of its own).
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else None
        switch = ["-u", owner or "postgres"] if os.geteuid() == 0 else []
        process = subprocess.Popen([str(PGBOUNCER), *switch, str(config)])
        started.append((process, folder))
        url = server.set(host="127.0.0.1", port=port, username=user, password=None)
        url = url.difference_update_query(["host"])  # the embedded server's socket folder
        pooled = url.render_as_string(hide_password=False)
        probe_engine = sa.create_engine(pooled, poolclass=sa.NullPool)

        def answers() -> bool:
            try:
                with probe_engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return True
            except sa.exc.OperationalError:
                return False

        wait_for(answers, timeout=10)
        probe_engine.dispose()
        return pooled

    yield start
    for process, folder in started:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _events(manager: zdr.ReplayManager) -> int:
    with manager.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM zdr.events").scalar_one())


def _zdr_locks(engine: sa.Engine) -> list[int]:
    """The pids holding any of zdr's advisory locks in this database, as a direct session
    sees them (another database's runners, another test run's, hold locks of their own)."""
    with engine.connect() as conn:
        return list(
            conn.exec_driver_sql(
                """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s
                   AND database = (SELECT oid FROM pg_database
                                   WHERE datname = current_database())""",
                (ZDR_LOCK_SPACE,),
            ).scalars()
        )


def test_the_applications_appends_work_through_a_transaction_pooler(manager, pgbouncer):
    """Six clients append at once, each the same statement over and over: psycopg would
    prepare it after five runs, in one server session, and look for it in another."""
    store = zdr.EventStore(pgbouncer("transaction"))
    failures: list[BaseException] = []

    def append(client: int) -> None:
        try:
            for i in range(60):
                store.append(f"acc-{client}-{i}", [_opened(f"acc-{client}-{i}")])
        except BaseException as exc:  # what the test reports
            failures.append(exc)

    clients = [threading.Thread(target=append, args=(c,)) for c in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(60)
    store.engine.dispose()
    assert not failures, f"{len(failures)} clients failed: {failures[0]!r}"
    assert _events(manager) == 360


def test_import_works_through_a_transaction_pooler(manager, pgbouncer):
    from zdr.examples.bank.domain import BankSimulator

    store = zdr.EventStore(pgbouncer("transaction"))
    for _ in range(7):  # more than psycopg's five runs before it prepares
        store.import_events(BankSimulator(accounts=20, seed=1).stream(100))
    store.engine.dispose()
    assert _events(manager) == 700


def test_runners_refuse_a_transaction_pooler_and_leave_no_lock(manager, engine, pgbouncer):
    seed(manager.store, 100)
    pooled = zdr.ReplayManager(
        pgbouncer("transaction"), projectors=[cls() for cls in LIVE], batch_size=50
    )
    with pytest.raises(zdr.ConfigurationError) as live:
        pooled.follow(max_seconds=2)
    assert str(live.value) == SHARED_SESSIONS
    assert "direct connection" in str(live.value) and "session pooling" in str(live.value)
    manager.create_replay("v2", [BalancesV2()])
    with pytest.raises(zdr.ConfigurationError, match="session of their own"):
        pooled.start_replay("v2")
    assert manager.get_replay("v2").state is zdr.ReplayState.CREATED  # nothing ran
    assert _zdr_locks(engine) == [], "a lock stayed behind in a pooled session"
    assert manager.live_runner_pid() is None
    pooled.engine.dispose()


def test_the_whole_life_cycle_works_through_session_pooling(manager, engine, pgbouncer):
    """A direct connection's behaviour, through PgBouncer's session pooling."""
    seed(manager.store, 500)
    pooled = zdr.ReplayManager(
        pgbouncer("session"), projectors=[cls() for cls in LIVE], batch_size=50
    )
    stop = threading.Event()
    live = threading.Thread(target=lambda: pooled.follow(stop=stop, poll_interval=0.02))
    live.start()
    try:
        wait_for(lambda: pooled.live_runner_pid() is not None)
        pooled.create_replay("v2", [BalancesV2()])
        pooled.start_replay("v2")
        pooled.enable_dual_write("v2")
        seed(pooled.store, 50, prefix="late")
        deadline = time.monotonic() + 10
        while True:
            try:
                pooled.promote("v2")
                break
            except zdr.ReplayLagging:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        stop.set()
        live.join(30)
    replay = manager.get_replay("v2")
    assert replay.state is zdr.ReplayState.LIVE
    assert_balances_match_fold(engine, manager.store)
    pooled.engine.dispose()


def test_zdr_live_through_a_transaction_pooler_exits_with_the_one_sentence(
    manager, engine, pgbouncer, zdr_cli
):
    pooled = pgbouncer("transaction")
    projectors = ",".join(cls.import_path() for cls in LIVE)
    code, out, err = zdr_cli(
        "live", "-p", projectors, "--max-seconds", "2", "--database-url", pooled
    )
    assert code != 0
    assert "need a database session of their own" in " ".join(err.split())
    assert "Traceback" not in err
    assert _zdr_locks(engine) == []


def test_a_live_runner_that_slipped_through_a_transaction_pooler_stops_when_its_lock_moves(
    manager, engine, pgbouncer, monkeypatch
):
    """Under the application's traffic the start-up check can pass by chance (another
    client took the session it looked at): the live runner checks now and then that its
    session still holds its lock, and stops with the pooler sentence when it does not."""
    seed(manager.store, 50)
    pooled = pgbouncer("transaction")
    monkeypatch.setattr(zdr.locks, "require_a_session_of_its_own", lambda conn: None)
    held_here = zdr.locks._held_here
    checks: list[str] = []

    def the_first_check_passes(conn: sa.Connection, name: str) -> bool:
        checks.append(name)  # the one right after taking the lock, as by chance
        return len(checks) == 1 or held_here(conn, name)

    monkeypatch.setattr(zdr.locks, "_held_here", the_first_check_passes)
    monkeypatch.setattr(zdr.runner, "LOCK_CHECK_S", 0.05)
    store = zdr.EventStore(pooled)
    stop = threading.Event()

    def application() -> None:  # appends and reads that take the pooled sessions in turn
        i = 0
        while not stop.is_set():
            i += 1
            store.append(f"app-{i}", [_opened(f"app-{i}")])

    traffic = [threading.Thread(target=application) for _ in range(3)]
    for thread in traffic:
        thread.start()
    runner = zdr.ReplayManager(pooled, projectors=[cls() for cls in LIVE], batch_size=50)
    try:
        with pytest.raises(zdr.LockLost, match="need a database session of their own"):
            runner.follow(max_seconds=20, poll_interval=0.01)
    finally:
        stop.set()
        for thread in traffic:
            thread.join(10)
        store.engine.dispose()
        runner.engine.dispose()


def test_session_pooling_with_one_session_is_not_mistaken_for_a_transaction_pooler(
    manager, pgbouncer, monkeypatch
):
    """The check's second connection finds no free session (the runner holds the only
    one): it does not wait for the pooler's own timeout (two minutes), and passes."""
    seed(manager.store, 100)
    monkeypatch.setattr(zdr.locks, "SECOND_SESSION_WAIT_S", 0.5)
    pooled = zdr.ReplayManager(
        pgbouncer("session", pool_size=1), projectors=[cls() for cls in LIVE], batch_size=50
    )
    started = time.monotonic()
    assert pooled.follow(max_seconds=1.0, poll_interval=0.02) == 100
    assert time.monotonic() - started < 10
    pooled.engine.dispose()

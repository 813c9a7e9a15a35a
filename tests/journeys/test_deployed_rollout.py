"""Journey 3 of DESIGN.md: the same rollout through a deployed pipeline. A real
`prefect server start`, the pipeline deployed with `prefect deploy` from prefect.yaml to
a process work pool, a `prefect worker start`; the approval given with `zdr approve` on
the suspended run; the live runner (`zdr live`) in a process of its own and the
application appending all along. Then a rollback with `zdr rollback` and the pipeline
run again to promote the same replay once more."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.journeys.conftest import ROOT, Journey
from tests.journeys.wallets import paths
from tests.support import wait_for

PIPELINE = "zero-downtime-replay/zero-downtime-replay"


def _environment(api: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "ZDR_DATABASE_URL": database_url,
        "ZDR_PROJECT_DIR": str(ROOT),
        "PYTHONPATH": str(ROOT),  # the worker's runs import the journeys' projectors
    }


def _module(env: dict[str, str], module: str, *arguments: str) -> str:
    """`python -m MODULE ARGS...` in the checkout, as a user types it; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )
    assert done.returncode == 0, (arguments, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


def _prefect(env: dict[str, str], *arguments: str) -> str:
    return _module(env, "prefect", *arguments)


@contextmanager
def worker(env: dict[str, str], log_path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "zdr"],
            cwd=ROOT,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _run(api: str, run_id):
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _approve(env: dict[str, str], key: str) -> None:
    _module(env, "zdr.cli.main", "approve", key, "--approver", "journey")


def _pipeline_promotes(api: str, env: dict[str, str], key: str, version: int, why: str) -> None:
    """A run of the deployed pipeline: it suspends for approval, `zdr approve` answers, the
    worker starts it again and it ends Promoted."""
    with temporary_settings({PREFECT_API_URL: api}):
        started = run_deployment(
            PIPELINE,
            parameters={"replay_key": key, "projectors": paths(version)},
            timeout=0,
        )

    def state() -> str:
        run = _run(api, started.id)
        return f"{run.state.name}: {run.state.message}" if run.state else "no state"

    wait_for(
        lambda: (
            (run := _run(api, started.id)).state is not None
            and (run.state.name == "Suspended" or run.state.is_final())
        ),
        timeout=240,
        interval=0.5,
        message=lambda: f"{why}: the run never asked for approval ({state()})",
    )
    assert _run(api, started.id).state.name == "Suspended", (why, state())
    _approve(env, key)
    ended = wait_for(
        lambda: (run := _run(api, started.id)).state is not None and run.state.is_final() and run,
        timeout=240,
        interval=0.5,
        message=lambda: f"{why}: the approved run did not end ({state()})",
    )
    assert ended.state.name == "Promoted", (why, ended.state.name, ended.state.message)


@pytest.mark.real_server
@pytest.mark.timeout(900)
def test_a_deployed_pipeline_approved_with_zdr_approve_promotes_under_a_running_live_runner(
    prefect_server: str, journey: Journey, zdr_cli, tmp_path
) -> None:
    env = _environment(prefect_server, journey.database_url)
    journey.store.import_events(journey.app.events(3_000))
    assert zdr_cli("setup", "-p", ",".join(paths(1)))[0] == 0
    journey.start_live(paths(1))
    journey.appending.thread.start()

    _prefect(env, "work-pool", "create", "zdr", "--type", "process", "--overwrite")
    _prefect(env, "--no-prompt", "deploy", "--name", "zero-downtime-replay")
    with worker(env, tmp_path / "worker.log"):
        _pipeline_promotes(prefect_server, env, "v2", 2, "first promotion")
        journey.assert_live_is(2)
        assert zdr_cli("rollback", "v2", "--yes")[0] == 0
        journey.assert_live_is(1)
        _pipeline_promotes(prefect_server, env, "v2", 2, "promoted again")
        journey.assert_live_is(2)

    assert journey.appending.error is None, journey.appending.error
    assert journey.live is not None and journey.live.poll() is None

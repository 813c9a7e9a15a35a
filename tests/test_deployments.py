"""Deployments load and validate, and a served one really runs through run_deployment."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import get_current_settings

from tests.support import seed, wait_for
from zdr.deployments.serve import deployments

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "zero-downtime-replay/zero-downtime-replay"
LIVE = "live-projection/live-projection"
SAMPLE_RUN_PARAMETERS = {
    "replay_key": "balances_v2",
    "projectors": ["zdr.examples.bank.projectors:BalancesV2"],
}


def test_the_served_deployments_have_their_flows_parameters_and_schedules():
    served = {f"{d.flow_name}/{d.name}": d for d in deployments()}
    assert set(served) == {
        PIPELINE,
        LIVE,
        "replay-status/replay-status",
        "promote-replay/promote-replay",
        "rollback-replay/rollback-replay",
        "remove-replay/remove-replay",
    }
    assert not served[PIPELINE].schedules, "the pipeline is started by a person"
    [schedule] = served[LIVE].schedules
    assert schedule.schedule.interval == dt.timedelta(seconds=60)
    assert served[LIVE].parameters["max_seconds"] < 60
    assert served[LIVE].concurrency_limit == 1
    for deployment in served.values():
        flow = load_flow_from_entrypoint(str(ROOT / deployment.entrypoint))
        # What a person fills in the UI's run form, plus the deployment's defaults.
        required = deployment._parameter_openapi_schema.required or []
        given = {name: SAMPLE_RUN_PARAMETERS[name] for name in required}
        flow.validate_parameters({**given, **deployment.parameters})  # raises if bad
    assert served[PIPELINE]._parameter_openapi_schema.required == ["replay_key", "projectors"]


def test_prefect_yaml_deployments_load_and_their_parameters_validate():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"zero-downtime-replay", "live-projection"} <= names
    for deployment in spec["deployments"]:
        # Module-path entrypoints: a worker needs the installed package, not this checkout.
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        flow.validate_parameters(deployment.get("parameters", {}))
        assert deployment["work_pool"]["name"] == "zdr"
    live = next(d for d in spec["deployments"] if d["name"] == "live-projection")
    assert live["schedules"] == [{"interval": 60}]


@pytest.mark.usefixtures("prefect_harness")
def test_a_served_deployment_runs_through_run_deployment(manager, engine, database_url):
    seed(manager.store, 300)  # not projected yet: the served live runner will do it
    env = {
        **os.environ,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "ZDR_DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "zdr.deployments.serve", "--paused"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _deployment_exists(LIVE) or server.poll() is not None, timeout=90)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        flow_run = run_deployment(
            LIVE,
            parameters={"max_seconds": 1.0, "database_url": database_url},
            timeout=120,
            poll_interval=1,
        )
        assert flow_run.state.is_completed(), flow_run.state
    finally:
        server.terminate()
        server.wait(30)
    with engine.connect() as conn:
        applied = conn.exec_driver_sql("SELECT sum(events) FROM bank_balances.balances").scalar()
    assert applied == 300


def _deployment_exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except Exception:
            return False

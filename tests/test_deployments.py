"""Deployments load and validate, and a served one really runs through run_deployment."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

import zdr
from tests.support import balances, seed, wait_for
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
    # Runs overlap and take over from each other; a concurrency limit would cancel them.
    assert 60 < served[LIVE].parameters["max_seconds"] < 120
    assert served[LIVE].parameters["take_over"] is True
    assert served[LIVE].concurrency_limit is None
    for deployment in served.values():
        flow = load_flow_from_entrypoint(str(ROOT / deployment.entrypoint))
        # What a person fills in the UI's run form, plus the deployment's defaults.
        required = deployment._parameter_openapi_schema.required or []
        given = {name: SAMPLE_RUN_PARAMETERS[name] for name in required}
        flow.validate_parameters({**given, **deployment.parameters})  # raises if bad
    assert served[PIPELINE]._parameter_openapi_schema.required == ["replay_key", "projectors"]


def test_every_served_deployment_reads_the_log_its_reader_names(monkeypatch, database_url):
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    reader = "zdr.examples.bank.stored_events:table_reader"
    for deployment in deployments(reader=reader):
        assert deployment.parameters["reader"] == reader, deployment.name
        flow = load_flow_from_entrypoint(str(ROOT / deployment.entrypoint))
        given = {
            n: SAMPLE_RUN_PARAMETERS[n] for n in deployment._parameter_openapi_schema.required or []
        }
        flow.validate_parameters({**given, **deployment.parameters})
    monkeypatch.setenv("ZDR_READER", reader)
    assert all(d.parameters["reader"] == reader for d in deployments())
    with pytest.raises(zdr.ConfigurationError, match="cannot be imported"):
        deployments(reader="zdr.nowhere:reader")


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
    assert 60 < live["parameters"]["max_seconds"] < 120 and live["parameters"]["take_over"]
    assert "concurrency_limit" not in live


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


@pytest.mark.real_server
def test_the_scheduled_live_runner_has_no_gaps_and_no_cancelled_runs(
    prefect_server, manager, engine, database_url
):
    """Served as deployed (runs every 8 s, each lasting 15 s, scaled down from 60 and 90;
    a run's process can start 15 s late on a busy machine, as the overtime allows):
    runs hand over to each other, so an append is in the live read model within a
    second at any time, and every run that ended, ended Completed."""
    seed(manager.store, 300)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "ZDR_DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
    }
    served = subprocess.Popen(
        [sys.executable, "-m", "zdr.deployments.serve", "--live-interval", "8", "--live-run", "15"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latencies = []
    try:
        wait_for(lambda: _applied(engine) >= 300 or served.poll() is not None, timeout=120)
        assert served.poll() is None, served.stderr.read().decode()[-2000:]
        watched_from = dt.datetime.now(dt.UTC)
        ends = time.monotonic() + 32  # four runs' worth of handovers
        i = 0
        while time.monotonic() < ends:
            account = f"acc-scheduled-{i}"
            manager.store.append(account, [_opened(account)])
            appended = time.monotonic()
            wait_for(lambda a=account: a in balances(engine), timeout=60, interval=0.01)
            latencies.append((time.monotonic() - appended, dt.datetime.now(dt.UTC)))
            i += 1
        runs = _live_runs(prefect_server)
    finally:
        served.terminate()
        served.wait(60)
    slow = [(f"{s:.2f}s", f"{at:%H:%M:%S.%f}") for s, at in latencies if s >= 1.0]
    if slow:
        pytest.fail(
            f"the live read model stood still: {slow}; runs: {_timeline(prefect_server, runs)}"
        )
    ended = [r for r in runs if r.state.is_final()]
    assert all(r.state.is_completed() for r in ended), [
        (r.name, r.state.name, r.state.message) for r in ended if not r.state.is_completed()
    ]
    handed_over = [r for r in ended if r.end_time and r.end_time > watched_from]
    assert len(handed_over) >= 3, [(r.name, r.state.name, r.end_time) for r in runs]
    # zdr's own log lines reach the run's logs in the UI: here the take-over.
    logs = _log_lines(prefect_server, [r.id for r in handed_over])
    assert any("took over after waiting" in line for line in logs), logs[-20:]


def _timeline(api: str, runs: list) -> list:
    """Each run's scheduled, start and end times and last log lines, for a failure."""
    return [
        (
            r.name,
            r.state.name,
            f"{r.expected_start_time:%H:%M:%S}",
            f"{r.start_time:%H:%M:%S.%f}",
            f"{r.end_time:%H:%M:%S.%f}",
            _log_lines(api, [r.id])[-3:],
        )
        for r in sorted(runs, key=lambda r: r.expected_start_time)
        if r.start_time and r.end_time
    ]


def _applied(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT coalesce(sum(events), 0) FROM bank_balances.balances"
        ).scalar_one()


def _opened(account: str) -> dict:
    return {"type": "AccountOpened", "data": {"account_id": account, "owner": "scheduled"}}


def _live_runs(api: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["live-projection"]))
        )


def _log_lines(api: str, run_ids: list) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
    return [log.message for log in logs]


def _deployment_exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except Exception:
            return False

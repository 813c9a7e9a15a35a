"""Deployments load and validate, and a served one really runs through run_deployment."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from zdr.flows.approval import answer

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "zero-downtime-replay/zero-downtime-replay"
LIVE = "live-projection/live-projection"
V2 = "zdr.examples.bank.projectors:BalancesV2"
SAMPLE_RUN_PARAMETERS = {
    "replay_key": "balances_v2",
    "projectors": ["zdr.examples.bank.projectors:BalancesV2"],
    "partition": 0,
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
        "replay-partition/replay-partition",
    }
    assert not served[PIPELINE].schedules, "the pipeline is started by a person"
    [schedule] = served[LIVE].schedules
    # An active run and a standby, a run every six hours: a few runs a day.
    assert schedule.schedule.interval == dt.timedelta(hours=6)
    assert served[LIVE].parameters == {"max_seconds": 6 * 3600.0, "keep_standby": True}
    assert served[LIVE].concurrency_limit is None  # it would cancel the standby
    # The earlier way, overlapping runs each taking over from the one before.
    [overlapping] = [
        d for d in deployments(live_interval_s=60, live_run_s=90) if d.name == "live-projection"
    ]
    assert overlapping.schedules[0].schedule.interval == dt.timedelta(seconds=60)
    assert overlapping.parameters == {"max_seconds": 90, "take_over": True}
    [alone] = [d for d in deployments(live_run_s=100) if d.name == "live-projection"]
    assert alone.parameters == {"max_seconds": 100, "take_over": True}  # as before
    for deployment in served.values():
        flow = load_flow_from_entrypoint(deployment.entrypoint)
        # What a person fills in the UI's run form, plus the deployment's defaults.
        required = deployment._parameter_openapi_schema.required or []
        given = {name: SAMPLE_RUN_PARAMETERS[name] for name in required}
        flow.validate_parameters({**given, **deployment.parameters})  # raises if bad
    assert served[PIPELINE]._parameter_openapi_schema.required == ["replay_key", "projectors"]


@pytest.mark.usefixtures("prefect_harness")
def test_serve_warns_when_prefect_deploy_put_its_deployments_on_a_work_pool():
    from prefect.client.schemas.actions import WorkPoolCreate

    from zdr.deployments.serve import on_work_pools
    from zdr.flows.operations import replay_status

    assert on_work_pools(["replay-status"]) == []

    async def create_pool() -> None:  # Prefect 3.1's sync client has no create_work_pool
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="zdr-test-pool", type="process"))

    asyncio.run(create_pool())
    replay_status.to_deployment(name="replay-status").apply(work_pool_name="zdr-test-pool")
    [warning] = on_work_pools(["replay-status", "remove-replay"])
    assert "'replay-status' is on work pool 'zdr-test-pool'" in warning
    assert "stopping serve pauses its schedule" in warning


def test_every_served_deployment_reads_the_log_its_reader_names(monkeypatch, database_url):
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    reader = "zdr.examples.bank.stored_events:table_reader"
    for deployment in deployments(reader=reader):
        assert deployment.parameters["reader"] == reader, deployment.name
        flow = load_flow_from_entrypoint(deployment.entrypoint)
        given = {
            n: SAMPLE_RUN_PARAMETERS[n] for n in deployment._parameter_openapi_schema.required or []
        }
        flow.validate_parameters({**given, **deployment.parameters})
    monkeypatch.setenv("ZDR_READER", reader)
    assert all(d.parameters["reader"] == reader for d in deployments())
    with pytest.raises(zdr.ConfigurationError, match="cannot be imported"):
        deployments(reader="zdr.nowhere:reader")


def test_prefect_yaml_declares_the_served_deployments():
    """One set of deployments whichever way they are deployed: same flows, parameters,
    schedules, descriptions and tags in prefect.yaml as in serve.py."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in spec["deployments"]}
    served = {d.name: d for d in deployments()}
    assert set(declared) == set(served)
    for name, deployment in declared.items():
        # Module-path entrypoints: a worker needs the installed package, not this checkout.
        assert deployment["entrypoint"] == served[name].entrypoint, name
        assert load_flow_from_entrypoint(deployment["entrypoint"]).name == served[name].flow_name
        assert deployment.get("parameters", {}) == served[name].parameters, name
        assert " ".join(deployment["description"].split()) == served[name].description, name
        assert deployment["tags"] == served[name].tags, name
        intervals = [s["interval"] for s in deployment.get("schedules", [])]
        assert intervals == [s.schedule.interval.total_seconds() for s in served[name].schedules]
        # The live runner's pool is its own: workers with --limit 1 keep the active run
        # and its standby apart.
        pool = "zdr-live" if name == "live-projection" else "zdr"
        assert deployment["work_pool"]["name"] == pool, name
        assert "concurrency_limit" not in deployment
    # A Quick run starts no rebuild: the pipeline has no replay key or projectors to use.
    assert not {"replay_key", "projectors"} & set(
        declared["zero-downtime-replay"].get("parameters", {})
    )


def test_the_run_form_describes_every_parameter_and_checks_the_key():
    """What the Custom run form shows: a description under every field, and the replay
    key's pattern, so a bad key is flagged before a run exists (the schema a
    `prefect deploy` builds from the source and the one `serve` builds agree)."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in deployments():
        entrypoint = next(
            d["entrypoint"] for d in spec["deployments"] if d["name"] == deployment.name
        )
        for schema in (
            deployment._parameter_openapi_schema,
            parameter_schema_from_entrypoint(entrypoint),
        ):
            properties = schema.properties
            undescribed = [n for n, p in properties.items() if not p.get("description")]
            assert not undescribed, (deployment.name, undescribed)
            if "replay_key" in properties:
                key = properties["replay_key"]
                pattern = key.get("pattern") or next(
                    (a.get("pattern") for a in key.get("anyOf", []) if a.get("pattern")), None
                )
                assert pattern == zdr.names.KEY_PATTERN.pattern, (deployment.name, key)
            assert "database_secret" in properties, deployment.name


@contextmanager
def served(database_url: str, *arguments: str, api: str | None = None) -> Iterator[None]:
    """``python -m zdr.deployments.serve`` in a process of its own, until the block ends."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api or str(get_current_settings().api.url),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "ZDR_DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "zdr.deployments.serve", *arguments],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _deployment_exists(LIVE, api) or server.poll() is not None, timeout=90)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        yield
    finally:
        server.terminate()
        server.wait(60)


@pytest.mark.usefixtures("prefect_harness")
def test_a_served_deployment_runs_through_run_deployment(manager, engine, database_url):
    seed(manager.store, 300)  # not projected yet: the served live runner will do it
    with served(database_url, "--paused"):
        flow_run = run_deployment(
            LIVE,
            parameters={"max_seconds": 1.0, "database_url": database_url},
            timeout=120,
            poll_interval=1,
        )
        assert flow_run.state.is_completed(), flow_run.state
    with engine.connect() as conn:
        applied = conn.exec_driver_sql("SELECT sum(events) FROM bank_balances.balances").scalar()
    assert applied == 300


@pytest.mark.usefixtures("prefect_harness")
def test_a_deployed_pipeline_suspends_for_approval_and_its_result_can_be_read(
    manager, engine, database_url
):
    """Run from a deployment, the pipeline suspends while it waits for approval (its
    process ends: no worker slot, no database connection held), is started again when
    approved, and ends Promoted with its summary persisted: a caller reads it with
    ``run_deployment(...).state.result()``."""
    seed(manager.store, 300)
    manager.project_live()
    with served(database_url, "--paused"):
        started = run_deployment(
            PIPELINE,
            parameters={"replay_key": "deployed_v2", "projectors": [V2]},
            timeout=0,
        )
        waiting = wait_for(
            lambda: _suspended(started.id),
            timeout=120,
            message=lambda: f"the run never suspended: {_state(started.id)}",
        )
        assert waiting.name.startswith("replay-deployed-v2-"), waiting.name
        assert "replay:deployed_v2" in waiting.tags and "projection:balances" in waiting.tags
        # Nothing of the run holds the database while it waits: the pipeline lock is let
        # go of as its process ends (moments after the state changed).
        wait_for(lambda: _lock_is_free(manager, "deployed_v2"), timeout=30, interval=0.2)
        # One question per replay: a second run of the key stops instead of asking too.
        second = run_deployment(
            PIPELINE,
            parameters={"replay_key": "deployed_v2", "projectors": [V2]},
            timeout=180,
            poll_interval=1,
        )
        assert second.state.is_failed(), second.state
        assert "already waits for approval of replay 'deployed_v2'" in second.state.message
        # An answer holds for what was shown: the replay is removed and made again while
        # the run waits, so the restarted run asks again instead of taking the answer.
        manager.remove_replay("deployed_v2")
        tag = manager.database_tag()
        answered = dt.datetime.now(dt.UTC)
        answer("deployed_v2", approve=True, approver="ops-early", database_tag=tag)
        again = wait_for(
            lambda: _suspended(started.id, after=answered),
            timeout=180,
            message=lambda: f"the restarted run did not ask again: {_state(started.id)}",
        )
        assert again.name == waiting.name, "a restarted run keeps its name"
        assert manager.get_replay("deployed_v2").state is zdr.ReplayState.DUAL_WRITING
        answer("deployed_v2", approve=True, approver="ops-dana", database_tag=tag)
        ended = wait_for(lambda: _final(started.id), timeout=180)
    assert ended.state.name == "Promoted", (ended.state.name, ended.state.message)
    summary = ended.state.result()
    assert summary.promoted and summary.approver == "ops-dana", summary
    assert summary.events_applied == 300 and summary.replay_key == "deployed_v2"
    assert manager.get_replay("deployed_v2").state is zdr.ReplayState.LIVE


def _lock_is_free(manager, key: str) -> bool:
    try:
        with manager.pipeline_lock(key):
            return True
    except zdr.RunnerBusy:
        return False


def _suspended(run_id, after: dt.datetime | None = None):
    run = _read_run(run_id)
    if not (run.state and run.state.name == "Suspended"):
        return None
    return run if after is None or run.state.timestamp > after else None


def _final(run_id):
    run = _read_run(run_id)
    return run if run.state and run.state.is_final() else None


def _state(run_id) -> str:
    run = _read_run(run_id)
    return f"{run.state.name}: {run.state.message}" if run.state else "no state"


def _read_run(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


@pytest.mark.real_server
def test_the_scheduled_live_runner_has_no_gaps_and_no_cancelled_runs(
    prefect_server, manager, engine, database_url
):
    """Served as deployed (runs every 8 s, each lasting 15 s, scaled down from 60 and 90;
    a run's process can start 15 s late on a busy machine, as the overtime allows):
    runs hand over to each other, so an append is in the live read model within a
    second at any time, and every run that ended, ended Completed."""
    seed(manager.store, 300)
    latencies = []
    with served(database_url, "--live-interval", "8", "--live-run", "15", api=prefect_server):
        wait_for(lambda: _applied(engine) >= 300, timeout=120)
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


def _deployment_exists(name: str, api: str | None = None) -> bool:
    settings = {} if api is None else {PREFECT_API_URL: api}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except Exception:
            return False


@pytest.mark.real_server
def test_a_pipeline_waiting_for_approval_sends_a_notification(
    prefect_server, manager, database_url
):
    """`python -m zdr.deployments.notify --block ...`'s automation: when a pipeline run
    pauses for approval, the server sends the block a notification naming the replay,
    the run's page and the command that answers it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.system import Secret

    from zdr.deployments.notify import notify_on_approval

    received: list[dict] = []
    hook = _webhook(received)
    seed(manager.store, 300)
    manager.project_live()
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        CustomWebhookNotificationBlock(
            name="zdr-test",
            url=f"http://127.0.0.1:{hook.server_port}/hook",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save("zdr-test-hook", overwrite=True)
        notify_on_approval("custom-webhook/zdr-test-hook")
        notify_on_approval("custom-webhook/zdr-test-hook")  # again: replaced, not doubled
        with pytest.raises(zdr.ConfigurationError, match="no notification block"):
            notify_on_approval("custom-webhook/nowhere")
        Secret(value="not a notifier").save("zdr-test-not-a-notifier", overwrite=True)
        with pytest.raises(zdr.ConfigurationError, match="cannot send a notification"):
            notify_on_approval("secret/zdr-test-not-a-notifier")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(ROOT)}
    pipeline = subprocess.Popen(
        [sys.executable, "-c", WAITING_PIPELINE, database_url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: received or pipeline.poll() is not None,
            timeout=120,
            interval=0.2,
            message=lambda: "no notification came",
        )
        assert pipeline.poll() is None, pipeline.stderr.read()[-3000:]
        time.sleep(3)  # a second automation would have sent a second notification by now
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            answer("notified", approve=False, approver="ops", database_tag=manager.database_tag())
        pipeline.wait(120)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
        hook.shutdown()
    [message] = received
    assert message["subject"] == "Replay notified waits for approval", message
    assert "zdr approve notified" in message["body"], message["body"]
    assert "/runs/flow-run/" in message["body"], message["body"]


@pytest.mark.real_server
@pytest.mark.timeout(300)
def test_no_live_runner_at_work_sends_a_notification(prefect_server, manager, database_url):
    """`notify --live-silent-after S`: a live runner with a standby sends heartbeats
    while active; once none has been at work for S seconds, the server notifies."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from zdr.deployments.notify import LIVE_AUTOMATION_NAME, notify_when_live_is_silent

    received: list[dict] = []
    hook = _webhook(received)
    seed(manager.store, 100)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        CustomWebhookNotificationBlock(
            name="zdr-test-live",
            url=f"http://127.0.0.1:{hook.server_port}/hook",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save("zdr-test-live-hook", overwrite=True)
        with pytest.raises(zdr.ConfigurationError, match="30 s or more"):
            notify_when_live_is_silent("custom-webhook/zdr-test-live-hook", 5)
        notify_when_live_is_silent("custom-webhook/zdr-test-live-hook", 30)
        try:
            # Active with a standby for 12 s (heartbeats), handed over to a plain run
            # that ends 20 s after it started: then no live runner is at work. Each run
            # in a process of its own, as a worker starts it.
            env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(ROOT)}
            run = "from zdr.flows.operations import live_projection as f; f({})"
            active = subprocess.Popen(
                [sys.executable, "-c", run.format(
                    f"database_url={database_url!r}, max_seconds=12.0, keep_standby=True"
                )],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_for(lambda: manager.live_runner_pid() is not None, timeout=60)
            subprocess.run(
                [sys.executable, "-c", run.format(
                    f"database_url={database_url!r}, max_seconds=20.0, take_over=True"
                )],
                cwd=ROOT, env=env, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            active.wait(30)
            silent_since = time.monotonic()
            assert not received, "a notification while a live runner was at work"
            wait_for(lambda: received, timeout=150, interval=1, message=lambda: "none came")
            print(f"notified {time.monotonic() - silent_since:.0f} s after the last runner")
        finally:
            Automation.read(name=LIVE_AUTOMATION_NAME).delete()
            hook.shutdown()
    message = received[0]
    assert message["subject"] == "No zdr live runner at work"
    assert "stand still" in message["body"], message["body"]


def test_the_notification_command_names_a_missing_or_unreachable_server_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    command = [sys.executable, "-m", "zdr.deployments.notify", "--block", "slack-webhook/x"]
    for api, says in [
        (None, "PREFECT_API_URL is not set"),
        ("http://127.0.0.1:1/api", "cannot reach"),
    ]:
        run_env = env if api is None else {**env, "PREFECT_API_URL": api}
        done = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


WAITING_PIPELINE = """
import sys
from zdr.flows.zero_downtime_replay import zero_downtime_replay
zero_downtime_replay(
    replay_key="notified",
    projectors=["zdr.examples.bank.projectors:BalancesV2"],
    database_url=sys.argv[1],
    approval_timeout_s=300,
)
"""


def _webhook(received: list[dict]):
    """An HTTP server on a free port that keeps each JSON body POSTed to it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

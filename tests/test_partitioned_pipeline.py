"""The pipeline with ``partitions``: a replay-partition task per partition on the flow's
task runner (the default one, and prefect-dask's with two local worker processes)."""

from __future__ import annotations

import logging

import pytest

import zdr
from tests.support import (
    assert_balances_match_fold,
    assert_history_exactly_once,
    seed,
    wait_for,
)
from tests.test_flows import LiveTraffic
from zdr.flows.zero_downtime_replay import zero_downtime_replay

pytestmark = pytest.mark.usefixtures("prefect_harness")

BALANCES = "zdr.examples.bank.projectors:BalancesV2"
HISTORY = "zdr.examples.bank.projectors:History"
TOTALS = "zdr.examples.bank.projectors:DailyTotals"


@pytest.fixture()
def logged(caplog):
    """The run's log lines, as the flow's and tasks' loggers wrote them."""
    caplog.set_level(logging.INFO, logger="prefect")
    return lambda: [record.getMessage() for record in caplog.records]


def _partition_runs(manager: zdr.ReplayManager, key: str) -> dict[str, int]:
    runs = manager.require_replay(key).runs
    found: dict[str, int] = {}
    for run in runs:
        if run.kind.startswith("partition"):
            found[run.kind] = found.get(run.kind, 0) + run.events
    return found


def _pipeline(manager, database_url, key, projectors, flow=zero_downtime_replay, **more):
    with LiveTraffic(manager):
        state = flow(
            replay_key=key,
            projectors=projectors,
            database_url=database_url,
            batch_size=400,
            events_per_task=1_000,
            auto_approve=True,
            return_state=True,
            **{"partitions": 2, **more},
        )
    manager.project_live()
    return state


def test_the_pipeline_replays_in_partitions_and_promotes_what_equals_the_fold(
    manager, engine, database_url, logged
):
    seed(manager.store, 4_000, accounts=150)
    manager.project_live()

    state = _pipeline(manager, database_url, "split", [BALANCES, HISTORY])

    summary = state.result()
    assert summary.promoted and summary.state == "live"
    runs = _partition_runs(manager, "split")
    assert sorted(runs) == ["partition 1/2", "partition 2/2"]
    assert all(events > 0 for events in runs.values())
    assert sum(runs.values()) >= 4_000 - 1, "the history went through the partitions"
    assert_balances_match_fold(engine, manager.reader)
    assert_history_exactly_once(engine, manager.reader)
    lines = [line for line in logged() if "in 2 partitions" in line]
    assert lines and "a task each on ThreadPoolTaskRunner" in lines[0], logged()
    # Each partition's task run is named for its partition and round (4,000 events at
    # 1,000 a task: more than one round), so the runs list tells them apart.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]})
        )
    names = sorted(t.name for t in task_runs if t.name.startswith("replay-partition"))
    assert "replay-partition-1-of-2-round-1" in names, names
    assert "replay-partition-2-of-2-round-2" in names, names
    assert len(names) == len(set(names)), names


def test_projectors_that_cannot_be_partitioned_replay_with_one_reader_and_the_logs_say_so(
    manager, engine, database_url, logged
):
    seed(manager.store, 2_000, accounts=100)
    manager.project_live()

    state = _pipeline(manager, database_url, "whole", [BALANCES, TOTALS])

    assert state.result().promoted
    assert _partition_runs(manager, "whole") == {}
    assert_balances_match_fold(engine, manager.reader)
    assert any(
        "cannot run in partitions: projector 'daily_totals' does not declare partition_by" in line
        and "one reader replays it" in line
        for line in logged()
    ), logged()


@pytest.mark.dask
def test_the_pipeline_on_a_dask_cluster_of_two_worker_processes(
    manager, engine, database_url, logged
):
    from prefect_dask import DaskTaskRunner

    seed(manager.store, 4_000, accounts=150)
    manager.project_live()
    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True}
    )
    on_dask = zero_downtime_replay.with_options(task_runner=runner)

    state = _pipeline(manager, database_url, "dask", [BALANCES, HISTORY], flow=on_dask)

    assert state.result().promoted
    assert sorted(_partition_runs(manager, "dask")) == ["partition 1/2", "partition 2/2"]
    assert_balances_match_fold(engine, manager.reader)
    assert_history_exactly_once(engine, manager.reader)
    assert any("a task each on DaskTaskRunner" in line for line in logged()), logged()


def test_partitions_as_flow_runs_of_the_replay_partition_deployment(manager, engine, database_url):
    """partition_deployment: each partition a flow run of its own (a subflow of the
    pipeline's run, on whatever runs the deployment: here `serve`, as a work pool's
    workers would), named and tagged for the replay."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment

    from tests.test_deployments import PIPELINE, _final, served

    seed(manager.store, 3_000, accounts=150)
    manager.project_live()
    with served(database_url, "--paused"), LiveTraffic(manager):
        started = run_deployment(
            PIPELINE,
            parameters={
                "replay_key": "subflows",
                "projectors": [BALANCES, HISTORY],
                "database_url": database_url,
                "partitions": 2,
                "partition_deployment": "replay-partition/replay-partition",
                "auto_approve": True,
                "batch_size": 400,
            },
            timeout=0,
        )
        ended = wait_for(lambda: _final(started.id), timeout=240)
    manager.project_live()
    assert ended.state.name == "Promoted", (ended.state.name, ended.state.message)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["replay:subflows"]))
        )
    partitions = {run.name: run for run in runs if "-partition-" in run.name}
    assert sorted(partitions) == [
        "replay-subflows-partition-1-of-2",
        "replay-subflows-partition-2-of-2",
    ]
    assert all(run.state.is_completed() for run in partitions.values())
    database_tag = f"zdr-db-{manager.database_tag()}"
    assert all(database_tag in run.tags for run in partitions.values())
    assert sorted(_partition_runs(manager, "subflows")) == ["partition 1/2", "partition 2/2"]
    assert_balances_match_fold(engine, manager.reader)
    assert_history_exactly_once(engine, manager.reader)


def test_a_partition_deployment_needs_a_database_the_workers_can_reach(manager, database_url):
    with pytest.raises(zdr.ConfigurationError, match="needs database_url or database_secret"):
        zero_downtime_replay(
            replay_key="nowhere",
            projectors=[BALANCES],
            partitions=2,
            partition_deployment="replay-partition/replay-partition",
        )


def test_a_run_after_a_crash_goes_on_with_the_partitions_an_earlier_run_made(
    manager, engine, database_url, logged
):
    """An earlier run cut the replay in 3 and stopped; this run asks for one reader: it
    finishes the 3 partitions first (they must), says so, and promotes."""
    seed(manager.store, 2_000, accounts=100)
    manager.project_live()
    manager.create_replay("again", [BALANCES])
    manager.plan_partitions("again", 3)
    manager.replay_partition("again", 1)

    state = _pipeline(manager, database_url, "again", [BALANCES], partitions=1)

    assert state.result().promoted
    assert sorted(_partition_runs(manager, "again")) == [
        "partition 1/3",
        "partition 2/3",
        "partition 3/3",
    ]
    assert any(
        "replay 'again' was cut into 3 partitions by an earlier run: going on with them" in line
        for line in logged()
    ), logged()
    assert_balances_match_fold(engine, manager.reader)


@pytest.mark.dask
def test_a_deployed_pipeline_runs_its_partitions_on_a_dask_cluster_it_is_given(
    manager, engine, database_url, monkeypatch
):
    """dask_address: a run of the deployment (not `zdr run`, not Python) sends its
    partitions' tasks to a running Dask scheduler, a subflow per round."""
    from distributed import LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment
    from prefect.settings import get_current_settings

    from tests.test_deployments import PIPELINE, _final, served

    seed(manager.store, 3_000, accounts=150)
    manager.project_live()
    # The cluster's worker processes report their task runs to the same Prefect API.
    monkeypatch.setenv("PREFECT_API_URL", str(get_current_settings().api.url))
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        served(database_url, "--paused"),
        LiveTraffic(manager),
    ):
        started = run_deployment(
            PIPELINE,
            parameters={
                "replay_key": "on_dask",
                "projectors": [BALANCES, HISTORY],
                "partitions": 2,  # the database: the worker's ZDR_DATABASE_URL
                "dask_address": cluster.scheduler_address,
                "auto_approve": True,
                "batch_size": 400,
            },
            timeout=0,
        )
        ended = wait_for(lambda: _final(started.id), timeout=240)
        with get_client(sync_client=True) as client:
            workers_ran = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["replay:on_dask"]))
            )
    manager.project_live()
    assert ended.state.name == "Promoted", (ended.state.name, ended.state.message)
    rounds = [run for run in workers_ran if "-partitions-round-" in run.name]
    assert rounds and all(r.name.startswith("replay-on_dask-partitions-round-") for r in rounds)
    # A subflow's arguments show in the UI: the database as the run was given it (here
    # none: the worker's environment), never the URL it found.
    assert all(r.parameters["database_url"] is None for r in rounds)
    assert not any(database_url in str(r.parameters) for r in rounds)
    assert sorted(_partition_runs(manager, "on_dask")) == ["partition 1/2", "partition 2/2"]
    assert_balances_match_fold(engine, manager.reader)
    assert_history_exactly_once(engine, manager.reader)

"""No database password reaches what a Prefect run shows: its parameters, logs,
artifacts, task runs or result. `zdr run` hands the URL to the run by reference, and
tags the run with its key and database from its creation."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, LogFilter

from tests.support import seed
from zdr.config import to_libpq_url

V2 = "zdr.examples.bank.projectors:BalancesV2"
PASSWORD = "envPW123"  # trust auth here: any password is accepted


def with_password(database_url: str) -> str:
    return to_libpq_url(
        sa.make_url(database_url).set(password=PASSWORD).render_as_string(hide_password=False)
    )


def everything_the_run_shows(key: str) -> tuple[dict, str]:
    """The run's parameters and, as one text, all Prefect holds about it."""

    async def read() -> tuple[dict, str]:
        async with get_client() as client:
            (run,) = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"replay:{key}"]))
            )
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id={"any_": [run.id]}), limit=200
            )
            artifacts = await client.read_artifacts(limit=200)
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [run.id]})
            )
            shown = [run.model_dump_json()]
            shown += [log.message for log in logs]
            shown += [a.model_dump_json() for a in artifacts]
            shown += [t.model_dump_json() for t in task_runs]
            return run.parameters, "\n".join(shown)

    from prefect.utilities.asyncutils import run_coro_as_sync

    return run_coro_as_sync(read())


@pytest.mark.usefixtures("prefect_harness")
def test_zdr_run_keeps_the_environments_password_out_of_the_run(
    cli, manager, database_url, monkeypatch
):
    seed(manager.store, 300)
    manager.project_live()
    monkeypatch.setenv("ZDR_DATABASE_URL", with_password(database_url))
    # The run is findable by key and database from its creation, not once the flow has
    # tagged itself: with the flow's own tagging off, the tags are there all the same.
    monkeypatch.setattr("zdr.flows.zero_downtime_replay._tag_this_run", lambda *tags: None)
    code, out, err = cli("run", "hidden", "-p", V2, "--auto-approve", "--json")
    assert code == 0, err
    assert json.loads(out)["promoted"] is True
    parameters, shown = everything_the_run_shows("hidden")
    assert parameters["database_url"] is None and parameters["replay_key"] == "hidden"
    assert PASSWORD not in shown and PASSWORD not in out + err
    assert f"zdr-db-{manager.database_tag()}" in shown  # the run's tag names the database


@pytest.mark.usefixtures("prefect_harness")
def test_zdr_run_takes_the_database_from_a_secret_block(cli, manager, database_url, monkeypatch):
    from prefect.blocks.system import Secret

    seed(manager.store, 300)
    manager.project_live()
    Secret(value=with_password(database_url)).save("zdr-test-database", overwrite=True)
    # The shell's ZDR_DATABASE_URL is a default: the secret named on the command line wins.
    monkeypatch.setenv("ZDR_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    code, out, err = cli(
        "run", "secret", "-p", V2, "--auto-approve", "--json",
        "--database-secret", "zdr-test-database",
    )  # fmt: skip
    assert code == 0, err
    parameters, shown = everything_the_run_shows("secret")
    assert parameters["database_secret"] == "zdr-test-database"
    assert parameters["database_url"] is None
    assert PASSWORD not in shown

    code, _, err = cli(
        "run", "both", "-p", V2, "--database-url", database_url,
        "--database-secret", "zdr-test-database",
    )  # fmt: skip
    assert code == 2 and "not both" in err


@pytest.mark.usefixtures("prefect_harness")
def test_a_flow_given_a_password_in_database_url_warns(database_url, caplog):
    from prefect import flow

    from zdr.flows.parameters import database

    @flow
    def resolve(url: str) -> str:
        return database(url, None)

    # The same database (a URL to a socket names its folder after the database name).
    resolved = sa.make_url(resolve(with_password(database_url)))
    assert resolved.database == sa.make_url(database_url).database
    assert any(
        "database_url holds a password" in r.getMessage() and r.levelname == "WARNING"
        for r in caplog.records
    )

"""The whole pipeline as a Prefect flow: run it, answer its approval, or run the demo.

Prefect is imported only when one of these commands runs: the other commands start fast.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.markup import escape
from rich.prompt import Confirm
from rich.table import Table

from zdr.cli.app import (
    AsJson,
    DatabaseUrl,
    Key,
    Projectors,
    ReaderPath,
    app,
    err,
    manager_for,
    paths,
    print_json,
    state,
)
from zdr.config import DATABASE_URL_ENV
from zdr.errors import ConfigurationError
from zdr.names import validate_key
from zdr.settings import DEFAULTS

Comment = Annotated[str, typer.Option(help="Why.")]


@app.command()
def run(
    ctx: typer.Context,
    key: Key,
    projectors: Projectors,
    auto_approve: Annotated[bool, typer.Option(help="Promote without asking.")] = False,
    lag_threshold: Annotated[int, typer.Option(min=0)] = DEFAULTS.lag_threshold,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULTS.batch_size,
    approval_timeout: Annotated[
        int, typer.Option(min=1, help="Seconds to wait.")
    ] = DEFAULTS.approval_timeout_s,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
    max_catch_up_rounds: Annotated[
        int, typer.Option(min=1, help="Catch-up rounds before giving up (the replay is kept).")
    ] = DEFAULTS.catch_up_rounds,
    remove_on_reject: Annotated[
        bool, typer.Option(help="On a rejection, drop the replay instead of keeping it.")
    ] = False,
    events_per_task: Annotated[
        int, typer.Option(min=1, help="Events one replay-batches task applies.")
    ] = DEFAULTS.events_per_task,
    partitions: Annotated[
        int,
        typer.Option(
            min=1,
            help="Replay the history in this many partitions of streams at once (projectors "
            "with partition_by = 'stream'), a task each.",
        ),
    ] = 1,
    dask_workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Run the partitions' tasks on a local Dask cluster of this many worker "
            "processes (the dask extra); 0: threads of this process.",
        ),
    ] = 0,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Run the tasks on this running Dask scheduler (tcp://host:8786)."),
    ] = None,
    database_secret: Annotated[
        str | None,
        typer.Option(
            metavar="BLOCK",
            help="The name of a Prefect Secret block holding the database URL (instead of "
            "--database-url / ZDR_DATABASE_URL).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the whole pipeline (Prefect flow); approve with `zdr approve KEY` or in the UI."""
    # Bad input fails here in a second, in one line, before Prefect starts a server:
    # the key, the numbers, the projectors, the reader, the URL and the database.
    validate_key(key)
    database_url = _url_or_secret(ctx, database_url, database_secret)
    DEFAULTS.replace(
        batch_size=batch_size,
        lag_threshold=lag_threshold,
        approval_timeout_s=approval_timeout,
        catch_up_rounds=max_catch_up_rounds,
        events_per_task=events_per_task,
    )
    manager = manager_for(database_url, projectors, reader)
    manager.list_replays()
    runner = dask_runner(dask_workers, dask_address)
    ask_here = not auto_approve and not _prefect_server_named()
    if ask_here and not sys.stdin.isatty():
        raise ConfigurationError(
            "zdr run waits for approval, and with no Prefect server configured "
            "(PREFECT_API_URL) it can only ask on its own terminal, and there is none: pass "
            "--auto-approve, or start a server (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api for the run and `zdr approve`"
        )

    from zdr.flows.zero_downtime_replay import zero_downtime_replay

    quiet_prefect_console()

    flow = (
        zero_downtime_replay
        if runner is None
        else zero_downtime_replay.with_options(task_runner=runner)
    )
    run_done = threading.Event()
    if ask_here:
        from zdr.flows.approval import answer_when_asked

        asking = (key, manager.database_tag(), _ask_on_terminal, run_done)
        threading.Thread(target=answer_when_asked, args=asking, daemon=True).start()
    from prefect import tags

    from zdr.flows.approval import run_tags

    try:
        with (
            one_api_for_workers(dask_workers),
            database_by_reference(database_url),
            tags(*run_tags(key, manager.database_tag())),  # the run has them from its creation
        ):
            summary = flow(
                replay_key=key,
                projectors=paths(projectors),
                database_secret=database_secret,
                batch_size=batch_size,
                lag_threshold=lag_threshold,
                approval_timeout_s=approval_timeout,
                auto_approve=auto_approve,
                reader=reader,
                max_catch_up_rounds=max_catch_up_rounds,
                remove_on_reject=remove_on_reject,
                events_per_task=events_per_task,
                partitions=partitions,
            )
    finally:
        run_done.set()
    if as_json:
        print_json(summary.model_dump())
    else:
        verdict = "promoted" if summary.promoted else "not promoted"
        err.print(f"replay [bold]{key}[/bold]: {summary.state}, {verdict}")


def _url_or_secret(
    ctx: typer.Context, database_url: str | None, database_secret: str | None
) -> str | None:
    """The URL to check the database with before the run starts. ``--database-secret``
    wins over ZDR_DATABASE_URL (a default of the shell), not over ``--database-url``."""
    if not database_secret:
        return database_url
    source = ctx.get_parameter_source("database_url")
    if database_url and getattr(source, "name", "") != "ENVIRONMENT":
        raise typer.BadParameter(
            "give --database-url or --database-secret, not both: which database was meant "
            "cannot be told"
        )
    from zdr.flows.parameters import database

    return database(None, database_secret)


@contextmanager
def database_by_reference(url: str | None) -> Iterator[None]:
    """The run reads its database URL from this process's ZDR_DATABASE_URL, never from a
    parameter: a parameter shows in the UI and the API (password included) to anyone who
    can read the run. Its tag ``zdr-db-...`` names the database there instead."""
    if url is None:
        yield
        return
    before = os.environ.get(DATABASE_URL_ENV)
    os.environ[DATABASE_URL_ENV] = url
    try:
        yield
    finally:
        if before is None:
            del os.environ[DATABASE_URL_ENV]
        else:
            os.environ[DATABASE_URL_ENV] = before


def dask_runner(workers: int, address: str | None) -> Any:
    """The flow's Dask task runner for --dask-workers / --dask-address."""
    if workers and address:
        raise typer.BadParameter("give --dask-workers or --dask-address, not both")
    from zdr.flows.parameters import dask_task_runner

    return dask_task_runner(workers, address)


@contextmanager
def one_api_for_workers(workers: int) -> Iterator[None]:
    """A local Dask cluster's worker processes report their task runs to the run's own
    Prefect API. With no server named (``PREFECT_API_URL``), Prefect starts a temporary one
    in each process that needs one (7 s each, and a worker's task runs would not show in
    the run's); start it here and name it in the environment the workers inherit."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not workers or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # stopped at exit, after Prefect has sent the run's last logs to it
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        del os.environ["PREFECT_API_URL"]


Wait = Annotated[
    float,
    typer.Option(
        min=0,
        help="Seconds to wait for what the run does with the answer (0: do not wait).",
    ),
]
FlowRunId = Annotated[
    UUID | None,
    typer.Option(help="The paused run to answer, if not the newest of this key and database."),
]


@app.command()
def approve(
    key: Key,
    approver: Annotated[str, typer.Option(help="Who approves.")] = "",
    comment: Comment = "",
    flow_run_id: FlowRunId = None,
    database_url: DatabaseUrl = None,
    wait: Wait = 300,
) -> None:
    """Approve the paused pipeline run of a replay on this database: it goes on and promotes."""
    _answer(key, True, approver, comment, flow_run_id, database_url, wait)


@app.command()
def reject(
    key: Key,
    approver: Annotated[str, typer.Option(help="Who rejects.")] = "",
    comment: Comment = "",
    flow_run_id: FlowRunId = None,
    database_url: DatabaseUrl = None,
    wait: Wait = 300,
) -> None:
    """Reject the paused pipeline run of a replay on this database: live stays as it is."""
    _answer(key, False, approver, comment, flow_run_id, database_url, wait)


@app.command()
def seed(
    events: Annotated[int, typer.Option(min=1, help="How many bank events to append.")] = 200_000,
    source: Annotated[
        str,
        typer.Option(
            help="Into which log: zdr (zdr.events), eventsourcing (the bank as an "
            "eventsourcing application) or stored-events (a Laravel-era table).",
        ),
    ] = "zdr",
    database_url: DatabaseUrl = None,
) -> None:
    """Append the bank example's events (what the walk-through and the demo replay)."""
    from zdr.examples.bank.demo import seed_events

    count, where = seed_events(database_url, events=events, source=source)
    err.print(f"appended {count:,} bank events to {where}")


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=1_000, help="Events to seed first.")] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking.")] = False,
    reset: Annotated[
        bool,
        typer.Option(
            help="With a named database: drop the zdr and bank schemas an earlier demo "
            "left there first (refused without it); the embedded one starts afresh anyway."
        ),
    ] = False,
    source: Annotated[
        str,
        typer.Option(
            help="The event log: zdr (zdr's own), eventsourcing (an eventsourcing "
            "application's table) or stored-events (a Laravel-era table, no lock).",
        ),
    ] = "zdr",
    database_url: DatabaseUrl = None,
) -> None:
    """Run the zero-downtime replay pipeline on the bank example under live traffic."""
    from zdr.examples.bank.demo import run_demo

    quiet_prefect_console()
    interactive = sys.stdin.isatty() and not yes and not as_json
    if not (interactive or yes or as_json):
        err.print(
            "[dim]·[/dim] no terminal to ask on: the replay is approved as with --yes "
            "(pass --yes or --json to say so)"
        )
    summary = run_demo(
        database_url,
        events=events,
        reset=reset,
        ask=_ask_on_terminal if interactive else None,
        say=lambda line: err.print(f"[dim]·[/dim] {line}"),
        source=source,
    )
    table = Table(title="zero-downtime replay: summary", show_header=False)
    for name, value in summary.as_dict().items():
        if name != "notes":
            table.add_row(name, _cell(value))
    err.print(table)
    for note in summary.notes:
        err.print(f"[yellow]read error:[/yellow] {note}")
    if as_json:
        print_json(summary.as_dict(), indent=None)
    problems = summary.lost or summary.duplicated or summary.read_errors
    if problems or summary.accounts_differing:
        raise typer.Exit(1)


def _answer(
    key: str,
    approve_it: bool,
    approver: str,
    comment: str,
    flow_run_id: UUID | None,
    database_url: str | None,
    wait: float,
) -> None:
    """Answer only a run of the database named here: two environments may share a
    Prefect server, and a run of the other one must never be resumed. Then wait for
    what the run does with the answer: an answer it does not take must not look taken."""
    manager = manager_for(database_url)
    manager.require_replay(key)  # a key that names nothing is bad input, said first
    require_a_prefect_server(f"`zdr {'approve' if approve_it else 'reject'}`")

    from zdr.flows.approval import answer, find_paused_run, outcome, paused_state

    who = approver or os.environ.get("USER") or "zdr-cli"
    tag = manager.database_tag()
    run_id = find_paused_run(key, database_tag=tag, flow_run_id=flow_run_id)
    asked = paused_state(run_id)
    answer(
        key, approve=approve_it, approver=who, comment=comment, database_tag=tag,
        flow_run_id=run_id,
    )  # fmt: skip
    verb = "approved" if approve_it else "rejected"
    err.print(f"{verb} replay [bold]{key}[/bold] (flow run {run_id}) as {who}")
    if not wait:
        return
    done = outcome(run_id, asked, wait)
    if done.kind == "asked_again":
        err.print(
            "[red]the run did not take the answer:[/red] "
            f"{escape(done.message or 'it asks again')} (read its new report, then answer "
            "again)",
            highlight=False,
        )
        raise typer.Exit(1)
    if done.kind == "running":
        err.print(
            f"the run is {done.state} after {wait:g}s and goes on: follow it with "
            f"`prefect flow-run inspect {run_id}`"
        )
        return
    if not done.completed:
        err.print(f"[red]the run ended {done.state}:[/red] {escape(done.message)}")
        raise typer.Exit(1)
    err.print(f"the run took the answer and ended {done.state}: {escape(done.message)}")


def _prefect_server_named() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def require_a_prefect_server(what: str) -> None:
    """A paused run waits on a Prefect server; with none named, every process starts a
    temporary one of its own (20 s and more) and nothing outside the run's process can
    answer it reliably: say so at once."""
    if not _prefect_server_named():
        raise ConfigurationError(
            f"{what} needs a Prefect server, and none is configured (PREFECT_API_URL): a "
            "run waits for approval on a server. Start one (`prefect server start`) and "
            "set PREFECT_API_URL=http://127.0.0.1:4200/api for the run and for this "
            "command; with no server, `zdr run` asks on its own terminal"
        )


def _ask_on_terminal(replay_key: str) -> tuple[bool, str, str]:
    err.print(
        f"\nThe pipeline waits for approval of replay [bold]{replay_key}[/bold] "
        "(its report is in the flow run's artifacts)."
    )
    approve_it = Confirm.ask("Promote it to live?", console=err, default=False)
    return approve_it, os.environ.get("USER") or "terminal", "answered on the terminal"


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}"


def quiet_prefect_console() -> None:
    """Prefect's console lines as a CLI user wants them: a failed run's error without
    its traceback (zdr ends with the error in one line; ``--debug`` keeps tracebacks),
    and no notice of the temporary server it starts for a run with no server named
    (docs/how-to/pipeline-in-prefect.md explains that mode). The run's logs in Prefect
    keep everything."""
    if state["debug"]:
        return
    import prefect  # noqa: F401  (configures Prefect's logging, which this adjusts)
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(
                handler.formatter, _WithoutTraceback
            ):
                handler.setFormatter(_WithoutTraceback(handler.formatter))
    # A logger's filter sees only what is logged on it, not what its children pass up:
    # this drops the "prefect" logger's own INFO lines (the temporary server), never a
    # flow's or a task's logs.
    prefect_logger = logging.getLogger("prefect")
    if _only_warnings not in prefect_logger.filters:
        prefect_logger.addFilter(_only_warnings)


def _only_warnings(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


class _WithoutTraceback(logging.Formatter):
    """Another formatter's lines, without the exception's traceback."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        kept = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = kept

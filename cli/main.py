"""`zdr`: the operator's command line.

Errors are one clear line and exit code 1 (bad input: 2), without a traceback
unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.prompt import Confirm
from rich.table import Table

import zdr

app = typer.Typer(
    name="zdr",
    help="Rebuild event-sourced read models in PostgreSQL without downtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
state = {"debug": False}

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="ZDR_DATABASE_URL",
        help="PostgreSQL URL; without it, an embedded PostgreSQL is used.",
        show_default=False,
    ),
]


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    state["debug"] = debug
    if debug:  # otherwise Prefect's console handler formats flow logs its own way
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    events: Annotated[
        int, typer.Option(min=1_000, help="Events to seed before the replay.")
    ] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking.")] = False,
    reset: Annotated[
        bool, typer.Option(help="With a named database: drop the demo's schemas first.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the zero-downtime replay pipeline on the bank example under live traffic."""
    from examples.bank.demo import run_demo

    interactive = sys.stdin.isatty() and not yes and not as_json
    summary = run_demo(
        database_url,
        events=events,
        reset=reset,
        ask=_ask_on_terminal if interactive else None,
        say=lambda line: console.print(f"[dim]·[/dim] {line}"),
    )
    table = Table(title="zero-downtime replay: summary", show_header=False)
    for name, value in summary.as_dict().items():
        if name != "notes":
            table.add_row(name, _cell(value))
    console.print(table)
    for note in summary.notes:
        console.print(f"[yellow]read error:[/yellow] {note}")
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
    problems = summary.lost or summary.duplicated or summary.read_errors
    if problems or summary.accounts_differing:
        raise typer.Exit(1)


def _ask_on_terminal(replay_key: str) -> tuple[bool, str, str]:
    console.print(
        f"\nThe pipeline waits for approval of replay [bold]{replay_key}[/bold] "
        "(its report is in the flow run's artifacts)."
    )
    approve = Confirm.ask("Promote it to live?", console=console, default=True)
    approver = os.environ.get("USER") or "terminal"
    return approve, approver, "answered on the terminal by the demo"


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}"


def _progress(*, transient: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def main() -> None:
    """Entry point: run the app, turning zdr errors into one line and an exit code."""
    # No internet is assumed; Prefect's no-server mode should not try to phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app(standalone_mode=False)
    except zdr.ZdrError as exc:
        if state["debug"]:
            raise
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2 if isinstance(exc, zdr.InvalidName | zdr.ConfigurationError) else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if state["debug"]:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()

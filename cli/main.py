"""`zdr`: the operator's command line.

Errors are one clear line and exit code 1 (bad input: 2), without a traceback
unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import logging
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
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
def demo(
    events: Annotated[
        int, typer.Option(min=1_000, help="Events to seed before the replay.")
    ] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    reset: Annotated[
        bool, typer.Option(help="With a named database: drop the demo's schemas first.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Run a zero-downtime replay of the bank example under live traffic and measure it."""
    from examples.bank.demo import run_demo

    with _progress(transient=True) as progress:
        task = progress.add_task("replaying", total=None)

        def on_progress(p: zdr.Progress) -> None:
            progress.update(
                task,
                total=p.events_total,
                completed=p.events_done,
                description=f"replaying  {p.rate:,.0f} events/s",
            )

        summary = run_demo(
            database_url,
            events=events,
            reset=reset,
            say=lambda line: console.print(f"[dim]·[/dim] {line}"),
            on_progress=on_progress,
        )
    table = Table(title="zero-downtime replay: summary", show_header=False)
    for name, value in summary.as_dict().items():
        if name != "notes":
            table.add_row(
                name,
                f"{value:,}"
                if isinstance(value, int | float) and not isinstance(value, bool)
                else str(value),
            )
    console.print(table)
    for note in summary.notes:
        console.print(f"[yellow]read error:[/yellow] {note}")
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
    healthy = not (
        summary.lost or summary.duplicated or summary.read_errors or summary.accounts_differing
    )
    if not healthy:
        raise typer.Exit(1)


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

"""Looking before acting: status, lag and verify change nothing."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from zdr import reports
from zdr.cli.app import (
    AsJson,
    DatabaseUrl,
    Key,
    app,
    err,
    manager_for,
    out,
    print_json,
)
from zdr.verify import NOT_LEVEL, VerificationReport


@app.command()
def status(
    key: Annotated[str | None, typer.Argument(help="One replay (default: all).")] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Where the replays stand: state, position, lag, rate, ETA, last run, age."""
    rows = manager_for(database_url).status(key)
    if as_json:
        print_json(rows)
        return
    if not rows:
        err.print("no replays")
        return
    table = Table(*reports.STATUS_COLUMNS)
    for row in rows:
        table.add_row(*reports.status_cells(row))
    out.print(table)


@app.command()
def lag(key: Key, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Events after the replay's checkpoint."""
    value = manager_for(database_url).get_replay_lag(key)
    if as_json:
        print_json({"key": key, "lag": value})
    else:
        out.print(f"{value:,}")


@app.command()
def verify(
    key: Key,
    as_json: AsJson = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print markdown.")] = False,
    max_differences: Annotated[int, typer.Option(min=1)] = 20,
    database_url: DatabaseUrl = None,
) -> None:
    """Compare the replay with live; exit 0 when equal, 1 when differences were found."""
    report = manager_for(database_url).verify(key, max_differences=max_differences)
    if as_json:
        print_json(report.to_dict())
    elif markdown:
        out.print(reports.verification_markdown(report), markup=False, highlight=False)
    else:
        _print_verification(report)
    if not report.equal:
        raise typer.Exit(1)


def _print_verification(report: VerificationReport) -> None:
    verdict = "[green]equal[/green]" if report.equal else "[red]differences found[/red]"
    err.print(reports.verification_headline(report, verdict=verdict))
    table = Table(*reports.VERIFICATION_COLUMNS)
    for cells in reports.verification_cells(report):
        table.add_row(*cells)
    out.print(table)
    if not report.level:
        err.print(f"[yellow]{NOT_LEVEL}[/yellow]")
    for line in reports.difference_lines(report):
        out.print(line, markup=False, highlight=False)
    if report.truncated:
        err.print("(more differences not listed: --max-differences)")

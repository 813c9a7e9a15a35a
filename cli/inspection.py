"""Looking before acting: status, lag, horizon and verify change nothing."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from zdr import reports
from zdr.cli.app import (
    AsJson,
    DatabaseUrl,
    HorizonWarning,
    Key,
    ReaderPath,
    app,
    err,
    manager_for,
    out,
    print_json,
    with_horizon_warning,
)
from zdr.verify import NOT_LEVEL, VerificationReport


@app.command()
def status(
    key: Annotated[
        str | None, typer.Argument(metavar="KEY", help="One replay (default: all).")
    ] = None,
    as_json: AsJson = False,
    horizon_warning: HorizonWarning = None,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Where the replays stand (state, position, lag, rate, ETA, last run, age), the live
    read models' lag, and a warning when the safe horizon is held too long."""
    manager = manager_for(database_url, reader=reader)
    with_horizon_warning(manager, horizon_warning)
    rows = manager.status(key)
    if as_json:
        print_json(rows)
        return
    if rows:
        table = Table(*reports.STATUS_COLUMNS)
        for row in rows:
            table.add_row(*reports.status_cells(row))
        out.print(table)
        for row in rows:
            if row["next"]:
                err.print(f"{escape(row['key'])}: {escape(row['next'])}", highlight=False)
    else:
        err.print("no replays")
    if key is None:
        live = manager.live_lag()
        if live:
            table = Table("live projection", "lag")
            for name, value in live.items():
                table.add_row(name, f"{value:,}")
            out.print(table)
            pid = manager.live_runner_pid()
            if pid is None:
                err.print(
                    "[yellow]warning:[/yellow] no live runner is running: new events reach "
                    "neither the live read models nor a dual-writing replay (start `zdr live`)",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                err.print(f"live runner: running (database session pid {pid})", highlight=False)
    horizon = manager.horizon()
    threshold = manager.settings.horizon_warning_s
    if horizon.held_longer_than(threshold):
        err.print(
            f"[yellow]warning:[/yellow] {escape(reports.horizon_warning(horizon))}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def horizon(
    as_json: AsJson = False, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """The safe horizon the runners read under, and the transaction holding it back, if any."""
    found = manager_for(database_url, reader=reader).horizon()
    if as_json:
        print_json(found.to_dict())
        return
    for line in reports.horizon_lines(found):
        out.print(line, markup=False, highlight=False)


@app.command()
def lag(
    key: Key, as_json: AsJson = False, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """Events after the replay's checkpoint."""
    value = manager_for(database_url, reader=reader).get_replay_lag(key)
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
    reader: ReaderPath = None,
) -> None:
    """Compare the replay with live; exit 0 when equal, 1 when differences were found."""
    report = manager_for(database_url, reader=reader).verify(key, max_differences=max_differences)
    if as_json:
        print_json(report.to_dict())
    elif markdown:
        out.print(
            reports.verification_markdown(report), markup=False, highlight=False, soft_wrap=True
        )
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

"""Looking before acting: status, lag, horizon and verify change nothing.

``zdr.reports`` and ``zdr.verify`` (SQLAlchemy, psycopg) are imported by the commands
that use them, not here: ``zdr --help`` does not need them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

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

if TYPE_CHECKING:
    from zdr.verify import VerificationReport


@app.command()
def status(
    key: Annotated[
        str | None, typer.Argument(metavar="KEY", help="One replay (default: all).")
    ] = None,
    as_json: AsJson = False,
    with_live: Annotated[
        bool,
        typer.Option(
            "--live",
            help='With --json: the live read models too, as rows of "kind": "live" after '
            "the replays' (without it the list holds the replays alone, as before).",
        ),
    ] = False,
    horizon_warning: HorizonWarning = None,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Where the replays stand (state, position, lag, rate, ETA, last run, age), the live
    read models' lag, and a warning when the safe horizon is held too long."""
    from rich.table import Table

    from zdr import reports

    manager = manager_for(database_url, reader=reader)
    with_horizon_warning(manager, horizon_warning)
    rows = manager.status(key)
    if as_json:
        if not with_live:  # the list scripts read since the first release
            print_json(rows)
            return
        # Replays, then (without KEY) the live read models, told apart by "kind".
        live_rows = [] if key is not None else manager.live_status()
        print_json([{"kind": "replay", **row} for row in rows] + live_rows)
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
        live = manager.live_status()
        if live:
            table = Table("live projection", "projector", "lag", "state")
            for row in live:
                failing = row["state"] == "failing"
                table.add_row(
                    row["projection"],
                    row["projector"],
                    f"{row['lag']:,}",
                    "[red]failing[/red]" if failing else row["state"],
                )
            out.print(table)
            for row in live:
                if row["state"] == "failing":
                    name = escape(repr(row["projection"]))
                    err.print(
                        f"[red]live projection {name} stands still[/red] "
                        f"since {row['failing_since']:%Y-%m-%d %H:%M:%S %Z}: "
                        f"{escape(row['error'])}. Fix the projector and restart `zdr live`: "
                        "it goes on from its checkpoint",
                        highlight=False,
                        soft_wrap=True,
                    )
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
    """The safe position the runners read up to, and the appending transaction holding it
    back, if any."""
    from zdr import reports

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
def wait(
    timeout: Annotated[
        float,
        typer.Option("--timeout", metavar="SECONDS", min=0, help="How long to wait at most."),
    ] = 30.0,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Wait until the running live runner has applied every event committed so far to the
    live read models and the dual-writing replays; exit 1 if it does not within --timeout,
    or when none runs (within 5 s), a read model that is behind stands still, or a replay
    failed in dual write (it receives no events until resumed)."""
    reached = manager_for(database_url, reader=reader).wait_for_live(timeout_s=timeout)
    position = None if reached is None else reached.position
    if as_json:
        print_json({"position": position})
    else:
        err.print(
            "the live read models have applied every event"
            + ("" if position is None else f" up to position {position:,}"),
            highlight=False,
        )


@app.command()
def verify(
    key: Key,
    as_json: AsJson = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print markdown.")] = False,
    max_differences: Annotated[int, typer.Option(min=1)] = 20,
    wait_level: Annotated[
        float,
        typer.Option(
            "--wait-level",
            metavar="SECONDS",
            min=0,
            help="Copies not level (right after dual write starts) give no verdict: wait "
            "this long for the live runner to level them, then verify again (0: at once).",
        ),
    ] = 10.0,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Compare the replay with live; exit 0 when equal, 1 when differences were found."""
    from zdr import reports

    report = manager_for(database_url, reader=reader).verify(
        key, max_differences=max_differences, wait_level_s=wait_level
    )
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
    from rich.table import Table

    from zdr import reports
    from zdr.verify import NOT_LEVEL

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

"""`zdr`: the operator's command line, one command per step of the life cycle.

Output meant for people goes to stderr (messages, progress bars) or is a table;
``--json`` prints one JSON document on stdout. An error is one line and a
non-zero exit code (2 for bad input, 1 otherwise), with a traceback only under
``--debug``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.prompt import Confirm
from rich.table import Table
from zdr.cli.embedded import embedded_app

import zdr
from zdr.projector import load_projector
from zdr.verify import NOT_LEVEL

app = typer.Typer(
    name="zdr",
    help="Rebuild event-sourced read models in PostgreSQL without downtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(embedded_app, name="embedded")
out = Console()
err = Console(stderr=True)
state = {"debug": False}

#: Bad input: exit code 2 (like a usage error); every other zdr error: 1.
BAD_INPUT = (zdr.InvalidName, zdr.ConfigurationError, zdr.UnknownProjector)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="ZDR_DATABASE_URL",
        help="PostgreSQL URL (default: ZDR_DATABASE_URL, else the embedded PostgreSQL).",
        show_default=False,
    ),
]
Key = Annotated[str, typer.Argument(help="The replay's key, e.g. balances_v2.")]
Projectors = Annotated[
    list[str],
    typer.Option(
        "--projectors",
        "-p",
        help="Projector import paths (module:Class), repeated or comma-separated.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    state["debug"] = debug
    if debug:  # otherwise Prefect's console handler formats flow logs its own way
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


# -- the life cycle ------------------------------------------------------------


@app.command()
def setup(projectors: Projectors, database_url: DatabaseUrl = None) -> None:
    """Create zdr's tables and the live tables of these projectors (idempotent)."""
    _manager(database_url, projectors).setup()
    err.print(f"set up: {', '.join(_paths(projectors))}")


@app.command()
def create(key: Key, projectors: Projectors, database_url: DatabaseUrl = None) -> None:
    """Create a replay: validate, and clone the projectors' tables into its own schemas."""
    replay = _manager(database_url).create_replay(key, _paths(projectors))
    err.print(f"created replay [bold]{key}[/bold]: {_schemas(replay)}")


@app.command()
def replay(
    key: Key,
    restart: Annotated[bool, typer.Option(help="Empty the replay and start from zero.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Events per transaction.")] = 10_000,
    database_url: DatabaseUrl = None,
) -> None:
    """Replay the history into the replay's copy, up to the head (resumes where it stopped)."""
    manager = _manager(database_url)
    with _progress() as progress:
        task = progress.add_task(f"replaying {key}", total=None)

        def on_progress(p: zdr.Progress) -> None:
            progress.update(
                task,
                total=p.events_total,
                completed=p.events_done,
                description=f"replaying {key}  {p.rate:,.0f} events/s",
            )

        result = manager.start_replay(
            key, restart=restart, batch_size=batch_size, on_progress=on_progress
        )
    run = result.runs[-1]
    err.print(
        f"replay [bold]{key}[/bold] is {result.state.value} at position {result.position:,}: "
        f"{run.events:,} events in {run.seconds:.1f}s ({run.rate or 0:,.0f} events/s)"
    )


@app.command()
def status(
    key: Annotated[str | None, typer.Argument(help="One replay (default: all).")] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Where the replays stand: state, position, lag, rate, ETA, last run, age."""
    manager = _manager(database_url)
    if key is None:
        replays = manager.list_replays()
    else:
        found = manager.get_replay(key)
        if found is None:
            raise zdr.ReplayNotFound(f"no replay with key {key!r}")
        replays = [found]
    rows = [_status_row(manager, r) for r in replays]
    if as_json:
        _print_json(rows)
        return
    if not rows:
        err.print("no replays")
        return
    table = Table("key", "state", "position", "lag", "events/s", "ETA", "last run", "age")
    for row in rows:
        table.add_row(
            row["key"],
            row["state"],
            f"{row['position']:,}",
            f"{row['lag']:,}",
            f"{row['rate']:,.0f}" if row["rate"] else "-",
            _duration(row["eta_seconds"]),
            row["last_run"] or "-",
            _duration(row["age_seconds"]),
        )
    out.print(table)


@app.command()
def lag(key: Key, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Events after the replay's checkpoint."""
    value = _manager(database_url).get_replay_lag(key)
    if as_json:
        _print_json({"key": key, "lag": value})
    else:
        out.print(f"{value:,}")


@app.command("dual-write")
def dual_write(
    key: Key,
    lag_threshold: Annotated[int, typer.Option(min=0, help="Refuse above this lag.")] = 1_000,
    database_url: DatabaseUrl = None,
) -> None:
    """Switch dual write on: the live runner writes the replay too, with no gap."""
    _manager(database_url).start_projecting_to_replay(key, lag_threshold=lag_threshold)
    err.print(f"dual write on for [bold]{key}[/bold]; a live runner must be running (zdr live)")


@app.command()
def verify(
    key: Key,
    as_json: AsJson = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print markdown.")] = False,
    max_differences: Annotated[int, typer.Option(min=1)] = 20,
    database_url: DatabaseUrl = None,
) -> None:
    """Compare the replay with live; exit 0 when equal, 1 when differences were found."""
    report = _manager(database_url).verify(key, max_differences=max_differences)
    if as_json:
        _print_json(report.to_dict())
    elif markdown:
        out.print(report.to_markdown(), markup=False, highlight=False)
    else:
        _print_verification(report)
    if not report.equal:
        raise typer.Exit(1)


@app.command()
def promote(key: Key, yes: Yes = False, database_url: DatabaseUrl = None) -> None:
    """Put the replay live in one transaction; the previous copy is kept for rollback."""
    manager = _manager(database_url)
    _confirm(yes, f"Put replay {key!r} live? Readers switch to its copy at once.", manager, key)
    report = manager.put_replay_live(key)
    err.print(
        f"replay [bold]{key}[/bold] is live at position {report.position:,} "
        f"(lock wait {report.lock_wait_ms:.1f} ms, swap {report.duration_ms:.1f} ms)"
    )


@app.command()
def rollback(key: Key, yes: Yes = False, database_url: DatabaseUrl = None) -> None:
    """Make the copy the replay replaced live again, brought up to date."""
    manager = _manager(database_url)
    _confirm(yes, f"Roll back replay {key!r}? The previous copy becomes live.", manager, key)
    report = manager.rollback(key)
    err.print(f"rolled back [bold]{key}[/bold] at position {report.position:,}")


@app.command()
def remove(key: Key, yes: Yes = False, database_url: DatabaseUrl = None) -> None:
    """Drop the replay's copy and metadata (after promotion: the previous live copy)."""
    manager = _manager(database_url)
    _confirm(yes, f"Remove replay {key!r} and drop its copy?", manager, key)
    manager.remove_replay(key)
    err.print(f"removed replay [bold]{key}[/bold]")


@app.command()
def live(
    projectors: Projectors,
    max_seconds: Annotated[
        float | None, typer.Option(help="Stop after this long (default: until Ctrl-C).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 10_000,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the live runner: apply new events to live and dual-writing replays; Ctrl-C stops."""
    manager = _manager(database_url, projectors)
    manager.setup()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    applied = [0]

    def on_batch(count: int) -> None:
        applied[0] += count
        err.print(f"applied {applied[0]:,} events", end="\r")

    err.print("live runner started (Ctrl-C stops after the batch in flight)")
    total = manager.follow(
        stop=stop, max_seconds=max_seconds, batch_size=batch_size, on_batch=on_batch
    )
    err.print(f"live runner stopped: {total:,} events applied")


# -- the pipeline (Prefect) ---------------------------------------------------


@app.command()
def run(
    key: Key,
    projectors: Projectors,
    auto_approve: Annotated[bool, typer.Option(help="Promote without asking.")] = False,
    lag_threshold: Annotated[int, typer.Option(min=0)] = 1_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 10_000,
    approval_timeout: Annotated[int, typer.Option(min=1, help="Seconds to wait.")] = 3_600,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the whole pipeline (Prefect flow); approve with `zdr approve KEY` or in the UI."""
    from zdr.flows.zero_downtime_replay import zero_downtime_replay

    summary = zero_downtime_replay(
        replay_key=key,
        projectors=_paths(projectors),
        database_url=database_url,
        batch_size=batch_size,
        lag_threshold=lag_threshold,
        approval_timeout_s=approval_timeout,
        auto_approve=auto_approve,
    )
    if as_json:
        _print_json(summary.model_dump())
    else:
        verdict = "promoted" if summary.promoted else "not promoted"
        err.print(f"replay [bold]{key}[/bold]: {summary.state}, {verdict}")


@app.command()
def approve(
    key: Key,
    approver: Annotated[str, typer.Option(help="Who approves.")] = "",
    comment: Annotated[str, typer.Option(help="Why.")] = "",
) -> None:
    """Approve the paused pipeline run of a replay: it goes on and promotes."""
    _answer(key, True, approver, comment)


@app.command()
def reject(
    key: Key,
    approver: Annotated[str, typer.Option(help="Who rejects.")] = "",
    comment: Annotated[str, typer.Option(help="Why.")] = "",
) -> None:
    """Reject the paused pipeline run of a replay: live stays as it is."""
    _answer(key, False, approver, comment)


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=1_000, help="Events to seed first.")] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking.")] = False,
    reset: Annotated[
        bool, typer.Option(help="With a named database: drop the demo's schemas first.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the zero-downtime replay pipeline on the bank example under live traffic."""
    from zdr.examples.bank.demo import run_demo

    interactive = sys.stdin.isatty() and not yes and not as_json
    summary = run_demo(
        database_url,
        events=events,
        reset=reset,
        ask=_ask_on_terminal if interactive else None,
        say=lambda line: err.print(f"[dim]·[/dim] {line}"),
    )
    table = Table(title="zero-downtime replay: summary", show_header=False)
    for name, value in summary.as_dict().items():
        if name != "notes":
            table.add_row(name, _cell(value))
    err.print(table)
    for note in summary.notes:
        err.print(f"[yellow]read error:[/yellow] {note}")
    if as_json:
        _print_json(summary.as_dict(), indent=None)
    problems = summary.lost or summary.duplicated or summary.read_errors
    if problems or summary.accounts_differing:
        raise typer.Exit(1)


# -- helpers -------------------------------------------------------------------


def _manager(database_url: str | None, projectors: Sequence[str] = ()) -> zdr.ReplayManager:
    return zdr.ReplayManager(
        database_url, projectors=[load_projector(p) for p in _paths(projectors)]
    )


def _paths(projectors: Sequence[str]) -> list[str]:
    """``-p a -p b`` and ``-p a,b`` both give [a, b]."""
    return [p.strip() for item in projectors for p in item.split(",") if p.strip()]


def _schemas(replay: zdr.Replay) -> str:
    return ", ".join(f"{live} -> {side}" for live, side in sorted(replay.schemas.items()))


def _status_row(manager: zdr.ReplayManager, replay: zdr.Replay) -> dict[str, Any]:
    lag = manager.get_replay_lag(replay.key)
    history = manager.lag_history(
        replay.key, since=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    )
    rate = float(history["events_per_s"].tail(10).mean()) if len(history) > 1 else replay.rate
    last = replay.runs[-1] if replay.runs else None
    return {
        "key": replay.key,
        "state": replay.state.value,
        "position": replay.position,
        "events_applied": replay.events_applied,
        "lag": lag,
        "rate": rate or None,
        "eta_seconds": lag / rate if rate and lag else (0.0 if not lag else None),
        "last_run": f"{last.kind} {last.status}" if last else None,
        "age_seconds": (dt.datetime.now(dt.UTC) - replay.created_at).total_seconds(),
        "error": replay.error,
    }


def _print_verification(report: Any) -> None:
    verdict = "[green]equal[/green]" if report.equal else "[red]differences found[/red]"
    err.print(
        f"replay [bold]{report.key}[/bold]: {verdict} (live at {report.live_position:,}, "
        f"replay at {report.replay_position:,}"
        + ("" if report.same_version else "; a new projector version")
        + ")"
    )
    table = Table("table", "live rows", "replay rows", "columns compared", "differing")
    for t in report.tables:
        table.add_row(
            t.table,
            f"{t.live_rows:,}" if t.live_rows is not None else "-",
            f"{t.replay_rows:,}" if t.replay_rows is not None else "-",
            str(len(t.compared_columns)),
            ", ".join(t.differing_columns) or "-",
        )
    out.print(table)
    if not report.level:
        err.print(f"[yellow]{NOT_LEVEL}[/yellow]")
    for d in report.differences:
        row = ", ".join(f"{k}={v}" for k, v in d.key.items())
        if d.kind == "changed":
            what = ", ".join(f"{c} {d.live[c]!r} -> {d.replay[c]!r}" for c in d.columns)
        else:
            what = "missing from the replay" if d.kind == "missing" else "only in the replay"
        out.print(f"{d.table} {row}: {d.kind}: {what}", highlight=False)
    if report.truncated:
        err.print("(more differences not listed: --max-differences)")


def _confirm(yes: bool, question: str, manager: zdr.ReplayManager, key: str) -> None:
    if manager.get_replay(key) is None:  # say so before asking anything
        raise zdr.ReplayNotFound(f"no replay with key {key!r}")
    if yes:
        return
    if not sys.stdin.isatty():
        raise typer.BadParameter("not a terminal: pass --yes to confirm", param_hint="--yes")
    if not Confirm.ask(question, console=err, default=False):
        raise typer.Abort()


def _answer(key: str, approve_it: bool, approver: str, comment: str) -> None:
    from zdr.flows.approval import answer

    who = approver or os.environ.get("USER") or "zdr-cli"
    run_id = answer(key, approve=approve_it, approver=who, comment=comment)
    verb = "approved" if approve_it else "rejected"
    err.print(f"{verb} replay [bold]{key}[/bold] (flow run {run_id}) as {who}")


def _ask_on_terminal(replay_key: str) -> tuple[bool, str, str]:
    err.print(
        f"\nThe pipeline waits for approval of replay [bold]{replay_key}[/bold] "
        "(its report is in the flow run's artifacts)."
    )
    approve_it = Confirm.ask("Promote it to live?", console=err, default=True)
    return approve_it, os.environ.get("USER") or "terminal", "answered on the demo's terminal"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _print_json(value: Any, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(value, indent=indent, default=str) + "\n")


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7_200:
        return f"{seconds // 60}m"
    return f"{seconds // 3_600}h{(seconds % 3_600) // 60:02d}m"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: typer handles usage errors, help and exit codes; zdr's errors become
    one line here."""
    # Prefect's no-server mode should not try to reach the internet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app(args=list(argv) if argv is not None else None)
    except zdr.ZdrError as exc:
        if state["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2 if isinstance(exc, BAD_INPUT) else 1)
    except Exception as exc:
        if state["debug"]:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()

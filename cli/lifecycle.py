"""The life cycle, one command per step: setup, create, replay, enable-dual-write, promote,
rollback, remove, and the live runner that keeps live (and dual-writing replays) level;
and rebase, for a database moved to another cluster."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.prompt import Confirm

from zdr.cli.app import (
    DatabaseUrl,
    HorizonWarning,
    Key,
    Projectors,
    ReaderPath,
    Yes,
    app,
    err,
    load_reader,
    log_to_stderr,
    manager_for,
    paths,
    with_horizon_warning,
)
from zdr.errors import ConfigurationError
from zdr.settings import DEFAULTS

if TYPE_CHECKING:
    from rich.progress import Progress

    import zdr


@app.command()
def setup(
    projectors: Projectors, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """Create zdr's tables and the live tables of these projectors (idempotent)."""
    manager_for(database_url, projectors, reader).setup()
    err.print(f"set up: {', '.join(paths(projectors))}")


@app.command("prepare-reader")
def prepare_reader(reader: ReaderPath = None, database_url: DatabaseUrl = None) -> None:
    """Stamp an application's event table for its reader (a TableReader): a column, a
    check, a trigger and an index, without rewriting the table (idempotent)."""
    if reader is None:
        raise ConfigurationError("name the reader to prepare: --reader module:attr")
    found = load_reader(database_url, reader)
    prepare = getattr(found, "prepare", None)
    if not callable(prepare):
        err.print(f"nothing to prepare: {found!r} reads its log as it is")
        return
    prepare(database_url)
    err.print(f"prepared: {found!r} reads its table by (transaction id, position)")


@app.command()
def create(
    key: Key, projectors: Projectors, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """Create a replay: validate, and clone the projectors' tables into its own schemas."""
    replay = manager_for(database_url, reader=reader).create_replay(key, paths(projectors))
    schemas = ", ".join(f"{live} -> {side}" for live, side in sorted(replay.schemas.items()))
    err.print(f"created replay [bold]{key}[/bold]: {schemas}")


@app.command()
def replay(
    key: Key,
    restart: Annotated[bool, typer.Option(help="Empty the replay and start from zero.")] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Events per transaction.")
    ] = DEFAULTS.batch_size,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Replay the history into the replay's copy, up to the head (resumes where it stopped)."""
    manager = manager_for(database_url, reader=reader)
    said = [time.monotonic()]
    try:
        with _progress() as progress, _sigterm_interrupts():
            task = progress.add_task(f"replaying {key}", total=None)

            def on_progress(p: zdr.Progress) -> None:
                progress.update(
                    task,
                    total=p.events_total,
                    completed=p.events_done,
                    description=f"replaying {key}  {p.rate:,.0f} events/s",
                )
                # Not a terminal (a log): no bar, a line of its own every 10 s instead.
                if progress.disable and time.monotonic() - said[0] >= 10:
                    said[0] = time.monotonic()
                    err.print(
                        f"replaying {key}: {p.events_done:,} of {p.events_total:,} events "
                        f"({p.rate:,.0f} events/s)",
                        highlight=False,
                    )

            result = manager.start_replay(
                key, restart=restart, batch_size=batch_size, on_progress=on_progress
            )
    except KeyboardInterrupt:
        # The batch in flight was rolled back; every batch before it is kept. A second
        # signal now changes nothing: the line below and exit 130 are what it gets.
        before = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            at = manager.require_replay(key).position
            err.print(
                f"replay [bold]{key}[/bold] interrupted at position {at:,}: "
                f"`zdr replay {key}` resumes it from there",
                highlight=False,
            )
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)
        raise typer.Exit(130) from None
    run = result.runs[-1]
    err.print(
        f"replay [bold]{key}[/bold] is {result.state.value} at position {result.position:,}: "
        f"{run.events:,} events in {run.seconds:.1f}s ({run.rate or 0:,.0f} events/s)"
    )


@app.command("enable-dual-write")
@app.command("dual-write", help="Alias of enable-dual-write.")
def enable_dual_write(
    key: Key,
    lag_threshold: Annotated[
        int, typer.Option(min=0, help="Refuse above this lag.")
    ] = DEFAULTS.lag_threshold,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Switch dual write on: the live runner writes the replay too, with no gap."""
    manager_for(database_url, reader=reader).enable_dual_write(key, lag_threshold=lag_threshold)
    err.print(f"dual write on for [bold]{key}[/bold]; a live runner must be running (zdr live)")


@app.command()
def promote(
    key: Key, yes: Yes = False, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """Put the replay live in one transaction; the previous copy is kept for rollback."""
    manager = manager_for(database_url, reader=reader)
    _confirm(yes, f"Put replay {key!r} live? Readers switch to its copy at once.", manager, key)
    report = manager.promote(key)
    err.print(
        f"replay [bold]{key}[/bold] is live at position {report.position:,} "
        f"(lock wait {report.lock_wait_ms:.1f} ms, swap {report.duration_ms:.1f} ms; "
        f"planner statistics fresh: {len(report.analyzed)} tables analyzed before the swap)"
    )


@app.command()
def rollback(
    key: Key, yes: Yes = False, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """Make the copy the replay replaced live again, brought up to date."""
    manager = manager_for(database_url, reader=reader)
    _confirm(yes, f"Roll back replay {key!r}? The previous copy becomes live.", manager, key)
    report = manager.rollback(key)
    err.print(f"rolled back [bold]{key}[/bold] at position {report.position:,}")


@app.command()
def remove(
    key: Key, yes: Yes = False, database_url: DatabaseUrl = None, reader: ReaderPath = None
) -> None:
    """Drop the replay's copy and metadata (after promotion: the previous live copy)."""
    manager = manager_for(database_url, reader=reader)
    _confirm(yes, f"Remove replay {key!r} and drop its copy?", manager, key)
    manager.remove_replay(key)
    err.print(f"removed replay [bold]{key}[/bold]")


@app.command()
def rebase(
    kept_transaction_ids: Annotated[
        bool,
        typer.Option(
            "--kept-transaction-ids",
            help="The cluster was upgraded in place (pg_upgrade) or copied physically: "
            "only record it.",
        ),
    ] = False,
    yes: Yes = False,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """After the database moved to another PostgreSQL cluster (a dump and restore):
    re-stamp the event log for this one. Stop the application's appends first."""
    manager = manager_for(database_url, reader=reader)
    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter("not a terminal: pass --yes to confirm", param_hint="--yes")
        question = (
            "Re-stamp zdr's event log and checkpoints for this cluster? Appends wait "
            "until it is done; stop the application first."
        )
        if not Confirm.ask(question, console=err, default=False):
            raise typer.Abort()
    done = manager.rebase(kept_transaction_ids=kept_transaction_ids)
    if kept_transaction_ids and done.recorded != done.current:
        err.print(f"recorded cluster {done.current}; the runners can start again")
        return
    if not getattr(manager.reader, "transaction_ids", True):
        err.print(
            "nothing to rebase: this event log is read by position, which means the same in "
            "any cluster"
        )
        return
    if not done.events and not done.checkpoints:
        err.print("nothing to rebase: the event log belongs to this cluster")
        return
    err.print(
        f"rebased: {done.events:,} events and {done.checkpoints} checkpoints re-stamped for "
        f"cluster {done.current} (they were stamped in {done.recorded or 'an unknown one'}); "
        "the runners can start again"
    )


@app.command()
def live(
    projectors: Projectors,
    max_seconds: Annotated[
        float | None,
        typer.Option(min=0, help="Stop after this long (default: until Ctrl-C)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULTS.batch_size,
    horizon_warning: HorizonWarning = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help="If a live runner is running, wait for it to end and take over "
            "(for a rolling restart) instead of exiting.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    reader: ReaderPath = None,
) -> None:
    """Run the live runner: apply new events to live and dual-writing replays; Ctrl-C stops.
    Sets up what is missing of these projectors first, as `zdr setup` does. Warns
    (stderr) naming the appending transaction that holds the safe position when events have waited
    behind it longer than --horizon-warning seconds."""
    manager = manager_for(database_url, projectors, reader)
    with_horizon_warning(manager, horizon_warning)
    log_to_stderr()
    manager.setup()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    applied = [0]
    # On a terminal the count rewrites one line; in a log (not a terminal) it is a line
    # of its own, at most every 10 s, so the lines never run together.
    on_terminal = err.is_terminal
    said = [time.monotonic()]

    def on_batch(count: int) -> None:
        applied[0] += count
        if on_terminal:
            err.print(f"applied {applied[0]:,} events", end="\r")
        elif time.monotonic() - said[0] >= 10:
            said[0] = time.monotonic()
            err.print(f"applied {applied[0]:,} events")

    # Say what happens before it does: started, or waiting to take over. A runner that
    # may not take over says nothing here: the refusal that follows names the other one.
    running = manager.live_runner_pid()
    if running is None:
        err.print("live runner started (Ctrl-C stops after the batch in flight)")
    elif take_over:
        err.print(
            f"a live runner is running (database session pid {running}): waiting for it "
            "to end, then taking over"
        )
    total = manager.follow(
        stop=stop,
        max_seconds=max_seconds,
        batch_size=batch_size,
        on_batch=on_batch,
        take_over=take_over,
    )
    err.print(f"live runner stopped: {total:,} events applied")


def _confirm(yes: bool, question: str, manager: zdr.ReplayManager, key: str) -> None:
    manager.require_replay(key)  # say so before asking anything
    if yes:
        return
    if not sys.stdin.isatty():
        raise typer.BadParameter("not a terminal: pass --yes to confirm", param_hint="--yes")
    if not Confirm.ask(question, console=err, default=False):
        raise typer.Abort()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a service manager, `kill`, a container stopping) stops like Ctrl-C."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class _NoBar:
    """Off a terminal: no progress bar at all (rich 13.0 prints a blank line for a
    disabled one); ``zdr replay`` prints a progress line every 10 s instead."""

    disable = True

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None


def _progress() -> Progress | _NoBar:
    if not err.is_terminal:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )

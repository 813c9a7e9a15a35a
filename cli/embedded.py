"""`zdr embedded status|stop|reset`: look at, stop or empty the embedded PostgreSQL.

Neither command starts the server. It stops by itself when the last zdr process
that uses it ends (see ``zdr.embedded``); these are for the rest: a server left
by a killed process or an earlier zdr, or one to stop before deleting its folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.prompt import Confirm

from zdr import embedded
from zdr.cli.app import err

embedded_app = typer.Typer(
    help="Look at, stop or empty the embedded PostgreSQL (used when no database URL is given).",
    no_args_is_help=True,
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="ZDR_EMBEDDED_DIR",
        help="Its data folder (default: ZDR_EMBEDDED_DIR, else $TMPDIR/zdr-<uid>/pgdata).",
        show_default=False,
    ),
]


@embedded_app.command("status")
def status_command(
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Is it running: its pid, data folder, socket and URL, and the processes that hold it."""
    st = embedded.status(data_dir)
    if as_json:
        print(json.dumps(st.to_dict(), indent=2))
        return
    if st.running:
        err.print(f"the embedded PostgreSQL is [bold]running[/bold] (pid {st.pid})")
    elif st.initialized:
        err.print("the embedded PostgreSQL is [bold]not running[/bold]")
    else:
        err.print("the embedded PostgreSQL is [bold]not running[/bold] (no data folder yet)")
    err.print(f"  data folder: {escape(st.data_dir)}", highlight=False)
    if st.running:
        err.print(f"  socket in:   {escape(st.socket_dir or '-')}", highlight=False)
        err.print(f"  URL:         {escape(st.url or '-')}", highlight=False)
    if st.live_holders:
        err.print("  used by:")
        for holder in st.live_holders:
            err.print(f"    pid {holder.pid}: {escape(holder.command)}", highlight=False)
    elif st.running:
        err.print("  used by:     no process (`zdr embedded stop` stops it)")
    stale = [h.pid for h in st.holders if not h.alive]
    if stale:
        err.print(f"  exited without leaving: pids {', '.join(map(str, stale))}")


@embedded_app.command("stop")
def stop_command(
    data_dir: DataDir = None,
    force: Annotated[
        bool, typer.Option("--force", help="Stop it even while other processes use it.")
    ] = False,
) -> None:
    """Stop the embedded PostgreSQL (refused while a zdr process still uses it)."""
    before = embedded.stop(data_dir, force=force)
    if before.running:
        err.print(f"stopped the embedded PostgreSQL in {escape(before.data_dir)}", highlight=False)
    else:
        err.print(f"the embedded PostgreSQL in {escape(before.data_dir)} was not running")


@embedded_app.command("reset")
def reset_command(
    data_dir: DataDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Reset it even while other processes use it.")
    ] = False,
) -> None:
    """Stop the embedded PostgreSQL and delete its data: the next zdr command starts an
    empty one (refused while a zdr process still uses it)."""
    where = embedded.status(data_dir).data_dir
    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter("not a terminal: pass --yes to confirm", param_hint="--yes")
        if not Confirm.ask(f"delete every database in {where}?", default=False, console=err):
            raise typer.Abort()
    before = embedded.reset(data_dir, force=force)
    if before.initialized:
        err.print(f"reset the embedded PostgreSQL: {escape(where)} deleted", highlight=False)
    else:
        err.print(f"no embedded PostgreSQL in {escape(where)}: nothing to delete", highlight=False)

"""The `zdr` application: the typer app, the options every command shares, the consoles,
and the entry point that turns zdr's errors into one line and an exit code.

Output meant for people goes to stderr (messages, progress bars) or is a table;
``--json`` prints one JSON document on stdout. An error is one line and a
non-zero exit code (2 for bad input, 1 otherwise), with a traceback only under
``--debug``.

The commands live in modules by subject (``lifecycle``, ``inspection``,
``pipeline``) and register on this app when imported; ``zdr.cli.main`` imports them.

``zdr --help`` answers at once: nothing here, nor in the commands' modules, imports
SQLAlchemy, psycopg, pydantic, pandas, Prefect or a projector at module level; each
command imports what it uses when it runs (tests/test_layering.py holds them to it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from zdr import config
from zdr.errors import (
    ConfigurationError,
    InvalidName,
    ReplayNotFound,
    UnknownProjector,
    ZdrError,
    one_line,
    root_cause,
)

if TYPE_CHECKING:
    import zdr

app = typer.Typer(
    name="zdr",
    help="Rebuild event-sourced read models in PostgreSQL without downtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
# Not a terminal (a pipe, a log, CI): no width to fit, so nothing is cut or wrapped;
# rich would assume 80 columns and shorten names in tables (`bank_balances.bala...`).
out = Console(width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 100_000)
state = {"debug": False}

#: Bad input: exit code 2 (like a usage error); every other zdr error: 1.
BAD_INPUT = (InvalidName, ConfigurationError, UnknownProjector, ReplayNotFound)


def _given_url(value: str | None) -> str | None:
    """An empty URL (an unset shell variable) is refused, not taken as "not given"."""
    if value is not None and not value.strip():
        raise typer.BadParameter(
            "is empty: give a postgresql:// URL, or leave the option out for "
            "ZDR_DATABASE_URL or the embedded PostgreSQL"
        )
    return value


DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        envvar="ZDR_DATABASE_URL",
        callback=_given_url,
        help="PostgreSQL URL (default: ZDR_DATABASE_URL, else the embedded PostgreSQL).",
        show_default=False,
    ),
]
Key = Annotated[str, typer.Argument(metavar="KEY", help="The replay's key, e.g. balances_v2.")]
Projectors = Annotated[
    list[str],
    typer.Option(
        "--projectors",
        "-p",
        metavar="MODULE:CLASS",
        help="Projector import paths (module:Class), repeated or comma-separated.",
    ),
]
ReaderPath = Annotated[
    str | None,
    typer.Option(
        "--reader",
        metavar="MODULE:ATTR",
        envvar="ZDR_READER",
        help="The event log to read: import path module:attr of a reader or of a function "
        "returning one (zdr.readers; default: zdr's own zdr.events). A function can read "
        "the database from ZDR_DATABASE_URL, which --database-url sets.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
HorizonWarning = Annotated[
    float | None,
    typer.Option(
        "--horizon-warning",
        envvar="ZDR_HORIZON_WARNING_S",
        help="Warn when an appending transaction has held the safe position this many seconds "
        "(default: Settings.horizon_warning_s, 30).",
        show_default=False,
    ),
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@app.callback()
def main_options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    state["debug"] = debug
    # The command's sessions say which command they are (pg_stat_activity), unless the
    # URL or the environment names another.
    config.APPLICATION_NAME = f"zdr {ctx.invoked_subcommand or ''}".strip()
    if debug:  # otherwise Prefect's console handler formats flow logs its own way
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


def manager_for(
    database_url: str | None, projectors: Sequence[str] = (), reader: str | None = None
) -> zdr.ReplayManager:
    """A manager for the command's database, with these projectors and that reader loaded."""
    from zdr.manager import ReplayManager
    from zdr.projector import load_projector

    return ReplayManager(
        database_url,
        projectors=[load_projector(p) for p in paths(projectors)],
        reader=load_reader(database_url, reader),
    )


def load_reader(database_url: str | None, reader: str | None) -> zdr.EventReader | None:
    """The reader at ``reader`` (None: zdr's own log). A reader's factory finds the
    command's database in ZDR_DATABASE_URL: ``--database-url`` is put there first."""
    if reader is None:
        return None
    from zdr.readers import load

    return load(reader, database_url=database_url)


def with_horizon_warning(manager: zdr.ReplayManager, seconds: float | None) -> None:
    """Apply ``--horizon-warning`` (validated like the setting: bad input exits 2)."""
    if seconds is not None:
        try:
            manager.settings = manager.settings.replace(horizon_warning_s=seconds)
        except ConfigurationError:
            raise typer.BadParameter(
                f"must be a number of seconds, 0 or more, got {seconds}",
                param_hint="'--horizon-warning'",
            ) from None


def log_to_stderr() -> None:
    """zdr's own log lines (INFO and up) on stderr, for the long-running commands
    (with --debug the root logger shows them already, and more)."""
    if state["debug"]:
        return
    logger = logging.getLogger("zdr")
    if not any(getattr(h, "_zdr_cli", False) for h in logger.handlers):
        handler: logging.Handler
        if err.is_terminal:
            from rich.logging import RichHandler

            handler = RichHandler(console=err, show_path=False, markup=False)
        else:  # a log file: one plain line a record (rich would pad it to the width)
            handler = _StderrHandler()
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
            )
        handler._zdr_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Plain lines on whatever sys.stderr is when a record comes."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def paths(projectors: Sequence[str]) -> list[str]:
    """``-p a -p b`` and ``-p a,b`` both give [a, b]; ``-p ''`` names nothing, and is
    refused rather than taken as no projector at all."""
    found = [p.strip() for item in projectors for p in item.split(",") if p.strip()]
    if projectors and not found:
        raise typer.BadParameter(
            "names no projector: give at least one import path module:Class",
            param_hint="'--projectors' / '-p'",
        )
    return found


def print_json(value: Any, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(value, indent=indent, default=str) + "\n")


# click's errors as typer raises them (typer 0.12 raises click's own, later versions
# those of the click it bundles): found through the class typer exports.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
#: A "no" at a prompt (typer's Abort), or Ctrl-C there with click 8 (its own Abort;
#: typer's bundled click exits 130 instead).
_ABORTS = (typer.Abort, getattr(sys.modules[_USAGE_ERROR.__module__], "Abort", typer.Abort))


def _fail(message: str, code: int) -> None:
    # emoji=False: an import path such as `myapp:x` is not rich's :x: (a cross mark).
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: typer handles usage errors, help and exit codes; zdr's errors become
    one line here."""
    # Prefect's no-server mode should not try to reach the internet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its first start on a machine creates its database; on a busy machine that takes
    # longer than Prefect's 20 s default, and `zdr run`/`zdr demo` would fail for it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        # standalone_mode=False: usage errors come here, to be one line like the others
        # (click would draw a box around them, wrapped at 80 columns).
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        if isinstance(code, int) and code:  # a command's typer.Exit(code)
            sys.exit(code)
    except _USAGE_ERROR as exc:
        command = exc.ctx.command_path if exc.ctx else "zdr"
        _fail(f"{exc.format_message()} (see `{command} --help`)", 2)
    except _CLICK_ERROR as exc:
        _fail(exc.format_message(), exc.exit_code)
    except _ABORTS:
        _fail("aborted", 130)
    except ZdrError as exc:
        if state["debug"]:
            raise
        _fail(str(exc), 2 if isinstance(exc, BAD_INPUT) else 1)
    except Exception as exc:
        if state["debug"]:
            raise
        _fail(_unexpected(exc), 1)


def _unexpected(exc: Exception) -> str:
    """One line for an error zdr did not name: the database's own first line (not a
    statement dump), with what to check where it is clear."""
    message = one_line(exc)
    if getattr(root_cause(exc), "sqlstate", None) == "42501":
        message += (
            " (the role in the database URL lacks a privilege zdr needs: CREATE on the "
            "database and ownership of the read models, see docs/operations/production.md, "
            "Privileges; --debug shows where)"
        )
    return message

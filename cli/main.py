"""`zdr`: the operator's command line, one command per step of the life cycle.

The entry point (``zdr = "zdr.cli.main:main"``). The app, its shared options and
error handling are in ``zdr.cli.app``; the commands, by subject, in
``lifecycle`` (setup, create, replay, enable-dual-write, promote, rollback, remove, live),
``inspection`` (status, lag, verify), ``pipeline`` (run, approve, reject, demo) and
``embedded`` (zdr embedded status|stop).
Importing them registers their commands on the app.
"""

from __future__ import annotations

# isort: off
# The order of these imports is the order of the commands in `zdr --help`.
from zdr.cli import lifecycle, inspection, pipeline
from zdr.cli.app import app, main
from zdr.cli.embedded import embedded_app

# isort: on

# Groups of commands (``zdr GROUP COMMAND``): import the group's app above, add it here.
app.add_typer(embedded_app, name="embedded")

__all__ = ["app", "inspection", "lifecycle", "main", "pipeline"]

if __name__ == "__main__":
    main()

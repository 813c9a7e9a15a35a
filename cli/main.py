"""`zdr`: the operator's command line, one command per step of the life cycle.

The entry point (``zdr = "zdr.cli.main:main"``). The app, its shared options and
error handling are in ``zdr.cli.app``; the commands, by subject, in
``lifecycle`` (setup, create, replay, dual-write, promote, rollback, remove, live),
``inspection`` (status, lag, verify) and ``pipeline`` (run, approve, reject, demo).
Importing them registers their commands on the app.
"""

from __future__ import annotations

# isort: off
# The order of these imports is the order of the commands in `zdr --help`.
from zdr.cli import lifecycle, inspection, pipeline
from zdr.cli.app import app, main

# isort: on

# Groups of commands (``zdr GROUP COMMAND``): import the group's app above, add it here.

__all__ = ["app", "inspection", "lifecycle", "main", "pipeline"]

if __name__ == "__main__":
    main()

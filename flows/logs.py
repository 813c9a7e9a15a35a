"""zdr's own log lines in the Prefect run's logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging.handlers import APILogHandler


@contextmanager
def zdr_logs_in_run() -> Iterator[None]:
    """Send the ``zdr`` logger's lines (INFO and up) to the run's logs while the block runs.

    The core logs with the standard library only (it imports no Prefect): without
    this its lines (the horizon held by a transaction, a replay left behind in dual
    write, a runner waiting to take over) reach the worker's console but not the
    run's logs in the UI. ``PREFECT_LOGGING_EXTRA_LOGGERS=zdr`` does the same.
    """
    logger = logging.getLogger("zdr")
    added = None
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        added = APILogHandler()
        logger.addHandler(added)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        if added is not None:
            logger.removeHandler(added)

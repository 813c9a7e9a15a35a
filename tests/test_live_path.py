"""Live never waits: nothing zdr runs makes the application's appends wait."""

from __future__ import annotations

import threading
import time

import zdr
from zdr.examples.bank.projectors import LIVE


def _timed(work) -> tuple[threading.Thread, dict[str, float]]:
    took: dict[str, float] = {}

    def run() -> None:
        started = time.monotonic()
        work()
        took["s"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def test_setup_with_nothing_to_create_never_makes_appends_wait(manager, engine):
    """An application transaction that appended stays open while `zdr live` (setup) starts."""
    manager.store.append("s", [{"type": "Ok", "data": {}}])
    again = zdr.ReplayManager(engine, projectors=[cls() for cls in LIVE])
    with engine.connect() as app:
        app.begin()
        manager.store.append("app", [{"type": "Ok", "data": {}}], conn=app)  # left open
        setup, setup_took = _timed(again.setup)
        setup.join(2)
        append, append_took = _timed(
            lambda: manager.store.append("b", [{"type": "Ok", "data": {}}])
        )
        append.join(2)
        app.rollback()  # the application commits at last; whatever waited goes on
    setup.join(10)
    append.join(10)
    assert setup_took.get("s", 99) < 1.0, "setup waited for the application's transaction"
    assert append_took.get("s", 99) < 1.0, "an append waited behind setup"

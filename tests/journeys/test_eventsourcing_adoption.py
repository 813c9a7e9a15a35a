"""Journey 4 of DESIGN.md: adoption. An eventsourcing application's events are read
where they are (`--reader zdr.examples.bank.eventsourced:reader`, the README's path for
one's own application); the application appends through its own recorder all along, the
live runner runs in a process of its own, and a new version goes live through the
command line, is rolled back and goes live again. The read models are checked against a
fold of the application's log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import zdr
from tests.journeys.conftest import ROOT, Appending, Journey
from tests.logs import make_log
from tests.support import assert_balances_match_fold, assert_history_exactly_once, wait_for

READER = "zdr.examples.bank.eventsourced:reader"
P = "zdr.examples.bank.projectors"


def _zdr(database_url: str, *arguments: str) -> None:
    """`zdr ARGS... --reader READER` in a process of its own, as the operator types it
    (each one opens the application's reader, and closes it when it ends)."""
    done = subprocess.run(
        [sys.executable, "-m", "zdr.cli.main", *arguments, "--reader", READER],
        cwd=ROOT,
        env={**os.environ, "ZDR_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 0, (arguments, done.stderr[-2000:])


@pytest.mark.eventsourcing
@pytest.mark.timeout(600)
def test_an_eventsourcing_application_read_where_it_is_gets_a_new_version_live(
    journey: Journey, engine, database_url
) -> None:
    log = make_log("eventsourcing", engine, database_url)
    try:
        sim = log.seed(2_000, accounts=50)
        manager = zdr.ReplayManager(engine, reader=log.reader)

        def appended() -> int:
            return len(log.append(sim.events(4)))

        journey.appending = Appending(append=appended)

        def cli(*arguments: str) -> None:
            _zdr(database_url, *arguments)

        def level_and_folded() -> None:
            with journey.appending.paused():
                journey.level(manager=manager)
                assert_balances_match_fold(engine, log.reader)
                assert_history_exactly_once(engine, log.reader)

        cli("setup", "-p", f"{P}:Balances,{P}:History")
        journey.start_live([f"{P}:Balances", f"{P}:History"], "--reader", READER)
        journey.appending.thread.start()
        level_and_folded()

        cli("create", "v2", "-p", f"{P}:BalancesV2")
        cli("replay", "v2")
        cli("enable-dual-write", "v2")
        wait_for(lambda: manager.get_replay_lag("v2") < 50, timeout=60)
        cli("promote", "v2", "--yes")
        level_and_folded()  # BalancesV2's deposits column too
        cli("rollback", "v2", "--yes")
        level_and_folded()
        cli("enable-dual-write", "v2")
        wait_for(lambda: manager.get_replay_lag("v2") < 50, timeout=60)
        cli("promote", "v2", "--yes")
        level_and_folded()

        assert journey.appending.error is None, journey.appending.error
        assert journey.appending.appended > 40
        assert journey.live is not None and journey.live.poll() is None
    finally:
        journey.appending.stop.set()
        if journey.appending.thread.is_alive():
            journey.appending.thread.join(30)
        journey.stop_live()
        log.close()

"""Journey 2 of DESIGN.md through the command line: new versions of a row projector and
of a per-event projector (a column added, a type changed, a column dropped), each
replayed, dual-written, promoted; a rollback and a promotion again; the live runner in a
process of its own is never restarted and the application appends all along."""

from __future__ import annotations

import pytest

from tests.journeys.conftest import Journey
from tests.journeys.wallets import paths
from tests.support import wait_for


def _ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err
    return out + err


@pytest.mark.timeout(600)
def test_new_versions_go_live_roll_back_and_go_live_again_under_one_running_live_runner(
    journey: Journey, zdr_cli
) -> None:
    journey.store.import_events(journey.app.events(3_000))
    _ok(zdr_cli("setup", "-p", ",".join(paths(1))))
    journey.start_live(paths(1))
    journey.appending.thread.start()
    journey.assert_live_is(1)

    def roll_out(version: int) -> None:
        key = f"v{version}"
        _ok(zdr_cli("create", key, "-p", ",".join(paths(version))))
        _ok(zdr_cli("replay", key))
        _ok(zdr_cli("enable-dual-write", key))
        promote(key)

    def promote(key: str) -> None:
        # The live runner brings the replay level; `zdr promote` refuses, changing
        # nothing, while it is not (a busy machine: a few events behind), and the
        # operator runs it again, as here.
        wait_for(lambda: journey.manager.get_replay_lag(key) < 50, timeout=60)

        def promoted() -> bool:
            code, _, err = zdr_cli("promote", key, "--yes")
            if code != 0 and "must be at the same position" not in err:
                pytest.fail(err)
            return code == 0

        wait_for(promoted, timeout=60, interval=0.2)

    roll_out(2)  # a column added
    journey.assert_live_is(2)
    # Restarted with yesterday's command line: the promotion holds, and it says so.
    journey.stop_live()
    journey.start_live(paths(1))
    journey.assert_live_is(2)
    assert "is live with tests.journeys.wallets:WalletsV2 (its promoted version)" in (
        journey.live_log.read_text()
    )
    _ok(zdr_cli("rollback", "v2", "--yes"))
    journey.assert_live_is(1)
    _ok(zdr_cli("enable-dual-write", "v2"))
    promote("v2")
    journey.assert_live_is(2)

    roll_out(3)  # a type changed
    journey.assert_live_is(3)

    roll_out(4)  # a column dropped
    journey.assert_live_is(4)
    _ok(zdr_cli("rollback", "v4", "--yes"))
    journey.assert_live_is(3)

    assert journey.appending.error is None, journey.appending.error
    assert journey.appending.appended > 100
    assert journey.live is not None and journey.live.poll() is None
    log = journey.live_log.read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert all("(its promoted version)" in line for line in warnings), log

"""Exactly once across a crash: a replay process killed with SIGKILL mid-batch resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import zdr
from tests.support import (
    SlowBalancesV2,
    assert_balances_match_fold,
    assert_history_exactly_once,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent

REPLAY_SCRIPT = textwrap.dedent(
    """
    import sys
    import zdr
    import zdr.readers
    reader = zdr.readers.load(sys.argv[4]) if len(sys.argv) > 4 else None
    manager = zdr.ReplayManager(sys.argv[1], reader=reader)
    manager.start_replay(sys.argv[2], batch_size=int(sys.argv[3]))
    """
)


def test_a_replay_killed_mid_batch_resumes_to_the_same_result(
    log_manager, log, engine, database_url
):
    """Against each kind of log (tests.logs): the child reads it by the reader's import path."""
    manager = log_manager
    log.seed(6_000, accounts=300)
    manager.project_live()
    manager.create_replay("crash", [SlowBalancesV2(), "history"])
    env = {
        **os.environ,
        "ZDR_TEST_SLOW_BATCH": "0.15",
        "PYTHONPATH": str(ROOT),
        "ZDR_DATABASE_URL": database_url,
    }
    reader = [log.reader_path] if log.reader_path else []
    child = subprocess.Popen(
        [sys.executable, "-c", REPLAY_SCRIPT, database_url, "crash", "400", *reader],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        # Wait until some batches have committed, then kill it while it sleeps
        # inside a batch whose writes are done but not committed.
        wait_for(lambda: _checkpoint(engine) >= 1_200 or child.poll() is not None, timeout=60)
        assert child.poll() is None, child.stderr.read().decode()
        [row] = manager.status("crash")
        assert row["running"] and row["last_run"] == "replay running", row
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    killed_at = _checkpoint(engine)
    assert 0 < killed_at < 6_000
    assert manager.get_replay("crash").state is zdr.ReplayState.REPLAYING
    # Status tells a dead run from a live one: the killed process's lock went with it.
    row = wait_for(lambda: _not_running(manager), timeout=30)
    assert row["last_run"] == "replay interrupted" and row["eta_seconds"] is None, row
    assert row["next"] == f"not running: `zdr replay crash` resumes it from position {killed_at:,}"

    replay = manager.start_replay("crash")

    assert replay.state is zdr.ReplayState.CAUGHT_UP
    assert replay.events_applied == 6_000, "each event counted once across both runs"
    assert_balances_match_fold(engine, log.reader, "zdr_crash_1")

    assert_history_exactly_once(engine, log.reader, "zdr_crash_2")


def test_a_replay_stopped_by_sigterm_says_where_and_how_to_resume(manager, engine, database_url):
    """`zdr replay` under a service manager or Ctrl-C: one line naming the position it
    stopped at and the command that resumes it; the run is interrupted, not failed."""
    from tests.support import seed

    seed(manager.store, 6_000)
    manager.project_live()
    manager.create_replay("crash", [SlowBalancesV2()])
    env = {**os.environ, "ZDR_TEST_SLOW_BATCH": "0.15", "ZDR_DATABASE_URL": database_url}
    env.pop("COLUMNS", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "zdr.cli.main", "replay", "crash", "--batch-size", "400"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _checkpoint(engine) >= 1_200 or child.poll() is not None, timeout=60)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    stopped_at = _checkpoint(engine)
    assert child.returncode == 130, stderr
    assert stderr.splitlines() == [
        f"replay crash interrupted at position {stopped_at:,}: `zdr replay crash` resumes it "
        "from there"
    ], stderr
    [row] = manager.status("crash")
    assert row["last_run"] == "replay interrupted" and not row["running"], row
    assert manager.get_replay("crash").state is zdr.ReplayState.REPLAYING
    assert manager.start_replay("crash").events_applied == 6_000


def _not_running(manager) -> dict | None:
    [row] = manager.status("crash")
    return None if row["running"] else row


def _checkpoint(engine) -> int:
    """The crashed replay's committed position, as a second process sees it."""
    return zdr.ReplayManager(engine).checkpoints()["replay:crash"].position


def test_status_counts_a_pipeline_run_between_its_steps_as_running(manager):
    """Between a pipeline's tasks no replay lock is held, but its pipeline lock is:
    status must not tell the operator to run the step the pipeline is about to run."""
    manager.create_replay("piped", ["balances"])
    [row] = manager.status("piped")
    assert not row["running"] and "zdr replay piped" in row["next"]
    with manager.pipeline_lock("piped"):
        [row] = manager.status("piped")
        assert row["running"] and row["next"] is None, row

"""An answer holds for the question it was given to, and `zdr approve` says what the run
did with it: it waits until the run ends or asks again, and an answer the run did not
take never looks taken. With no Prefect server to hold a paused run, `zdr approve` and
an unattended `zdr run` refuse at once."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect import flow, tags

from tests.support import assert_balances_match_fold, seed, wait_for
from zdr.examples.bank.projectors import BalancesV2
from zdr.flows.approval import (
    DATABASE_TAG,
    KEY_TAG,
    PIPELINE_FLOW_NAME,
    NoPausedRun,
    find_paused_run,
)
from zdr.flows.zero_downtime_replay import _approval, zero_downtime_replay
from zdr.tasks.replay import verify_replay

ROOT = Path(__file__).resolve().parent.parent
V2 = "zdr.examples.bank.projectors:BalancesV2"


def _without_a_server(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "ZDR_DATABASE_URL": database_url}
    return env


@pytest.mark.parametrize(
    "arguments",
    [["approve", "k"], ["reject", "k"], ["run", "k", "-p", V2]],
    ids=["approve", "reject", "run-unattended"],
)
def test_with_no_prefect_server_approving_refuses_at_once(
    manager, database_url, tmp_path, arguments
):
    manager.create_replay("k", [BalancesV2()])
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "zdr.cli.main", *arguments],
        cwd=ROOT,
        env=_without_a_server(tmp_path, database_url),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert "PREFECT_API_URL" in done.stderr and "prefect server start" in done.stderr
    # At once: the time of starting Python and importing Prefect (about 4 s here, up to
    # 11 s beside another test process at the lowest versions), not of a temporary
    # Prefect server (20 s and more on top of it).
    assert took < 15, f"took {took:.1f}s (a temporary Prefect server takes 20 s and more)"
    assert manager.get_replay("k").state.value == "created"  # nothing started


@pytest.mark.usefixtures("prefect_harness")
def test_an_answer_to_a_question_that_changed_is_not_taken_and_zdr_approve_says_so(
    cli, manager, database_url
):
    """What a suspended run does when it starts again after an answer and finds another
    question (the verification now says otherwise): the same flow run asks twice."""
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("asked", [BalancesV2()])
    manager.start_replay("asked")
    manager.enable_dual_write("asked")
    tag = manager.database_tag()

    @flow(name=PIPELINE_FLOW_NAME)
    def pipeline(replay_key: str) -> list[str]:
        report = verify_replay(database_url, replay_key)
        assert report.verification.equal
        first = _approval(report, False, 120, "asked-artifacts", tag)
        behind = dataclasses.replace(
            report.verification, replay_position=report.verification.live_position + 1
        )
        second = _approval(
            dataclasses.replace(report, verification=behind), False, 120, "asked-artifacts", tag
        )
        # Equal again: the first question's approval is older than the rejection given
        # since, so it is not taken either; the run asks again.
        third = _approval(report, False, 120, "asked-artifacts", tag)
        return [first.decision, second.decision, third.decision]

    result: dict = {}

    def run() -> None:
        with tags(DATABASE_TAG.format(tag), KEY_TAG.format("asked")):
            result["decisions"] = pipeline("asked")

    thread = threading.Thread(target=run)
    thread.start()

    def paused():
        try:
            return find_paused_run("asked", database_tag=tag)
        except NoPausedRun:
            return None

    try:
        run_id = wait_for(paused, timeout=60)
        # From Python, the database named as the CLI names it: a URL finds its runs only.
        assert find_paused_run("asked", database_url=database_url) == run_id
        with pytest.raises(NoPausedRun):
            find_paused_run("asked", database_tag="00000000")
        code, _, err = cli("approve", "asked", "--approver", "ops-dana", "--wait", "60")
        assert code == 1, err
        assert "the run did not take the answer" in err
        assert "the answer 'approve' by ops-dana is not taken" in err
        assert "the verification said 'equal' then and says 'differences' now" in err

        code, _, err = cli("reject", "asked", "--approver", "ops-erin", "--wait", "60")
        assert code == 1, err
        assert "the answer 'reject' by ops-erin is not taken" in err
        assert "the verification said 'differences' then and says 'equal' now" in err

        code, _, err = cli("approve", "asked", "--approver", "ops-dana", "--wait", "60")
        assert code == 0, err
        assert "the run took the answer and ended Completed" in err
    finally:
        thread.join(60)
    assert result["decisions"] == ["approve", "reject", "approve"]


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_from_python_approved_on_copies_not_level_asks_again_once_they_are(
    cli, manager, database_url, engine
):
    """The pipeline called from Python pauses in its process and goes on at once with the
    answer: an approval given to a report that compared nothing (dual write on, no live
    runner yet to level the copies) is held to that question, as a suspended run's is;
    once the live runner has levelled them the verdict is another, so the run asks again
    instead of promoting on the first answer."""
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("level", [BalancesV2()])
    manager.start_replay("level")
    # Not applied to live (no live runner yet); the pipeline's replay takes them.
    seed(manager.store, 40, prefix="late")
    tag = manager.database_tag()
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = zero_downtime_replay(
                "level", [V2], database_url=database_url, approval_timeout_s=120
            )
        except BaseException as exc:  # what the test reports
            result["error"] = exc

    pipeline = threading.Thread(target=run)
    pipeline.start()
    stop = threading.Event()
    live = threading.Thread(target=lambda: manager.follow(stop=stop, poll_interval=0.05))

    def paused():
        try:
            return find_paused_run("level", database_tag=tag)
        except NoPausedRun:
            return None

    try:
        wait_for(paused, timeout=60)
        assert not manager.verify("level").level, "the question was asked on copies not level"
        live.start()  # levels the copies: the report's verdict is another now
        wait_for(lambda: manager.verify("level").level, timeout=30)
        code, _, err = cli("approve", "level", "--approver", "ops-dana", "--wait", "60")
        assert code == 1, err
        assert "the answer 'approve' by ops-dana is not taken" in err
        assert "says 'equal' now" in err
        assert manager.get_replay("level").state.value == "dual_writing", "not promoted"
        code, _, err = cli("approve", "level", "--approver", "ops-dana", "--wait", "60")
        assert code == 0, err
    finally:
        pipeline.join(120)
        stop.set()
        if live.is_alive():
            live.join(30)
    assert "error" not in result, result.get("error")
    assert result["summary"].promoted
    assert_balances_match_fold(engine, manager.store)

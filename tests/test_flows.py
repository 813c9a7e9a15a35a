"""The Prefect pipeline: end to end, approval, retries, resume, one run per key."""

from __future__ import annotations

import re
import threading
import time

import pytest
from prefect import Task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.flow_runs import resume_flow_run

import zdr
from tests.support import (
    ExplodingBalancesV2,
    append,
    assert_balances_match_fold,
    balances,
    seed,
    wait_for,
)
from zdr.examples.bank.domain import BankSimulator
from zdr.examples.bank.projectors import BalancesV2
from zdr.flows.approval import NoPausedRun, answer, find_paused_run
from zdr.flows.zero_downtime_replay import zero_downtime_replay

pytestmark = pytest.mark.usefixtures("prefect_harness")

V2 = "zdr.examples.bank.projectors:BalancesV2"
SLOW = "tests.support:SlowBalancesV2"
EXPLODING = "tests.support:ExplodingBalancesV2"


class LiveTraffic:
    """A writer and the live runner in threads, as in production."""

    def __init__(self, manager: zdr.ReplayManager, *, write: bool = True, log=None) -> None:
        self.manager = manager
        self.log = log
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard(self._follow))]
        if write:
            self.threads.append(threading.Thread(target=self._guard(self._write)))

    def __enter__(self) -> LiveTraffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors

    def _guard(self, body):
        def run():
            try:
                body()
            except BaseException as exc:  # pragma: no cover - reported at exit
                self.errors.append(exc)

        return run

    def _follow(self) -> None:
        self.manager.follow(stop=self.stop, poll_interval=0.02)

    def _write(self) -> None:
        sim = BankSimulator(accounts=50, seed=5, prefix="flow")
        while not self.stop.is_set():
            if self.log is None:
                append(self.manager.store, sim.events(10))
            else:
                self.log.append(sim.events(10))
            time.sleep(0.01)


def _run_in_thread(**parameters):
    """Start the pipeline in a thread; return the thread and a dict for its outcome."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = zero_downtime_replay(**parameters)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_pipeline_promotes_a_replay_equal_to_the_fold_under_appends(
    log_manager, log, engine, database_url
):
    """On each kind of log, the flow reading it by the reader's import path."""
    manager = log_manager
    log.seed(4_000)
    manager.project_live()
    with LiveTraffic(manager, log=log):
        summary = zero_downtime_replay(
            replay_key="flow_v2",
            projectors=[V2],
            database_url=database_url,
            batch_size=500,
            events_per_task=1_500,
            auto_approve=True,
            reader=log.reader_path,
        )
    manager.project_live()
    assert summary.promoted and summary.state == "live"
    assert summary.approver == "auto_approve"
    assert summary.lock_wait_ms is not None
    assert_balances_match_fold(engine, log.reader)
    assert "deposits" in next(iter(balances(engine).values()))
    runs = manager.get_replay("flow_v2").runs
    assert sum(r.events for r in runs if r.kind == "replay") >= 4_000
    assert len([r for r in runs if r.kind == "replay"]) >= 3, "cut into task-sized pieces"


def test_a_rejection_leaves_the_replay_intact_and_live_unchanged(manager, engine, database_url):
    seed(manager.store, 1_000)
    manager.project_live()
    with LiveTraffic(manager, write=False):
        thread, outcome = _run_in_thread(
            replay_key="ask", projectors=[V2], database_url=database_url
        )
        wait_for(lambda: _paused("ask"), timeout=60)
        run_id = answer("ask", approve=False, approver="ops-alice", comment="numbers look off")
        thread.join(60)
    summary = outcome["result"]
    assert not summary.promoted and summary.approved is False
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert (state.type.value, state.name) == ("COMPLETED", "Rejected"), "not like a promotion"
    assert "live is unchanged" in state.message
    assert (summary.approver, summary.comment) == ("ops-alice", "numbers look off")
    assert manager.get_replay("ask").state is zdr.ReplayState.DUAL_WRITING
    assert "deposits" not in next(iter(balances(engine).values())), "live is unchanged"


def test_an_approval_promotes_and_invalid_input_is_refused(manager, engine, database_url):
    seed(manager.store, 1_000)
    manager.project_live()
    with LiveTraffic(manager, write=False):
        thread, outcome = _run_in_thread(
            replay_key="ask_me", projectors=[V2], database_url=database_url
        )
        wait_for(lambda: _paused("ask_me"), timeout=60)
        run_id = find_paused_run("ask_me")
        with pytest.raises(RuntimeError, match="'approver' is a required property"):
            resume_flow_run(run_id, run_input={"decision": "approve"})  # no approver
        # A form sent with a name only does not reject: the choice is required.
        with pytest.raises(RuntimeError, match="'decision' is a required property"):
            resume_flow_run(run_id, run_input={"approver": "ops-bob"})
        with pytest.raises(RuntimeError, match="'maybe' is not one of"):
            resume_flow_run(run_id, run_input={"decision": "maybe", "approver": "ops-bob"})
        assert find_paused_run("ask_me") == run_id, "still waiting after the bad input"
        answer("ask_me", approve=True, approver="ops-bob", comment="ship it")
        thread.join(60)
    summary = outcome["result"]
    assert summary.promoted and summary.approver == "ops-bob"
    assert_balances_match_fold(engine, manager.store)


def test_a_run_is_named_and_tagged_for_its_replay_key_and_projections(manager, database_url):
    seed(manager.store, 300)
    manager.project_live()
    state = zero_downtime_replay(
        replay_key="named_v2",
        projectors=[V2],
        database_url=database_url,
        auto_approve=True,
        return_state=True,
    )
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert (run.state.type.value, run.state.name) == ("COMPLETED", "Promoted")
    assert state.result().promoted
    assert run.name.startswith("replay-named-v2-")
    assert {"replay:named_v2", "projection:balances"} <= set(run.tags)
    assert f"zdr-db-{manager.database_tag()}" in run.tags
    with get_client(sync_client=True) as client:
        [progress] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"zdr-{manager.database_tag()}-named-v2-progress"])
            )
        )
    assert progress.data == 100.0
    assert re.search(r"caught up, 300 events applied \([\d,]+ events/s\)", progress.description)


def test_a_transient_failure_is_retried_and_the_run_completes(
    manager, database_url, monkeypatch, caplog
):
    seed(manager.store, 500)
    manager.project_live()
    calls = []
    original = zdr.ReplayManager.enable_dual_write

    def flaky(self, key, **kwargs):
        calls.append(key)
        if len(calls) == 1:
            raise zdr.LockTimeout("the locks were busy (injected)")
        return original(self, key, **kwargs)

    monkeypatch.setattr(zdr.ReplayManager, "enable_dual_write", flaky)
    with LiveTraffic(manager, write=False):
        summary = zero_downtime_replay(
            replay_key="flaky", projectors=[V2], database_url=database_url, auto_approve=True
        )
    assert len(calls) == 2
    assert summary.promoted
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "enable-dual-write failed with a transient error" in m
        and "the locks were busy (injected)" in m
        and m.endswith("retry 1 of 3")
        for m in warned
    ), warned


def test_a_pipeline_that_lost_its_lock_stops_before_promoting(
    manager, engine, database_url, monkeypatch
):
    seed(manager.store, 300)
    manager.project_live()
    original = zdr.ReplayManager.verify

    def verify_then_lose_the_connections(self, key, **kwargs):
        report = original(self, key, **kwargs)
        with engine.connect() as admin:  # a network cut: every other session is gone
            admin.exec_driver_sql(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()"""
            )
            admin.commit()
        return report

    monkeypatch.setattr(zdr.ReplayManager, "verify", verify_then_lose_the_connections)
    with pytest.raises(zdr.LockLost, match="lost its lock"):
        zero_downtime_replay(
            replay_key="lost", projectors=[V2], database_url=database_url, auto_approve=True
        )
    engine.dispose()  # the cut ended the test's own pooled sessions too
    assert manager.get_replay("lost").state is zdr.ReplayState.DUAL_WRITING, "not promoted"


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("events_per_task", 0), ("batch_size", -1), ("max_catch_up_rounds", 0)],
)
def test_bad_numbers_are_refused_before_anything_runs(manager, database_url, parameter, value):
    with pytest.raises(zdr.ConfigurationError, match="must be a whole number"):
        zero_downtime_replay(
            replay_key="bad_numbers",
            projectors=[V2],
            database_url=database_url,
            auto_approve=True,
            **{parameter: value},
        )
    assert manager.get_replay("bad_numbers") is None


def test_a_projector_bug_fails_at_once_with_its_message(manager, database_url, monkeypatch):
    seed(manager.store, 500)
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 123)
    calls = []
    original = zdr.ReplayManager.start_replay
    monkeypatch.setattr(
        zdr.ReplayManager,
        "start_replay",
        lambda self, key, **kw: calls.append(key) or original(self, key, **kw),
    )
    with pytest.raises(zdr.ProjectorError, match="event 123"):
        zero_downtime_replay(replay_key="buggy", projectors=[EXPLODING], database_url=database_url)
    assert calls == ["buggy"], "not retried"


def test_a_second_run_of_a_failed_pipeline_resumes_from_the_checkpoint(
    manager, engine, database_url, monkeypatch
):
    seed(manager.store, 2_000)
    manager.project_live()
    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 1_555)
    parameters = dict(
        replay_key="resume",
        projectors=[EXPLODING],
        database_url=database_url,
        batch_size=250,
        auto_approve=True,
    )
    with pytest.raises(zdr.ProjectorError):
        zero_downtime_replay(**parameters)
    failed_at = manager.get_replay("resume").position
    assert failed_at == 1_500

    monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 0)  # the bug is fixed
    with LiveTraffic(manager, write=False):
        summary = zero_downtime_replay(**parameters)

    assert summary.promoted
    replay_runs = [r for r in manager.get_replay("resume").runs if r.kind == "replay"]
    assert replay_runs[0].status == "failed"
    assert replay_runs[1].from_position == failed_at
    assert summary.events_applied == 2_000, "nothing applied twice"
    assert_balances_match_fold(engine, manager.store)


def test_a_step_that_hangs_is_stopped_by_its_timeout_and_the_next_run_resumes(
    manager, engine, database_url, monkeypatch
):
    """Every step that can hang has a timeout; a replay-batches task stopped by it
    fails the run at once (a hang is not retried) with Prefect's reason, and leaves the
    replay at its last committed batch for the next run."""
    import zdr.flows.zero_downtime_replay as pipeline
    from zdr.tasks import replay as steps

    limited = [t for t in vars(steps).values() if isinstance(t, Task)]
    # project-live: its max_seconds bounds it; replay-partition: submitted, it runs in a
    # worker thread, where Prefect cannot stop it (tasks/replay.py): max_events bounds it.
    unlimited = {t.name for t in limited if not t.timeout_seconds}
    assert unlimited == {"project-live", "replay-partition"}
    seed(manager.store, 1_000)
    manager.project_live()
    monkeypatch.setenv("ZDR_TEST_SLOW_BATCH", "3")  # each batch takes 3 s
    monkeypatch.setattr(
        pipeline, "replay_batches", steps.replay_batches.with_options(timeout_seconds=1.5)
    )
    parameters = dict(
        replay_key="hangs", projectors=[SLOW], database_url=database_url, batch_size=250
    )
    started = time.monotonic()
    state = zero_downtime_replay(**parameters, auto_approve=True, return_state=True)
    assert state.is_failed() and time.monotonic() - started < 30, "retried a hang"
    assert "timeout" in state.message.lower(), state.message
    monkeypatch.setenv("ZDR_TEST_SLOW_BATCH", "0")
    summary = zero_downtime_replay(**parameters, auto_approve=True)
    assert summary.promoted and summary.events_applied == 1_000
    assert_balances_match_fold(engine, manager.store)


def test_a_second_pipeline_run_on_the_same_key_is_refused(manager, database_url):
    seed(manager.store, 300)
    manager.project_live()
    with LiveTraffic(manager, write=False):
        thread, outcome = _run_in_thread(
            replay_key="solo", projectors=[V2], database_url=database_url
        )
        wait_for(lambda: _paused("solo"), timeout=60)
        with pytest.raises(zdr.RunnerBusy, match="pipeline run for replay 'solo' is already"):
            zero_downtime_replay(replay_key="solo", projectors=[V2], database_url=database_url)
        answer("solo", approve=True, approver="ops")
        thread.join(60)
    assert outcome["result"].promoted


def test_the_same_key_with_other_projectors_is_refused(manager, database_url):
    seed(manager.store, 100)
    manager.create_replay("taken", ["history"])
    with pytest.raises(zdr.DuplicateReplay, match="already exists and rebuilds history"):
        zero_downtime_replay(replay_key="taken", projectors=[V2], database_url=database_url)


@pytest.mark.parametrize(
    "source",
    ["zdr", pytest.param("eventsourcing", marks=pytest.mark.eventsourcing), "stored-events"],
)
def test_the_demo_loses_nothing_duplicates_nothing_and_no_read_fails(database_url, source):
    from zdr.examples.bank.demo import run_demo

    summary = run_demo(database_url, events=5_000, reset=True, say=lambda line: None, source=source)

    assert summary.promoted and summary.source == source
    assert summary.events_expected == summary.events_in_read_model > 5_000
    assert (summary.lost, summary.duplicated, summary.accounts_differing) == (0, 0, 0)
    assert summary.read_errors == 0 and summary.reads > 0


def test_the_demo_asks_and_a_no_leaves_live_as_it_was(database_url):
    from zdr.examples.bank.demo import run_demo

    asked = []
    summary = run_demo(
        database_url,
        events=2_000,
        reset=True,
        say=lambda line: None,
        ask=lambda key: asked.append(key) or (False, "tester", "not today"),
    )

    assert asked == ["balances_v2"]
    assert not summary.promoted
    assert (summary.lost, summary.duplicated, summary.read_errors) == (0, 0, 0)


def _paused(key: str) -> bool:
    try:
        find_paused_run(key)
        return True
    except NoPausedRun:
        return False


def test_the_docs_flow_example_runs(engine, database_url, monkeypatch, capsys):
    """The flow from Python (docs/how-to/pipeline-in-prefect.md, which
    tests/test_docs_examples.py runs too): what it prints, and the new shape live."""
    from tests.docs_examples import DOCS, blocks

    page = DOCS / "how-to" / "pipeline-in-prefect.md"
    flow_example = next(b for b in blocks(page) if b.runs and "zero_downtime_replay(" in b.code)
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    exec(compile(flow_example.code, flow_example.where, "exec"), {"__name__": "docs_flow_example"})
    assert capsys.readouterr().out.splitlines()[-1] == "live True"
    assert "deposits" in next(iter(balances(engine).values()))


def test_catch_up_that_does_not_converge_fails_clearly_and_leaves_the_replay(
    manager, database_url, monkeypatch
):
    from zdr.flows.zero_downtime_replay import NotConverged

    seed(manager.store, 300)
    sim = BankSimulator(accounts=20, seed=3, prefix="late")
    original = zdr.ReplayManager.start_replay

    def busy_log(self, key, **kwargs):  # events keep arriving faster than it catches up
        replay = original(self, key, **kwargs)
        append(manager.store, sim.events(50))
        return replay

    monkeypatch.setattr(zdr.ReplayManager, "start_replay", busy_log)
    with pytest.raises(NotConverged, match="still 50 events behind after 2 catch-up rounds"):
        zero_downtime_replay(
            replay_key="runaway",
            projectors=[V2],
            database_url=database_url,
            lag_threshold=10,
            max_catch_up_rounds=2,
        )
    assert manager.get_replay("runaway").state is zdr.ReplayState.CAUGHT_UP


def test_an_approval_that_times_out_leaves_the_replay_intact_and_says_so(
    manager, engine, database_url, caplog
):
    from zdr.flows.zero_downtime_replay import ApprovalTimedOut

    seed(manager.store, 200)
    manager.project_live()
    state = zero_downtime_replay(
        replay_key="nobody",
        projectors=[V2],
        database_url=database_url,
        approval_timeout_s=2,
        return_state=True,
    )
    with pytest.raises(ApprovalTimedOut, match="left intact in dual write"):
        state.result()
    # The reason is the run's state message, as the runs list and the run page show it
    # (not Prefect's "The flow was paused and never resumed.").
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).state
    assert stored.is_failed(), stored
    assert "nobody approved replay 'nobody'" in stored.message, stored.message
    # No live runner ran meanwhile: the run said so when it switched dual write on.
    assert "no live runner is running" in caplog.text
    assert manager.get_replay("nobody").state is zdr.ReplayState.DUAL_WRITING
    assert "deposits" not in next(iter(balances(engine).values()))


def test_a_cancelled_waiting_run_is_not_brought_back_to_running(manager, database_url):
    """A run cancelled while it waits stays cancelled: the timeout's own state change
    (back to Running, to fail with zdr's reason) is for a run still paused only."""
    from prefect.states import Cancelling

    seed(manager.store, 200)
    manager.project_live()
    done = {}
    pipeline = threading.Thread(
        target=lambda: done.setdefault(
            "state",
            zero_downtime_replay(
                replay_key="cancelled",
                projectors=[V2],
                database_url=database_url,
                approval_timeout_s=4,
                return_state=True,
            ),
        )
    )
    pipeline.start()
    run_id = wait_for(lambda: _paused_run("cancelled", manager), timeout=60)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
    pipeline.join(60)
    with get_client(sync_client=True) as client:
        history = [s.type.value for s in client.read_flow_run_states(run_id)]
    after = history[history.index("CANCELLING") + 1 :]
    assert "RUNNING" not in after, history
    assert manager.get_replay("cancelled").state is zdr.ReplayState.DUAL_WRITING


def _paused_run(key: str, manager):
    try:
        return find_paused_run(key, database_tag=manager.database_tag())
    except NoPausedRun:
        return None


def test_a_rejection_with_remove_on_reject_removes_the_replay(manager, engine, database_url):
    seed(manager.store, 200)
    manager.project_live()
    thread, outcome = _run_in_thread(
        replay_key="unwanted", projectors=[V2], database_url=database_url, remove_on_reject=True
    )
    wait_for(lambda: _paused("unwanted"), timeout=60)
    answer("unwanted", approve=False, approver="ops", comment="not needed")
    thread.join(60)
    assert outcome["result"].removed and not outcome["result"].promoted
    assert outcome["result"].state is zdr.ReplayState.REMOVED  # not what it was when asked
    assert manager.get_replay("unwanted") is None
    assert "deposits" not in next(iter(balances(engine).values()))


def test_the_small_flows_promote_roll_back_report_and_remove(manager, engine, database_url):
    from zdr.flows.operations import promote_replay, remove_replay, replay_status, rollback_replay

    seed(manager.store, 200)
    manager.project_live()
    manager.create_replay("steps", [BalancesV2()])
    manager.start_replay("steps")

    [row] = replay_status(database_url=database_url)
    assert (row["key"], row["state"], row["lag"]) == ("steps", "caught_up", 0)
    assert promote_replay("steps", database_url=database_url).state is zdr.ReplayState.LIVE
    assert "deposits" in next(iter(balances(engine).values()))
    seed(manager.store, 50, seed=1, prefix="new")
    manager.project_live()
    [row] = replay_status(database_url=database_url)
    assert (row["state"], row["lag"], row["eta_seconds"]) == ("live", None, None)
    rolled_back = rollback_replay("steps", database_url=database_url)
    assert rolled_back.state is zdr.ReplayState.ROLLED_BACK
    assert remove_replay("steps", database_url=database_url).state is zdr.ReplayState.REMOVED
    assert replay_status(database_url=database_url) == []


def test_an_approval_answers_only_a_run_of_its_own_database(
    manager, engine, database_url, monkeypatch
):
    """Two environments share a Prefect server: a run of the other database's replay of
    the same key, paused later, is never the one answered, and artifacts are apart."""
    from prefect.states import Paused

    seed(manager.store, 500)
    manager.project_live()
    tag = manager.database_tag()
    with LiveTraffic(manager, write=False):
        thread, outcome = _run_in_thread(
            replay_key="twin", projectors=[V2], database_url=database_url
        )
        wait_for(lambda: _paused("twin"), timeout=60)
        mine = find_paused_run("twin", database_tag=tag)
        with get_client(sync_client=True) as client:
            other = client.create_flow_run(
                zero_downtime_replay,
                parameters={"replay_key": "twin", "projectors": [V2]},
                tags=["zdr-db-00000000"],
                state=Paused(),
            )
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[f"zdr-{tag}-twin-report"])
                )
            )
        assert artifacts, "the report's artifact key names the database"
        monkeypatch.delenv("ZDR_DATABASE_URL", raising=False)
        assert find_paused_run("twin") == other.id  # no database named: the newest of any
        monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
        assert find_paused_run("twin") == mine  # ZDR_DATABASE_URL's, as the CLI takes it
        assert find_paused_run("twin", database_url=database_url) == mine
        assert find_paused_run("twin", database_tag=tag) == mine
        with pytest.raises(NoPausedRun, match=r"on this database \(ffffffff\)"):
            find_paused_run("twin", database_tag="ffffffff")
        with pytest.raises(NoPausedRun, match=f"with id {other.id}"):
            find_paused_run("twin", database_tag=tag, flow_run_id=other.id)
        answer("twin", approve=True, approver="ops-dana", database_tag=tag)
        thread.join(60)
    assert outcome["result"].promoted and outcome["result"].approver == "ops-dana"


def test_a_pause_past_its_timeout_waits_for_nobody(manager, database_url):
    """A run that paused and whose process died (or whose timeout passed before a server
    failed it) neither blocks the next run of the key nor takes an answer."""
    from prefect.states import Paused

    seed(manager.store, 200)
    manager.project_live()
    tag = manager.database_tag()
    with get_client(sync_client=True) as client:
        client.create_flow_run(
            zero_downtime_replay,
            parameters={"replay_key": "stale", "projectors": [V2]},
            tags=[f"zdr-db-{tag}"],
            state=Paused(timeout_seconds=1),
        )
    time.sleep(1.5)
    with pytest.raises(NoPausedRun):
        find_paused_run("stale", database_tag=tag)
    thread, outcome = _run_in_thread(replay_key="stale", projectors=[V2], database_url=database_url)
    wait_for(lambda: _paused_run("stale", manager), timeout=60)  # it asks: not refused
    answer("stale", approve=True, approver="ops-dana", database_tag=tag)
    thread.join(60)
    assert outcome["result"].promoted


def test_a_run_names_its_database_by_a_secret_block_and_never_by_both(
    manager, database_url, monkeypatch
):
    """database_secret: the URL (and its password) stays in a Secret block, out of the
    run's parameters; a missing block, or a URL and a secret both, is refused."""
    from prefect.blocks.system import Secret

    from zdr.flows.operations import replay_status

    monkeypatch.delenv("ZDR_DATABASE_URL", raising=False)
    manager.create_replay("secret", [BalancesV2()])
    Secret(value=database_url).save("zdr-test-database", overwrite=True)
    state = replay_status(database_secret="zdr-test-database", return_state=True)
    assert [row["key"] for row in state.result()] == ["secret"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert database_url not in str(run.parameters)
    with pytest.raises(zdr.ConfigurationError, match="no Prefect Secret block named 'nowhere'"):
        replay_status(database_secret="nowhere")
    with pytest.raises(zdr.ConfigurationError, match="not both"):
        replay_status(database_url=database_url, database_secret="zdr-test-database")


def test_the_live_runner_reads_the_workers_live_projectors_when_a_run_names_none(
    database_url, monkeypatch
):
    """Served and prefect.yaml deployments leave projectors empty: each run reads the
    worker's ZDR_LIVE_PROJECTORS as it starts (here one that cannot be imported)."""
    from zdr.flows.operations import live_projection

    monkeypatch.setenv("ZDR_LIVE_PROJECTORS", "zdr.examples.bank.projectors:Nowhere")
    with pytest.raises(zdr.UnknownProjector, match="Nowhere"):
        live_projection(database_url=database_url, max_seconds=0.5)

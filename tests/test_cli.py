"""`zdr` against a real database: each command's happy path, and its error path."""

from __future__ import annotations

import contextvars
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import zdr
from tests.support import assert_balances_match_fold, balances, seed, wait_for
from zdr.cli.main import main
from zdr.examples.bank.projectors import Balances, BalancesV2
from zdr.locks import live_runner

V1 = "zdr.examples.bank.projectors:Balances"
V2 = "zdr.examples.bank.projectors:BalancesV2"
LIVE = ",".join(
    f"zdr.examples.bank.projectors:{name}"
    for name in ("Balances", "History", "DailyTotals", "Accounts")
)


def _catalog(engine):
    with engine.connect() as conn:
        return (
            conn.exec_driver_sql("SELECT key, state FROM zdr.replays ORDER BY key").all(),
            conn.exec_driver_sql("SELECT name, position FROM zdr.checkpoints ORDER BY 1").all(),
            sorted(conn.exec_driver_sql("SELECT nspname FROM pg_namespace").scalars()),
        )


def test_a_second_live_runner_names_the_first_or_waits_to_take_over(cli, engine):
    with engine.connect() as holder, live_runner(holder):
        pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        holder.commit()
        code, _, err = cli("live", "-p", LIVE, "--max-seconds", "5")
        assert code == 1 and "already running on this database" in err
        assert f"held by pid {pid}" in err
        assert "started" not in err, "it said it started before it was refused"
        code, _, err = cli("live", "-p", LIVE, "--max-seconds", "0.5", "--take-over")
        assert code == 1 and "waiting for it to end, then taking over" in err
    code, _, err = cli("live", "-p", LIVE, "--max-seconds", "0.5", "--take-over")
    assert code == 0 and "live runner stopped" in err


def test_the_whole_life_cycle_from_the_command_line(cli, manager, engine):
    seed(manager.store, 1_200)
    assert cli("setup", "-p", LIVE)[0] == 0
    assert cli("live", "-p", LIVE, "--max-seconds", "1")[0] == 0
    assert sum(r["events"] for r in balances(engine).values()) == 1_200

    code, _, err = cli("create", "v2", "-p", V2)
    assert code == 0 and "bank_balances -> zdr_v2_1" in err

    assert json.loads(cli("lag", "v2", "--json")[1]) == {"key": "v2", "lag": 1_200}
    code, _, err = cli("replay", "v2", "--batch-size", "300")
    assert code == 0 and "caught_up at position 1,200" in err

    code, out, _ = cli("status", "--json")
    [row] = json.loads(out)
    assert (row["key"], row["state"], row["position"], row["lag"]) == ("v2", "caught_up", 1_200, 0)
    code, out, _ = cli("status")
    assert code == 0 and "caught_up" in out and "v2" in out

    assert cli("enable-dual-write", "v2")[0] == 0
    code, out, _ = cli("verify", "v2", "--json")
    assert code == 0 and json.loads(out)["equal"] is True

    code, _, err = cli("promote", "v2", "--yes")
    assert code == 0 and "is live" in err
    assert "deposits" in next(iter(balances(engine).values()))
    code, _, err = cli("rollback", "v2", "--yes")
    assert code == 0 and "rolled back" in err
    assert "deposits" not in next(iter(balances(engine).values()))
    assert cli("remove", "v2", "--yes")[0] == 0
    assert manager.get_replay("v2") is None


def test_verify_exits_1_and_names_the_difference(cli, manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("check", ["balances"])
    manager.start_replay("check")
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM zdr_check_1.balances WHERE account_id = 'acc-000003'")

    code, out, _ = cli("verify", "check", "--json")

    assert code == 1
    report = json.loads(out)
    assert report["equal"] is False
    [difference] = report["differences"]
    assert difference["table"] == "bank_balances.balances"
    assert difference["kind"] == "missing" and difference["key"] == {"account_id": "acc-000003"}
    code, out, _ = cli("verify", "check")
    assert code == 1 and "acc-000003" in out


@pytest.mark.parametrize(
    "command",
    [
        ["lag", "{key}"],
        ["status", "{key}"],
        ["replay", "{key}"],
        ["dual-write", "{key}"],
        ["verify", "{key}"],
        ["promote", "{key}", "--yes"],
        ["rollback", "{key}", "--yes"],
        ["remove", "{key}", "--yes"],
    ],
)
@pytest.mark.parametrize(
    ("key", "codes", "message"),
    [
        ("nope", {2}, "no replay with key 'nope'"),
        ("Robert'); DROP TABLE zdr.events;--", {2}, "invalid replay key"),
    ],
)
def test_a_bad_or_unknown_key_is_one_clear_line_and_changes_nothing(
    cli, engine, command, key, codes, message
):
    before = _catalog(engine)
    code, out, err = cli(*[part.format(key=key) for part in command])
    assert code in codes
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert _catalog(engine) == before


def test_an_unknown_name_says_what_there_is(cli):
    """A bare projector name, a replay key, a class or a reader that names nothing: the
    one line names what the database and the module hold, and what a reference looks like."""
    code, _, err = cli("create", "k", "-p", "justname")
    assert code == 2 and "unknown projector 'justname'" in err, err
    assert "none registered" not in err
    for name, cls in [
        ("accounts", "Accounts"),
        ("balances", "Balances"),
        ("daily_totals", "DailyTotals"),
        ("history", "History"),
    ]:
        assert f"{name} (zdr.examples.bank.projectors:{cls})" in err, err
    assert "import path module:Class" in err
    assert len(err.strip().splitlines()) == 1, err

    code, _, err = cli("rollback", "nope", "--yes")
    assert code == 2 and "no replay with key 'nope' (this database has no replays)" in err
    assert cli("create", "v2", "-p", V2)[0] == 0
    for command in (["lag", "nope"], ["rollback", "nope", "--yes"], ["status", "nope"]):
        code, _, err = cli(*command)
        assert code == 2 and "no replay with key 'nope' (replays in this database: v2)" in err

    code, _, err = cli("create", "k", "-p", "zdr.examples.bank.projectors:Nope")
    assert code == 2 and "has no projector 'Nope' (its projectors: Accounts, Balances," in err
    code, _, err = cli("status", "--reader", "zdr.examples.bank.projectors:x")
    assert code == 2 and "zdr.examples.bank.projectors has no attribute 'x'" in err, err
    code, _, err = cli("status", "--reader", "no_such_module_zdr:x")
    assert code == 2 and "reader no_such_module_zdr:x:" in err, err  # not rich's :x: emoji


def test_an_unknown_name_on_a_database_with_no_projection_says_how_to_name_one(zdr_cli, engine):
    zdr.ReplayManager(engine).setup()  # zdr's tables, no projection
    code, _, err = zdr_cli("create", "k", "-p", "justname")
    assert code == 2 and "unknown projector 'justname'" in err
    assert "no projection is registered here or live in this database" in err
    assert "module:Class" in err and "zdr setup -p MODULE:CLASS" in err


LONG_KEY = "a_key_long_enough_that_a_wrapped_line_would_break_" + "x" * 40


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["status", LONG_KEY], 2, "invalid replay key"),
        (["promote", "nope", "--yes"], 2, "no replay with key 'nope'"),
        (["create", "k", "-p", "zdr.examples.bank.projectors.BalancesV2"], 2, "module:Class"),
        (
            ["live", "-p", "zdr.examples.bank.projectors.Balances"],
            2,
            "did you mean 'zdr.examples.bank.projectors:Balances'?",
        ),
        (["status", "--database-url", "notaurl"], 2, "invalid database URL 'notaurl'"),
        (["status", "--database-url", "mysql://u:pw@localhost/db"], 2, "zdr needs PostgreSQL"),
        (
            ["status", "--database-url", "postgresql://u:hunter2@127.0.0.1:1/db"],
            1,
            "cannot connect to the database at 127.0.0.1:1/db",
        ),
        (["status", "--database-url", "postgresql:/u:hunter2@127.0.0.1/db"], 2, "URL"),
        (["status", "--database-url", "mysql://u:hun//ter2@h/db"], 2, "'mysql://u:***@h/db'"),
        (
            ["status", "--database-url", "postgresql://u@/db?host=/nonexistent-zdr-socket"],
            1,
            "cannot connect to the database at the local socket",
        ),
        (["status", "--database-url", ""], 2, "--database-url"),
        (["live", "-p", V1, "--max-seconds", "-1"], 2, "--max-seconds"),
        (["live", "-p", V1, "--horizon-warning", "nan"], 2, "--horizon-warning"),
        (
            ["status", "--database-url", "postgresql://u:hunter2@h:notaport/db"],
            2,
            "invalid database URL 'postgresql://u:***@h:notaport/db'",
        ),
        (["status", "--database-url", "host=h password=hunter2"], 2, "invalid database URL"),
        (
            ["status", "--database-url", "postgresql://u@127.0.0.1:1/db?sslmode=bogus"],
            2,
            "is not valid",
        ),
        (["status", "--database-url", "postgresql+asyncpg://u@h/db"], 2, "through psycopg 3"),
        (["promote", "asks"], 2, "pass --yes to confirm"),
        (["approve", "nokey"], 2, "no replay with key 'nokey'"),
        (["reject", "nokey"], 2, "no replay with key 'nokey'"),
        (["setup"], 2, "Missing option '--projectors'"),
        (["setup", "-p", ""], 2, "names no projector"),
        (["live", "-p", " , "], 2, "names no projector"),
        (["run", "k", "-p", "zdr.examples.bank.projectors:Nope"], 2, "has no projector 'Nope'"),
        (
            ["run", "k", "-p", V1, "--dask-workers", "2", "--dask-address", "tcp://h:1"],
            2,
            "not both",
        ),
        (["run", "k", "-p", V1, "--partitions", "0"], 2, "--partitions"),
    ],
)
def test_every_error_is_one_line_on_a_pipe_with_its_exit_code(
    manager, database_url, arguments, code, message
):
    """stderr a pipe (CI, logs), no COLUMNS: one line, whatever its length, naming what to
    fix, exit 2 for bad input and 1 otherwise; no password shown; `zdr run` refuses a bad
    projector before Prefect starts (seconds, not a server start and a traceback)."""
    manager.create_replay("asks", [BalancesV2()])
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["ZDR_DATABASE_URL"] = database_url
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "zdr.cli.main", *arguments],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert (done.returncode, len(done.stderr.splitlines())) == (code, 1), done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert "hunter2" not in done.stderr and "ter2" not in done.stderr and "pw@" not in done.stderr
    if arguments[0] == "run":
        assert took < 10, f"zdr run took {took:.1f}s to refuse a bad projector"


def test_a_pipeline_that_fails_inside_its_flow_ends_with_one_error_line(
    manager, database_url, tmp_path
):
    """Prefect's log lines stay, but not its traceback nor its temporary-server notice:
    the error is said once, in one line, naming the event."""
    seed(manager.store, 50)
    manager.project_live()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "COLUMNS"))}
    env.update(
        ZDR_DATABASE_URL=database_url,
        PREFECT_HOME=str(tmp_path),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    done = subprocess.run(
        [sys.executable, "-m", "zdr.cli.main", "run", "boom", "--auto-approve"]
        + ["-p", "tests.support:ExplodingAtSevenBalancesV2"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert "failed on event 7 (MoneyDeposited" in errors[0]
    assert "Traceback" not in done.stderr and "temporary server" not in done.stderr, done.stderr
    assert "Finished in state Failed" in done.stderr  # Prefect's own lines are still there


def test_the_live_runner_logs_plain_lines_to_a_file(manager, engine, database_url):
    """A broken live read model is logged every try: each record one line of its own
    length (rich padded each to the console's width, 100,000 characters off a terminal)."""
    from tests.test_live_path import PoisonedHistory

    zdr.ReplayManager(engine, projectors=[PoisonedHistory()]).setup()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE zdr.projections SET projector = 'tests.test_live_path:PoisonedHistory' "
            "WHERE name = 'history'"
        )
    deposit = {"type": "MoneyDeposited", "data": {"account_id": "acc-poison", "amount": 5}}
    manager.store.append(
        "acc-poison",
        [{"type": "AccountOpened", "data": {"account_id": "acc-poison", "owner": "x"}}, deposit],
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["ZDR_DATABASE_URL"] = database_url
    done = subprocess.run(
        [sys.executable, "-m", "zdr.cli.main", "live", "-p", V1, "--max-seconds", "1"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any("stays behind" in line and "acc-poison" in line for line in lines), done.stderr
    assert max(len(line) for line in lines) < 1_000


def test_create_with_a_bad_key_is_refused_with_exit_code_2(cli, engine):
    before = _catalog(engine)
    code, _, err = cli("create", "Robert'); DROP TABLE zdr.events;--", "-p", V2)
    assert code == 2 and "invalid replay key" in err
    assert _catalog(engine) == before


def test_an_unknown_projector_is_refused_with_exit_code_2(cli, engine):
    before = _catalog(engine)
    code, _, err = cli("create", "k", "-p", "zdr.examples.bank.projectors:Nope")
    assert code == 2 and "has no projector 'Nope'" in err
    assert _catalog(engine) == before


def test_promote_asks_for_confirmation_and_refuses_without_a_terminal(cli, manager):
    seed(manager.store, 50)
    manager.project_live()
    manager.create_replay("ask", ["balances"])
    manager.start_replay("ask")
    code, _, err = cli("promote", "ask")
    assert code == 2 and "--yes" in err
    assert manager.get_replay("ask").state is zdr.ReplayState.CAUGHT_UP


def test_debug_shows_the_traceback(cli):
    with pytest.raises(zdr.ReplayNotFound):
        main(["--debug", "lag", "nope"])


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_approve_and_reject_resume_the_paused_run_with_the_right_input(
    cli, manager, engine, database_url, decision
):
    seed(manager.store, 400)
    manager.project_live()
    stop = threading.Event()
    runner = threading.Thread(target=manager.follow, kwargs={"stop": stop, "poll_interval": 0.02})
    runner.start()
    outcome: dict = {}

    def pipeline() -> None:
        outcome["run"] = cli("run", "gate", "-p", V2, "--json")

    # In this context: the test server's settings (a thread does not inherit them).
    flow = threading.Thread(target=contextvars.copy_context().run, args=(pipeline,))
    flow.start()
    try:
        from zdr.flows.approval import NoPausedRun, find_paused_run

        def paused() -> bool:
            try:
                return bool(find_paused_run("gate"))
            except NoPausedRun:
                return False

        wait_for(paused, timeout=60)
        code, _, err = cli(decision, "gate", "--approver", "ops-carol", "--comment", "checked")
        ended = "Promoted: promoted, approved" if decision == "approve" else "Rejected: rejected"
        assert code == 0 and f"the run took the answer and ended {ended} by ops-carol" in err
        flow.join(60)
        # The two commands share the test's capture: a line may land in the other's.
        both = err + outcome["run"][2]
        assert f"{decision.rstrip('e')}ed replay gate" in both
    finally:
        stop.set()
        runner.join(10)
    code, out, _ = outcome["run"]
    summary = json.loads(out)
    assert code == 0
    assert summary["approver"] == "ops-carol" and summary["comment"] == "checked"
    assert summary["promoted"] is (decision == "approve")
    assert ("deposits" in next(iter(balances(engine).values()))) is (decision == "approve")


@pytest.mark.usefixtures("prefect_harness")
def test_approve_without_a_paused_run_says_so(cli, manager):
    manager.create_replay("idle", [BalancesV2()])
    code, _, err = cli("approve", "idle")
    assert code == 1 and "no pipeline run for replay 'idle' on this database" in err
    assert "--flow-run-id" in err


def test_status_gives_a_promoted_replay_no_lag_or_eta(cli, manager):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.promote("v2")
    seed(manager.store, 100, seed=1, prefix="new")
    manager.project_live()  # live moves on; the promoted replay's side copy stays put

    [row] = manager.status()

    assert (row["state"], row["lag"], row["rate"], row["eta_seconds"]) == ("live", None, None, None)
    code, out, _ = cli("status")
    assert code == 0
    assert _cells(out, "v2")[1:6] == ["live", "300", "-", "-", "-"]


def test_status_gives_lag_rate_and_eta_only_where_the_state_means_them(cli, manager):
    seed(manager.store, 300)
    manager.project_live()
    for key, projector in [("v2", BalancesV2()), ("v3", Balances()), ("back", BalancesV2())]:
        manager.create_replay(key, [projector])
        manager.start_replay(key)
        manager.promote(key)
    manager.rollback("back")  # v3 live again, v2 superseded by it
    manager.create_replay("next", [BalancesV2()])
    manager.create_replay("broken", [BalancesV2()])
    with manager.engine.begin() as conn:  # as a projector error leaves it
        conn.exec_driver_sql("UPDATE zdr.replays SET state = 'failed' WHERE key = 'broken'")
    seed(manager.store, 100, seed=1, prefix="new")
    manager.project_live()

    rows = {row["key"]: row for row in manager.status()}

    for key, state in [("v2", "superseded"), ("v3", "live"), ("back", "rolled_back")]:
        row = rows[key]
        assert row["state"] == state
        assert (row["lag"], row["rate"], row["eta_seconds"]) == (None, None, None), key
    assert rows["next"]["lag"] == 400, "a replay still to run has its lag"
    assert rows["next"]["eta_seconds"] is None, "and no ETA before it ran"
    assert (rows["broken"]["lag"], rows["broken"]["eta_seconds"]) == (400, None)
    code, out, _ = cli("status", "--json")
    assert code == 0
    assert {row["key"]: row["lag"] for row in json.loads(out)}["v3"] is None
    code, out, _ = cli("status")
    assert _cells(out, "v2")[1:4] == ["superseded by v3", "300", "-"]


def _cells(table: str, key: str) -> list[str]:
    """The cells of ``key``'s row in a `zdr status` table."""
    line = next(line for line in table.splitlines() if f" {key} " in line)
    return [cell.strip() for cell in re.split(r"[│┃]", line) if cell.strip()]


def test_a_moved_database_runs_on_and_zdr_rebase_has_nothing_to_do(cli, manager, engine):
    seed(manager.store, 300)
    assert cli("live", "-p", LIVE, "--max-seconds", "0.5")[0] == 0
    with engine.begin() as conn:  # as a dump and restore into another cluster leaves it
        conn.exec_driver_sql("UPDATE zdr.events SET txid = txid + 1000000000")
        conn.exec_driver_sql("UPDATE zdr.cluster SET system_identifier = '42'")
    manager.store.append(
        "acc-new", [{"type": "AccountOpened", "data": {"account_id": "acc-new", "owner": "new"}}]
    )
    code, _, err = cli("live", "-p", LIVE, "--max-seconds", "0.5")
    assert code == 0, err
    assert "acc-new" in balances(engine)
    assert cli("rebase")[0] != 0  # asks first, and there is no terminal
    code, _, err = cli("rebase", "--yes")
    assert code == 0 and err.startswith("nothing to rebase: this event log is read by position")


def test_seed_appends_the_bank_history_the_walk_through_replays(cli, engine):
    code, _, err = cli("seed", "--events", "1500")
    assert code == 0 and "appended 1,500 bank events to zdr.events" in err
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM zdr.events").scalar_one() == 1500
    code, _, err = cli("seed", "--events", "10", "--source", "kafka")
    assert code == 2 and "unknown source 'kafka'" in err


def test_seed_run_again_adds_accounts_the_live_read_models_take(cli, engine, manager):
    """A reader runs the walk-through twice: the second seed opens new accounts, not the
    same ones again (which the Accounts read model, one row per account, refuses)."""
    for _ in range(2):
        code, _, err = cli("seed", "--events", "1500")
        assert code == 0, err
    code, _, err = cli("live", "-p", LIVE, "--max-seconds", "1")
    assert code == 0, err
    assert all(row["state"] != "failing" for row in manager.live_status())
    with engine.connect() as conn:
        opened = conn.exec_driver_sql(
            "SELECT count(*) FROM zdr.events WHERE type = 'AccountOpened'"
        ).scalar_one()
        accounts = conn.exec_driver_sql("SELECT count(*) FROM bank_accounts.accounts")
        assert accounts.scalar_one() == opened
    assert_balances_match_fold(engine, manager.store)


def test_tables_on_a_pipe_keep_whole_names(manager, database_url):
    """Not a terminal, no COLUMNS: rich would assume 80 columns and cut names short."""
    key = "balances_rebuilt_for_the_new_shape_v2"
    manager.create_replay(key, [BalancesV2()])
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["ZDR_DATABASE_URL"] = database_url
    done = subprocess.run(
        [sys.executable, "-m", "zdr.cli.main", "verify", key],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert key in done.stdout + done.stderr and "bank_balances.balances " in done.stdout, (
        done.stdout + done.stderr
    )


def test_each_command_names_itself_to_the_database(cli, engine, database_url):
    """A DBA tells zdr's sessions apart in pg_stat_activity: `zdr live` says so."""
    import subprocess
    import sys

    live = subprocess.Popen(
        [sys.executable, "-m", "zdr.cli.main", "live", "-p", LIVE, "--max-seconds", "8"],
        env={**os.environ, "ZDR_DATABASE_URL": database_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def names() -> set[str]:
            with engine.connect() as conn:
                return set(
                    conn.exec_driver_sql(
                        "SELECT application_name FROM pg_stat_activity "
                        "WHERE datname = current_database()"
                    ).scalars()
                )

        wait_for(lambda: "zdr live" in names(), timeout=15)
    finally:
        live.terminate()
        live.wait(20)

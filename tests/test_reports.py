"""What zdr shows people (zdr.reports): ETAs, status rows, verification, lag over time and
the approver's report. Pure functions: no database, no Prefect."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from zdr import reports
from zdr.records import LagSample
from zdr.replay import Replay, ReplayState, Run
from zdr.verify import NOT_LEVEL, Difference, TableReport, VerificationReport

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def _replay(
    *,
    runs: list[Run] | None = None,
    state: ReplayState = ReplayState.REPLAYING,
    superseded_by: str | None = None,
) -> Replay:
    return Replay(
        key="balances_v2",
        state=state,
        superseded_by=superseded_by,
        projectors={"balances": "zdr.examples.bank.projectors:BalancesV2"},
        schemas={"bank_balances": "zdr_balances_v2_1"},
        position=50_000,
        txid=7,
        events_applied=50_000,
        error=None,
        created_at=T0,
        updated_at=T0,
        runs=runs or [],
    )


def _history(events_applied: list[int], *, seconds: list[float] | None = None) -> list[LagSample]:
    """A lag history as ``ReplayManager.lag_history_samples`` gives it (head of the log at
    100,000)."""
    at = [T0 + dt.timedelta(seconds=s) for s in (seconds or range(len(events_applied)))]
    history: list[LagSample] = []
    for when, applied in zip(at, events_applied, strict=True):
        elapsed = (when - history[-1].at).total_seconds() if history else 0.0
        rate = (applied - history[-1].events_applied) / elapsed if elapsed > 0 else 0.0
        history.append(LagSample(when, applied, applied, 100_000 - applied, rate))
    return history


def _report(
    differences: list[Difference], *, live_position: int = 500, summary: bool = False
) -> VerificationReport:
    table = TableReport(
        table="bank_balances.balances",
        live_rows=1_000,
        replay_rows=999 if differences else 1_000,
        compared_columns=["account_id", "balance"],
        differing_columns=["balance"] if differences else [],
        only_live_columns=[],
        only_replay_columns=[],
        primary_key=["account_id"],
        summary=SUMMARY if summary else [],
    )
    return VerificationReport(
        key="check",
        state="dual_writing",
        same_version=True,
        live_position=live_position,
        replay_position=500,
        tables=[table],
        differences=differences,
        truncated=False,
    )


# -- ETA -----------------------------------------------------------------------


def test_the_eta_is_the_lag_over_the_rate():
    assert reports.eta_seconds(12_000, 4_000.0) == 3.0


def test_the_eta_is_zero_when_nothing_remains_and_unknown_without_a_rate():
    assert reports.eta_seconds(0, None) == 0.0
    assert reports.eta_seconds(0, 4_000.0) == 0.0
    assert reports.eta_seconds(500, None) is None
    assert reports.eta_seconds(500, 0.0) is None


def test_the_status_row_takes_its_rate_from_the_recent_samples_and_says_the_eta():
    history = _history([0, 1_000, 2_000, 3_000])  # 1,000 events/s
    row = reports.status_row(
        _replay(), lag=90_000, history=history, now=T0 + dt.timedelta(minutes=3)
    )
    assert row["rate"] == pytest.approx(750.0)  # the first sample has no rate: 0, 1k, 1k, 1k
    assert row["eta_seconds"] == pytest.approx(120.0)
    assert reports.status_cells(row) == [
        "balances_v2",
        "replaying",
        "50,000",
        "90,000",
        "750",
        "2m",
        "-",
        "3m",
    ]


def test_the_status_row_falls_back_to_the_last_run_rate_and_says_caught_up_as_0s():
    run = Run(1, "replay", "succeeded", T0, T0 + dt.timedelta(seconds=10), 0, 50_000, 50_000, None)
    row = reports.status_row(_replay(runs=[run]), lag=0, history=_history([50_000]), now=T0)
    assert row["rate"] == pytest.approx(5_000.0)
    assert row["last_run"] == "replay succeeded"
    assert reports.status_cells(row)[4:6] == ["5,000", "0s"]


def test_an_unknown_eta_reads_as_a_dash():
    row = reports.status_row(_replay(), lag=10, history=_history([]), now=T0)
    assert row["rate"] is None and row["eta_seconds"] is None
    assert reports.status_cells(row)[4:6] == ["-", "-"]


@pytest.mark.parametrize("state", [ReplayState.LIVE, ReplayState.ROLLED_BACK, ReplayState.REMOVED])
def test_a_replay_whose_copy_follows_nothing_has_no_lag_rate_or_eta(state):
    run = Run(1, "replay", "succeeded", T0, T0 + dt.timedelta(seconds=10), 0, 50_000, 50_000, None)
    history = _history([0, 1_000, 2_000, 3_000])
    row = reports.status_row(_replay(runs=[run], state=state), lag=9_000, history=history, now=T0)
    assert (row["lag"], row["rate"], row["eta_seconds"]) == (None, None, None)
    assert reports.status_cells(row)[1:6] == [state.value, "50,000", "-", "-", "-"]


def test_a_superseded_replay_says_by_which_and_has_no_lag():
    row = reports.status_row(
        _replay(state=ReplayState.SUPERSEDED, superseded_by="v3"), lag=9_000, history=None, now=T0
    )
    assert row["superseded_by"] == "v3" and row["lag"] is None
    assert reports.status_cells(row)[1:4] == ["superseded by v3", "50,000", "-"]


def test_a_failed_replay_has_its_lag_but_no_rate_or_eta():
    row = reports.status_row(
        _replay(state=ReplayState.FAILED), lag=9_000, history=_history([0, 1_000]), now=T0
    )
    assert (row["lag"], row["rate"], row["eta_seconds"]) == (9_000, None, None)


def test_status_tells_a_dead_run_from_a_live_one_and_says_what_to_run():
    """The runner locks say who runs: a run recorded as running whose process died is
    "interrupted", and nothing that is not moved has a rate or an ETA."""
    running = Run(1, "replay", "running", T0, None, 0, None, 0, None)
    history = _history([0, 1_000, 2_000, 3_000])
    alive = reports.status_row(
        _replay(runs=[running]), lag=9_000, history=history, runners=reports.Runners(42, None)
    )
    assert (alive["running"], alive["last_run"], alive["next"]) == (True, "replay running", None)
    assert alive["eta_seconds"] is not None
    dead = reports.status_row(
        _replay(runs=[running]), lag=9_000, history=history, runners=reports.Runners(None, 7)
    )
    assert (dead["running"], dead["last_run"]) == (False, "replay interrupted")
    assert (dead["rate"], dead["eta_seconds"]) == (None, None)
    assert dead["next"] == "not running: `zdr replay balances_v2` resumes it from position 50,000"
    dual = _replay(state=ReplayState.DUAL_WRITING)
    unfed = reports.status_row(dual, lag=500, history=history, runners=reports.Runners(None, None))
    assert unfed["eta_seconds"] is None and "start `zdr live`" in unfed["next"]
    fed = reports.status_row(dual, lag=500, history=history, runners=reports.Runners(None, 7))
    assert fed["next"] is None and fed["live_runner"] is True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (119.9, "119s"), (120, "2m"), (7_199, "119m"), (11_100, "3h05m")],
)
def test_durations_read_in_seconds_minutes_or_hours(seconds, text):
    assert reports.duration(seconds) == text


def test_the_progress_line_gives_done_total_rate_and_eta():
    assert reports.replay_progress(40_000, 100_000, 20_000.0) == (
        "replayed 40,000 of 100,000 events (20,000 events/s, ETA 3s)"
    )
    assert reports.replay_progress(0, 10_000_000, 1_000.0).endswith("ETA 2h46m)")
    assert reports.replay_progress(0, 100_000, 0.0).endswith("ETA unknown)")


# -- lag over time -------------------------------------------------------------


def test_the_lag_table_has_no_repeated_row_and_keeps_the_last_sample():
    # A replay caught up at 21,000 events and tasks that found nothing new sampled it
    # twice more within one second: those two samples read the same to the second.
    applied = [i * 1_000 for i in range(22)] + [21_000, 21_000]
    seconds = [float(i) for i in range(22)] + [22.1, 22.6]
    samples = reports.lag_samples(_history(applied, seconds=seconds))

    rows = [tuple(s.values()) for s in samples]
    assert len(rows) == len(set(rows)), rows
    assert len(rows) <= 12
    assert samples[0]["at"] == "12:00:00"
    last = {"at": "12:00:22", "events_applied": 21_000, "lag": 79_000, "events_per_s": 0}
    assert samples[-1] == last


def test_the_lag_table_spreads_at_most_the_rows_asked_for_first_and_last_in():
    samples = reports.lag_samples(_history([i * 100 for i in range(100)]), rows=12)
    assert len(samples) == 12
    assert samples[0]["events_applied"] == 0 and samples[-1]["events_applied"] == 9_900
    applied = [s["events_applied"] for s in samples]
    assert applied == sorted(applied)
    assert reports.lag_samples(_history([])) == []
    assert len(reports.lag_samples(_history([0, 100, 200]))) == 3


def test_the_lag_table_in_markdown_has_one_line_per_sample():
    samples = reports.lag_samples(_history([0, 5_000, 10_000]))
    lines = reports.lag_markdown(samples)
    assert lines[0] == "Lag over time:"
    assert "| 12:00:02 | 10,000 | 90,000 | 5,000 |" in lines
    assert len([line for line in lines if line.startswith("| 12:")]) == 3
    assert reports.lag_markdown([]) == []


# -- verification --------------------------------------------------------------

SUMMARY = [
    {
        "column": "deposits",
        "live": None,
        "replay": {"type": "integer", "non_null": 999, "distinct": 5, "min": 0, "max": 9},
    },
    {
        "column": "balance",
        "live": {"type": "bigint", "non_null": 1_000, "distinct": 7, "min": 0, "max": 90},
        "replay": {"type": "bigint", "non_null": 999, "distinct": 7, "min": None, "max": 90},
    },
]

DIFFERENCES = [
    Difference(
        "bank_balances.balances",
        "changed",
        {"account_id": "acc-000001"},
        ["balance"],
        {"balance": 100},
        {"balance": 90},
    ),
    Difference("bank_balances.balances", "missing", {"account_id": "acc-000003"}),
    Difference("bank_balances.balances", "extra", {"account_id": "acc-999999"}),
]


def test_verification_text_names_each_differing_row_and_what_differs():
    report = _report(DIFFERENCES)
    assert reports.difference_lines(report) == [
        "bank_balances.balances account_id=acc-000001: changed: balance 100 -> 90",
        "bank_balances.balances account_id=acc-000003: missing: missing from the replay",
        "bank_balances.balances account_id=acc-999999: extra: only in the replay",
    ]
    assert reports.verification_headline(report) == (
        "replay check: differences found (live at 500, replay at 500)"
    )
    assert reports.verification_cells(report) == [
        ["bank_balances.balances", "1,000", "999", "2", "balance"]
    ]


def test_verification_cells_count_the_differing_rows_after_the_columns():
    table = TableReport(
        table="bank_balances.balances",
        live_rows=1_000,
        replay_rows=1_000,
        compared_columns=["account_id", "balance"],
        differing_columns=[],
        only_live_columns=[],
        only_replay_columns=[],
        primary_key=["account_id"],
        missing_rows=1,
        extra_rows=1,
    )
    report = VerificationReport(
        key="check",
        state="dual_writing",
        same_version=True,
        live_position=500,
        replay_position=500,
        tables=[table, replace(table, differing_columns=["balance"], changed_rows=1_200)],
        differences=[],
        truncated=False,
        snapshot_seconds=2.54,
    )
    assert not table.equal, "a row moved to another key is a difference, counts alike"
    assert [cells[-1] for cells in reports.verification_cells(report)] == [
        "rows: 1 missing, 1 extra",
        "balance; rows: 1,200 changed, 1 missing, 1 extra",
    ]
    assert "in one snapshot open 2.5 s" in reports.verification_markdown(report)
    [row, _] = reports.row_counts(report.to_dict()["tables"])
    assert row["differing_rows"] == 2 and row["equal"] is False


def test_verification_markdown_says_equal_or_lists_the_rows_and_when_not_level():
    assert "**equal**" in reports.verification_markdown(_report([]))
    markdown = reports.verification_markdown(_report(DIFFERENCES))
    assert "**differences found**" in markdown
    assert "| bank_balances.balances | account_id=acc-000003 | missing | - |" in markdown
    assert "| deposits | - / integer | - / 999 |" in reports.verification_markdown(
        _report([], summary=True)
    )
    assert NOT_LEVEL in reports.verification_markdown(_report([], live_position=501))


@pytest.mark.parametrize(
    "report",
    [_report([]), _report(DIFFERENCES, summary=True), _report([], live_position=501)],
)
def test_verification_markdown_is_the_report_s_own_markdown(report):
    """Until ``VerificationReport.to_markdown`` delegates to reports, both must agree."""
    assert reports.verification_markdown(report) == report.to_markdown()


# -- the pipeline's reports ----------------------------------------------------


def test_the_approver_report_has_state_lag_projectors_verification_and_lag_over_time():
    verification = reports.verification_markdown(_report([]))
    markdown = reports.approval_markdown(
        "balances_v2",
        state="dual_writing",
        lag=3,
        events_applied=200_000,
        rate=45_616.4,
        projectors=["zdr.examples.bank.projectors:BalancesV2"],
        verification=verification,
        lag_rows=reports.lag_samples(_history([0, 5_000])),
    )
    assert markdown.startswith("## Replay `balances_v2`")
    assert "* state: **dual_writing**, lag **3** events" in markdown
    assert "(last replay run 45,616 events/s)" in markdown
    assert "`zdr.examples.bank.projectors:BalancesV2`" in markdown
    assert verification in markdown
    assert "| 12:00:01 | 5,000 | 95,000 | 5,000 |" in markdown
    assert markdown.endswith("the current copy is kept for rollback.")


@pytest.mark.parametrize("differences", [[], DIFFERENCES])
def test_the_approval_form_s_report_fits_the_form(differences):
    """The resume form is narrow: its report has no table wider than the lag's four
    narrow columns (a wide one is clipped on the right), yet says each table's counts,
    each listed difference, the lag over time once per sample, and where the whole
    report is."""
    report = reports.ApprovalReport(
        replay=_replay(state=ReplayState.DUAL_WRITING),
        lag=3,
        verification=_report(differences, summary=True),
        lag_history=reports.lag_samples(_history([0, 5_000, 5_000], seconds=[0, 1, 1])),
    )
    markdown = report.to_form_markdown(full_report="artifact `zdr-x-report`")
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert rows and all(line.count("|") - 1 <= 4 for line in rows), rows
    assert len(rows) == len(set(rows)), "a lag row is repeated"
    verdict = "**differences found**" if differences else "**equal**"
    assert markdown.startswith(f"## Replay `balances_v2`: {verdict}")
    assert "* `bank_balances.balances`: 1,000 live rows, " in markdown
    assert "* state **dual_writing**, lag **3** events" in markdown
    if differences:
        assert "* `bank_balances.balances` account_id=acc-000001: changed (balance)" in markdown
        assert "* `bank_balances.balances` account_id=acc-000003: missing" in markdown
    assert "The whole report, with each column live / replay: artifact `zdr-x-report`." in (
        markdown
    )
    assert "deposits" not in markdown, "column summaries belong to the whole report"


def test_the_promotion_markdown_gives_position_waits_and_attempts():
    markdown = reports.promotion_markdown(
        "balances_v2", position=200_000, lock_wait_ms=0.84, duration_ms=21.04, attempts=2
    )
    assert "### Replay `balances_v2` is live" in markdown
    assert "| lock wait | 0.8 ms |" in markdown
    assert "| swap transaction | 21.0 ms |" in markdown
    assert "| attempts | 2 |" in markdown

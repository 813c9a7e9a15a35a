"""What zdr shows people: status rows, ETAs, verification, lag over time, the approver's
report and the promotion, as text and markdown.

One renderer for the command line and the Prefect pipeline, so ``zdr status`` and the
flow's logs give the same ETA and ``zdr verify --markdown`` prints what the approver
reads. Functions take zdr's dataclasses, lag samples (as
``ReplayManager.lag_history_samples`` returns them) and plain values; nothing here
imports Prefect or touches the database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zdr.horizon import age
from zdr.replay import FOLLOWING, MOVING, eta_seconds
from zdr.verify import NOT_LEVEL

if TYPE_CHECKING:
    from zdr.horizon import Horizon
    from zdr.records import LagSample
    from zdr.replay import Replay
    from zdr.summary import ReplaySummary as ReplaySummary
    from zdr.verify import Difference, TableReport, VerificationReport

#: How many recent samples the status's events/s averages over.
RATE_SAMPLES = 10
#: How far back a status row looks for the recent rate.
RATE_WINDOW = dt.timedelta(minutes=5)
#: The columns of ``zdr status``, in order.
STATUS_COLUMNS = ("key", "state", "position", "lag", "events/s", "ETA", "last run", "age")
#: The columns of ``zdr verify``'s table, in order.
VERIFICATION_COLUMNS = ("table", "live rows", "replay rows", "columns compared", "differing")


# -- time ----------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """``42s``, ``17m``, ``3h05m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7_200:
        return f"{seconds // 60}m"
    return f"{seconds // 3_600}h{(seconds % 3_600) // 60:02d}m"


def replay_progress(done: int, total: int, rate: float) -> str:
    """One line on a running replay: how far, how fast, how long still."""
    eta = eta_seconds(total - done, rate)
    return f"replayed {done:,} of {total:,} events ({rate:,.0f} events/s, ETA " + (
        "unknown)" if eta is None else f"{duration(eta)})"
    )


# -- status --------------------------------------------------------------------


def recent_rate(history: Sequence[LagSample], fallback: float | None = None) -> float | None:
    """Events/s over the latest samples of ``history``; ``fallback`` with fewer than two."""
    if len(history) > 1:
        latest = history[-RATE_SAMPLES:]
        return sum(s.events_per_s for s in latest) / len(latest)
    return fallback


@dataclass(frozen=True)
class Runners:
    """Who runs, as the runner locks say (a process that died holds none): the pid of
    the session running the replay and of the live runner's, None where nobody runs."""

    replay_pid: int | None
    live_pid: int | None


#: The states whose copy only the replay's own run moves (``zdr replay``); a
#: dual-writing copy is moved by the live runner.
_MOVED_BY_REPLAY_RUN = frozenset({"created", "replaying", "caught_up"})


def status_row(
    replay: Replay,
    *,
    lag: int | None,
    history: Sequence[LagSample] | None,
    now: dt.datetime | None = None,
    runners: Runners | None = None,
) -> dict[str, Any]:
    """Where a replay stands, as plain data (``zdr status --json`` prints these).

    Only the figures that mean something in the replay's state are given, the others
    are None: a lag only while its copy still follows the log (``FOLLOWING``: not once
    it is live, superseded, rolled back or removed), a rate and an ETA only while it
    moves (``MOVING``: not failed either). ``history`` is its recent lag history; the
    rate is the mean over its latest samples, else the rate of the replay's last run.
    """
    state = replay.state.value
    replay_running = runners is None or runners.replay_pid is not None
    live_running = runners is None or runners.live_pid is not None
    # Nothing moves a copy whose runner is not running: no rate, no ETA then.
    mover_running = live_running if state == "dual_writing" else replay_running
    moving = replay.state in MOVING and lag is not None and mover_running
    if replay.state not in FOLLOWING:
        lag = None
    rate = None
    if moving:
        rate = recent_rate(history, replay.rate) if history is not None else replay.rate
    last = replay.runs[-1] if replay.runs else None
    last_run = f"{last.kind} {last.status}" if last else None
    if last is not None and last.status == "running" and not replay_running:
        last_run = f"{last.kind} interrupted"  # its process died: its lock went with it
    now = now or dt.datetime.now(dt.UTC)
    return {
        "key": replay.key,
        "state": replay.state.value,
        "superseded_by": replay.superseded_by,
        "position": replay.position,
        "events_applied": replay.events_applied,
        "lag": lag,
        "rate": rate or None,
        "eta_seconds": eta_seconds(lag, rate) if moving and lag is not None else None,
        "last_run": last_run,
        "age_seconds": (now - replay.created_at).total_seconds(),
        "error": replay.error,
        "running": None if runners is None else runners.replay_pid is not None,
        "live_runner": None if runners is None else runners.live_pid is not None,
        "next": None if runners is None else _next_step(replay, state, runners),
    }


def _next_step(replay: Replay, state: str, runners: Runners) -> str | None:
    """What to do for a copy nothing moves, in the command line's words; None if it moves
    or there is nothing to do."""
    key = replay.key
    if runners.replay_pid is not None:
        return None
    if state == "caught_up":
        return f"caught up: `zdr enable-dual-write {key}` next (with `zdr live` running)"
    if replay.partitions_left:
        n = replay.partitions
        return (
            f"not running: {replay.partitions_left} of its {n} partitions left; the "
            f"pipeline with partitions={n} (`zdr run {key} -p ... --partitions {n}`) "
            "resumes them"
        )
    if state in _MOVED_BY_REPLAY_RUN:
        verb = "starts it" if state == "created" else "resumes it"
        return f"not running: `zdr replay {key}` {verb} from position {replay.position:,}"
    if state == "dual_writing" and runners.live_pid is None:
        return "no live runner: nothing keeps it level with live; start `zdr live`"
    if state == "failed":
        return f"failed: fix the projector, then `zdr replay {key}` resumes it"
    return None


def status_cells(row: Mapping[str, Any]) -> list[str]:
    """A ``status_row`` as the cells of ``STATUS_COLUMNS`` ("-" where a figure means nothing
    in the replay's state, or is not known yet)."""
    state = row["state"]
    if row.get("superseded_by"):
        state += f" by {row['superseded_by']}"
    return [
        row["key"],
        state,
        f"{row['position']:,}",
        "-" if row["lag"] is None else f"{row['lag']:,}",
        f"{row['rate']:,.0f}" if row["rate"] else "-",
        duration(row["eta_seconds"]),
        row["last_run"] or "-",
        duration(row["age_seconds"]),
    ]


def status_records(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Replays as records for a table artifact (one placeholder record when there are none)."""
    fields = ("key", "state", "position", "events_applied", "lag")
    return [{k: row[k] for k in fields} for row in rows] or [{"key": "(no replays)"}]


# -- the safe horizon ----------------------------------------------------------


def horizon_warning(horizon: Horizon) -> str:
    """The one-line warning ``zdr status`` prints when the horizon is held."""
    holder = horizon.holder
    if holder is None:
        return horizon.describe()
    return (
        f"the safe position is held by an appending transaction, {holder.describe()}; "
        "events committed after it wait (live read models and replays stand still) until "
        "it ends: see `zdr horizon`"
    )


def horizon_lines(horizon: Horizon) -> list[str]:
    """``zdr horizon``: the horizon, then the holder field by field."""
    if horizon.by_position:
        return [horizon.describe()]
    if horizon.position is not None:
        head = f"safe position: {horizon.position:,}"
    else:
        head = f"safe horizon: transaction {horizon.txid:,}"
    holder = horizon.holder
    if holder is None:
        return [head, "nothing holds it back"]
    who = f"pid {holder.pid}" if holder.kind == "session" else f"{holder.kind} {holder.name!r}"
    held = "" if holder.age_s is None else f" for {age(holder.age_s)}"
    lines = [head, f"held by {who}{held}, an appending transaction"]
    fields = [
        ("pid", holder.pid),
        ("database", holder.database),
        ("user", holder.user),
        ("application", holder.application_name),
        ("state", holder.state),
        ("query", holder.query),
    ]
    lines += [f"  {name + ':':<13}{value}" for name, value in fields if value not in (None, "")]
    return lines


# -- verification --------------------------------------------------------------


def verification_headline(report: VerificationReport, *, verdict: str | None = None) -> str:
    """``replay KEY: equal (live at N, replay at M)``; ``verdict`` replaces the word
    (the command line colours it)."""
    if verdict is None:
        verdict = "equal" if report.equal else "differences found"
    return (
        f"replay {report.key}: {verdict} (live at {report.live_position:,}, "
        f"replay at {report.replay_position:,}"
        + ("" if report.same_version else "; a new projector version")
        + ")"
    )


def verification_cells(report: VerificationReport) -> list[list[str]]:
    """One row per table: live rows, replay rows, columns compared, what differs (the
    columns, then how many rows: ``balance; rows: 2 changed, 1 missing``)."""
    return [
        [
            t.table,
            _n(t.live_rows),
            _n(t.replay_rows),
            str(len(t.compared_columns)),
            differing(t),
        ]
        for t in report.tables
    ]


def differing(table: TableReport) -> str:
    """The columns that differ, those whose types cannot be compared, and the count of
    rows that differ; ``-`` when nothing does."""
    rows = ", ".join(
        f"{n:,} {what}"
        for n, what in (
            (table.changed_rows, "changed"),
            (table.missing_rows, "missing"),
            (table.extra_rows, "extra"),
        )
        if n
    )
    uncomparable = ", ".join(table.uncomparable_columns)
    parts = [
        ", ".join(table.differing_columns),
        f"types not comparable: {uncomparable}" if uncomparable else "",
        f"rows: {rows}" if rows else "",
    ]
    return "; ".join(p for p in parts if p) or "-"


def difference_line(d: Difference) -> str:
    """``TABLE KEY=VALUE: missing: missing from the replay`` (or what changed, column by
    column)."""
    row = ", ".join(f"{k}={v}" for k, v in d.key.items())
    if d.kind == "changed":
        live, replay = d.live or {}, d.replay or {}
        what = ", ".join(f"{c} {live[c]!r} -> {replay[c]!r}" for c in d.columns)
    else:
        what = "missing from the replay" if d.kind == "missing" else "only in the replay"
    return f"{d.table} {row}: {d.kind}: {what}"


def difference_lines(report: VerificationReport) -> list[str]:
    """One line per differing row the report lists."""
    return [difference_line(d) for d in report.differences]


def verification_markdown(report: VerificationReport) -> str:
    """The report as markdown (``zdr verify --markdown``, the approver's report)."""
    verdict = "**equal**" if report.equal else "**differences found**"
    lines = [
        f"### Verification of replay `{report.key}`: {verdict}",
        "",
        f"* state {report.state}; projector version "
        f"{'the same as live' if report.same_version else 'new (a new shape or a fix)'}",
        f"* compared at live position {report.live_position}, replay position "
        f"{report.replay_position}"
        + ("" if report.level else f" ({NOT_LEVEL}; no rows are listed)"),
        *_compared_how(report),
        "",
        "| table | live rows | replay rows | columns compared | differing |",
        "|---|---:|---:|---:|---|",
        *("| " + " | ".join(cells) + " |" for cells in verification_cells(report)),
    ]
    if report.differences:
        lines += ["", "| table | row | what | columns |", "|---|---|---|---|"]
        for d in report.differences:
            key = ", ".join(f"{k}={v}" for k, v in d.key.items())
            lines.append(f"| {d.table} | {key} | {d.kind} | {', '.join(d.columns) or '-'} |")
        if report.truncated:
            lines.append("| ... | | more differences not listed | |")
    for t in report.tables:
        if t.summary:
            lines += ["", f"Columns of {t.table}, live / replay:", ""]
            lines += _markdown_table(_summary_rows(t.summary))
    return "\n".join(lines)


def _compared_how(report: VerificationReport) -> list[str]:
    """How rows were compared, and how long the snapshot was open, when known."""
    how = "* rows compared by primary key, every column bound to its row's key"
    if report.snapshot_seconds is not None:
        how += f", in one snapshot open {report.snapshot_seconds:.1f} s"
    unkeyed = [t.table for t in report.tables if t.compared_columns and not t.primary_key]
    if unkeyed:
        how += "; without a primary key (or with a generated one), as multisets of rows "
        how += "(counted, not listed): " + ", ".join(unkeyed)
    generated = [f"{t.table}.{c}" for t in report.tables for c in t.generated_columns]
    if generated:
        how += "; not compared, numbered by the database in each copy: " + ", ".join(generated)
    return [how]


def row_counts(tables: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows per table, live and replay, as records for a table artifact (``tables`` as in
    ``VerificationReport.to_dict()["tables"]``)."""
    return [
        {
            "table": t["table"],
            "live_rows": t["live_rows"],
            "replay_rows": t["replay_rows"],
            "equal": t["equal"],
            "differing_columns": ", ".join(t["differing_columns"]),
            "differing_rows": sum(
                t.get(k, 0) for k in ("changed_rows", "missing_rows", "extra_rows")
            ),
        }
        for t in tables
    ]


# -- lag over time -------------------------------------------------------------


def lag_samples(history: Sequence[LagSample], rows: int = 12) -> list[dict[str, Any]]:
    """At most ``rows`` samples of a lag history, evenly spread, first and last always in.

    A sample that would read exactly like the next one (same second, same numbers, as
    when a caught-up replay is sampled twice) is left out, so no row repeats and the
    last sample is the one kept.
    """
    if not history or rows < 1:
        return []
    positions = sorted({round(i) for i in _spread(len(history) - 1, min(rows, len(history)))})
    records = [
        {
            "at": history[i].at.strftime("%H:%M:%S"),
            "events_applied": int(history[i].events_applied),
            "lag": int(history[i].lag),
            "events_per_s": round(float(history[i].events_per_s)),
        }
        for i in positions
    ]
    return [r for r, after in zip(records, [*records[1:], None], strict=True) if r != after]


def lag_markdown(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """``lag_samples`` as a markdown table, with a blank line after; nothing without samples."""
    if not samples:
        return []
    return [
        "Lag over time:",
        "",
        "| time | events applied | lag | events/s |",
        "|---|---:|---:|---:|",
        *(
            f"| {s['at']} | {s['events_applied']:,} | {s['lag']:,} | {s['events_per_s']:,} |"
            for s in samples
        ),
        "",
    ]


# -- the pipeline's reports ----------------------------------------------------


def approval_markdown(
    key: str,
    *,
    state: str,
    lag: int,
    events_applied: int,
    rate: float | None,
    projectors: Iterable[str],
    verification: str,
    lag_rows: Sequence[Mapping[str, Any]],
) -> str:
    """What the approver reads before promoting: state, lag, rate, projectors, the
    verification (markdown, ``verification_markdown``) and the lag over time
    (``lag_samples``)."""
    lines = [
        f"## Replay `{key}`",
        "",
        f"* state: **{state}**, lag **{lag:,}** events",
        f"* events applied: {events_applied:,} (last replay run {rate or 0:,.0f} events/s)",
        f"* projectors: {', '.join(f'`{p}`' for p in projectors)}",
        "",
        verification,
        "",
        *lag_markdown(lag_rows),
        "Approve to promote the replay to live; the current copy is kept for rollback.",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ApprovalReport:
    """What an approver looks at before promoting: the replay, its lag, the verification
    and the lag over time (what the pipeline's ``verify-replay`` step returns)."""

    replay: Replay
    lag: int
    verification: VerificationReport
    lag_history: list[dict[str, Any]]

    def to_markdown(self) -> str:
        return approval_markdown(
            self.replay.key,
            state=self.replay.state.value,
            lag=self.lag,
            events_applied=self.replay.events_applied,
            rate=self.replay.rate,
            projectors=self.replay.projectors.values(),
            verification=verification_markdown(self.verification),
            lag_rows=self.lag_history,
        )

    def to_form_markdown(self, *, full_report: str | None = None) -> str:
        """The report as the approval form shows it: the form is narrow, so no table
        wider than the lag's four narrow columns; each table's counts and each listed
        difference are a line of their own. ``full_report``: where the whole report
        (with each column's values, live / replay) is, e.g. its artifact's key."""
        v = self.verification
        verdict = "**equal**" if v.equal else "**differences found**"
        replay = self.replay
        lines = [
            f"## Replay `{replay.key}`: {verdict}",
            "",
            f"* state **{replay.state.value}**, lag **{self.lag:,}** events",
            f"* {replay.events_applied:,} events applied "
            f"(last replay run {replay.rate or 0:,.0f} events/s)",
            f"* projectors: {', '.join(f'`{p}`' for p in replay.projectors.values())}",
            "* projector version: "
            + ("the same as live" if v.same_version else "new (a new shape or a fix)"),
            f"* compared at live position {v.live_position:,}, replay position "
            f"{v.replay_position:,}" + ("" if v.level else f" ({NOT_LEVEL})"),
            "",
            "Tables:",
            "",
            *(
                f"* `{t.table}`: {_n(t.live_rows)} live rows, {_n(t.replay_rows)} replay "
                f"rows, {len(t.compared_columns)} columns compared; "
                + ("nothing differs" if t.equal else f"differing: {differing(t)}")
                for t in v.tables
            ),
        ]
        if v.differences:
            lines += ["", "Rows that differ:", ""]
            for d in v.differences:
                key = ", ".join(f"{k}={val}" for k, val in d.key.items())
                columns = f" ({', '.join(d.columns)})" if d.columns else ""
                lines.append(f"* `{d.table}` {key}: {d.kind}{columns}")
            if v.truncated:
                lines.append("* ... more, not listed")
        lines += ["", *lag_markdown(self.lag_history)]
        if full_report:
            lines += [f"The whole report, with each column live / replay: {full_report}.", ""]
        lines.append(
            "Approve to promote the replay to live; the current copy is kept for rollback."
        )
        return "\n".join(lines)


def promotion_markdown(
    key: str,
    *,
    position: int | None,
    lock_wait_ms: float,
    duration_ms: float,
    attempts: int,
    analyzed: Sequence[str] = (),
) -> str:
    """What a promotion did: the position, how long readers could have waited, and which
    tables got fresh planner statistics before the swap."""
    return (
        f"### Replay `{key}` is live\n\n"
        f"| | |\n|---|---|\n"
        f"| position | {position} |\n"
        f"| lock wait | {lock_wait_ms:.1f} ms |\n"
        f"| swap transaction | {duration_ms:.1f} ms |\n"
        f"| attempts | {attempts} |\n"
        f"| analyzed before the swap | {', '.join(analyzed) or '-'} |\n"
    )


# -- helpers -------------------------------------------------------------------


def _spread(last: int, count: int) -> list[float]:
    """``count`` points from 0 to ``last``, evenly spaced (both ends in)."""
    if count <= 1:
        return [float(last)]
    return [last * i / (count - 1) for i in range(count)]


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _summary_rows(summary: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per column, each cell "live / replay" ("-" where a side lacks the column)."""

    def both(row: dict[str, Any], field: str) -> str:
        values = [row[side][field] if row[side] else "-" for side in ("live", "replay")]
        if values[0] == values[1]:
            return "-" if values[0] is None else str(values[0])
        return " / ".join("-" if v is None else str(v) for v in values)

    fields = ("type", "non_null", "distinct", "min", "max")
    return [{"column": row["column"], **{f: both(row, f) for f in fields}} for row in summary]


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return [header, rule, *body]


def __getattr__(name: str) -> Any:
    """``ReplaySummary`` (zdr.summary) on first use: it needs pydantic, which the
    command line's status and verify do not."""
    if name == "ReplaySummary":
        from zdr.summary import ReplaySummary

        return ReplaySummary
    raise AttributeError(f"module 'zdr.reports' has no attribute {name!r}")

"""Verification finds planted differences by table and primary key, and none on an honest replay."""

from __future__ import annotations

import json

import pytest

import zdr
from tests.support import seed
from zdr.examples.bank.projectors import BalancesV2


@pytest.fixture()
def same_version(manager):
    seed(manager.store, 1_500, accounts=120)
    manager.project_live()
    manager.create_replay("same", ["balances", "history"])
    manager.start_replay("same")
    manager.start_projecting_to_replay("same")
    return manager


def test_an_honest_replay_of_the_same_version_is_equal(same_version):
    report = same_version.verify("same", chunk_rows=7)
    assert report.equal and report.same_version and report.level
    assert not report.differences
    assert {t.table for t in report.tables} == {
        "bank_balances.balances",
        "bank_history.transactions",
    }
    assert all(t.live_rows == t.replay_rows > 0 for t in report.tables)
    assert json.loads(json.dumps(report.to_dict(), default=str))["equal"] is True


@pytest.mark.parametrize("chunk_rows", [7, 50_000])
def test_a_changed_value_a_missing_row_and_an_extra_row_are_each_named(
    same_version, engine, chunk_rows
):
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE zdr_same_1.balances SET balance = balance + 1 WHERE account_id = 'acc-000007'"
        )
        conn.exec_driver_sql("DELETE FROM zdr_same_1.balances WHERE account_id = 'acc-000042'")
        conn.exec_driver_sql(
            "INSERT INTO zdr_same_1.balances VALUES ('zzz-ghost', 'nobody', 5, 1, false)"
        )
    report = same_version.verify("same", chunk_rows=chunk_rows)

    assert not report.equal
    found = {(d.table, d.kind, d.key["account_id"]): d for d in report.differences}
    assert set(found) == {
        ("bank_balances.balances", "changed", "acc-000007"),
        ("bank_balances.balances", "missing", "acc-000042"),
        ("bank_balances.balances", "extra", "zzz-ghost"),
    }
    changed = found[("bank_balances.balances", "changed", "acc-000007")]
    assert changed.columns == ["balance"]
    assert changed.replay["balance"] == changed.live["balance"] + 1
    [balances] = [t for t in report.tables if t.table == "bank_balances.balances"]
    assert "balance" in balances.differing_columns
    history = [t for t in report.tables if t.table == "bank_history.transactions"]
    assert history[0].equal, "an untouched table stays equal"


def test_the_number_of_differences_listed_is_bounded(same_version, engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr_same_2.transactions SET amount = amount + 1")
    report = same_version.verify("same", max_differences=5, chunk_rows=100)
    assert len(report.differences) == 5 and report.truncated
    assert "more differences not listed" in report.to_markdown()


def test_a_new_shape_compares_shared_columns_and_summarises_both_sides(manager):
    seed(manager.store, 800)
    manager.project_live()
    manager.create_replay("shape", [BalancesV2()])
    manager.start_replay("shape")
    report = manager.verify("shape")
    [table] = report.tables
    assert not report.same_version
    assert report.equal, "the shared columns hold the same values"
    assert table.only_replay_columns == ["deposits", "last_position"]
    columns = {row["column"]: row for row in table.summary}
    assert columns["deposits"]["live"] is None
    assert columns["deposits"]["replay"]["non_null"] == table.replay_rows
    assert columns["balance"]["live"]["max"] == columns["balance"]["replay"]["max"]
    assert columns["account_id"]["live"]["distinct"] == table.live_rows
    markdown = report.to_markdown()
    assert "Columns of bank_balances.balances, live / replay" in markdown
    assert f"| deposits | - / integer | - / {table.replay_rows} |" in markdown


def test_a_replay_that_is_not_level_with_live_says_so(manager):
    sim = seed(manager.store, 300)
    manager.create_replay("behind", ["balances"])
    manager.start_replay("behind")
    from tests.support import append

    append(manager.store, sim.events(10))
    manager.project_live()
    report = manager.verify("behind")
    assert not report.level and not report.equal
    assert not report.differences, "rows of copies at different positions are not compared"
    assert "not level" in report.to_markdown()


def test_verifying_an_unknown_replay_names_it(manager):
    with pytest.raises(zdr.ReplayNotFound, match="'nope'"):
        manager.verify("nope")

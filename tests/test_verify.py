"""Verification finds planted differences by table and primary key, and none on an honest replay."""

from __future__ import annotations

import json

import pytest

import zdr
from tests.support import append, following, seed
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


# -- rows are compared bound to their keys, never as column sums ------------------------


def _two_accounts(engine, schema="zdr_same_1"):
    """Two accounts whose balances and event counts differ, in key order."""
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            f"""SELECT a.account_id, b.account_id FROM "{schema}".balances a
                JOIN "{schema}".balances b ON b.account_id > a.account_id
                 AND b.balance <> a.balance AND b.events <> a.events
                 AND b.balance <> a.events AND b.events <> a.balance
                ORDER BY a.account_id, b.account_id LIMIT 1"""
        ).one()


def _changed(report):
    return {d.key["account_id"]: d for d in report.differences if d.kind == "changed"}


@pytest.mark.parametrize("chunk_rows", [7, 50_000])
def test_values_swapped_between_two_rows_are_found_and_both_keys_named(
    same_version, engine, chunk_rows
):
    first, second = _two_accounts(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """UPDATE zdr_same_1.balances t SET balance = o.balance FROM zdr_same_1.balances o
               WHERE (t.account_id, o.account_id) IN ((%s, %s), (%s, %s))""",
            (first, second, second, first),
        )
    report = same_version.verify("same", chunk_rows=chunk_rows)

    assert not report.equal
    changed = _changed(report)
    assert set(changed) == {first, second} and len(report.differences) == 2
    assert changed[first].columns == changed[second].columns == ["balance"]
    assert changed[first].replay["balance"] == changed[second].live["balance"]
    [balances] = [t for t in report.tables if t.table == "bank_balances.balances"]
    assert balances.live_rows == balances.replay_rows
    assert balances.differing_columns == ["balance"] and balances.changed_rows == 2


@pytest.mark.parametrize("chunk_rows", [7, 50_000])
def test_compensating_errors_one_row_plus_one_another_minus_one_are_found(
    same_version, engine, chunk_rows
):
    """Two rows far apart (in other chunks when chunks are small) hold balances 100 and
    101; the replay has 101 and 100: +1 on one, -1 on the other. The table's total is
    the same, and so is every column's set of values, only on other rows."""
    with engine.connect() as conn:
        keys = (
            conn.exec_driver_sql("SELECT account_id FROM zdr_same_1.balances ORDER BY account_id")
            .scalars()
            .all()
        )
    up, down = keys[3], keys[-3]
    with engine.begin() as conn:
        for schema in ("bank_balances", "zdr_same_1"):
            for account, balance in ((up, 100), (down, 101)):
                conn.exec_driver_sql(
                    f'UPDATE "{schema}".balances SET balance = %s WHERE account_id = %s',
                    (balance, account),
                )
        conn.exec_driver_sql(
            "UPDATE zdr_same_1.balances SET balance = balance + 1 WHERE account_id = %s", (up,)
        )
        conn.exec_driver_sql(
            "UPDATE zdr_same_1.balances SET balance = balance - 1 WHERE account_id = %s", (down,)
        )
    report = same_version.verify("same", chunk_rows=chunk_rows)

    assert not report.equal
    changed = _changed(report)
    assert set(changed) == {up, down}
    assert (changed[up].live, changed[up].replay) == ({"balance": 100}, {"balance": 101})
    assert (changed[down].live, changed[down].replay) == ({"balance": 101}, {"balance": 100})


def test_a_value_moved_to_another_column_of_its_row_is_found_even_when_column_sums_hide_it(
    same_version, engine
):
    """On one row balance and events trade places; a second row trades them back the
    other way, so each column still holds the same values, only on other rows."""
    first, second = _two_accounts(engine)
    with engine.begin() as conn:
        for schema in ("bank_balances", "zdr_same_1"):  # mirror images, live and replay
            conn.exec_driver_sql(
                f"""UPDATE "{schema}".balances SET balance = 1000, events = 7
                    WHERE account_id = %s""",
                (first,),
            )
            conn.exec_driver_sql(
                f"""UPDATE "{schema}".balances SET balance = 7, events = 1000
                    WHERE account_id = %s""",
                (second,),
            )
        conn.exec_driver_sql(
            """UPDATE zdr_same_1.balances SET balance = events, events = balance
               WHERE account_id = %s""",
            (first,),
        )
    moved_only_on_one_row = same_version.verify("same", chunk_rows=7)
    assert set(_changed(moved_only_on_one_row)) == {first}
    assert _changed(moved_only_on_one_row)[first].columns == ["balance", "events"]

    with engine.begin() as conn:
        conn.exec_driver_sql(
            """UPDATE zdr_same_1.balances SET balance = events, events = balance
               WHERE account_id = %s""",
            (second,),
        )
    report = same_version.verify("same", chunk_rows=7)

    assert not report.equal
    changed = _changed(report)
    assert set(changed) == {first, second}
    assert changed[first].live == {"balance": 1000, "events": 7}
    assert changed[first].replay == {"balance": 7, "events": 1000}


SCALES = """CREATE TABLE {schema}.scales (
    id integer PRIMARY KEY, amount {numeric}, note text, ratio double precision, day date)"""


def _scales(engine, live_rows, replay_rows, *, numeric="numeric"):
    """A table of the same shape in the live schema and the replay's, with these rows."""
    with engine.begin() as conn:
        for schema, kind, rows in (
            ("bank_balances", "numeric", live_rows),
            ("zdr_same_1", numeric, replay_rows),
        ):
            conn.exec_driver_sql(SCALES.format(schema=schema, numeric=kind))
            for row in rows:
                conn.exec_driver_sql(
                    f"INSERT INTO {schema}.scales VALUES (%s, %s, %s, %s, %s)", row
                )


def test_equal_tables_with_nulls_and_numerics_of_another_scale_are_equal(same_version, engine):
    """1.0 and 1.00 are one value (numerics compare without their scale), as are -0.0 and
    0.0; NULL equals NULL. The replay's column is numeric(12, 4), live's plain numeric."""
    live = [
        (1, "1.0", None, -0.0, None),
        (2, None, "", 0.5, "2026-01-02"),
        (3, "2.50", "x", None, None),
    ]
    replay = [
        (1, "1.00", None, 0.0, None),
        (2, None, "", 0.5, "2026-01-02"),
        (3, "2.5", "x", None, None),
    ]
    _scales(engine, live, replay, numeric="numeric(12, 4)")
    report = same_version.verify("same", chunk_rows=2)

    assert report.equal, report.differences
    [scales] = [t for t in report.tables if t.table == "bank_balances.scales"]
    assert scales.live_rows == scales.replay_rows == 3 and scales.primary_key == ["id"]

    with engine.begin() as conn:  # but NULL is not the empty string, nor 1.0 one point one
        conn.exec_driver_sql("UPDATE zdr_same_1.scales SET note = '' WHERE id = 1")
        conn.exec_driver_sql("UPDATE zdr_same_1.scales SET amount = 2.51 WHERE id = 3")
    report = same_version.verify("same", chunk_rows=2)
    changed = {d.key["id"]: d for d in report.differences}
    assert set(changed) == {1, 3}
    assert changed[1].columns == ["note"] and changed[1].live == {"note": None}
    assert changed[1].replay == {"note": ""}
    assert changed[3].columns == ["amount"]


def test_one_difference_in_the_middle_of_many_chunks_is_found(same_version, engine):
    """120 accounts in chunks of 7: two rows of the ninth chunk trade balances."""
    with engine.connect() as conn:
        keys = (
            conn.exec_driver_sql("SELECT account_id FROM zdr_same_1.balances ORDER BY account_id")
            .scalars()
            .all()
        )
    middle = keys[len(keys) // 2 - 3 : len(keys) // 2 + 3]
    assert len(keys) // 7 > 10
    with engine.connect() as conn:
        first, second = conn.exec_driver_sql(
            """SELECT a.account_id, b.account_id FROM zdr_same_1.balances a
               JOIN zdr_same_1.balances b ON b.account_id > a.account_id
                AND b.balance <> a.balance
               WHERE a.account_id = ANY(%s) AND b.account_id = ANY(%s) LIMIT 1""",
            (middle, middle),
        ).one()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """UPDATE zdr_same_1.balances t SET balance = o.balance FROM zdr_same_1.balances o
               WHERE (t.account_id, o.account_id) IN ((%s, %s), (%s, %s))""",
            (first, second, second, first),
        )
    report = same_version.verify("same", chunk_rows=7)

    assert not report.equal
    assert set(_changed(report)) == {first, second}
    assert len(report.differences) == 2


def test_a_table_without_a_primary_key_is_compared_as_a_multiset_of_rows(same_version, engine):
    """No key names the rows, so they are counted, not listed; swapped values are still
    different rows."""
    with engine.begin() as conn:
        for schema in ("bank_balances", "zdr_same_1"):
            conn.exec_driver_sql(f"CREATE TABLE {schema}.notes (account_id text, note text)")
        conn.exec_driver_sql(
            "INSERT INTO bank_balances.notes VALUES ('a', 'x'), ('b', 'y'), ('b', 'y'), (NULL, '')"
        )
        conn.exec_driver_sql(
            "INSERT INTO zdr_same_1.notes VALUES ('b', 'y'), (NULL, ''), ('b', 'y'), ('a', 'x')"
        )
    report = same_version.verify("same")
    [notes] = [t for t in report.tables if t.table == "bank_balances.notes"]
    assert report.equal and notes.equal and notes.primary_key == []

    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr_same_1.notes SET note = 'y' WHERE account_id = 'a'")
        conn.exec_driver_sql(
            "UPDATE zdr_same_1.notes SET note = 'x' WHERE ctid = "
            "(SELECT ctid FROM zdr_same_1.notes WHERE account_id = 'b' LIMIT 1)"
        )
    report = same_version.verify("same")
    [notes] = [t for t in report.tables if t.table == "bank_balances.notes"]
    assert not report.equal and not notes.equal
    assert (notes.missing_rows, notes.extra_rows, notes.changed_rows) == (2, 2, 0)
    assert notes.live_rows == notes.replay_rows == 4
    assert not report.differences, "rows without a key are counted, not listed"


def test_verification_takes_no_transaction_id_and_makes_no_live_write_wait(
    same_version, engine, monkeypatch
):
    """While verify's snapshot is open, a live write with a 200 ms lock_timeout goes
    through, and verify's own session holds only ACCESS SHARE locks and no xid."""
    from zdr import verify as verification

    seen: dict[str, object] = {}
    original = verification._table_names

    def table_names_and_a_live_write(conn, *schemas):
        names = original(conn, *schemas)
        if not seen:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            conn.exec_driver_sql("SELECT count(*) FROM bank_balances.balances").one()
            with engine.connect() as other:
                other.exec_driver_sql("SET lock_timeout = '200ms'")
                other.exec_driver_sql(
                    "UPDATE bank_balances.balances SET balance = balance WHERE account_id = %s",
                    ("acc-000001",),
                )
                other.commit()
                seen["modes"] = set(
                    other.exec_driver_sql(
                        "SELECT mode FROM pg_locks WHERE pid = %s AND locktype = 'relation'",
                        (pid,),
                    ).scalars()
                )
                seen["xid"] = other.exec_driver_sql(
                    "SELECT backend_xid FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).scalar_one()
        return names

    monkeypatch.setattr(verification, "_table_names", table_names_and_a_live_write)
    report = same_version.verify("same")

    assert report.equal
    assert seen["modes"] == {"AccessShareLock"} and seen["xid"] is None
    assert report.snapshot_seconds is not None and report.snapshot_seconds > 0


def _retyped(engine, live_columns: str, replay_columns: str, live_rows, replay_rows):
    """A table `retyped` in the live schema and the replay's, each with its own columns."""
    with engine.begin() as conn:
        for schema, columns, rows in (
            ("bank_balances", live_columns, live_rows),
            ("zdr_same_1", replay_columns, replay_rows),
        ):
            conn.exec_driver_sql(f"CREATE TABLE {schema}.retyped ({columns})")
            for row in rows:
                marks = ", ".join(["%s"] * len(row))
                conn.exec_driver_sql(f"INSERT INTO {schema}.retyped VALUES ({marks})", row)


def test_columns_a_new_version_retyped_are_compared_by_value(same_version, engine):
    """integer -> bigint, varchar -> text, numeric(12,2) -> numeric(14,4), real -> double
    precision: the values are compared as readers see them, however wrong."""
    live_columns = (
        "id integer PRIMARY KEY, n integer, name varchar(20), amount numeric(12, 2), ratio real"
    )
    replay_columns = (
        "id bigint PRIMARY KEY, n bigint, name text, amount numeric(14, 4), ratio float8"
    )
    rows = [(1, 10, "a", "1.50", 0.5), (2, None, "b", "2.00", 0.25)]
    _retyped(engine, live_columns, replay_columns, rows, rows)
    [table] = [t for t in same_version.verify("same").tables if t.table.endswith("retyped")]
    assert table.equal and table.compared_columns == ["id", "n", "name", "amount", "ratio"]
    assert table.primary_key == ["id"] and not table.uncomparable_columns

    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr_same_1.retyped SET n = 11, name = 'B' WHERE id IN (1, 2)")
    report = same_version.verify("same")
    assert not report.equal
    changed = {d.key["id"]: d.columns for d in report.differences if d.table.endswith("retyped")}
    assert changed == {1: ["n", "name"], 2: ["n", "name"]}


def test_a_column_whose_types_cannot_be_compared_makes_the_report_not_equal(same_version, engine):
    _retyped(
        engine,
        "id integer PRIMARY KEY, doc text",
        "id integer PRIMARY KEY, doc jsonb",
        [(1, '{"a": 1}')],
        [(1, '{"a": 1}')],
    )
    report = same_version.verify("same")
    [table] = [t for t in report.tables if t.table.endswith("retyped")]
    assert table.uncomparable_columns == ["doc"] and table.compared_columns == ["id"]
    assert not table.equal and not report.equal
    assert "types not comparable: doc" in report.to_markdown()


def test_verify_can_wait_for_dual_write_to_level_the_copies_before_its_verdict(manager):
    """Right after dual write starts the replay is behind: a report then says "not level",
    no verdict an approver's answer can hold for. Asked to wait, verify waits for the
    live runner to bring the copies to one position and verifies them there."""
    sim = seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("late", ["balances", "history"])
    manager.start_replay("late")
    append(manager.store, sim.events(200))
    manager.project_live()  # live is 200 events ahead of the replay
    manager.enable_dual_write("late")
    assert not manager.verify("late").level
    with following(manager):
        report = manager.verify("late", wait_level_s=30)
    assert report.level and report.equal, report.to_markdown()

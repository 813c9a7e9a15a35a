"""Promotion keeps what the live copy had beyond zdr's tables, or refuses, naming it."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import sqlalchemy as sa

import zdr
from tests.support import ROLE, BalancesWithLedger, seed, zdr_state
from zdr.examples.bank.projectors import Balances, BalancesV2

DBA_SETUP = [
    f"CREATE ROLE {ROLE}owner",
    f"CREATE ROLE {ROLE}reader",
    f"CREATE ROLE {ROLE}restricted",
    f"CREATE ROLE {ROLE}writer",
    f"ALTER SCHEMA bank_balances OWNER TO {ROLE}owner",
    f"ALTER TABLE bank_balances.balances OWNER TO {ROLE}owner",
    "GRANT USAGE ON SCHEMA bank_balances TO PUBLIC",
    "GRANT SELECT ON bank_balances.balances TO PUBLIC",
    f"GRANT UPDATE (owner) ON bank_balances.balances TO {ROLE}writer",
    "ALTER TABLE bank_balances.balances ENABLE ROW LEVEL SECURITY",
    f"CREATE POLICY everything ON bank_balances.balances FOR SELECT TO {ROLE}reader USING (true)",
    f"""CREATE POLICY not_secret ON bank_balances.balances FOR SELECT TO {ROLE}restricted
       USING (account_id < 'acc-000020')""",
    "CREATE INDEX balances_by_owner ON bank_balances.balances (owner)",
    f"ALTER DEFAULT PRIVILEGES IN SCHEMA bank_balances GRANT SELECT ON TABLES TO {ROLE}reader",
    "COMMENT ON TABLE bank_balances.balances IS 'balances per account (DBA note)'",
    "ALTER TABLE bank_balances.balances SET (fillfactor = 80)",
]


def _dual_writing(manager, key="v2"):
    seed(manager.store, 1_000)
    manager.project_live()
    manager.create_replay(key, [BalancesV2()])
    manager.start_replay(key)
    manager.enable_dual_write(key)


def _as(engine, role: str, query: str):
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(f"SET LOCAL ROLE {role}")
        return conn.exec_driver_sql(query).scalar()


def _facts(engine) -> dict:
    """What readers and the DBA see of bank_balances.balances."""
    count = "SELECT count(*) FROM bank_balances.balances"
    with engine.connect() as conn:
        catalog = conn.exec_driver_sql(
            f"""SELECT n.nspowner::regrole::text, c.relowner::regrole::text, c.relrowsecurity,
                      has_column_privilege('{ROLE}writer', c.oid, 'owner', 'UPDATE'),
                      has_column_privilege('{ROLE}writer', c.oid, 'balance', 'UPDATE'),
                      (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid),
                      to_regclass('bank_balances.balances_by_owner') IS NOT NULL,
                      obj_description(c.oid, 'pg_class'), c.reloptions,
                      (SELECT count(*) FROM pg_default_acl WHERE defaclnamespace = n.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'bank_balances' AND c.relname = 'balances'"""
        ).one()
    return {
        "catalog": tuple(catalog),
        "reader": _as(engine, f"{ROLE}reader", count),
        "restricted": _as(engine, f"{ROLE}restricted", count),
        "public": _as(engine, f"{ROLE}writer", count),  # PUBLIC's SELECT, no policy: 0 rows
    }


def test_promotion_carries_owners_grants_policies_indexes_and_notes(manager, engine):
    _dual_writing(manager)
    with engine.begin() as conn:
        for statement in DBA_SETUP:
            conn.exec_driver_sql(statement)
    manager.project_live()
    before = _facts(engine)
    assert 0 < before["restricted"] < before["reader"]  # the policy hides some rows

    manager.promote("v2")

    assert _facts(engine) == before
    with engine.connect() as conn:  # and the rows are the new version's
        assert "deposits" in list(
            conn.exec_driver_sql("SELECT * FROM bank_balances.balances").keys()
        )

    manager.rollback("v2")  # and back: the previous copy had all of it all along
    assert _facts(engine) == before


def test_a_dba_index_is_built_on_the_new_copy_before_the_swap(manager, engine):
    _dual_writing(manager)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX balances_by_owner ON bank_balances.balances (owner)")
    manager.promote("v2")
    with engine.connect() as conn:
        definition = conn.exec_driver_sql(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'balances_by_owner'"
            " AND schemaname = 'bank_balances'"
        ).scalar_one()
    assert definition.endswith("USING btree (owner)")


REFUSED = {
    "trigger": (
        """CREATE FUNCTION public.zdr_test_audit() RETURNS trigger LANGUAGE plpgsql
           AS $$ BEGIN RETURN NEW; END $$;
           CREATE TRIGGER audit AFTER INSERT ON bank_balances.balances
           FOR EACH ROW EXECUTE FUNCTION public.zdr_test_audit()""",
        "trigger bank_balances.balances.audit was not created by zdr",
    ),
    "function": (
        "CREATE FUNCTION bank_balances.rich() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "function bank_balances.rich() was not created by zdr",
    ),
    "type": (
        "CREATE TYPE bank_balances.tier AS ENUM ('gold', 'silver')",
        "type bank_balances.tier was not created by zdr",
    ),
    "publication": (
        "CREATE PUBLICATION zdr_test_pub FOR TABLE bank_balances.balances",
        "publication zdr_test_pub publishes bank_balances.balances by OID",
    ),
    "view": (
        "CREATE VIEW bank_balances.rich AS SELECT * FROM bank_balances.balances",
        "relation bank_balances.rich was not created by zdr",
    ),
    "column": (
        "ALTER TABLE bank_balances.balances ADD COLUMN note text",
        "column bank_balances.balances.note was not created by zdr",
    ),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_promotion_refuses_what_it_cannot_carry_naming_it_and_changes_nothing(
    manager, engine, kind
):
    _dual_writing(manager)
    statement, message = REFUSED[kind]
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)
    try:
        with pytest.raises(zdr.DependentObjects, match="promotion refused") as refused:
            manager.promote("v2")
        assert message in str(refused.value)
        assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING
        with engine.connect() as conn:
            assert "deposits" not in list(
                conn.exec_driver_sql("SELECT * FROM bank_balances.balances LIMIT 0").keys()
            )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP PUBLICATION IF EXISTS zdr_test_pub")
            conn.exec_driver_sql("DROP FUNCTION IF EXISTS public.zdr_test_audit() CASCADE")


def test_a_version_that_adds_a_table_is_promoted_and_rolled_back(manager, engine):
    """Tables the projector itself adds or drops are its change, not something dropped."""
    seed(manager.store, 500)
    manager.project_live()
    manager.create_replay("ledger", [BalancesWithLedger()])
    manager.start_replay("ledger")
    manager.enable_dual_write("ledger")
    manager.promote("ledger")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regclass('bank_balances.ledger')").scalar()
    manager.rollback("ledger")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regclass('bank_balances.ledger')").scalar() is None


def test_a_dba_unique_index_the_new_rows_violate_refuses_promotion_and_leaves_nothing(
    manager, engine
):
    _dual_writing(manager)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE UNIQUE INDEX one_per_owner ON bank_balances.balances (lower(account_id))"
        )
        conn.exec_driver_sql(  # the new version makes a second row for an account
            """INSERT INTO zdr_v2_1.balances
               SELECT upper(account_id), owner, balance, events, closed, deposits, last_position
               FROM zdr_v2_1.balances ORDER BY account_id LIMIT 1"""
        )
    for _ in range(2):  # and again: no half-built index lets the second try through
        with pytest.raises(zdr.DependentObjects, match="one_per_owner.*cannot be built"):
            manager.promote("v2")
    assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regclass('zdr_v2_1.one_per_owner')").scalar() is None


def test_an_index_whose_name_the_new_version_took_refuses_with_what_to_do(manager, engine):
    _dual_writing(manager)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX clash ON bank_balances.balances (owner)")
        conn.exec_driver_sql("CREATE INDEX clash ON zdr_v2_1.balances (balance)")
    with pytest.raises(zdr.DependentObjects, match="has an index of that name already"):
        manager.promote("v2")


def test_policies_that_read_the_live_tables_by_oid_refuse_promotion(manager, engine):
    """A policy elsewhere that reads a live table, and a live table's policy that reads
    another live table, would keep reading the old copy after the swap."""
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("ledger", [BalancesWithLedger()])
    manager.start_replay("ledger")
    manager.enable_dual_write("ledger")
    manager.promote("ledger")  # bank_balances now has balances and ledger
    manager.create_replay("back", [BalancesWithLedger()])
    manager.start_replay("back")
    manager.enable_dual_write("back")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE public.zdr_test_notes (account_id text)")
        conn.exec_driver_sql(
            """CREATE POLICY known ON public.zdr_test_notes USING (account_id IN
               (SELECT account_id FROM bank_balances.balances))"""
        )
        conn.exec_driver_sql(
            """CREATE POLICY in_ledger ON bank_balances.balances USING (account_id IN
               (SELECT account_id FROM bank_balances.ledger))"""
        )
    try:
        with pytest.raises(zdr.DependentObjects) as refused:
            manager.promote("back")
        message = str(refused.value)
        assert "policy known on public.zdr_test_notes reads bank_balances.balances" in message
        assert (
            "policy in_ledger on bank_balances.balances uses table bank_balances.ledger" in message
        )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE public.zdr_test_notes")


COLUMN_CHANGES = {
    "not null": "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET NOT NULL",
    "default": "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET DEFAULT 'nobody'",
    "collation": 'ALTER TABLE bank_balances.balances ALTER COLUMN owner TYPE text COLLATE "C"',
    "identity": """ALTER TABLE bank_balances.balances ALTER COLUMN events
                   ADD GENERATED BY DEFAULT AS IDENTITY""",
}


@pytest.mark.parametrize("change", sorted(COLUMN_CHANGES))
def test_a_dba_change_to_a_column_refuses_promotion_naming_it(manager, engine, change):
    """The new projector version defines its columns; what a DBA changed on the live one
    cannot be put on it without scanning the table under lock (or guessing)."""
    _dual_writing(manager)
    with engine.begin() as conn:
        conn.exec_driver_sql(COLUMN_CHANGES[change])
    column = "events" if change == "identity" else "owner"
    with pytest.raises(zdr.DependentObjects, match=f"column bank_balances.balances.{column} "):
        manager.promote("v2")
    assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING


def test_a_table_moved_to_another_tablespace_refuses_promotion(manager, engine):
    """Moving the new copy would rewrite it under lock: refused, named."""
    _dual_writing(manager)
    tmp_path = tempfile.mkdtemp(prefix="zdr-test-space-")
    with engine.connect() as conn:
        data = conn.exec_driver_sql("SELECT current_setting('data_directory')").scalar_one()
    owner = os.stat(data).st_uid
    os.chown(tmp_path, owner, -1)
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql(f"CREATE TABLESPACE zdr_test_space LOCATION '{tmp_path}'")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE bank_balances.balances SET TABLESPACE zdr_test_space")
        with pytest.raises(zdr.DependentObjects, match="tablespace zdr_test_space"):
            manager.promote("v2")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "ALTER TABLE ALL IN TABLESPACE zdr_test_space SET TABLESPACE pg_default"
            )
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("DROP TABLESPACE zdr_test_space")
        shutil.rmtree(tmp_path, ignore_errors=True)


SETTINGS = [
    "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET STATISTICS 500",
    "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET STORAGE EXTERNAL",
    "ALTER TABLE bank_balances.balances REPLICA IDENTITY FULL",
    "ALTER TABLE bank_balances.balances CLUSTER ON balances_owner",
    "ALTER TABLE bank_balances.balances SET (toast.autovacuum_enabled = false)",
    "ALTER INDEX bank_balances.balances_owner SET (fillfactor = 70)",
    "COMMENT ON COLUMN bank_balances.balances.owner IS 'who owns it'",
    "COMMENT ON INDEX bank_balances.balances_owner IS 'for the owner page'",
    "COMMENT ON CONSTRAINT balances_pkey ON bank_balances.balances IS 'one row an account'",
]


def _settings(engine) -> tuple:
    with engine.connect() as conn:
        return tuple(
            conn.exec_driver_sql(
                """SELECT a.attstattarget, a.attstorage, c.relreplident, x.indisclustered,
                          t.reloptions, i.reloptions, col_description(c.oid, a.attnum),
                          obj_description(i.oid, 'pg_class'),
                          obj_description(k.oid, 'pg_constraint')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'owner'
                   JOIN pg_class i ON i.relname = 'balances_owner' AND i.relnamespace = n.oid
                   JOIN pg_index x ON x.indexrelid = i.oid
                   JOIN pg_constraint k ON k.conrelid = c.oid AND k.conname = 'balances_pkey'
                   LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
                   WHERE n.nspname = 'bank_balances' AND c.relname = 'balances'"""
            ).one()
        )


def test_promotion_carries_column_and_table_settings_and_their_comments(manager, engine):
    _dual_writing(manager)
    untouched = _settings(engine)
    with engine.begin() as conn:
        for statement in SETTINGS:
            conn.exec_driver_sql(statement)
    before = _settings(engine)
    assert all(a != b for a, b in zip(before, untouched, strict=True))
    manager.promote("v2")
    assert _settings(engine) == before
    manager.rollback("v2")
    assert _settings(engine) == before


def test_rollback_does_not_bring_back_what_a_dba_removed_after_promotion(manager, engine):
    _dual_writing(manager)
    with engine.begin() as conn:
        for statement in DBA_SETUP:
            conn.exec_driver_sql(statement)
    manager.promote("v2")
    with engine.begin() as conn:  # the DBA changes their mind on the new live copy
        for statement in [
            "ALTER DEFAULT PRIVILEGES IN SCHEMA bank_balances"
            f" REVOKE SELECT ON TABLES FROM {ROLE}reader",
            "COMMENT ON TABLE bank_balances.balances IS NULL",
            "ALTER TABLE bank_balances.balances RESET (fillfactor)",
            f"REVOKE UPDATE (owner) ON bank_balances.balances FROM {ROLE}writer",
            "DROP POLICY everything ON bank_balances.balances",
        ]:
            conn.exec_driver_sql(statement)
    after = _facts(engine)
    manager.rollback("v2")
    assert _facts(engine) == after


def test_grants_keep_their_grantor_and_the_owners_own_revokes(manager, engine):
    """A role that granted with its grant option can still revoke after promotion, and
    an owner that revoked a privilege from itself does not get it back."""
    _dual_writing(manager)
    with engine.begin() as conn:
        for statement in [
            f"CREATE ROLE {ROLE}owner",
            f"CREATE ROLE {ROLE}lead",
            f"CREATE ROLE {ROLE}reader",
            f"ALTER SCHEMA bank_balances OWNER TO {ROLE}owner",
            f"ALTER TABLE bank_balances.balances OWNER TO {ROLE}owner",
            f"GRANT USAGE ON SCHEMA bank_balances TO {ROLE}lead, {ROLE}reader",
            f"GRANT SELECT ON bank_balances.balances TO {ROLE}lead WITH GRANT OPTION",
            f"SET ROLE {ROLE}lead",
            f"GRANT SELECT ON bank_balances.balances TO {ROLE}reader",
            "RESET ROLE",
            f"REVOKE UPDATE ON bank_balances.balances FROM {ROLE}owner",
        ]:
            conn.exec_driver_sql(statement)
    acl = """SELECT array_agg(a::text ORDER BY a::text) FROM pg_class, unnest(relacl) a
             WHERE oid = 'bank_balances.balances'::regclass"""
    with engine.connect() as conn:
        before = conn.exec_driver_sql(acl).scalar_one()
    manager.promote("v2")
    with engine.connect() as conn:
        assert conn.exec_driver_sql(acl).scalar_one() == before
    with engine.begin() as conn:  # the lead's revoke takes the reader's access away
        conn.exec_driver_sql(f"SET LOCAL ROLE {ROLE}lead")
        conn.exec_driver_sql(f"REVOKE SELECT ON bank_balances.balances FROM {ROLE}reader")
    with engine.connect() as conn:
        assert not conn.exec_driver_sql(
            f"SELECT has_table_privilege('{ROLE}reader', 'bank_balances.balances', 'SELECT')"
        ).scalar_one()


def test_the_whole_life_cycle_runs_as_an_ordinary_role_that_owns_its_read_models(engine):
    """zdr needs no superuser: a role with CREATE on the database runs everything, and
    a reader's grants survive promotion and rollback."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
        for statement in [
            f"CREATE ROLE {ROLE}app LOGIN",
            f"CREATE ROLE {ROLE}reader",
            f'GRANT CREATE ON DATABASE "{database}" TO {ROLE}app',
        ]:
            conn.exec_driver_sql(statement)
    app = sa.create_engine(engine.url.set(username=f"{ROLE}app", password=None))
    try:
        manager = zdr.ReplayManager(app, projectors=[Balances()], batch_size=500)
        manager.setup()
        seed(manager.store, 1_000)
        manager.project_live()
        with app.begin() as conn:
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA bank_balances TO {ROLE}reader")
            conn.exec_driver_sql(f"GRANT SELECT ON bank_balances.balances TO {ROLE}reader")
        count = "SELECT count(*) FROM bank_balances.balances"
        before = _as(engine, f"{ROLE}reader", count)
        manager.create_replay("v2", [BalancesV2()])
        manager.start_replay("v2")
        manager.enable_dual_write("v2")
        manager.promote("v2")
        assert _as(engine, f"{ROLE}reader", count) == before
        manager.rollback("v2")
        assert _as(engine, f"{ROLE}reader", count) == before
        manager.remove_replay("v2")
    finally:
        app.dispose()


def test_a_policy_reading_another_projection_of_the_same_replay_refuses_promotion(manager, engine):
    """A policy on history's table that reads balances' table, both rebuilt by one replay:
    re-created from its text on the new copy before the swap, it would read the old
    balances afterwards (a stream blocked after the promotion would stay visible)."""
    seed(manager.store, 300)
    manager.project_live()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """CREATE POLICY open_accounts ON bank_history.transactions USING (account_id IN
               (SELECT account_id FROM bank_balances.balances WHERE NOT closed))"""
        )
    manager.create_replay("both", ["balances", "history"])
    manager.start_replay("both")
    manager.enable_dual_write("both")
    before = zdr_state(engine)
    with pytest.raises(zdr.DependentObjects) as refused:
        manager.promote("both")
    assert (
        "policy open_accounts on bank_history.transactions uses table bank_balances.balances"
        in str(refused.value)
    )
    assert zdr_state(engine) == before

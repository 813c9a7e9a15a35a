"""Promotion carry-over at its edges: grants changing while it runs, odd names, settings
of every kind, objects elsewhere that point at the tables, projectors with types,
sequences and tables in two schemas, and zdr as an ordinary role."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import zdr
from tests.support import ROLE, BalancesWithLedger, seed
from tests.test_carryover import _dual_writing
from zdr.examples.bank.domain import EVENT_TYPES


def _q(engine, query):
    with engine.connect() as conn:
        return conn.exec_driver_sql(query).scalar()


def _run(engine, *statements):
    with engine.begin() as conn:
        for s in statements:
            conn.exec_driver_sql(s)


# ---------------------------------------------------------------- grants


def test_column_grant_lost_on_rollback_when_table_grant_changed(manager, engine):
    _dual_writing(manager)
    _run(
        engine,
        f"CREATE ROLE {ROLE}writer",
        f"GRANT USAGE ON SCHEMA bank_balances TO {ROLE}writer",
        f"GRANT SELECT ON bank_balances.balances TO {ROLE}writer",
        f"GRANT UPDATE (owner) ON bank_balances.balances TO {ROLE}writer",
    )
    manager.promote("v2")
    has = (
        f"SELECT has_column_privilege('{ROLE}writer', 'bank_balances.balances', 'owner', 'UPDATE')"
    )
    assert _q(engine, has)
    # after promotion the DBA gives the writer one more table privilege
    _run(engine, f"GRANT INSERT ON bank_balances.balances TO {ROLE}writer")
    manager.rollback("v2")
    assert _q(
        engine, f"SELECT has_table_privilege('{ROLE}writer', 'bank_balances.balances', 'INSERT')"
    )
    assert _q(engine, has), "UPDATE (owner) silently lost"


def test_column_grant_lost_when_promote_is_retried(manager, engine):
    _dual_writing(manager)
    _run(
        engine,
        f"CREATE ROLE {ROLE}writer",
        f"GRANT SELECT ON bank_balances.balances TO {ROLE}writer",
        f"GRANT UPDATE (owner) ON bank_balances.balances TO {ROLE}writer",
        'CREATE SCHEMA "zdr-swap-v2_1"',
    )  # any refusal raised after prepare()
    with pytest.raises(zdr.DependentObjects):
        manager.promote("v2")
    _run(
        engine,
        'DROP SCHEMA "zdr-swap-v2_1"',
        f"GRANT INSERT ON bank_balances.balances TO {ROLE}writer",
    )
    manager.promote("v2")
    assert _q(
        engine,
        f"SELECT has_column_privilege('{ROLE}writer', 'bank_balances.balances', 'owner', 'UPDATE')",
    ), "UPDATE (owner) silently lost"


def test_column_grant_lost_when_table_grant_changes_between_prepare_and_swap(
    manager, engine, monkeypatch
):
    """The DBA grants a table privilege to a role while promote waits for the swap lock."""
    from zdr.promotion import Promotion

    _dual_writing(manager)
    _run(
        engine,
        f"CREATE ROLE {ROLE}writer",
        f"GRANT SELECT ON bank_balances.balances TO {ROLE}writer",
        f"GRANT UPDATE (owner) ON bank_balances.balances TO {ROLE}writer",
    )
    prepare = Promotion.prepare

    def racing(self, conn, replay, what):
        base = prepare(self, conn, replay, what)
        _run(engine, f"GRANT INSERT ON bank_balances.balances TO {ROLE}writer")
        return base

    monkeypatch.setattr(Promotion, "prepare", racing)
    manager.promote("v2")
    assert _q(
        engine, f"SELECT has_table_privilege('{ROLE}writer', 'bank_balances.balances', 'INSERT')"
    )
    assert _q(
        engine,
        f"SELECT has_column_privilege('{ROLE}writer', 'bank_balances.balances', 'owner', 'UPDATE')",
    ), "UPDATE (owner) silently lost"


ODD = '"edge_Odd ""Role"" x"'
ODD_LEAD = '"edge lead; DROP TABLE x --"'


@pytest.fixture()
def odd_roles(engine):
    yield
    for role in (ODD, ODD_LEAD):
        with engine.begin() as conn:
            exists = conn.exec_driver_sql(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE quote_ident(rolname) = %s)", (role,)
            ).scalar_one()
            if exists:
                conn.exec_driver_sql(
                    f"REASSIGN OWNED BY {role} TO CURRENT_USER; DROP OWNED BY {role}; "
                    f"DROP ROLE {role}"
                )


def test_odd_role_names_and_comments(manager, engine, odd_roles):
    _dual_writing(manager)
    _run(
        engine,
        f"CREATE ROLE {ODD}",
        f"CREATE ROLE {ODD_LEAD}",
        f"ALTER SCHEMA bank_balances OWNER TO {ODD}",
        f"ALTER TABLE bank_balances.balances OWNER TO {ODD}",
        f"GRANT USAGE ON SCHEMA bank_balances TO {ODD_LEAD}",
        f"GRANT SELECT ON bank_balances.balances TO {ODD_LEAD} WITH GRANT OPTION",
        f"SET ROLE {ODD_LEAD}",
        "GRANT SELECT ON bank_balances.balances TO PUBLIC",
        "RESET ROLE",
        "ALTER TABLE bank_balances.balances ENABLE ROW LEVEL SECURITY",
        f'CREATE POLICY "Pol ""x"" y" ON bank_balances.balances TO {ODD_LEAD}'
        " USING (owner <> '''); x')",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {ODD} IN SCHEMA bank_balances"
        f" GRANT SELECT ON TABLES TO {ODD_LEAD}",
        "COMMENT ON TABLE bank_balances.balances IS $$it's '); DROP TABLE x; --$$",
        "COMMENT ON SCHEMA bank_balances IS 'schema note'",
    )
    snap = """SELECT n.nspowner::regrole, c.relowner::regrole, c.relacl::text,
                     obj_description(c.oid, 'pg_class'), obj_description(n.oid, 'pg_namespace'),
                     (SELECT string_agg(polname || pg_get_expr(polqual, polrelid), ',')
                      FROM pg_policy WHERE polrelid = c.oid),
                     (SELECT defaclacl::text FROM pg_default_acl WHERE defaclnamespace = n.oid)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'bank_balances' AND c.relname = 'balances'"""
    with engine.connect() as conn:
        before = tuple(conn.exec_driver_sql(snap).one())
    manager.promote("v2")
    with engine.connect() as conn:
        assert tuple(conn.exec_driver_sql(snap).one()) == before
    manager.rollback("v2")
    with engine.connect() as conn:
        assert tuple(conn.exec_driver_sql(snap).one()) == before


# ---------------------------------------------------------------- settings not carried

NOT_CARRIED = {
    "n_distinct": (
        "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET (n_distinct = 42)",
        """SELECT array_to_string(array(SELECT o FROM unnest(attoptions) o
                      WHERE o LIKE 'n_distinct%%'), ',') FROM pg_attribute
                      WHERE attrelid = 'bank_balances.balances'::regclass AND attname = 'owner'""",
    ),
    "compression": (
        "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET COMPRESSION pglz",
        """SELECT attcompression::text FROM pg_attribute
                       WHERE attrelid = 'bank_balances.balances'::regclass
                         AND attname = 'owner'""",
    ),
    "policy comment": (
        """ALTER TABLE bank_balances.balances ENABLE ROW LEVEL SECURITY;
           CREATE POLICY p ON bank_balances.balances USING (true);
           COMMENT ON POLICY p ON bank_balances.balances IS 'why'""",
        """SELECT d.description FROM pg_policy p JOIN pg_description d ON d.objoid = p.oid
           WHERE p.polrelid = 'bank_balances.balances'::regclass""",
    ),
    "index column statistics": (
        """CREATE INDEX by_lower ON bank_balances.balances (lower(owner));
           ALTER INDEX bank_balances.by_lower ALTER COLUMN 1 SET STATISTICS 900""",
        """SELECT attstattarget FROM pg_attribute
           WHERE attrelid = 'bank_balances.by_lower'::regclass""",
    ),
    "n_distinct_inherited": (
        "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET (n_distinct_inherited = 7)",
        """SELECT array_to_string(array(SELECT o FROM unnest(attoptions) o
                      WHERE o LIKE 'n_distinct%%'), ',') FROM pg_attribute
                      WHERE attrelid = 'bank_balances.balances'::regclass AND attname = 'owner'""",
    ),
}


@pytest.mark.parametrize("kind", sorted(NOT_CARRIED))
def test_dba_setting_kept_after_promote(manager, engine, kind):
    _dual_writing(manager)
    change, probe = NOT_CARRIED[kind]
    before_change = _q(engine, probe) if kind != "index column statistics" else None
    _run(engine, change)
    before = _q(engine, probe)
    assert before != before_change
    manager.promote("v2")  # expected: carried, or refused naming it
    assert _q(engine, probe) == before


def test_an_unlogged_live_table_refuses_promotion(manager, engine):
    _dual_writing(manager)
    _run(engine, "ALTER TABLE bank_balances.balances SET UNLOGGED")
    with pytest.raises(zdr.DependentObjects, match="bank_balances.balances is UNLOGGED"):
        manager.promote("v2")


# ---------------------------------------------------------------- outside dependents

OUTSIDE = {
    "extended statistics elsewhere": (
        "CREATE STATISTICS public.zdr_test_st ON owner, closed FROM bank_balances.balances",
        "SELECT count(*) FROM pg_statistic_ext WHERE stxrelid = 'bank_balances.balances'::regclass",
    ),
    "child table inherits": (
        """CREATE TABLE public.zdr_test_child () INHERITS (bank_balances.balances);
           INSERT INTO public.zdr_test_child
           SELECT 'zz-child', 'x', 0, 0, false""",
        "SELECT count(*) FROM bank_balances.balances WHERE account_id = 'zz-child'",
    ),
    "function over row type": (
        """CREATE FUNCTION public.zdr_test_rich(b bank_balances.balances) RETURNS bool
           LANGUAGE sql AS 'SELECT b.balance > 0'""",
        "SELECT count(*) FROM bank_balances.balances b WHERE public.zdr_test_rich(b)",
    ),
    "table column of row type": (
        "CREATE TABLE public.zdr_test_snap (b bank_balances.balances)",
        "SELECT count(*) FROM public.zdr_test_snap",
    ),
}


@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_objects_elsewhere_that_use_the_live_tables_refuse_promotion(manager, engine, kind):
    _dual_writing(manager)
    change, probe = OUTSIDE[kind]
    _run(engine, change)
    before = _q(engine, probe)
    try:
        with pytest.raises(zdr.DependentObjects, match="would leave it on the old copy"):
            manager.promote("v2")
        assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING
        assert _q(engine, probe) == before  # nothing changed
    finally:
        _run(
            engine,
            "DROP TABLE IF EXISTS public.zdr_test_child, public.zdr_test_snap",
            "DROP FUNCTION IF EXISTS public.zdr_test_rich",
            "DROP STATISTICS IF EXISTS public.zdr_test_st",
            "DROP SEQUENCE IF EXISTS public.zdr_test_ids",
        )


# ---------------------------------------------------------------- rollback / new tables


def test_rollback_brings_back_an_index_the_dba_dropped_after_promotion(manager, engine):
    _dual_writing(manager)
    _run(engine, "CREATE UNIQUE INDEX one_owner ON bank_balances.balances (account_id, owner)")
    manager.promote("v2")
    _run(engine, "DROP INDEX bank_balances.one_owner")
    manager.rollback("v2")
    assert _q(engine, "SELECT to_regclass('bank_balances.one_owner')") is None


def _dual_writing_versions(
    engine: sa.Engine, live: zdr.Projector, new: zdr.Projector
) -> zdr.ReplayManager:
    """``live`` projected live, and replay "v2" of ``new`` beside it in dual write."""
    manager = zdr.ReplayManager(engine, projectors=[live], batch_size=500)
    manager.setup()
    manager.project_live()
    manager.create_replay("v2", [new])
    manager.start_replay("v2")
    manager.enable_dual_write("v2")
    return manager


class _Quiet(zdr.Projector):
    event_types = frozenset(EVENT_TYPES)

    def handle_batch(self, events, conn):
        pass


def _notes(metadata: sa.MetaData, *extra: sa.Column) -> list[sa.Table]:
    return [
        sa.Table(
            "notes",
            metadata,
            sa.Column("k", sa.Text, primary_key=True),
            *extra,
            sa.Index("notes_k", "k", postgresql_with={"fillfactor": 70}),
            comment="zdr made",
            schema="edge_n",
        )
    ]


class NotesV1(_Quiet):
    name = "notes"
    tables = _notes(sa.MetaData())


class NotesV2(_Quiet):
    name = "notes"
    tables = _notes(sa.MetaData(), sa.Column("x", sa.Integer))


# ---------------------------------------------------------------- false refusals


def _exotic(metadata, *, extra=False):
    tier = sa.Enum("gold", "silver", name="Tier Type", schema="edge_x")
    parent = sa.Table(
        "Parent Table",
        metadata,
        sa.Column("Id", sa.Integer, primary_key=True),  # serial
        sa.Column("Name", sa.Text, server_default=sa.text("'n/a'"), comment="the name"),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("tier", tier, server_default="gold"),
        sa.Column("v", sa.String(20, collation="C")),
        sa.CheckConstraint('"Id" > 0', name="Positive Id"),
        sa.Index(
            "By Name",
            "Name",
            postgresql_where=sa.text("\"Name\" <> ''"),
            postgresql_with={"fillfactor": 60},
        ),
        sa.Index("by_lower", sa.func.lower(sa.text('"Name"'))),
        schema="edge_x",
        comment="zdr's comment",
    )
    child = sa.Table(
        "child",
        metadata,
        sa.Column("n", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("parent", sa.Integer, sa.ForeignKey(parent.c.Id)),
        sa.Column("counter", sa.Integer, sa.Sequence("Counter Seq", schema="edge_x")),
        *([sa.Column("more", sa.Text)] if extra else []),
        schema="edge_x",
    )
    return [parent, child]


class ExoticV1(_Quiet):
    name = "exotic"
    tables = _exotic(sa.MetaData())


class ExoticV2(_Quiet):
    name = "exotic"
    tables = _exotic(sa.MetaData(), extra=True)


def test_exotic_projector_promotes_and_rolls_back(engine):
    manager = _dual_writing_versions(engine, ExoticV1(), ExoticV2())
    manager.promote("v2")
    manager.rollback("v2")
    # remove_replay("v2") refuses: standalone Sequence "Counter Seq" (targets.drop, pre-existing)


def test_dba_partial_index_on_a_projector_enum_column(engine):
    manager = _dual_writing_versions(engine, ExoticV1(), ExoticV2())
    _run(
        engine,
        """CREATE INDEX gold_only ON edge_x."Parent Table" ("Id")
                    WHERE tier = 'gold'""",
    )
    manager.promote("v2")  # built on the new copy with the new copy's type
    assert "WHERE (tier = 'gold'::edge_x.\"Tier Type\")" in _q(
        engine,
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'gold_only' AND schemaname = 'edge_x'",
    )


def _two_schemas(metadata, extra=False):
    u = sa.Table("u", metadata, sa.Column("id", sa.Integer, primary_key=True), schema="edge_b")
    t = sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("u_id", sa.Integer, sa.ForeignKey(u.c.id)),
        *([sa.Column("more", sa.Text)] if extra else []),
        schema="edge_a",
    )
    return [u, t]


class TwoV1(_Quiet):
    name = "two"
    tables = _two_schemas(sa.MetaData())


class TwoV2(_Quiet):
    name = "two"
    tables = _two_schemas(sa.MetaData(), extra=True)


def test_projector_with_a_cross_schema_foreign_key(engine):
    manager = _dual_writing_versions(engine, TwoV1(), TwoV2())
    manager.promote("v2")


def _exotic_snapshot(engine):
    with engine.connect() as conn:
        return conn.exec_driver_sql(r"""
            SELECT c.relname, c.relkind::text, c.relowner::regrole::text, c.relacl::text,
                   c.reloptions::text, c.relreplident::text, c.relrowsecurity,
                   obj_description(c.oid, 'pg_class'),
                   (SELECT string_agg(a.attname || ':' || coalesce(a.attacl::text, '') || ':'
                        || a.attstorage::text || ':'
                        || coalesce(col_description(c.oid, a.attnum), ''),
                        ',' ORDER BY a.attnum) FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.attname <> 'more'),
                   (SELECT string_agg(polname || pg_get_expr(polqual, polrelid), ',')
                    FROM pg_policy WHERE polrelid = c.oid),
                   (SELECT string_agg(conname || '=' || coalesce(obj_description(k.oid,
                        'pg_constraint'), ''), ',' ORDER BY conname)
                    FROM pg_constraint k WHERE k.conrelid = c.oid),
                   (SELECT bool_or(indisclustered) FROM pg_index WHERE indrelid = c.oid)
            FROM pg_class c WHERE c.relnamespace = 'edge_x'::regnamespace
              AND c.relkind <> 'i' ORDER BY c.relname""").all()


def test_exotic_names_carry_grants_and_settings_exactly(engine, odd_roles):
    manager = _dual_writing_versions(engine, ExoticV1(), ExoticV2())
    _run(
        engine,
        f"CREATE ROLE {ODD}",
        f"CREATE ROLE {ODD_LEAD}",
        f'ALTER TABLE edge_x."Parent Table" OWNER TO {ODD}',
        f'ALTER SEQUENCE edge_x."Counter Seq" OWNER TO {ODD}',
        f"GRANT USAGE ON SCHEMA edge_x TO {ODD_LEAD}",
        f'GRANT USAGE ON SEQUENCE edge_x."Counter Seq" TO {ODD_LEAD} WITH GRANT OPTION',
        f'GRANT USAGE ON SEQUENCE edge_x."Parent Table_Id_seq" TO {ODD_LEAD}',
        f'GRANT UPDATE ("Name") ON edge_x."Parent Table" TO {ODD_LEAD} WITH GRANT OPTION',
        f"SET ROLE {ODD_LEAD}",
        'GRANT UPDATE ("Name") ON edge_x."Parent Table" TO PUBLIC',
        'GRANT USAGE ON SEQUENCE edge_x."Counter Seq" TO PUBLIC',
        "RESET ROLE",
        'ALTER TABLE edge_x."Parent Table" ENABLE ROW LEVEL SECURITY',
        f'CREATE POLICY "Only ""Gold""" ON edge_x."Parent Table" TO {ODD_LEAD}'
        " USING (tier::text = 'gold')",
        "COMMENT ON CONSTRAINT \"Positive Id\" ON edge_x.\"Parent Table\" IS 'o''k'",
        'COMMENT ON COLUMN edge_x."Parent Table"."Name" IS \'dba name\'',
        'ALTER TABLE edge_x."Parent Table" ALTER COLUMN "Name" SET STORAGE MAIN',
        'ALTER TABLE edge_x."Parent Table" REPLICA IDENTITY USING INDEX "Parent Table_pkey"',
        'ALTER TABLE edge_x."Parent Table" CLUSTER ON "Parent Table_pkey"',
        'ALTER TABLE edge_x."Parent Table" SET (fillfactor = 90)',
        "COMMENT ON SEQUENCE edge_x.\"Counter Seq\" IS 'seq note'",
    )
    before = _exotic_snapshot(engine)
    manager.promote("v2")
    assert _exotic_snapshot(engine) == before
    manager.rollback("v2")
    assert _exotic_snapshot(engine) == before


def test_rollback_after_dba_changes_owner_identity_and_cluster_post_promotion(manager, engine):
    _dual_writing(manager)
    manager.promote("v2")
    _run(
        engine,
        f"CREATE ROLE {ROLE}owner",
        f"ALTER TABLE bank_balances.balances OWNER TO {ROLE}owner",
        f"ALTER SCHEMA bank_balances OWNER TO {ROLE}owner",
        "CREATE UNIQUE INDEX by_acc ON bank_balances.balances (account_id)",
        "ALTER TABLE bank_balances.balances REPLICA IDENTITY USING INDEX by_acc",
        "ALTER TABLE bank_balances.balances CLUSTER ON by_acc",
        "ALTER TABLE bank_balances.balances ALTER COLUMN owner SET STATISTICS 321",
    )
    snap = """SELECT c.relowner::regrole::text, n.nspowner::regrole::text, c.relreplident::text,
                     (SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                      WHERE x.indrelid = c.oid AND x.indisreplident),
                     (SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                      WHERE x.indrelid = c.oid AND x.indisclustered),
                     (SELECT attstattarget FROM pg_attribute WHERE attrelid = c.oid
                      AND attname = 'owner')
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'bank_balances' AND c.relname = 'balances'"""
    with engine.connect() as conn:
        before = tuple(conn.exec_driver_sql(snap).one())
    manager.rollback("v2")
    with engine.connect() as conn:
        assert tuple(conn.exec_driver_sql(snap).one()) == before


def test_a_policy_comparing_a_projector_enum_column(engine):
    manager = _dual_writing_versions(engine, ExoticV1(), ExoticV2())
    _run(
        engine,
        f"CREATE ROLE {ROLE}reader",
        'ALTER TABLE edge_x."Parent Table" ENABLE ROW LEVEL SECURITY',
        f"CREATE POLICY gold ON edge_x.\"Parent Table\" TO {ROLE}reader USING (tier = 'gold')",
    )
    with pytest.raises(zdr.DependentObjects, match='policy gold .* uses type edge_x."Tier Type"'):
        manager.promote("v2")


# ---------------------------------------------------------------- non-superuser zdr


def _as_app(engine, setup):
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
        for statement in [
            f"CREATE ROLE {ROLE}app LOGIN",
            f"CREATE ROLE {ROLE}reader",
            f"CREATE ROLE {ROLE}owner",
            f'GRANT CREATE ON DATABASE "{database}" TO {ROLE}app',
            f"GRANT {ROLE}owner TO {ROLE}app",
        ]:
            conn.exec_driver_sql(statement)
    app = sa.create_engine(engine.url.set(username=f"{ROLE}app", password=None))
    from zdr.examples.bank.projectors import Balances, BalancesV2

    manager = zdr.ReplayManager(app, projectors=[Balances()], batch_size=500)
    manager.setup()
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.enable_dual_write("v2")
    _run(engine, *setup)  # the DBA, as superuser
    return app, manager


def test_non_superuser_table_owned_by_a_role_zdr_is_member_of(engine):
    app, manager = _as_app(
        engine,
        [
            f"GRANT CREATE, USAGE ON SCHEMA bank_balances TO {ROLE}owner",
            f"ALTER TABLE bank_balances.balances OWNER TO {ROLE}owner",
        ],
    )
    try:
        manager.promote("v2")
        assert (
            _q(
                engine,
                "SELECT relowner::regrole::text FROM pg_class"
                " WHERE oid = 'bank_balances.balances'::regclass",
            )
            == f"{ROLE}owner"
        )
    finally:
        app.dispose()


def test_non_superuser_dba_default_privileges_for_own_role(engine):
    app, manager = _as_app(
        engine,
        [
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {ROLE}owner IN SCHEMA bank_balances"
            f" GRANT SELECT ON TABLES TO {ROLE}reader"
        ],
    )
    try:
        manager.promote("v2")
    finally:
        app.dispose()


def _shared_type(metadata, extra=False):
    from sqlalchemy.dialects import postgresql as pg

    kind = pg.ENUM("a", "b", name="kind", schema="app_edge_e", create_type=False)
    return [
        sa.Table(
            "t",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("k", kind),
            *([sa.Column("more", sa.Text)] if extra else []),
            schema="edge_e",
        )
    ]


class SharedV1(_Quiet):
    name = "shared"
    tables = _shared_type(sa.MetaData())


class SharedV2(_Quiet):
    name = "shared"
    tables = _shared_type(sa.MetaData(), extra=True)


def test_a_column_typed_by_a_schema_whose_name_ends_with_the_live_schema(engine):
    _run(engine, "CREATE SCHEMA app_edge_e", "CREATE TYPE app_edge_e.kind AS ENUM ('a', 'b')")
    manager = _dual_writing_versions(engine, SharedV1(), SharedV2())
    manager.promote("v2")


def test_default_privileges_apply_to_a_table_the_new_version_adds(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    _run(
        engine,
        f"CREATE ROLE {ROLE}reader",
        f"GRANT USAGE ON SCHEMA bank_balances TO {ROLE}reader",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA bank_balances TO {ROLE}reader",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA bank_balances GRANT SELECT ON TABLES TO {ROLE}reader",
    )
    manager.create_replay("ledger", [BalancesWithLedger()])
    manager.start_replay("ledger")
    manager.enable_dual_write("ledger")
    manager.promote("ledger")
    # every table in bank_balances is readable by the reader, as the DBA arranged
    assert _q(
        engine,
        f"SELECT has_table_privilege('{ROLE}reader', 'bank_balances.ledger', 'SELECT')",
    )


def test_a_dba_removing_what_the_projector_set_is_carried(engine):
    """The DBA's difference from what zdr made can be a removal too."""
    manager = _dual_writing_versions(engine, NotesV1(), NotesV2())
    _run(
        engine,
        "COMMENT ON TABLE edge_n.notes IS NULL",
        "ALTER INDEX edge_n.notes_k RESET (fillfactor)",
    )
    manager.promote("v2")
    assert _q(engine, "SELECT obj_description('edge_n.notes'::regclass, 'pg_class')") is None
    assert (
        _q(engine, "SELECT reloptions FROM pg_class WHERE oid = 'edge_n.notes_k'::regclass") is None
    )

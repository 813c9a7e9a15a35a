"""zdr under least privilege: what a missing grant looks like, and the life cycle run by a
role that is no superuser (the read models' owner), and by one that does not own them.

A missing privilege is a configuration error that names the privilege, the object and
the role, with the GRANT that gives it; never a projector's failure. A live read model
stands still until it is granted and then catches up by itself; a replay stays
resumable (never ``failed``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

import zdr
from tests.support import ROLE, assert_balances_match_fold, seed, wait_for
from zdr.examples.bank.projectors import LIVE, BalancesV2

Connect = Callable[[str], str]  # role -> the test database's URL as that role


@pytest.fixture()
def as_role(engine: sa.Engine, database_url: str) -> Iterator[Connect]:
    """Make login roles (no superuser) and give URLs that log in as them; dropped after."""
    made: list[str] = []

    def connect(suffix: str) -> str:
        role = f"{ROLE}{suffix}"
        if role not in made:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN NOSUPERUSER")
            made.append(role)
        url = sa.make_url(database_url).set(username=role, password=None)
        return url.render_as_string(hide_password=False)

    yield connect
    database = sa.make_url(database_url).database
    with engine.begin() as conn:
        conn.exec_driver_sql(f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC')
        for role in made:
            conn.exec_driver_sql(f"DROP OWNED BY {role} CASCADE")
            conn.exec_driver_sql(f"DROP ROLE {role}")


def _grant(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _writes(role: str, *schemas: str) -> list[str]:
    """The grants that let ``role`` use ``schemas`` and write every table in them."""
    return [
        grant
        for schema in schemas
        for grant in (
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
        )
    ]


def _database(engine: sa.Engine) -> str:
    return str(engine.url.database)


def test_without_temporary_the_live_read_model_waits_for_the_grant_named(engine, as_role):
    """A RowProjector writes through a temporary table: without TEMPORARY on the database
    its read model stands still, saying so (not "the projector failed"), the others go
    on, and once granted it catches up with no restart."""
    db = _database(engine)
    owner_url = as_role("owner")
    owner = _role_of(owner_url)
    _grant(
        engine,
        f'GRANT CREATE ON DATABASE "{db}" TO {owner}',
        f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC',
    )
    manager = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE], batch_size=100)
    manager.settings = manager.settings.replace(failed_retry_s=0.5)
    manager.setup()
    seed(manager.store, 300)
    stop = threading.Event()
    failures: list[BaseException] = []

    def follow() -> None:
        try:
            manager.follow(stop=stop, poll_interval=0.02)
        except BaseException as exc:  # what the test reports
            failures.append(exc)

    live = threading.Thread(target=follow)
    live.start()
    try:
        wait_for(lambda: _live(manager)["balances"]["state"] == "failing" or failures)
        assert not failures, f"the live runner died: {failures[0]!r}"
        balances = _live(manager)["balances"]
        assert f"role '{owner}' lacks TEMPORARY on database {db}" in balances["error"]
        assert f'GRANT TEMPORARY ON DATABASE {db} TO "{owner}"' in balances["error"]
        assert "projector" not in balances["error"]
        wait_for(lambda: _live(manager)["history"]["position"] == 300)  # the others go on
        _grant(engine, f'GRANT TEMPORARY ON DATABASE "{db}" TO {owner}')
        wait_for(lambda: _live(manager)["balances"]["position"] == 300)
        assert _live(manager)["balances"]["state"] == "following"
        assert not failures
    finally:
        stop.set()
        live.join(30)
    assert_balances_match_fold(engine, manager.store)
    manager.engine.dispose()


def test_without_temporary_a_replay_stays_resumable_and_names_the_grant(engine, as_role):
    db = _database(engine)
    owner_url = as_role("owner")
    owner = _role_of(owner_url)
    _grant(engine, f'GRANT CREATE ON DATABASE "{db}" TO {owner}')
    manager = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE], batch_size=100)
    manager.setup()
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("v1again", ["balances"])
    _grant(
        engine,
        f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC',
        f'REVOKE TEMPORARY ON DATABASE "{db}" FROM {owner}',
    )
    with pytest.raises(zdr.PrivilegeMissing, match=f"lacks TEMPORARY on database {db}"):
        manager.start_replay("v1again")
    assert manager.get_replay("v1again").state is not zdr.ReplayState.FAILED
    _grant(engine, f'GRANT TEMPORARY ON DATABASE "{db}" TO {owner}')
    assert manager.start_replay("v1again").state is zdr.ReplayState.CAUGHT_UP
    manager.engine.dispose()


def test_a_read_model_whose_schema_the_runner_cannot_use_is_named(engine, as_role):
    """A DBA revoked USAGE on one read model's schema: that read model stands still with
    the schema and the GRANT named; the others go on."""
    db = _database(engine)
    owner_url = as_role("owner")
    owner = _role_of(owner_url)
    _grant(engine, f'GRANT CREATE ON DATABASE "{db}" TO {owner}')
    setup = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE])
    setup.setup()
    seed(setup.store, 200)
    setup.project_live()
    setup.engine.dispose()
    runner_url = as_role("runner")
    runner = _role_of(runner_url)
    _grant(
        engine,
        f"GRANT USAGE ON SCHEMA zdr TO {runner}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA zdr TO {runner}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA zdr TO {runner}",
        *_writes(runner, "bank_balances", "bank_stats", "bank_accounts"),
    )
    manager = zdr.ReplayManager(runner_url, projectors=[cls() for cls in LIVE])
    seed(setup_store := zdr.EventStore(owner_url), 100, prefix="later")
    setup_store.engine.dispose()
    manager.follow(max_seconds=1.5, poll_interval=0.02)
    live = _live_as(engine)
    assert live["history"]["state"] == "failing"
    assert f"role '{runner}' lacks USAGE on schema bank_history" in live["history"]["error"]
    assert f'GRANT USAGE ON SCHEMA bank_history TO "{runner}"' in live["history"]["error"]
    assert live["balances"]["state"] == "following"
    assert live["balances"]["lag"] == 0
    manager.engine.dispose()


def _live(manager: zdr.ReplayManager) -> dict[str, dict]:
    return {row["projection"]: row for row in manager.live_status()}


def _live_as(engine: sa.Engine) -> dict[str, dict]:
    return _live(zdr.ReplayManager(engine))


def _role_of(url: str) -> str:
    return str(sa.make_url(url).username)


def _life_cycle_until_dual_write(manager: zdr.ReplayManager, app: zdr.EventStore) -> None:
    seed(app, 400, prefix="more")
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.enable_dual_write("v2")
    seed(app, 100, prefix="late")
    manager.project_live()
    assert manager.verify("v2").equal


def test_the_life_cycle_as_a_role_that_owns_the_read_models_and_is_no_superuser(engine, as_role):
    """The owner role of docs/operations/production.md: CREATE on the database, and nothing else."""
    owner_url = as_role("owner")
    _grant(engine, f'GRANT CREATE ON DATABASE "{_database(engine)}" TO {_role_of(owner_url)}')
    manager = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE], batch_size=100)
    manager.setup()
    _life_cycle_until_dual_write(manager, manager.store)
    manager.promote("v2")
    assert_balances_match_fold(engine, manager.store)
    manager.rollback("v2")
    manager.project_live()
    assert_balances_match_fold(engine, manager.store)
    manager.remove_replay("v2")
    manager.engine.dispose()


def test_the_life_cycle_as_a_role_that_does_not_own_the_read_models(engine, as_role):
    """The non-owner role of docs/operations/production.md, granted exactly that list: everything up
    to promotion; promotion refused in one sentence naming the GRANT, and done once the
    role is a member of the owner."""
    db = _database(engine)
    owner_url, runner_url = as_role("owner"), as_role("runner")
    owner, runner = _role_of(owner_url), _role_of(runner_url)
    _grant(engine, f'GRANT CREATE ON DATABASE "{db}" TO {owner}')
    application = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE])
    application.setup()
    seed(application.store, 300)
    application.project_live()
    schemas = ("zdr", "bank_balances", "bank_history", "bank_stats", "bank_accounts")
    _grant(
        engine,
        f'GRANT CREATE, TEMPORARY ON DATABASE "{db}" TO {runner}',
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA zdr TO {runner}",
        *_writes(runner, *schemas),
    )
    manager = zdr.ReplayManager(runner_url, projectors=[cls() for cls in LIVE], batch_size=100)
    _life_cycle_until_dual_write(manager, application.store)
    with pytest.raises(zdr.PrivilegeMissing) as refused:
        manager.promote("v2")
    assert f"role '{runner}' cannot give the new copy" in str(refused.value)
    assert f'GRANT {owner} TO "{runner}"' in str(refused.value)
    assert manager.get_replay("v2").state is zdr.ReplayState.DUAL_WRITING  # nothing changed
    _grant(engine, f"GRANT {owner} TO {runner}")
    manager.promote("v2")
    assert_balances_match_fold(engine, application.store)
    manager.rollback("v2")
    assert_balances_match_fold(engine, application.store)
    manager.engine.dispose()
    application.engine.dispose()


def test_a_dual_writing_replay_the_live_runner_may_not_write_says_why_and_catches_up(
    engine, as_role
):
    """The pipeline made the replay as the owner; the live runner runs as another role
    with grants on the live read models only: the replay's copy stays behind with the
    grant named on its record (state kept), and catches up once granted."""
    db = _database(engine)
    owner_url, runner_url = as_role("owner"), as_role("runner")
    owner, runner = _role_of(owner_url), _role_of(runner_url)
    _grant(engine, f'GRANT CREATE ON DATABASE "{db}" TO {owner}')
    pipeline = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE], batch_size=100)
    pipeline.setup()
    seed(pipeline.store, 300)
    pipeline.project_live()
    pipeline.create_replay("v2", [BalancesV2()])
    pipeline.start_replay("v2")
    pipeline.enable_dual_write("v2")
    schemas = ("zdr", "bank_balances", "bank_history", "bank_stats", "bank_accounts")
    _grant(
        engine,
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA zdr TO {runner}",
        *_writes(runner, *schemas),
    )
    live = zdr.ReplayManager(runner_url, projectors=[cls() for cls in LIVE])
    live.settings = live.settings.replace(failed_retry_s=0.3)
    seed(pipeline.store, 100, prefix="later")
    live.follow(max_seconds=1.0, poll_interval=0.02)
    replay = pipeline.get_replay("v2")
    side = replay.schemas["bank_balances"]
    assert replay.state is zdr.ReplayState.DUAL_WRITING
    assert replay.error is not None and f"role '{runner}' lacks USAGE on schema {side}" in (
        replay.error
    )
    assert pipeline.get_replay_lag("v2") == 100
    _grant(
        engine,
        f"GRANT USAGE ON SCHEMA {side} TO {runner}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {side} TO {runner}",
    )
    live.follow(max_seconds=1.5, poll_interval=0.02)
    replay = pipeline.get_replay("v2")
    assert replay.error is None and pipeline.get_replay_lag("v2") == 0
    assert pipeline.verify("v2").equal
    live.engine.dispose()
    pipeline.engine.dispose()


def test_setup_without_create_on_the_database_names_it(engine, as_role):
    """`zdr live` sets up first: the first thing a new role meets must say what to grant."""
    db = _database(engine)
    url = as_role("nocreate")  # PostgreSQL grants PUBLIC no CREATE on a database
    manager = zdr.ReplayManager(url, projectors=[cls() for cls in LIVE])
    with pytest.raises(zdr.PrivilegeMissing) as refused:
        manager.setup()
    assert f"role '{_role_of(url)}' lacks CREATE on database {db}" in str(refused.value)
    assert f'GRANT CREATE ON DATABASE {db} TO "{_role_of(url)}"' in str(refused.value)
    manager.engine.dispose()


def test_a_table_the_runner_may_not_write_is_named_with_its_schema(engine, as_role):
    """PostgreSQL says "permission denied for table history": zdr says which schema (each
    version of a projection has tables of the same names) and what it was writing."""
    db = _database(engine)
    owner_url, runner_url = as_role("owner"), as_role("runner")
    owner, runner = _role_of(owner_url), _role_of(runner_url)
    _grant(engine, f'GRANT CREATE ON DATABASE "{db}" TO {owner}')
    setup = zdr.ReplayManager(owner_url, projectors=[cls() for cls in LIVE])
    setup.setup()
    seed(setup.store, 100)
    _grant(
        engine,
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA zdr TO {runner}",
        *(
            statement
            for schema in ("zdr", "bank_balances", "bank_history", "bank_stats", "bank_accounts")
            for statement in (
                f"GRANT USAGE ON SCHEMA {schema} TO {runner}",
                f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {runner}",
                *(
                    [f"GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {runner}"]
                    if schema != "bank_history"
                    else []
                ),
            )
        ),
    )
    manager = zdr.ReplayManager(runner_url, projectors=[cls() for cls in LIVE])
    manager.follow(max_seconds=1.0, poll_interval=0.02)
    error = _live_as(engine)["history"]["error"]
    assert f"role '{runner}' lacks a privilege on table bank_history." in error
    assert "while projecting to live projection 'history'" in error
    assert "ON ALL TABLES IN SCHEMA bank_history" in error
    setup.engine.dispose()
    manager.engine.dispose()

"""The life cycle is one table (zdr.replay.TRANSITIONS), docs/how-it-works.md's too: every operation
it does not allow is refused naming the state and the states that allow it, and changes
nothing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import zdr
from tests.support import ExplodingBalancesV2, seed, zdr_state
from zdr.examples.bank.projectors import Balances, BalancesV2
from zdr.replay import TRANSITIONS, ReplayState

S = ReplayState
#: Every state a stored replay can be in (a removed replay is gone: ReplayNotFound).
STORED = [s for s in S if s is not S.REMOVED]
OPERATIONS = {name: t for name, t in TRANSITIONS.items() if t.operator}
REFUSED = [
    (operation, state)
    for operation, transition in OPERATIONS.items()
    for state in STORED
    if state not in transition.allowed
]


def _replay_in(manager, state: ReplayState, monkeypatch, key: str = "r") -> None:
    """A replay ``key`` of the balances brought to ``state`` by the operations themselves."""
    seed(manager.store, 300)
    manager.project_live()
    if state is S.FAILED:
        monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 150)
        manager.create_replay(key, [ExplodingBalancesV2()])
        with pytest.raises(zdr.ProjectorError):
            manager.start_replay(key, batch_size=100)
        monkeypatch.setattr(ExplodingBalancesV2, "explode_at", 0)
        return
    manager.create_replay(key, [BalancesV2()])
    if state is S.REPLAYING:
        manager.start_replay(key, batch_size=100, max_events=100)
    elif state is not S.CREATED:
        manager.start_replay(key)
    if state is S.DUAL_WRITING:
        manager.enable_dual_write(key)
    if state in (S.LIVE, S.SUPERSEDED, S.ROLLED_BACK):
        manager.promote(key)
    if state is S.ROLLED_BACK:
        manager.rollback(key)
    if state is S.SUPERSEDED:
        manager.create_replay("newer", [Balances()])
        manager.start_replay("newer")
        manager.promote("newer")
    assert manager.get_replay(key).state is state


def _call(manager, operation: str, key: str) -> object:
    return getattr(manager, operation)(key)


def test_every_state_is_in_the_table_and_every_operation_has_a_manager_method():
    reached = {t.to for t in TRANSITIONS.values()}
    # created by create_replay; replaying on the way through start_replay
    assert reached | {S.CREATED, S.REPLAYING} == set(S)
    for operation in OPERATIONS:
        assert callable(getattr(zdr.ReplayManager, operation))


@pytest.mark.parametrize(("operation", "state"), REFUSED, ids=[f"{o}-{s}" for o, s in REFUSED])
def test_an_operation_the_table_does_not_allow_is_refused_naming_the_states_and_changes_nothing(
    manager, engine, monkeypatch, operation, state
):
    _replay_in(manager, state, monkeypatch)
    before = zdr_state(engine)

    with pytest.raises(zdr.InvalidState) as refused:
        _call(manager, operation, "r")

    allowed = ", ".join(s.value for s in S if s in OPERATIONS[operation].allowed)
    assert f"{operation} is not allowed for replay 'r' in state '{state.value}'" in str(
        refused.value
    )
    assert f"(allowed in: {allowed})" in str(refused.value)
    assert zdr_state(engine) == before


def test_the_old_names_of_the_state_sets_are_the_table_s(manager):
    from zdr.replay import DUAL_WRITABLE, PROMOTABLE, REPLAYABLE

    assert TRANSITIONS["start_replay"].allowed == REPLAYABLE
    assert TRANSITIONS["enable_dual_write"].allowed == DUAL_WRITABLE
    assert TRANSITIONS["promote"].allowed == PROMOTABLE


def test_a_removed_replay_is_gone_for_every_operation(manager):
    seed(manager.store, 100)
    manager.project_live()
    manager.create_replay("gone", [BalancesV2()])
    manager.remove_replay("gone")
    for operation in OPERATIONS:
        with pytest.raises(zdr.ReplayNotFound, match="no replay with key 'gone'"):
            _call(manager, operation, "gone")


def test_the_docs_states_table_is_the_code_s_table():
    page = (Path(__file__).parent.parent / "docs" / "how-it-works.md").read_text()
    section = page.split("\n## States", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| [`*]", line)]
    found = {}
    for row in rows:
        operation, allowed, to = (cell.strip() for cell in row.strip("|").split("|"))
        name = re.match(r"[`*](\w+)[`*]", operation).group(1)
        states = allowed.split(";")[0]
        found[name] = (
            set(STORED) if states == "any" else {S(s.strip()) for s in states.split(",")},
            S(to.split()[0]),
        )
    assert found == {name: (set(t.allowed), t.to) for name, t in TRANSITIONS.items()}


# -- swap names never collide with side schemas ------------------------------------------


# -- the column behind `superseded` --------------------------------------------------------


def test_setup_adds_the_superseded_by_column_to_an_install_from_before(manager, engine):
    seed(manager.store, 300)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    manager.start_replay("v2")
    manager.promote("v2")
    with engine.begin() as conn:  # zdr.replays as an older version made it
        conn.exec_driver_sql("ALTER TABLE zdr.replays DROP COLUMN superseded_by")

    manager.setup()

    assert manager.get_replay("v2").state is S.LIVE
    manager.create_replay("v3", [Balances()])
    manager.start_replay("v3")
    manager.promote("v3")
    assert manager.get_replay("v2").superseded_by == "v3"


def test_setup_with_the_column_there_takes_no_lock_on_the_replays_table(manager, engine):
    patient = zdr.ReplayManager(engine, projectors=[Balances()], lock_timeout=3, swap_attempts=1)
    with engine.connect() as reader:
        reader.begin()
        reader.exec_driver_sql("SELECT count(*) FROM zdr.replays")  # held to the end
        started = time.monotonic()
        patient.setup()
        took = time.monotonic() - started
        reader.rollback()
    assert took < 1.0, f"setup waited {took:.1f}s for a reader of zdr.replays"

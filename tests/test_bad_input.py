"""Bad input gets a ZdrError that names it, and nothing is stored or half-done."""

from __future__ import annotations

import decimal
import math

import pytest

import zdr
from tests.support import seed
from zdr.examples.bank.projectors import Balances, BalancesV2, History


def _opened(data: dict) -> dict:
    return {"type": "AccountOpened", "data": {"account_id": "acc-x", "owner": "x", **data}}


BAD_EVENTS = {
    "NUL in a string": (_opened({"note": "a\x00b"}), r"data\.note holds a NUL"),
    "NUL in a key": (_opened({"a\x00b": 1}), "holds a NUL"),
    "lone surrogate": (_opened({"note": "\ud800"}), r"data\.note .*surrogate"),
    "NaN": (_opened({"amount": math.nan}), r"data\.amount is NaN"),
    "infinity": (_opened({"amount": math.inf}), r"data\.amount is inf"),
    "Decimal": (_opened({"amount": decimal.Decimal("1.5")}), r"data\.amount is a Decimal"),
    "non-string key": (_opened({1: "one"}), "key 1 is not a string"),
    "huge integer": (_opened({"n": 10**5000}), r"data\.n is an integer of more than"),
    "nested": (_opened({"items": [{"x": math.nan}]}), r"data\.items\[0\]\.x is NaN"),
    "metadata": ({**_opened({}), "metadata": {"at": object()}}, r"metadata\.at is a object"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_a_payload_json_or_postgresql_cannot_hold_is_refused_at_append(manager, case):
    event, message = BAD_EVENTS[case]
    for store in (
        lambda: manager.store.append("acc-x", [_opened({}), event]),
        lambda: manager.store.import_events([("acc-x", _opened({})), ("acc-x", event)]),
    ):
        with pytest.raises(zdr.InvalidEvent, match=message):
            store()
    with manager.engine.connect() as conn:
        assert manager.store.count_after(conn, zdr.store.START) == 0  # nothing of the call


@pytest.mark.parametrize("stream", ["a\x00b", "\udc00"])
def test_a_stream_id_postgresql_cannot_hold_is_refused(manager, stream):
    for store in (
        lambda: manager.store.append(stream, [_opened({})]),
        lambda: manager.store.import_events([(stream, _opened({}))]),
    ):
        with pytest.raises(zdr.InvalidEvent, match="stream_id"):
            store()


def test_a_poison_event_in_the_log_stops_its_reader_naming_its_position(manager, engine):
    seed(manager.store, 50)
    manager.project_live()
    with engine.begin() as conn:  # written by plain SQL, past zdr's checks
        conn.exec_driver_sql(
            "INSERT INTO zdr.events (stream_id, type, data) VALUES ('acc-poison', "
            "'AccountOpened', ('{\"account_id\": \"acc-poison\", \"n\": ' || repeat('9', 5000)"
            " || '}')::jsonb)"
        )
    with pytest.raises(zdr.InvalidEvent, match=r"event 51 .*stream 'acc-poison'.*cannot be read"):
        manager.project_live()


class Other(History):
    """Another projection that declares BalancesV2's table."""

    name = "other"
    tables = BalancesV2.tables


def test_two_projectors_declaring_one_table_are_refused_before_anything(manager, engine):
    with pytest.raises(zdr.ConfigurationError, match="bank_balances.balances"):
        manager.create_replay("two", [BalancesV2(), Other()])
    assert manager.get_replay("two") is None
    with pytest.raises(zdr.ConfigurationError, match="bank_balances.balances"):
        zdr.ReplayManager(engine, projectors=[Balances(), Other()]).setup()


def test_remove_refuses_naming_what_a_dba_put_in_the_copy_and_changes_nothing(manager, engine):
    seed(manager.store, 100)
    manager.project_live()
    manager.create_replay("v2", [BalancesV2()])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION zdr_v2_1.rich() RETURNS int LANGUAGE sql AS 'SELECT 1'"
        )
    with pytest.raises(zdr.DependentObjects, match=r"function zdr_v2_1\.rich\(\)"):
        manager.remove_replay("v2")
    assert manager.get_replay("v2") is not None
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regclass('zdr_v2_1.balances')").scalar()

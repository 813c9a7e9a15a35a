"""How the live runner is hosted in Prefect: a run that fails every batch does not end
green; an active run with a standby hands over to it after its time, sends heartbeats
while it works, and its runner sessions make the server notice a lost machine."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

import zdr
from tests.support import seed, wait_for
from zdr.flows.operations import live_projection
from zdr.locks import LOST_CLIENT_SETTINGS, live_runner

metadata = sa.MetaData(schema="failing_notes")
notes = sa.Table("notes", metadata, sa.Column("position", sa.BigInteger, primary_key=True))


class AlwaysFailing(zdr.Projector):
    """A read model whose every batch fails (a bug in the projector)."""

    name = "always_failing"
    tables = [notes]
    event_types = frozenset({"AccountOpened", "MoneyDeposited", "MoneyWithdrawn"})

    def handle_batch(self, events: Sequence[zdr.RecordedEvent], conn: sa.Connection) -> None:
        raise RuntimeError("this projector cannot handle anything")


@pytest.mark.usefixtures("prefect_harness")
def test_a_live_projection_run_whose_read_model_fails_every_batch_ends_failed(
    manager, database_url
):
    seed(manager.store, 50)
    state = live_projection(
        projectors=[f"{__name__}:AlwaysFailing"],
        database_url=database_url,
        max_seconds=2.0,
        take_over=False,
        return_state=True,
    )
    assert state.is_failed(), state
    assert "always_failing at event 1" in state.message, state.message
    assert "this projector cannot handle anything" in state.message


def test_a_runner_session_tells_the_server_to_notice_a_lost_machine(engine):
    with engine.connect() as conn, live_runner(conn):
        shown = {
            name: conn.exec_driver_sql(f"SHOW {name}").scalar_one() for name in LOST_CLIENT_SETTINGS
        }
    # Over TCP the server reports what was set; over a Unix socket (the embedded
    # server) it reports 0: no keepalives there, where a lost client cannot happen.
    host = engine.url.host or ""
    if host and not host.startswith("/"):
        assert shown == LOST_CLIENT_SETTINGS, shown
    else:
        assert set(shown.values()) == {"0"}, shown


@pytest.mark.usefixtures("prefect_harness")
def test_an_active_run_hands_over_to_its_standby_after_its_time(manager, database_url, caplog):
    """Runs with keep_standby: the first is active, the second waits; after the first's
    max_seconds the second takes over with no gap. A run that finds an active run and
    a standby ends at once (the schedule's safety net); the last standby is handed
    over to a plain run that ends, so the test ends."""
    seed(manager.store, 100)
    results: dict[str, dict] = {}

    def run(name: str, **options) -> threading.Thread:
        options = {"max_seconds": 3.0, "keep_standby": True} | options
        thread = threading.Thread(
            target=lambda: results.setdefault(
                name, live_projection(database_url=database_url, **options)
            )
        )
        thread.start()
        return thread

    first = run("first")
    wait_for(lambda: manager.live_runner_pid() is not None, timeout=60)
    active = manager.live_runner_pid()
    second = run("second")
    wait_for(manager.live_runner_has_standby, timeout=60)
    assert live_projection(database_url=database_url, max_seconds=3.0, keep_standby=True)[
        "skipped"
    ].endswith("this run is not needed")
    first.join(60)
    assert not first.is_alive() and results["first"]["skipped"] is None
    assert wait_for(lambda: manager.live_runner_pid() not in (None, active), timeout=10)
    last = run("last", max_seconds=8.0, keep_standby=False, take_over=True)
    second.join(60)
    last.join(60)
    assert not second.is_alive() and not last.is_alive()
    assert results["last"]["skipped"] is None
    assert any("handing over to the one that waits" in r.getMessage() for r in caplog.records)

"""What every journey needs: the application appending in a thread of its own, the live
runner (`zdr live`) in a process of its own, and a check against the independent folds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

import zdr
from tests.journeys.wallets import (
    ENTRIES,
    WALLETS,
    Application,
    fold_entries,
    fold_wallets,
    read_entries,
    read_wallets,
)
from tests.support import wait_for
from zdr.store import iter_all

ROOT = Path(__file__).resolve().parents[2]


class Appending:
    """The application: a transaction of a few events every ``interval`` seconds, until
    stopped; ``paused()`` holds it while the read models are compared with the folds.
    ``append`` appends one transaction's worth (default: three wallet events)."""

    def __init__(
        self,
        store: zdr.EventStore | None = None,
        app: Application | None = None,
        interval: float = 0.02,
        append: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.app = app
        self.interval = interval
        self.append = append or self._wallet_events
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.busy = threading.Lock()
        self.appended = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="application", daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.interval):
                with self.busy:  # paused() waits for a transaction in flight
                    if not self.running.is_set():
                        continue
                    self.appended += self.append()
        except BaseException as exc:  # the test says so at its end
            self.error = exc

    def _wallet_events(self) -> int:
        assert self.store is not None and self.app is not None
        for stream, event in self.app.events(3):
            self.store.append(stream, [event])
        return 3

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.running.clear()
        with self.busy:  # the transaction in flight, if any, has committed
            pass
        try:
            yield
        finally:
            self.running.set()


class Journey:
    """One database, its log, the application appending and a live runner process."""

    def __init__(self, engine: sa.Engine, database_url: str, tmp_path: Path) -> None:
        self.engine = engine
        self.database_url = database_url
        self.store = zdr.EventStore(engine)
        self.store.setup()
        self.app = Application()
        self.appending = Appending(self.store, self.app)
        self.manager = zdr.ReplayManager(engine)
        self.live_log = tmp_path / "live.log"
        self.live: subprocess.Popen[bytes] | None = None

    def start_live(self, projectors: list[str], *options: str) -> None:
        """`zdr live -p ... [options]` in a process of its own, logging to ``live_log``."""
        env = {**os.environ, "ZDR_DATABASE_URL": self.database_url, "PYTHONPATH": str(ROOT)}
        with self.live_log.open("ab") as log:
            self.live = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "zdr.cli.main",
                    "live",
                    "-p",
                    ",".join(projectors),
                    *options,
                ],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_for(
            lambda: self.manager.live_runner_pid() is not None or self.live.poll() is not None,
            timeout=60,
        )
        assert self.live.poll() is None, self.live_log.read_text()

    def stop_live(self) -> None:
        if self.live is not None and self.live.poll() is None:
            self.live.terminate()
            self.live.wait(30)

    def level(self, timeout: float = 60, manager: zdr.ReplayManager | None = None) -> None:
        """Wait (the application held) until every live read model is at the head."""

        manager = manager or self.manager

        def caught_up() -> bool:
            assert self.live is not None and self.live.poll() is None, self.live_log.read_text()
            return not any(manager.live_lag().values())

        wait_for(
            caught_up,
            timeout=timeout,
            message=lambda: f"live lag {manager.live_lag()}\n{self.live_log.read_text()}",
        )

    def assert_live_is(self, version: int) -> None:
        """The live read models equal the folds of version ``version`` over the whole log,
        checked while the application is held and the live runner level."""
        with self.appending.paused():
            self.level()
            events = list(iter_all(self.store, self.engine))
            assert read_wallets(self.engine, WALLETS) == fold_wallets(events, version)
            assert read_entries(self.engine, ENTRIES) == fold_entries(events, version)


@pytest.fixture()
def journey(engine: sa.Engine, database_url: str, tmp_path: Path) -> Iterator[Journey]:
    found = Journey(engine, database_url, tmp_path)
    try:
        yield found
    finally:
        found.appending.stop.set()
        if found.appending.thread.is_alive():
            found.appending.thread.join(30)
        found.stop_live()

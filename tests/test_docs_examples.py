"""Every example in the docs runs as it is printed: page by page, in the order printed,
each page from an empty database and then again on what its first run left (a reader
runs it twice). How a page's blocks are read: tests/docs_examples.py."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.docs_examples import PLACEHOLDER, ROOT, Block, blocks, pages


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _uses_eventsourcing(page: Path) -> bool:
    return any("eventsourcing" in b.code for b in blocks(page) if b.runs or b.is_file)


RUNNABLE_PAGES = [
    pytest.param(
        page,
        id=_id(page),
        marks=[pytest.mark.eventsourcing] if _uses_eventsourcing(page) else [],
    )
    for page in pages()
    if any(b.runs for b in blocks(page))
]


def test_every_block_that_is_not_run_says_why_and_no_code_holds_a_placeholder():
    for page in pages():
        for block in blocks(page):
            assert block.not_run != "", f"{block.where}: say why it is not run"
            if block.language in {"python", "bash"}:
                hole = PLACEHOLDER.search(block.code)
                assert hole is None, f"{block.where}: a placeholder a reader cannot copy: {hole}"


@pytest.fixture()
def empty_database(server_url: str) -> Iterator[str]:
    name = f"zdr_docs_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


class PageRun:
    """One reader going through one page: its folder, its database, its background
    commands."""

    def __init__(self, page: Path, folder: Path, database_url: str) -> None:
        self.page = page
        self.folder = folder
        self.env = {
            **os.environ,
            "ZDR_DATABASE_URL": database_url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(
                [str(folder), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.sessions: list[subprocess.Popen[bytes]] = []
        # The same module name on each run: projectors are recorded by import path.
        slug = re.sub(r"\W", "_", _id(page).removesuffix(".md")).lower()
        self.namespace = types.ModuleType(f"docs_{slug}")

    def run(self, block: Block) -> None:
        if block.is_file:
            path = self.folder / block.title  # type: ignore[operator]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code)
        elif block.runs and block.language == "python":
            exec(compile(block.code, block.where, "exec"), self.namespace.__dict__)
        elif block.runs and block.language == "bash":
            self._bash(block)

    def _bash(self, block: Block) -> None:
        log = self.folder / f"bash-{block.line}.log"
        with log.open("wb") as out:
            # A session of its own: what it leaves in the background is ended with the page.
            shell = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", block.code],
                cwd=self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.sessions.append(shell)
            try:
                code = shell.wait(timeout=600)
            except subprocess.TimeoutExpired:
                code = -1
        if code != 0:
            pytest.fail(f"{block.where} exited {code}:\n{log.read_text()[-4000:]}")

    def end(self) -> None:
        for shell in self.sessions:
            try:
                os.killpg(shell.pid, signal.SIGINT)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 20
        for shell in self.sessions:
            while time.monotonic() < deadline:
                try:
                    os.killpg(shell.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(shell.pid, signal.SIGKILL)


def _forget_modules_under(folder: Path, namespace: str) -> None:
    """The page's files are imported afresh on the next run, as in a new process."""
    forgotten = {namespace}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(folder.resolve()):
            del sys.modules[name]
            forgotten.add(name)
    importlib.invalidate_caches()
    _forget_eventsourcing_topics(forgotten)


def _forget_eventsourcing_topics(modules: set[str]) -> None:
    """eventsourcing caches each class by topic (``module:Class``) for the process and
    refuses another class under the same topic: a new process starts with none."""
    try:
        from eventsourcing import utils
    except ImportError:
        return
    with utils._topic_cache_lock:
        for topic in [t for t in utils._topic_cache if t.partition(":")[0] in modules]:
            del utils._topic_cache[topic]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_page_runs_as_printed_twice_from_an_empty_database(
    page: Path, empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "reader"
    folder.mkdir()
    monkeypatch.setenv("ZDR_DATABASE_URL", empty_database)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    for _ in range(2):
        run = PageRun(page, folder, empty_database)
        monkeypatch.setitem(sys.modules, run.namespace.__name__, run.namespace)
        try:
            for block in blocks(page):
                run.run(block)
        finally:
            run.end()
            _forget_modules_under(folder, run.namespace.__name__)

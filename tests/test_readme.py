"""The README's Python example runs as it is written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
#: The readers' examples (they moved from the README to this page).
READERS_PAGE = README.parent / "docs" / "how-to" / "existing-event-tables.md"


def test_the_readme_python_example_runs(engine, database_url, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    for _ in range(2):  # a newcomer runs it again: it must not fail the second time
        exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == "caught_up 0"
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT book_id, on_loan FROM library_loans.loans").all()
            assert rows == [("book-1", True)]
            assert (
                conn.exec_driver_sql(
                    "SELECT count(*) FROM zdr.replays WHERE state <> 'removed'"
                ).scalar()
                == 0
            )


def _run_as_module(code: str, name: str, monkeypatch) -> None:
    """Run a page's code as an importable module (eventsourcing imports an aggregate's)."""
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(code, str(READERS_PAGE), "exec"), module.__dict__)


def _block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", READERS_PAGE.read_text(), flags=re.S)
    [block] = [b for b in blocks if b.startswith(marker)]
    return block


@pytest.mark.eventsourcing
def test_the_eventsourcing_reader_example_prints_the_promoted_rows(
    engine, database_url, monkeypatch, capsys
):
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    _run_as_module(_block("# readers: eventsourcing"), "readme_eventsourcing", monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "[('Dune', True), ('Emma', False)]"
    with engine.connect() as conn:  # promoted, then removed: the read model is live
        assert conn.exec_driver_sql("SELECT count(*) FROM zdr.replays").scalar_one() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM library_books.books").scalar_one() == 2


def test_the_table_reader_example_prints_the_balance_and_prepares_once(
    engine, database_url, monkeypatch, capsys
):
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    for _ in range(2):  # run again, it must not fail
        _run_as_module(_block("# readers: table"), "readme_table", monkeypatch)
        printed = capsys.readouterr().out.splitlines()
        assert printed[-1] == "[('acc-1', 42)]"
    with engine.connect() as conn:
        prepared = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.stored_events'::regclass "
            "AND tgname = 'zdr_append_trigger'"
        ).scalar_one()
    assert prepared == 1, "prepare added its trigger, once"

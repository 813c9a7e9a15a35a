"""The README's Python example runs as it is written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_python_example_runs(engine, database_url, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    monkeypatch.setenv("ZDR_DATABASE_URL", database_url)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "caught_up 0"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT book_id, on_loan FROM library_loans.loans").all()
        assert rows == [("book-1", True)]
        assert conn.exec_driver_sql("SELECT count(*) FROM zdr.replays").scalar() == 0

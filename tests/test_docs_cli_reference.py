"""The command-line reference (docs/reference/cli.md) is generated at build time by
scripts/mkdocs_hooks.py: every command is on it, with its options."""

from __future__ import annotations

import importlib.util

import typer

from tests.docs_examples import DOCS, ROOT
from zdr.cli.main import app


def _hooks():
    spec = importlib.util.spec_from_file_location(
        "mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_has_every_command_and_its_options():
    page = (DOCS / "reference" / "cli.md").read_text()
    rendered = _hooks().on_page_markdown(page, None)
    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        assert f"## `zdr {name}`" in rendered
        for child in getattr(sub, "commands", {}):
            assert f"### `zdr {name} {child}`" in rendered
    # options, with their types and defaults (a typer upgrade that hides them fails here)
    assert "| `--events` | integer ≥ 1 | How many bank events to append. | `200000` |" in rendered
    assert "| `--database-url` | URL |" in rendered

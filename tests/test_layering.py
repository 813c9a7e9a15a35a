"""The core stays usable on its own: nothing in zdr's core imports Prefect.

Installed, the pipeline's parts live under the same name (``zdr.flows``,
``zdr.tasks``, ``zdr.deployments``, ``zdr.cli``, ``zdr.examples``); they may
import Prefect, the core modules may not, and ``import zdr`` must not either.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import zdr

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_PACKAGES = {"cli", "flows", "tasks", "deployments", "examples"}


def test_the_core_imports_no_prefect():
    modules = [
        f"zdr.{m.name}"
        for m in pkgutil.iter_modules(zdr.__path__)
        if m.name not in PIPELINE_PACKAGES
    ]
    code = (
        f"import sys, importlib\nimport zdr\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'prefect'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "zdr.manager" in modules and "zdr.verify" in modules
    assert result.stdout.strip() == "[]"


def test_the_pipeline_lives_under_the_one_name_zdr():
    import zdr.deployments.serve
    import zdr.examples.bank.projectors
    import zdr.flows.zero_downtime_replay
    import zdr.tasks.replay

    assert zdr.examples.bank.projectors.BalancesV2.import_path() == (
        "zdr.examples.bank.projectors:BalancesV2"
    )
    assert zdr.flows.zero_downtime_replay.zero_downtime_replay.name == "zero-downtime-replay"


#: What `zdr --help` must not wait for: each takes a tenth of a second or more to import.
HEAVY = ("sqlalchemy", "psycopg", "prefect", "pandas", "pydantic")


def _heavy_after(code: str) -> list[str]:
    """The HEAVY packages in sys.modules after ``code`` ran in a fresh interpreter."""
    check = (
        f"{code}\nimport sys\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({HEAVY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])  # a list of str, printed above


def _zdr(*argv: str) -> str:
    """Run ``zdr ARGV`` in process, as the entry point does (it exits)."""
    return (
        "from zdr.cli.main import main\n"
        f"try:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass"
    )


def test_import_zdr_imports_nothing_heavy_until_a_name_is_used():
    """``import zdr`` (which any ``import zdr.x`` runs first) costs nothing: the public
    names are imported on first use, and then they are what they always were."""
    assert _heavy_after("import zdr") == []
    assert _heavy_after("import zdr\nzdr.ConfigurationError\nzdr.Settings") == []
    assert {"sqlalchemy", "psycopg"} <= set(_heavy_after("import zdr\nzdr.ReplayManager"))
    code = (
        "import zdr, zdr.manager, zdr.errors, zdr.store\n"
        "assert zdr.ReplayManager is zdr.manager.ReplayManager\n"
        "assert zdr.ZdrError is zdr.errors.ZdrError and zdr.EventStore is zdr.store.EventStore\n"
        "assert all(getattr(zdr, name) is not None for name in zdr.__all__)\n"
        "assert set(zdr.__all__) <= set(dir(zdr))\n"
        "from zdr import *  # noqa: F403\n"
        "assert Replay is zdr.Replay\n"  # noqa: F405
        "try:\n    zdr.NoSuchName\nexcept AttributeError:\n    pass\n"
        "else:\n    raise AssertionError('zdr.NoSuchName exists')\n"
    )
    _heavy_after(code)


def test_the_command_line_starts_without_prefect_or_pandas():
    """Every `zdr` command pays its imports before it does anything: `zdr --help` (and
    importing the command line) imports none of SQLAlchemy, psycopg, Prefect, pandas or
    pydantic; Prefect (seconds) comes only with the commands that run a flow, pandas
    only where a lag history is shown."""
    assert _heavy_after("import zdr.cli.main") == []
    assert _heavy_after(_zdr("--help")) == []
    assert _heavy_after(_zdr()) == []  # no command: the help


def test_a_commands_help_imports_nothing_heavy_of_its_own():
    """``zdr COMMAND --help`` imports nothing heavy beyond what typer itself imports to
    parse a command's options (typer 0.2x builds them on pydantic; older ones do not)."""
    import typer.main

    from zdr.cli.main import app

    group = typer.main.get_command(app)
    helps = [
        [*path, "--help"]
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for path in (
            [[name, sub] for sub in command.commands] if hasattr(command, "commands") else [[name]]
        )
    ]
    assert ["status", "--help"] in helps and ["embedded", "stop", "--help"] in helps
    typer_alone = (
        "import typer\napp = typer.Typer()\n"
        "@app.command()\ndef one(key: str, n: int = 1) -> None: ...\n"
        "@app.command()\ndef two() -> None: ...\n"
        "try:\n    app(['one', '--help'])\nexcept SystemExit:\n    pass"
    )
    allowed = set(_heavy_after(typer_alone))
    assert allowed <= {"pydantic"}
    every_help = "\n".join(_zdr(*argv) for argv in helps)
    assert set(_heavy_after(every_help)) <= allowed

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


def test_the_command_line_starts_without_prefect_or_pandas():
    """Every `zdr` command pays its imports before it does anything: Prefect (seconds)
    comes only with the commands that run a flow, pandas only where a lag history is
    shown."""
    code = (
        "import sys\nimport zdr.cli.main\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'pandas'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"

"""The core stays usable on its own: nothing in zdr/ imports Prefect."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import zdr

ROOT = Path(__file__).resolve().parent.parent


def test_the_core_imports_no_prefect():
    modules = [f"zdr.{m.name}" for m in pkgutil.iter_modules(zdr.__path__)]
    code = (
        f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'prefect'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "zdr.manager" in modules and "zdr.verify" in modules
    assert result.stdout.strip() == "[]"

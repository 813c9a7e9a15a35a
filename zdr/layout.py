"""Where the pipeline's packages are found when `zdr` is imported from a checkout.

Installed (`pip install .`), everything lives under the one name `zdr`: `zdr.flows`,
`zdr.tasks`, `zdr.deployments`, `zdr.cli` and `zdr.examples` are folders of the
installed package. In the repository they are top-level folders of their own
(flows/, tasks/, ...: they show the layering). Run from a checkout (`prefect deploy`,
a worker or a script whose working directory is the checkout), Python imports the
checkout's `zdr/` before any installed copy, and that folder holds only the core: so
this module maps the five names onto the checkout's folders, as an editable install
does, and nothing else. Installed, it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: zdr's subpackage -> the repository's top-level folder that holds it (pyproject.toml
#: maps the same names in [tool.setuptools.package-dir]).
PIPELINE_FOLDERS = {
    "zdr.cli": "cli",
    "zdr.flows": "flows",
    "zdr.tasks": "tasks",
    "zdr.deployments": "deployments",
    "zdr.examples": "examples",
}
PROJECT_NAME = 'name = "zero-downtime-replays"'


class CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds `zdr.flows` and its siblings in the checkout's top-level folders."""

    def __init__(self, checkout: Path) -> None:
        self.checkout = checkout

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        folder = PIPELINE_FOLDERS.get(fullname)
        if folder is None:
            return None
        package = self.checkout / folder
        return importlib.util.spec_from_file_location(
            fullname, package / "__init__.py", submodule_search_locations=[str(package)]
        )


def checkout_of(package_dir: Path) -> Path | None:
    """The repository `package_dir` sits in, or None where zdr is installed."""
    root = package_dir.parent
    pyproject = root / "pyproject.toml"
    if not (root / "flows" / "__init__.py").is_file() or not pyproject.is_file():
        return None
    return root if PROJECT_NAME in pyproject.read_text(encoding="utf-8") else None


def find_pipeline_in_checkout() -> None:
    package_dir = Path(__file__).resolve().parent
    checkout = checkout_of(package_dir)
    if checkout is None or (package_dir / "flows").is_dir():
        return
    if not any(isinstance(f, CheckoutFolders) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFolders(checkout))

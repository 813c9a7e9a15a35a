"""A reader named by import path, as the CLI, the flows and the deployments take it."""

from __future__ import annotations

import importlib
import os
from typing import Any

from zdr.config import DATABASE_URL_ENV
from zdr.errors import ConfigurationError
from zdr.store import EventReader

_METHODS = ("read", "horizon", "count_after")


def load(path: str, *, database_url: str | None = None) -> EventReader:
    """The reader at ``module:attr`` (``attr`` may be dotted): a reader, or a callable
    taking no argument that returns one (called here). ConfigurationError names what
    went wrong: the form, the module, the attribute, the call, or what came back.

    ``database_url``: the database zdr runs on, put in ``ZDR_DATABASE_URL`` first, so a
    factory finds the same database as the command or flow that names it."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ConfigurationError(
            f"a reader is named module:attr (for example myapp.zdr:reader), got {path!r}"
        )
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"a reader is named module:attr, got {path!r}")
    if database_url:
        os.environ[DATABASE_URL_ENV] = database_url
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code: anything may come out
        raise ConfigurationError(
            f"reader {path}: module {module_name!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            module = importlib.import_module(module_name)
            readers = sorted(
                name
                for name, value in vars(module).items()
                if not name.startswith("_") and _is_reader(value)
            )
            there = f" (readers there: {', '.join(readers)})" if readers else ""
            raise ConfigurationError(
                f"reader {path}: {module_name} has no attribute {attr!r}{there}"
            ) from None
    if not _is_reader(found) and callable(found):
        try:
            found = found()
        except Exception as exc:  # the user's factory: anything may come out
            raise ConfigurationError(
                f"reader {path}: calling it raised {type(exc).__name__}: {exc}"
            ) from exc
    if not _is_reader(found):
        raise ConfigurationError(
            f"reader {path} is a {type(found).__name__}, not a reader (an object with "
            f"{', '.join(_METHODS)}, such as zdr.readers.TableReader) nor a function "
            "returning one"
        )
    reader: EventReader = found
    return reader


def _is_reader(candidate: Any) -> bool:
    return not isinstance(candidate, type) and all(
        callable(getattr(candidate, name, None)) for name in _METHODS
    )

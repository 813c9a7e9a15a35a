"""Which projector class writes which copy: resolving references, live registrations, coverage.

A projector is referred to by its projection name (the registered one), by its
import path (``pkg.module:Class``, how another process finds it again) or by an
instance. zdr records the import path of the class writing each copy, so the
live runner finds the right version by itself after a promotion; this module
turns those paths back into instances, once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import sqlalchemy as sa

from zdr import records, targets
from zdr.errors import ConfigurationError, UnknownProjector
from zdr.names import validate_key
from zdr.projector import Projector, check_projector, load_projector

log = logging.getLogger("zdr")

ProjectorRef = str | Projector


class Registry:
    """The projectors a manager was given, and every class loaded by import path since.

    Safe to share between threads; projectors must keep no state between calls.
    """

    def __init__(self, projectors: Iterable[Projector] = ()) -> None:
        self._registered: dict[str, Projector] = {}
        self._by_path: dict[str, Projector] = {}
        self._lock = threading.Lock()
        for projector in projectors:
            check_projector(projector)
            if projector.name in self._registered:
                raise ConfigurationError(f"two projectors are named {projector.name!r}")
            self._registered[projector.name] = projector
            self._by_path[projector.import_path()] = projector
        require_own_tables(self._registered.values())

    @property
    def registered(self) -> list[Projector]:
        return list(self._registered.values())

    def resolve(self, ref: ProjectorRef, conn: sa.Connection) -> Projector:
        """The projector a reference means; a bare name not registered here is looked up
        among the live projections (``conn``)."""
        if isinstance(ref, Projector):
            check_projector(ref)
            if type(ref) not in {type(p) for p in self._registered.values()}:
                # A registered class is recorded for its live projection by this same path.
                check_loadable(ref)
            with self._lock:
                # Later runs in this process (dual write, rollback) use this very instance.
                return self._by_path.setdefault(ref.import_path(), ref)
        if not isinstance(ref, str):
            raise UnknownProjector(
                f"{ref!r} is neither a projector name, an import path nor a Projector"
            )
        if ":" in ref:
            return self.for_path(ref)
        if "." in ref:  # module.Class: the colon was left out
            module, _, name = ref.rpartition(".")
            raise UnknownProjector(
                f"projector {ref!r} is neither an import path nor a projection's name: an "
                f"import path is module:Class ({module}:{name})"
            )
        validate_key(ref, what="projector name")
        if ref in self._registered:
            return self._registered[ref]
        path = records.live_projector_path(conn, ref)
        if path is None:
            raise UnknownProjector(f"unknown projector {ref!r}: {self.known(conn)}")
        return self.for_path(path)

    def known(self, conn: sa.Connection) -> str:
        """What a bare projector name may name (the projections registered in this process
        and those live in the database, ``zdr.projections``) and how else to give one."""
        live = records.live_projector_paths(conn)
        registered = {name: p.import_path() for name, p in self._registered.items()}
        if not live and not registered:
            return (
                "no projection is registered here or live in this database, so no bare name "
                "means one: give the projector's import path module:Class (e.g. "
                "'myapp.projectors:Balances'); `zdr setup -p MODULE:CLASS` puts one live"
            )
        found = []
        if live:
            found.append(f"live: {_listing(live)}")
        extra = {n: p for n, p in registered.items() if n not in live}
        if extra:
            found.append(f"registered: {_listing(extra)}")
        example = min({**registered, **live}.items())[1]
        return (
            f"no projection of that name is registered here or live in this database "
            f"({'; '.join(found)}): name one of those, or give a projector by its import "
            f"path module:Class (e.g. {example!r})"
        )

    def for_path(self, path: str) -> Projector:
        """The instance for an import path, imported once per process."""
        with self._lock:
            projector = self._by_path.get(path)
            if projector is None:
                projector = load_projector(path)
                self._by_path[path] = projector
            return projector


def check_loadable(projector: Projector) -> Projector:
    """Refuse a projector that another process could not load again by its import path.

    zdr records the import path of the class writing each copy; the live runner,
    the pipeline's workers and the command line load it from there. A class
    defined in ``__main__`` or inside a function, or a path that leads to another
    class, would fail there (or write with the wrong code).
    """
    cls = type(projector)
    path = cls.import_path()
    fix = (
        "define the class at the top level of a module that the live runner and the "
        "pipeline's workers can import (e.g. myapp/projectors.py), and pass it from there "
        "or by its import path 'package.module:Class'"
    )
    if cls.__module__ == "__main__":
        raise ConfigurationError(
            f"projector {path} is defined in __main__: another process (the live runner, a "
            f"pipeline worker) could not load it by that path; {fix}"
        )
    if "<locals>" in cls.__qualname__:
        raise ConfigurationError(
            f"projector {path} is defined inside a function: another process could not "
            f"load it by that path; {fix}"
        )
    try:
        loaded = load_projector(path)
    except Exception as exc:  # an import runs arbitrary code: anything may come out
        raise ConfigurationError(
            f"projector {path} cannot be loaded by its import path, so another process "
            f"could not load it either ({exc}); {fix}"
        ) from exc
    if type(loaded) is not cls:
        raise ConfigurationError(
            f"import path {path} leads to another class than the projector given, so "
            f"another process would load that one instead; {fix}"
        )
    return projector


def register_live(conn: sa.Connection, projector: Projector) -> None:
    """Create a new projection's live tables and records; leave a live one as it is.

    A projection that is already live keeps the projector version recorded for
    it; a different registered version is only used by replays.
    """
    live_path = records.live_projector_path(conn, projector.name)
    path = projector.import_path()
    if live_path is None:
        targets.create_live(conn, projector)
        records.add_projection(conn, projector.name, path, projector.schemas())
        log.info("projection %r is live with %s", projector.name, path)
    elif live_path != path:
        # The database's record wins: a restart with an older command line must not
        # undo a promotion (only a rollback does).
        log.warning(
            "projection %r is live with %s (its promoted version): live runners apply "
            "that one; %s, given here, is only used by a replay created with the "
            "projection's name",
            projector.name,
            live_path,
            path,
        )


def require_own_tables(projectors: Iterable[Projector]) -> None:
    """Refuse (ConfigurationError) two projectors that declare one table: each would
    overwrite the other's rows, and the second to create it would fail."""
    owner: dict[str, str] = {}
    for projector in projectors:
        for table in projector.tables:
            first = owner.setdefault(table.fullname, projector.name)
            if first != projector.name:
                raise ConfigurationError(
                    f"projectors {first!r} and {projector.name!r} both declare table "
                    f"{table.fullname}: a table belongs to one projector"
                )


def check_coverage(conn: sa.Connection, projectors: list[Projector]) -> list[str]:
    """The live schemas a replay of ``projectors`` swaps; refuse one that would swap others'
    tables away, or that rebuilds a projection that is not live."""
    live = records.live_schemas(conn)
    wanted: set[str] = set()
    for projector in projectors:
        if projector.name not in live:
            raise UnknownProjector(
                f"no live projection named {projector.name!r} to rebuild: set it up "
                "first (`zdr setup -p MODULE:CLASS` with its live projector, or "
                "ReplayManager(projectors=[...]).setup())"
            )
        if projector.schemas() != sorted(live[projector.name]):
            raise ConfigurationError(
                f"projector {projector.import_path()} writes schemas {projector.schemas()} "
                f"but the live projection {projector.name!r} is in "
                f"{sorted(live[projector.name])}"
            )
        wanted.update(projector.schemas())
    included = {p.name for p in projectors}
    for name, schemas in live.items():
        shared = wanted.intersection(schemas)
        if name not in included and shared:
            raise ConfigurationError(
                f"schema {sorted(shared)[0]!r} also holds projection {name!r}: a replay "
                "swaps whole schemas, so include that projection in the replay"
            )
    return sorted(wanted)


def _listing(paths: dict[str, str], most: int = 20) -> str:
    """``name (module:Class), ...`` in name order, the first ``most`` of them."""
    names = sorted(paths)
    shown = ", ".join(f"{name} ({paths[name]})" for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def describe_paths(paths: dict[str, str]) -> str:
    return ", ".join(f"{name} with {path}" for name, path in sorted(paths.items()))

"""Projectors: user code that turns events into rows of the tables it declares.

A projector writes with its own SQLAlchemy ``Table`` objects through the
connection it is given. Which physical copy that lands in (the live one or a
replay's) is set on the connection with ``schema_translate_map``, so one class
serves every target unchanged. Projectors must keep no state between calls:
a ReplayManager shares one instance between threads.
"""

from __future__ import annotations

import contextvars
import copy
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import psycopg
import sqlalchemy as sa
from psycopg import sql

from zdr.errors import (
    ConfigurationError,
    ProjectorError,
    UnknownProjector,
    interrupted,
    is_stale_plan,
    is_transient,
    one_line,
    privilege_missing,
)
from zdr.names import validate_key, validate_live_schema
from zdr.store import RecordedEvent, forget_prepared_statements

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("zdr")

#: Whether the default handle_batch runs the per-event handlers in pipeline mode (off
#: while a failed batch is run again to name the event it fails on).
_PIPELINING: contextvars.ContextVar[bool] = contextvars.ContextVar("zdr_pipelining", default=True)


def handles(*event_types: str) -> Callable[[F], F]:
    """Mark a method ``(self, event, conn)`` as the handler of the given event types."""
    if not event_types or not all(isinstance(t, str) and t for t in event_types):
        raise ConfigurationError("@handles needs one or more event type names")

    def mark(method: F) -> F:
        method._zdr_handles = tuple(event_types)  # type: ignore[attr-defined]
        return method

    return mark


#: What ``Projector.partition_by`` may say.
PARTITION_KINDS = (None, "stream")


class Projector:
    """Base class of projectors.

    Subclasses set ``name`` and ``tables`` and either mark per-event handlers with
    ``@zdr.handles`` (simple) or override ``handle_batch`` and set
    ``event_types`` (fast: one call per batch of thousands of events).

    ``partition_by = "stream"`` says that what the projector writes for one stream
    depends on that stream's events alone (one row per account, say; not a total
    over all accounts): a replay can then run in partitions of streams, each in a
    process of its own (``ReplayManager.plan_partitions``).
    """

    name: ClassVar[str]
    tables: ClassVar[Sequence[sa.Table]] = ()
    event_types: ClassVar[frozenset[str]] = frozenset()
    #: None, or "stream": the projector's state is keyed by stream (see above).
    partition_by: ClassVar[str | None] = None
    #: Whether the default ``handle_batch`` sends the handlers' statements in psycopg's
    #: pipeline mode, without waiting for each one's result (about 1.8x as fast). Only
    #: for handlers that read nothing back: in pipeline mode a SELECT's rows, a
    #: ``rowcount`` and a generated key are not there yet (a SELECT reads as no rows,
    #: silently). A pipelined batch that fails where it would not unpipelined (SQLAlchemy
    #: reading a generated key) is applied unpipelined, and the class runs so from then on.
    pipelined: ClassVar[bool] = False
    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for event_type in getattr(value, "_zdr_handles", ()):
                    handlers[event_type] = attr
        cls._handlers = handlers
        cls.event_types = frozenset(cls.event_types) | frozenset(handlers)

    # -- what the engine calls -------------------------------------------------

    def handle_batch(self, events: Sequence[RecordedEvent], conn: sa.Connection) -> None:
        """Apply a batch of events (only of ``event_types``), in order.

        The default calls the per-event handlers; with ``pipelined = True`` in psycopg's
        pipeline mode: their statements go to the server without waiting for each
        other's results, so a batch costs a few round trips instead of one per
        statement. Override it to apply a whole batch at once, for example by folding it
        in Python and writing one upsert per table.
        """
        raw = conn.connection.driver_connection
        if not _pipelines(type(self)) or not psycopg.Pipeline.is_supported():
            for event in events:
                getattr(self, self._handlers[event.type])(event, conn)
            return
        try:
            with raw.pipeline():  # type: ignore[union-attr]
                for event in events:
                    getattr(self, self._handlers[event.type])(event, conn)
        except Exception as exc:
            # The database reports a statement's error at a later sync: the handler
            # running then is not the one that failed; and a handler that reads what a
            # statement returned finds nothing yet (apply_events runs it unpipelined).
            exc._zdr_pipelined = True  # type: ignore[attr-defined]
            raise

    # -- helpers -------------------------------------------------------------

    @classmethod
    def check(cls) -> None:
        """Refuse, with a ConfigurationError, what this kind of projector cannot run."""

    @classmethod
    def import_path(cls) -> str:
        """``module:QualName``, how another process finds this class again."""
        return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def schemas(cls) -> list[str]:
        """The schemas holding this projector's tables, sorted."""
        return sorted({validate_live_schema(t.schema, table=t.name) for t in cls.tables})

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {getattr(self, 'name', '?')!r}>"


def check_projector(projector: object) -> Projector:
    """Refuse a projector that zdr could not run, with a message naming what is wrong."""
    if not isinstance(projector, Projector):
        raise UnknownProjector(f"{projector!r} is not a zdr.Projector instance")
    cls = type(projector)
    name = getattr(cls, "name", None)
    validate_key(name, what=f"projection name of {cls.__qualname__}")
    if not cls.tables:
        raise ConfigurationError(f"projector {name!r} declares no tables")
    for table in cls.tables:
        if not isinstance(table, sa.Table):
            raise ConfigurationError(f"projector {name!r}: {table!r} is not a sqlalchemy.Table")
    if cls.partition_by not in PARTITION_KINDS:
        raise ConfigurationError(
            f"projector {name!r}: partition_by must be None or 'stream', got {cls.partition_by!r}"
        )
    cls.check()
    cls.schemas()
    if not cls.event_types:
        raise ConfigurationError(
            f"projector {name!r} handles no event types: mark handlers with @zdr.handles "
            "or set event_types for handle_batch"
        )
    return projector


def load_projector(path: str) -> Projector:
    """Instantiate a projector from its import path ``package.module:ClassName``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        package, _, name = path.rpartition(".")
        hint = f": did you mean '{package}:{name}'?" if package and name else ""
        raise UnknownProjector(
            f"projector path {path!r} must be written module:Class, a colon before the "
            f"class (e.g. 'package.module:ClassName'){hint}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownProjector(
            f"cannot import module {module_name!r} for projector {path!r}: {exc}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            there = projector_classes(module)
            raise UnknownProjector(
                f"module {module_name!r} has no projector {attr!r} ("
                + (f"its projectors: {', '.join(there)}" if there else "it defines none")
                + ")"
            )
    if not (isinstance(target, type) and issubclass(target, Projector)):
        raise UnknownProjector(f"{path!r} is not a zdr.Projector subclass")
    return check_projector(target())


def projector_classes(module: Any) -> list[str]:
    """The names of the concrete Projector subclasses a module defines, for messages."""
    return sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, Projector)
        and value.__module__ == module.__name__
        and getattr(value, "name", None)
        and not name.startswith("_")
    )


def apply_events(
    projector: Projector,
    events: Sequence[RecordedEvent],
    conn: sa.Connection,
    *,
    where: str,
    own_copy: bool = False,
) -> None:
    """Apply the events the projector handles; wrap its failures in a ProjectorError.

    ``where`` names the target in the message (a replay key or "live").
    ``own_copy``: another projector sees these same events after this one, so
    this one gets its own copy of their payloads (whatever it does to
    ``event.data`` or ``event.metadata`` stays with it).
    """
    wanted = projector.event_types
    relevant = [e for e in events if e.type in wanted]
    if not relevant:
        return
    if own_copy:
        relevant = [copy_event(e) for e in relevant]
    first = relevant
    if _may_pipeline(projector):  # a second, unpipelined try gets the events untouched
        first = [copy_event(e) for e in relevant]
    try:
        # In a savepoint (two statements a batch): if the batch fails, it can be tried
        # again event by event to name the event that fails.
        with conn.begin_nested():
            projector.handle_batch(first, conn)
    except ProjectorError:
        raise
    except Exception as exc:
        translate = conn.get_execution_options().get("schema_translate_map") or {}
        written = [translate.get(schema, schema) for schema in projector.schemas()]
        missing = privilege_missing(
            exc, session_role(conn), schemas=written, where=f" while projecting to {where}"
        )
        if missing is not None:  # a grant is missing: configuration, not the projector
            raise missing from exc
        if is_transient(exc):  # the database's failure, not the projector's
            if is_stale_plan(exc):  # a swap changed a table's shape: prepare again
                forget_prepared_statements(conn)
            span = f"events {relevant[0].position}..{relevant[-1].position}"
            raise interrupted(f"projecting {span} to {where}", exc) from exc
        if getattr(exc, "_zdr_pipelined", False):
            try:  # copies: if it fails, the search for the event starts from untouched ones
                _unpipelined(projector, [copy_event(e) for e in relevant], conn)
            except Exception as again:
                if is_transient(again):
                    span = f"events {relevant[0].position}..{relevant[-1].position}"
                    raise interrupted(f"projecting {span} to {where}", again) from again
                culprit = _failing_event(again)
                if culprit is not None:  # the handler's own error, where its statement failed
                    exc = again
            else:
                # Only pipeline mode failed it: a handler reads a statement's result
                # (a generated key, RETURNING). The batch is applied, unpipelined.
                _UNPIPELINED.add(type(projector))
                log.info(
                    "projector %r reads what its statements return (%s): its handlers run "
                    "one statement at a time from now on (set pipelined = False on the "
                    "class to say so)",
                    projector.name,
                    one_line(exc),
                )
                return
        else:
            culprit = _failing_event(exc)
        culprit = culprit or _first_failing(projector, relevant, conn)
        if culprit is not None:
            at = f"event {culprit.position} ({culprit.type}, stream {culprit.stream_id!r})"
            position, event_type = culprit.position, culprit.type
        else:
            at = f"the batch of events {relevant[0].position}..{relevant[-1].position}"
            position, event_type = relevant[0].position, None
        raise ProjectorError(
            f"projector {projector.name!r} failed on {at} while projecting to {where}: "
            f"{one_line(exc)}",
            projector=projector.name,
            position=position,
            event_type=event_type,
        ) from exc


def copy_event(event: RecordedEvent) -> RecordedEvent:
    """The event with payload and metadata of its own (JSON values: dicts, lists, scalars)."""
    return RecordedEvent(
        event.position,
        event.txid,
        event.stream_id,
        event.type,
        _copy_json(event.data),
        _copy_json(event.metadata),
        event.recorded_at,
    )


#: Values shared safely between copies: they cannot be changed in place.
_IMMUTABLE = (str, int, float, bool, type(None))


def _copy_json(value: Any) -> Any:
    """A deep copy of decoded JSON, several times faster than ``copy.deepcopy``."""
    if isinstance(value, dict):
        copied = value.copy()
        for key, item in copied.items():
            if not isinstance(item, _IMMUTABLE):
                copied[key] = _copy_json(item)
        return copied
    if isinstance(value, list):
        return [item if isinstance(item, _IMMUTABLE) else _copy_json(item) for item in value]
    if isinstance(value, _IMMUTABLE):
        return value
    return copy.deepcopy(value)


#: How long the search for the event a failing batch failed on may take (the batch's
#: transaction stays open meanwhile; past it, the message names the batch's range).
DIAGNOSE_BUDGET_S = 5.0


def _first_failing(
    projector: Projector, events: Sequence[RecordedEvent], conn: sa.Connection
) -> RecordedEvent | None:
    """The event a batch fails on: the last of the shortest failing prefix of the batch,
    found by halving (about log2(n) tries, each in a savepoint rolled back), or None if
    the whole batch no longer fails, the transaction cannot take a savepoint, or the
    search runs past ``DIAGNOSE_BUDGET_S``.

    For batch handlers that fail without a loop over ``event`` to read from the
    traceback (a vectorised handler, a bulk statement)."""
    deadline = time.monotonic() + DIAGNOSE_BUDGET_S

    def fails(count: int) -> bool:
        attempt = conn.begin_nested()
        try:
            projector.handle_batch([copy_event(e) for e in events[:count]], conn)
            return False
        except Exception:
            return True
        finally:
            attempt.rollback()

    try:
        if not fails(len(events)):
            return None
        good, bad = 0, len(events)  # events[:good] applies, events[:bad] fails
        while bad - good > 1:
            if time.monotonic() > deadline:
                return None
            middle = (good + bad) // 2
            if fails(middle):
                bad = middle
            else:
                good = middle
        return events[bad - 1]
    except Exception:  # the transaction cannot take a savepoint any more
        return None


#: Projector classes whose batches failed in pipeline mode and applied without it.
_UNPIPELINED: set[type[Projector]] = set()


def _pipelines(cls: type[Projector]) -> bool:
    """Whether the default ``handle_batch`` sends this class's statements pipelined now."""
    return cls.pipelined and cls not in _UNPIPELINED and _PIPELINING.get()


def _may_pipeline(projector: Projector) -> bool:
    """Whether the projector's batch goes through the default, pipelined ``handle_batch``."""
    cls = type(projector)
    return cls.handle_batch is Projector.handle_batch and _pipelines(cls)


def _unpipelined(
    projector: Projector, events: Sequence[RecordedEvent], conn: sa.Connection
) -> None:
    """Apply a batch that failed in pipeline mode again, one statement at a time, in a
    savepoint of its own: kept if it applies; if it fails, the error comes from the
    handler whose statement failed (in pipeline mode the database reports it at a later
    sync, in whichever handler runs then)."""
    token = _PIPELINING.set(False)
    try:
        with conn.begin_nested():
            projector.handle_batch(events, conn)
    finally:
        _PIPELINING.reset(token)


def _failing_event(exc: BaseException) -> RecordedEvent | None:
    """The event a handler was working on when it raised, read from the traceback.

    The innermost frame with a local ``event`` holding a RecordedEvent wins: the
    default ``handle_batch`` and batch handlers that loop ``for event in events``
    both name the exact event this way; otherwise the message names the batch.
    """
    tb = exc.__traceback__
    found = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("event")
        if isinstance(candidate, RecordedEvent):
            found = candidate
        tb = tb.tb_next
    return found


def session_role(conn: sa.Connection) -> str | None:
    """The role a connection logged in as (for messages; no round trip)."""
    try:
        return str(conn.connection.driver_connection.info.user)  # type: ignore[union-attr]
    except Exception:  # a closed connection: the message goes without the name
        return None


def physical_name(conn: sa.Connection, table: sa.Table) -> sql.Identifier:
    """The quoted name of ``table`` in the copy this connection writes to.

    For handlers that bypass SQLAlchemy Core (COPY through
    ``conn.connection.driver_connection``), which ``schema_translate_map`` does
    not reach.
    """
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema = validate_live_schema(table.schema, table=table.name)
    return sql.Identifier(translate.get(schema, schema), table.name)

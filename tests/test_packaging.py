"""The wheel, installed into a fresh virtual environment, is a good citizen.

Build the wheel, install it (with its dependencies) into a new virtual
environment, and check that it adds one top-level name to site-packages, `zdr`
(plus its dist-info), and that `zdr --help` and a small `zdr demo` work from a
folder outside the checkout, with the embedded PostgreSQL, which is stopped
again afterwards. It takes about 45 s here with uv (used when it is on PATH)
and about 60 s with `python -m venv` and pip, both with a warm package cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil

from tests.support import postgres_on, wait_until_gone

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FOLDERS = {"cli", "flows", "tasks", "deployments", "examples"}


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 600)
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
    return result


def install_into_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A new virtual environment with the wheel and its dependencies; returns its python."""
    python = venv / "bin" / "python"
    uv = shutil.which("uv")
    if uv:
        run(uv, "venv", "-q", "--python", sys.executable, venv)
        run(uv, "pip", "install", "-q", "--python", python, wheel)
    else:
        run(sys.executable, "-m", "venv", venv)
        run(python, "-m", "pip", "install", "-q", wheel)
    return python


def test_the_wheel_installs_one_name_and_runs_the_demo_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, ROOT)
    (wheel,) = dist.glob("zero_downtime_replays-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name.split("/")[0] for name in archive.namelist()}
    dist_info = next(n for n in in_wheel if n.endswith(".dist-info"))
    assert in_wheel == {"zdr", dist_info}

    python = install_into_fresh_venv(wheel, tmp_path / "venv")
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
    )
    record = (site / dist_info / "RECORD").read_text().splitlines()
    installed = {line.split(",")[0].split("/")[0] for line in record}
    assert {name for name in installed if name != ".."} == {"zdr", dist_info}  # ..: bin/zdr
    assert not PIPELINE_FOLDERS & {p.name for p in site.iterdir()}

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data_dir = tmp_path / "pg"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"ZDR_DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["ZDR_EMBEDDED_DIR"] = str(data_dir)
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    zdr = python.parent / "zdr"
    try:
        where = run(python, "-c", "import zdr.cli; print(zdr.cli.__file__)", cwd=outside, env=env)
        assert Path(where.stdout.strip()).is_relative_to(site)
        assert "demo" in run(zdr, "--help", cwd=outside, env=env).stdout
        # In the checkout, the checkout's zdr/ comes first on sys.path (prefect deploy, a
        # worker whose working directory is the checkout): every entrypoint of
        # prefect.yaml still loads, from the checkout's own folders.
        entrypoints = [
            line.split("entrypoint:")[1].strip()
            for line in (ROOT / "prefect.yaml").read_text().splitlines()
            if "entrypoint:" in line
        ]
        assert len(entrypoints) >= 7
        loaded = run(
            python,
            "-c",
            "import sys\nfrom prefect.flows import load_flow_from_entrypoint\n"
            "for e in sys.argv[1:]:\n"
            "    f = load_flow_from_entrypoint(e)\n"
            "    print(f.name, sys.modules[f.fn.__module__].__file__)",
            *entrypoints,
            cwd=ROOT,
            env=env,
        ).stdout.splitlines()
        assert len(loaded) == len(entrypoints)
        assert all(Path(line.split()[1]).is_relative_to(ROOT) for line in loaded), loaded
        demo = run(zdr, "demo", "--events", "2000", "--json", "--yes", cwd=outside, env=env)
        summary = json.loads(demo.stdout.strip().splitlines()[-1])
        assert summary["lost"] == 0 and summary["promoted"] is True
        assert (data_dir / "PG_VERSION").exists()
        assert wait_until_gone(data_dir) == [], "the demo left its embedded PostgreSQL running"
    finally:
        for proc in postgres_on(data_dir):  # only ever the server this test started
            proc.terminate()
        psutil.wait_procs(postgres_on(data_dir), timeout=10)

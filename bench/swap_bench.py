"""Swap cost when the live read model carries many grants: promotion and rollback of
the bank's balances with ``--roles`` roles, each given SELECT on the table, UPDATE on
one column and a row-level security policy of its own.

Prints one JSON line (numbers only, no pass/fail):

    python bench/swap_bench.py [--roles 300] [--events 5000] [--clutter 0] [--database-url URL]

``*_swap_ms`` is the swap's transaction (what readers and the live runner can wait
for), ``*_lock_wait_ms`` the part of it spent waiting for the live batch lock,
``*_total_s`` the whole call (baselines, indexes, the first pass of carrying grants
outside the swap lock). Without a URL it runs in a database of its own in the
embedded PostgreSQL; a URL names a database for it alone: the roles
(``zdr_bench_role_<n>``) and the schemas it made are dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zdr  # noqa: E402
from bench.replay_bench import fresh_database  # noqa: E402
from zdr.examples.bank.domain import BankSimulator  # noqa: E402
from zdr.examples.bank.projectors import Balances, BalancesV2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", type=int, default=300)
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument(
        "--clutter", type=int, default=0, help="tables of another schema (a big catalog)"
    )
    parser.add_argument("--database-url")
    args = parser.parse_args()
    engine = sa.create_engine(fresh_database(args.database_url, "zdr_swap_bench"))
    manager = zdr.ReplayManager(engine, projectors=[Balances()], batch_size=5_000)
    manager.setup()
    manager.store.import_events(BankSimulator(seed=7).stream(args.events))
    manager.project_live()
    manager.create_replay("swap_bench", [BalancesV2()])
    manager.start_replay("swap_bench")
    manager.enable_dual_write("swap_bench")
    roles = [f"zdr_bench_role_{n}" for n in range(args.roles)]
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE bank_balances.balances ENABLE ROW LEVEL SECURITY")
        for n, role in enumerate(roles):
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            conn.exec_driver_sql(f"CREATE ROLE {role}")
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA bank_balances TO {role}")
            conn.exec_driver_sql(f"GRANT SELECT ON bank_balances.balances TO {role}")
            conn.exec_driver_sql(f"GRANT UPDATE (owner) ON bank_balances.balances TO {role}")
            conn.exec_driver_sql(
                f"CREATE POLICY p{n} ON bank_balances.balances FOR SELECT TO {role}"
                f" USING (account_id > 'acc-{n:06d}')"
            )
    result: dict[str, float | int] = {
        "roles": args.roles,
        "events": args.events,
        "clutter_tables": args.clutter,
    }
    try:
        _clutter(engine, args.clutter)
        for name, call in [
            ("promote", lambda: manager.promote("swap_bench")),
            ("rollback", lambda: manager.rollback("swap_bench")),
        ]:
            started = time.perf_counter()
            report = call()
            result[f"{name}_total_s"] = round(time.perf_counter() - started, 3)
            result[f"{name}_swap_ms"] = round(report.duration_ms, 1)
            result[f"{name}_lock_wait_ms"] = round(report.lock_wait_ms, 1)
        print(json.dumps(result))
    finally:
        manager.remove_replay("swap_bench")
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA bank_balances, zdr CASCADE")
            for role in roles:
                conn.exec_driver_sql(f"DROP OWNED BY {role}; DROP ROLE {role}")
        _clutter(engine, 0)


def _clutter(engine: sa.Engine, tables: int) -> None:
    """Make ``tables`` tables in schema zdr_bench_clutter (0: drop them), 1,000 a
    transaction (one transaction's locks would not hold them all)."""
    for start in range(0, max(tables, 1), 1_000):
        with engine.begin() as conn:
            if tables:
                conn.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS zdr_bench_clutter")
                conn.exec_driver_sql(
                    f"""DO $$ BEGIN FOR i IN {start}..{min(start + 999, tables - 1)} LOOP
                        EXECUTE 'CREATE TABLE zdr_bench_clutter.t' || i || ' (a int PRIMARY KEY)';
                        END LOOP; END $$"""
                )
    if not tables:
        while True:
            with engine.begin() as conn:
                names = (
                    conn.exec_driver_sql(
                        """SELECT c.relname FROM pg_class c JOIN pg_namespace n
                       ON n.oid = c.relnamespace WHERE n.nspname = 'zdr_bench_clutter'
                       AND c.relkind = 'r' LIMIT 1000"""
                    )
                    .scalars()
                    .all()
                )
                for name in names:
                    conn.exec_driver_sql(f'DROP TABLE zdr_bench_clutter."{name}"')
            if not names:
                break
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS zdr_bench_clutter")


if __name__ == "__main__":
    main()

"""What giving up prepared statements costs the application's appends.

zdr's connections use no prepared statements, so that ``EventStore.append`` works
through a transaction pooler (PgBouncer's ``pool_mode = transaction``), where a
statement prepared in one server session is looked for in another. This times one
client appending one event per transaction, with psycopg's prepared statements off
(zdr's setting) and on (psycopg's default: prepared from the fifth run on), in turns.

Prints one JSON line (numbers only, no pass/fail):

    python bench/appends.py [--appends 5000] [--rounds 2] [--database-url URL]

Without a URL it runs in a database of its own in the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

import zdr  # noqa: E402
from bench.replay_bench import fresh_database  # noqa: E402
from zdr.config import make_engine  # noqa: E402

OPENED = [{"type": "AccountOpened", "data": {"account_id": "a", "owner": "x"}}]


def _timed(url: str, prepare_threshold: int | None, appends: int, tag: str) -> dict[str, Any]:
    engine = make_engine(url)
    if prepare_threshold is not None:  # psycopg's default, on every new connection

        @sa.event.listens_for(engine, "connect")
        def prepare(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.prepare_threshold = prepare_threshold

    store = zdr.EventStore(engine)
    for i in range(300):  # warm: connections made, statements prepared where they are
        store.append(f"warm-{tag}-{i}", OPENED)
    took = []
    started = time.perf_counter()
    for i in range(appends):
        before = time.perf_counter()
        store.append(f"{tag}-{i}", OPENED)
        took.append(time.perf_counter() - before)
    seconds = time.perf_counter() - started
    engine.dispose()
    took.sort()
    return {
        "appends_per_s": round(appends / seconds),
        "median_ms": round(took[len(took) // 2] * 1000, 3),
        "p99_ms": round(took[int(len(took) * 0.99)] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    url = fresh_database(args.database_url, "zdr_bench_appends")
    zdr.EventStore(url).setup()
    off: list[dict[str, Any]] = []
    on: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        off.append(_timed(url, None, args.appends, f"off{round_}"))
        on.append(_timed(url, 5, args.appends, f"on{round_}"))

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return min(runs, key=lambda r: r["median_ms"])

    without, with_ = best(off), best(on)
    print(
        json.dumps(
            {
                "appends": args.appends,
                "without_prepared": without,
                "with_prepared": with_,
                "cost_per_append_ms": round(without["median_ms"] - with_["median_ms"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()

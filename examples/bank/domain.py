"""The bank's events, a deterministic generator of them, and the from-scratch fold.

The fold is the reference the tests and the demo compare read models with: it is
what the balances table must hold after every event was applied exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

OPENED = "AccountOpened"
DEPOSITED = "MoneyDeposited"
WITHDRAWN = "MoneyWithdrawn"
CLOSED = "AccountClosed"
EVENT_TYPES = (OPENED, DEPOSITED, WITHDRAWN, CLOSED)

Event = dict[str, Any]


@dataclass
class BankSimulator:
    """Produces a plausible stream of bank events, reproducible from ``seed``."""

    accounts: int = 1_000
    seed: int = 7
    prefix: str = "acc"
    _rng: random.Random = field(init=False)
    _balances: dict[str, int] = field(init=False, default_factory=dict)
    _open: list[str] = field(init=False, default_factory=list)
    _opened: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def events(self, n: int) -> list[tuple[str, Event]]:
        """The next ``n`` events as (stream_id, event) pairs."""
        return list(self.stream(n))

    def stream(self, n: int) -> Iterator[tuple[str, Event]]:
        """The next ``n`` events, one at a time (for seeding millions without holding them)."""
        for _ in range(n):
            yield self._next()

    def _next(self) -> tuple[str, Event]:
        rng = self._rng
        if self._opened < self.accounts and (not self._open or rng.random() < 0.05):
            self._opened += 1
            account = f"{self.prefix}-{self._opened:06d}"
            self._balances[account] = 0
            self._open.append(account)
            owner = rng.choice(["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal"])
            return account, {"type": OPENED, "data": {"account_id": account, "owner": owner}}
        index = rng.randrange(len(self._open))
        account = self._open[index]
        roll = rng.random()
        if roll < 0.002 and len(self._open) > 1:
            self._open[index] = self._open[-1]
            self._open.pop()
            return account, {"type": CLOSED, "data": {"account_id": account}}
        if roll < 0.35 and self._balances[account] > 0:
            amount = rng.randint(1, self._balances[account])
            self._balances[account] -= amount
            return account, {"type": WITHDRAWN, "data": {"account_id": account, "amount": amount}}
        amount = rng.randint(1, 500)
        self._balances[account] += amount
        return account, {"type": DEPOSITED, "data": {"account_id": account, "amount": amount}}


def in_chunks(
    append: Callable[[list[tuple[str, Event]]], Sized],
    events: Iterable[tuple[str, Event]],
    chunk: int,
) -> int:
    """Hand ``events`` to ``append`` ``chunk`` at a time; return how many it took."""
    count = 0
    pending: list[tuple[str, Event]] = []
    for pair in events:
        pending.append(pair)
        if len(pending) == chunk:
            count += len(append(pending))
            pending = []
    if pending:
        count += len(append(pending))
    return count


def fold_balances(events: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Balances as a from-scratch fold of recorded events (objects with .type and .data)."""
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        data = event.data
        account = data.get("account_id")
        if event.type not in EVENT_TYPES:
            continue
        row = rows.setdefault(
            account,
            {"owner": None, "balance": 0, "events": 0, "closed": False, "deposits": 0},
        )
        row["events"] += 1
        if event.type == OPENED:
            row["owner"] = data["owner"]
        elif event.type == DEPOSITED:
            row["balance"] += data["amount"]
            row["deposits"] += 1
        elif event.type == WITHDRAWN:
            row["balance"] -= data["amount"]
        else:
            row["closed"] = True
    return rows


def fold_daily_totals(events: Iterable[Any]) -> dict[Any, dict[str, int]]:
    """Daily totals as a from-scratch fold, keyed by the UTC day events were recorded."""
    days: dict[Any, dict[str, int]] = {}
    for event in events:
        if event.type not in EVENT_TYPES:
            continue
        totals = days.setdefault(
            event.recorded_at.date(), {"opened": 0, "closed": 0, "deposited": 0, "withdrawn": 0}
        )
        if event.type == OPENED:
            totals["opened"] += 1
        elif event.type == CLOSED:
            totals["closed"] += 1
        elif event.type == DEPOSITED:
            totals["deposited"] += event.data["amount"]
        else:
            totals["withdrawn"] += event.data["amount"]
    return days

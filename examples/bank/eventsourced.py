"""The bank as an ``eventsourcing`` application, read by ``zdr.readers.EventsourcingReader``.

The event classes carry the bank's event names (``AccountOpened``...) and fields,
so the bank's projectors read this log unchanged: an EventsourcingReader makes the
class's qualified name the event's type and its attributes the event's data.

``reader`` is a zero-argument factory for ``--reader zdr.examples.bank.eventsourced:reader``
(it reads ``ZDR_DATABASE_URL``); ``BankLog`` writes the simulator's events through
the application's own recorder (its table lock included), as ``Bank.save`` would.
"""

from __future__ import annotations

import atexit
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from zdr.config import DATABASE_URL_ENV, to_sqlalchemy_url
from zdr.errors import ConfigurationError
from zdr.examples.bank.domain import CLOSED, DEPOSITED, OPENED, WITHDRAWN, in_chunks
from zdr.readers import EventsourcingReader, postgres_env

#: The schema the application's table (``bank_events``) lives in.
SCHEMA = "bank_es"
#: Aggregate ids from account ids, the same in every run.
_NAMESPACE = uuid.UUID("6f1c9a52-4d0e-4b8f-9b1e-2a7c3d5e8f10")


class Account(Aggregate):
    """A bank account: what the application's repository says about it."""

    def __init__(self, account_id: str, owner: str) -> None:
        self.account_id = account_id
        self.owner = owner
        self.balance = 0
        self.events = 1
        self.closed = False

    def deposit(self, amount: int) -> None:
        self.trigger_event(MoneyDeposited, account_id=self.account_id, amount=amount)

    def withdraw(self, amount: int) -> None:
        self.trigger_event(MoneyWithdrawn, account_id=self.account_id, amount=amount)

    def close(self) -> None:
        self.trigger_event(AccountClosed, account_id=self.account_id)


class AccountOpened(Account.Created):
    account_id: str
    owner: str


class MoneyDeposited(Account.Event):
    account_id: str
    amount: int

    def apply(self, aggregate: Any) -> None:
        aggregate.balance += self.amount
        aggregate.events += 1


class MoneyWithdrawn(Account.Event):
    account_id: str
    amount: int

    def apply(self, aggregate: Any) -> None:
        aggregate.balance -= self.amount
        aggregate.events += 1


class AccountClosed(Account.Event):
    account_id: str

    def apply(self, aggregate: Any) -> None:
        aggregate.closed = True
        aggregate.events += 1


class Bank(Application):
    """The bank's application: its events go to ``bank_es.bank_events``."""

    def open_account(self, account_id: str, owner: str) -> uuid.UUID:
        account = Account._create(
            AccountOpened, id=account_uuid(account_id), account_id=account_id, owner=owner
        )
        self.save(account)
        return account.id


def account_uuid(account_id: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, account_id)


def bank_app(database_url: str, *, schema: str = SCHEMA) -> Bank:
    """The Bank persisted with ``eventsourcing.postgres`` in the database at ``database_url``
    (the schema is created if missing: eventsourcing creates only its table)."""
    engine = sa.create_engine(to_sqlalchemy_url(database_url))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        engine.dispose()
    return Bank(env=postgres_env(database_url, schema=schema))


def reader() -> EventsourcingReader:
    """``--reader zdr.examples.bank.eventsourced:reader``: the Bank of ZDR_DATABASE_URL."""
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigurationError(
            f"zdr.examples.bank.eventsourced:reader reads the database from {DATABASE_URL_ENV}"
        )
    app = bank_app(url)
    atexit.register(app.close)  # its connection pool, before the interpreter tears down
    return EventsourcingReader(app)


class BankLog:
    """Writes (account id, event) pairs of ``BankSimulator`` to the Bank's table through
    its recorder: mapped by the application's mapper, inserted under its table lock."""

    def __init__(self, app: Bank) -> None:
        self.app = app
        self._versions: dict[str, int] = {}
        self._topic = get_topic(Account)

    def append(self, events: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Insert the events in one transaction; return their notification ids."""
        stored = [self.app.mapper.to_stored_event(e) for e in self.domain_events(events)]
        ids = self.app.recorder.insert_events(stored)
        return list(ids or [])

    def import_events(self, events: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Insert many events, 500 a transaction; return the count. (The recorder sends a
        save in psycopg's pipeline mode; over a Unix socket, as to the embedded PostgreSQL,
        one of 5,000 events never returned.)"""
        return in_chunks(self.append, events, 500)

    def domain_events(self, events: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        made = []
        for account, event in events:
            version = self._versions.get(account, 0) + 1
            self._versions[account] = version
            data = event["data"]
            common = {
                "originator_id": account_uuid(account),
                "originator_version": version,
                "timestamp": Account.Event.create_timestamp(),
                "account_id": account,
            }
            kind = event["type"]
            if kind == OPENED:
                made.append(
                    AccountOpened(originator_topic=self._topic, owner=data["owner"], **common)
                )
            elif kind == DEPOSITED:
                made.append(MoneyDeposited(amount=data["amount"], **common))
            elif kind == WITHDRAWN:
                made.append(MoneyWithdrawn(amount=data["amount"], **common))
            elif kind == CLOSED:
                made.append(AccountClosed(**common))
            else:
                raise ValueError(f"not a bank event: {kind!r}")
        return made

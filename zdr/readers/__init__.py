"""Readers of event logs zdr does not own: pass one as ``ReplayManager(url, reader=...)``.

* ``TableReader``: any event table with a position, a stream id, a type and a JSON
  payload (a Laravel-era ``stored_events``, say), once ``prepare`` has stamped it;
* ``EventsourcingReader``: the notifications of an ``eventsourcing`` application
  persisted in PostgreSQL (the ``eventsourcing`` extra).

zdr's own ``zdr.EventStore`` is the default. The pipeline, the CLI and the
deployments name a reader by import path (``load``). zdr's own tables stay in the
``zdr`` schema of the same database.
"""

from zdr.readers.eventsourcing import EventsourcingReader, postgres_env
from zdr.readers.loading import load
from zdr.readers.table import TableReader

__all__ = ["EventsourcingReader", "TableReader", "load", "postgres_env"]

"""A projector of the benchmark's: defined in a module of its own so that zdr can record
it by import path (``bench.unindexed:UnindexedHistory``)."""

import sqlalchemy as sa

from zdr.examples.bank.projectors import History, history


class UnindexedHistory(History):
    """History whose replay copy gets its secondary index only after the replay."""

    tables = [
        sa.Table(
            history.name, sa.MetaData(), *(c.copy() for c in history.columns), schema=history.schema
        )
    ]

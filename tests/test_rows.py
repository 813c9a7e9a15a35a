"""Row projectors: per-event Python on rows, written a batch at a time, exactly once."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

import zdr

metadata = sa.MetaData()
loans = sa.Table(
    "loans",
    metadata,
    sa.Column("book_id", sa.Text, primary_key=True),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("times_lent", sa.Integer, nullable=False, default=0),
    sa.Column("on_loan", sa.Boolean, nullable=False, default=False),
    schema="rows_loans",
)
shelves = sa.Table(
    "shelves",
    metadata,
    sa.Column("library", sa.Text, primary_key=True),
    sa.Column("shelf", sa.Integer, primary_key=True),
    sa.Column("books", postgresql.JSONB, nullable=False, default=[]),
    schema="rows_shelves",
)


class Loans(zdr.RowProjector):
    name = "loans"
    table = loans

    @zdr.handles("BookAdded")
    def added(self, row, event):
        row["title"] = event.data["title"]

    @zdr.handles("BookLent")
    def lent(self, row, event):
        if row.new:  # a book nobody added: no row for it
            row.delete()
            return
        row["times_lent"] += 1
        row["on_loan"] = True

    @zdr.handles("BookReturned")
    def returned(self, row, event):
        if row.new:
            row.delete()
            return
        row["on_loan"] = False

    @zdr.handles("BookRemoved")
    def removed(self, row, event):
        row.delete()


class Shelves(zdr.RowProjector):
    """A key of two columns, and a JSON value changed in place."""

    name = "shelves"
    table = shelves

    def key(self, event):
        return (event.data["library"], event.data["shelf"])

    @zdr.handles("Shelved")
    def shelved(self, row, event):
        row["books"].append(event.data["book"])


def fold_loans(events) -> dict[str, tuple]:
    """What the loans table must hold: the same rules as a plain fold, one event at a time."""
    rows: dict[str, dict] = {}
    for e in events:
        if e.type == "BookAdded":
            row = rows.setdefault(e.stream_id, {"times_lent": 0, "on_loan": False})
            row["title"] = e.data["title"]
        elif e.type == "BookLent" and e.stream_id in rows:
            rows[e.stream_id]["times_lent"] += 1
            rows[e.stream_id]["on_loan"] = True
        elif e.type == "BookReturned" and e.stream_id in rows:
            rows[e.stream_id]["on_loan"] = False
        elif e.type == "BookRemoved":
            rows.pop(e.stream_id, None)
    return {k: (v["title"], v["times_lent"], v["on_loan"]) for k, v in rows.items()}


def library_events(count: int, seed: int = 3) -> list[tuple[str, dict]]:
    """Books added, lent, returned, removed and added again, in random order per book."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        book = f"book-{rng.randrange(60)}"
        kind = rng.choices(["BookAdded", "BookLent", "BookReturned", "BookRemoved"], [2, 5, 4, 1])[
            0
        ]
        data = {"title": f"Title {rng.randrange(1000)}"} if kind == "BookAdded" else {}
        pairs.append((book, {"type": kind, "data": data}))
    return pairs


def stored_loans(engine, schema: str = "rows_loans") -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f'SELECT book_id, title, times_lent, on_loan FROM "{schema}".loans'
        ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


@pytest.mark.parametrize("batch_size", [1, 7, 5_000])
def test_a_row_projector_equals_the_fold_of_every_event_live_and_replayed(engine, batch_size):
    """Creation, changes, deletion and re-creation of one key inside one batch or across
    batches: the table equals a plain event-by-event fold, live and in a replay."""
    manager = zdr.ReplayManager(engine, projectors=[Loans()], batch_size=batch_size)
    manager.setup()
    manager.store.import_events(library_events(1_500))
    manager.project_live()
    expected = fold_loans(manager.store.iter_all())
    assert stored_loans(engine) == expected
    assert len(expected) > 10

    manager.create_replay("again", ["loans"])
    manager.start_replay("again", batch_size=batch_size)
    [schema] = manager.get_replay("again").schemas.values()
    assert stored_loans(engine, schema) == expected
    assert manager.verify("again").equal


def test_a_key_of_two_columns_and_json_changed_in_place(engine):
    manager = zdr.ReplayManager(engine, projectors=[Shelves()], batch_size=4)
    manager.setup()
    events = [
        ("s", {"type": "Shelved", "data": {"library": lib, "shelf": n % 3, "book": f"b{n}"}})
        for n, lib in enumerate(["north", "south"] * 10)
    ]
    manager.store.import_events(events)
    manager.project_live()
    with engine.connect() as conn:
        found = {
            (lib, shelf): books
            for lib, shelf, books in conn.exec_driver_sql(
                "SELECT library, shelf, books FROM rows_shelves.shelves"
            )
        }
    expected: dict[tuple, list] = {}
    for _, event in events:
        d = event["data"]
        expected.setdefault((d["library"], d["shelf"]), []).append(d["book"])
    assert found == expected


def test_unchanged_rows_are_not_written_again(engine):
    manager = zdr.ReplayManager(engine, projectors=[Loans()])
    manager.setup()
    manager.store.append("b1", [{"type": "BookAdded", "data": {"title": "Dune"}}])
    manager.store.append("b2", [{"type": "BookAdded", "data": {"title": "Emma"}}])
    manager.project_live()

    def versions():
        with engine.connect() as conn:
            query = "SELECT book_id, xmin::text FROM rows_loans.loans"
            return {book: version for book, version in conn.exec_driver_sql(query)}

    before = versions()
    manager.store.append("b1", [{"type": "BookReturned", "data": {}}])  # already returned
    manager.store.append("b2", [{"type": "BookLent", "data": {}}])
    manager.project_live()
    after = versions()
    assert after["b1"] == before["b1"] and after["b2"] != before["b2"]


class FailingLoans(Loans):
    @zdr.handles("BookLent")
    def lent(self, row, event):
        if event.stream_id == "b-bad":
            raise ValueError("no such reader")
        super().lent(row, event)


def test_a_handler_that_raises_names_its_event_and_nothing_is_written(engine):
    manager = zdr.ReplayManager(engine, projectors=[FailingLoans()])
    manager.setup()
    manager.store.append("b-ok", [{"type": "BookAdded", "data": {"title": "Dune"}}])
    [bad] = manager.store.append("b-bad", [{"type": "BookLent", "data": {}}])
    with pytest.raises(zdr.ProjectorError, match=rf"event {bad} \(BookLent, stream 'b-bad'\)"):
        manager.project_live()
    assert stored_loans(engine) == {}


class IntKeyLoans(Loans):
    def key(self, event):
        return int(event.stream_id)


class UnknownColumnLoans(Loans):
    @zdr.handles("BookAdded")
    def added(self, row, event):
        row["titel"] = event.data["title"]


def test_keys_of_another_type_or_unknown_columns_are_refused_not_overwritten(engine):
    """A key of the wrong type would make a stored row look new, and be overwritten."""
    manager = zdr.ReplayManager(engine, projectors=[Loans()])
    manager.setup()
    manager.store.append("7", [{"type": "BookAdded", "data": {"title": "Dune"}}])
    manager.store.append("7", [{"type": "BookLent", "data": {}}])
    manager.project_live()
    before = stored_loans(engine)
    manager.store.append("7", [{"type": "BookReturned", "data": {}}])
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE zdr.projections SET projector = %s", (_path(IntKeyLoans),))
    with pytest.raises(zdr.ProjectorError, match="key\\(\\) returned keys the table stores"):
        zdr.ReplayManager(engine, projectors=[IntKeyLoans()]).project_live()
    assert stored_loans(engine) == before

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE zdr.projections SET projector = %s", (_path(UnknownColumnLoans),)
        )
    manager.store.append("8", [{"type": "BookAdded", "data": {"title": "Emma"}}])
    with pytest.raises(zdr.ProjectorError, match="set titel, not a column of rows_loans.loans"):
        zdr.ReplayManager(engine, projectors=[UnknownColumnLoans()]).project_live()
    assert stored_loans(engine) == before


def _path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (sa.Column("n", sa.Integer, server_default="0"), "has a server_default"),
        (sa.Column("n", sa.Integer, default=lambda: 0), "default that is computed"),
    ],
)
def test_columns_zdr_cannot_fill_are_refused_when_registered(engine, column, message):
    table = sa.Table(
        "t", sa.MetaData(), sa.Column("k", sa.Text, primary_key=True), column, schema="rows_t"
    )

    class WithDefault(zdr.RowProjector):
        name = "t"

        @zdr.handles("X")
        def x(self, row, event):
            pass

    WithDefault.table = table
    WithDefault.tables = [table]
    with pytest.raises(zdr.ConfigurationError, match=message):
        zdr.ReplayManager(engine, projectors=[WithDefault()])


def test_a_table_without_a_primary_key_is_refused(engine):
    table = sa.Table("t", sa.MetaData(), sa.Column("k", sa.Text), schema="rows_t")

    class NoKey(zdr.RowProjector):
        name = "t"
        tables = [table]

        @zdr.handles("X")
        def x(self, row, event):
            pass

    NoKey.table = table
    with pytest.raises(zdr.ConfigurationError, match="has no primary key"):
        zdr.ReplayManager(engine, projectors=[NoKey()])


wide = sa.Table(
    "wide",
    sa.MetaData(),
    sa.Column("code", sa.CHAR(4), primary_key=True),
    sa.Column("amount", sa.Numeric(38, 18), nullable=False, default=0),
    sa.Column("total", sa.Numeric(), nullable=False, default=0),
    schema="rows_wide",
)


class Wide(zdr.RowProjector):
    """A char(4) key, a numeric wider than Python's default decimal context (28 digits)
    and an unconstrained numeric a handler adds integers to."""

    name = "wide"
    table = wide

    def key(self, event):
        return event.data["code"]

    @zdr.handles("Paid")
    def paid(self, row, event):
        row["amount"] += Decimal(event.data["amount"])
        row["total"] += 1


def test_wide_numerics_char_keys_and_bare_numerics_give_the_same_rows_live_and_replayed(engine):
    store = zdr.EventStore(engine)
    store.setup()
    for code in ("ab", "xyz", "ab", "ab", "xyz"):
        store.append(code, [{"type": "Paid", "data": {"code": code, "amount": "12345678901.5"}}])
    manager = zdr.ReplayManager(engine, projectors=[Wide()])
    manager.setup()
    manager.project_live(batch_size=1)
    manager.create_replay("wide", ["wide"])
    manager.start_replay("wide")
    want = {
        "ab  ": (Decimal("37037036704.5"), Decimal(3)),
        "xyz ": (Decimal("24691357803.0"), Decimal(2)),
    }
    for schema in ("rows_wide", manager.get_replay("wide").schemas["rows_wide"]):
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f'SELECT code, amount, total FROM "{schema}".wide').all()
        assert {code: (amount, total) for code, amount, total in rows} == want, schema


def test_a_real_column_is_kept_as_postgresql_reads_it_back(engine):
    """What a row holds of a float in a real column is what PostgreSQL prints for it (its
    shortest text), ties between two shortest candidates included (451705202.89...)."""
    from zdr.rows import _real

    picks = random.Random(5)
    values = [picks.uniform(-1e9, 1e9) for _ in range(2_000)]
    values += [picks.uniform(-1, 1) for _ in range(2_000)] + [451705202.89303035, 1e-40]
    with engine.connect() as conn:
        printed = conn.exec_driver_sql(
            "SELECT (x::float4)::text FROM unnest(%s::float8[]) WITH ORDINALITY AS t(x, i) "
            "ORDER BY i",
            (values,),
        ).scalars()
        want = [float(text) for text in printed]
    assert [_real(v) for v in values] == want

"""Giving a new copy of a schema exactly the privileges the live copy has.

Exactly: every grant on the live schema, its relations and their columns, with
its grantor and grant option, and nothing more (what the copy has beyond them is
revoked), including what an owner revoked from itself. A grant that a role made
with its grant option is made again by that role (``SET LOCAL ROLE``), so the
role's ``REVOKE`` still works after the swap; chains of such grants go in order.

Objects whose grants already agree are left alone: the pass inside the swap,
after one before it, changes only what changed in between, so the swap stays
short however many roles there are. Afterwards the grants are compared again:
what could not be made exactly refuses the swap, naming the object.

Role names come from the catalog as ``regrole`` prints them (quoted where needed),
never from input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from psycopg import sql

from zdr.errors import DependentObjects

_GRANTEE = "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END"

#: Every object of a schema that has grants: (relation, column, kind, owner); the
#: schema itself is ("", ""), a table's own grants have column "".
_OBJECTS = """
SELECT '', '', 'SCHEMA', nspowner::regrole::text FROM pg_namespace WHERE nspname = %(schema)s
UNION ALL
SELECT c.relname, '', CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
       c.relowner::regrole::text
FROM pg_class c
WHERE c.oid = ANY(%(rels)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
UNION ALL
SELECT c.relname, att.attname, 'TABLE', c.relowner::regrole::text
FROM pg_class c
JOIN pg_attribute att ON att.attrelid = c.oid AND att.attnum > 0 AND NOT att.attisdropped
WHERE c.oid = ANY(%(rels)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""

#: Every grant of a schema: (relation, column, grantor, grantee, privilege, grantable).
_GRANTS = f"""
WITH nsp AS (SELECT oid, nspowner, nspacl FROM pg_namespace WHERE nspname = %(schema)s)
SELECT '', '', a.grantor::regrole::text, {_GRANTEE}, a.privilege_type, a.is_grantable
FROM nsp, aclexplode(coalesce(nsp.nspacl, acldefault('n', nsp.nspowner))) a
UNION ALL
SELECT c.relname, '', a.grantor::regrole::text, {_GRANTEE}, a.privilege_type, a.is_grantable
FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault(
         (CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::"char", c.relowner))) a
WHERE c.oid = ANY(%(rels)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
UNION ALL
SELECT c.relname, att.attname, a.grantor::regrole::text, {_GRANTEE}, a.privilege_type,
       a.is_grantable
FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid
     AND att.attnum > 0 AND NOT att.attisdropped AND att.attacl IS NOT NULL,
     aclexplode(att.attacl) a
WHERE c.oid = ANY(%(rels)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""

Object = tuple[str, str]


@dataclass(frozen=True)
class Grant:
    grantor: str
    grantee: str
    privilege: str
    grantable: bool


@dataclass(frozen=True)
class _Statement:
    on: Object
    grantor: str
    grantees: tuple[str, ...]
    privileges: tuple[str, ...]
    grantable: bool


def carry(
    conn: sa.Connection, live: str, side: str, *, schema: bool, rels: dict[str, list[int]]
) -> None:
    """Make the grants on the objects of ``side`` what they are on the objects of the same
    names in ``live`` (their owners carried already); DependentObjects if they cannot be.

    ``schema``: the schema's own grants (first: an owner or a grantor of a table needs
    them to name it), else its relations' and their columns'. ``rels``: each schema's
    relations (``relations``), looked up once by the caller.
    """
    objects = {
        on: kind_owner
        for on, *kind_owner in _objects(conn, side, rels)
        if (on == ("", "")) == schema
    }
    live_objects = {on for on, *_ in _objects(conn, live, rels)}
    wanted, have = _grants(conn, live, rels), _grants(conn, side, rels)
    differ = {
        on for on in objects if on in live_objects and wanted.get(on, set()) != have.get(on, set())
    }
    # REVOKE on a table takes the same privileges off its columns: they are given again.
    tables = {relation for relation, column in differ if not column}
    changing = sorted(
        on for on in objects if on in live_objects and (on in differ or on[0] in tables)
    )
    if not changing:
        return

    def target(on: Object) -> sql.Composable:
        kind, _ = objects[on]
        column = sql.SQL(" ({})").format(sql.Identifier(on[1])) if on[1] else sql.SQL("")
        name = sql.Identifier(side, on[0]) if on[0] else sql.Identifier(side)
        return sql.SQL("{} ON {} {}").format(column, sql.SQL(kind), name)

    def run(statement: sql.Composable) -> None:
        conn.exec_driver_sql(statement.as_string(conn.connection.driver_connection))

    owners = {on: owner for on, (_, owner) in objects.items()}
    # The schema first (a grantor acting below needs USAGE on it), the owners' own
    # privileges last (an owner that lost USAGE on the schema could not name its tables).
    changing.sort(key=lambda on: on != ("", ""))
    for on in changing:
        others = sorted({g.grantee for g in have.get(on, ()) if g.grantee != owners[on]})
        if others:
            run(sql.SQL("REVOKE ALL{} FROM {} CASCADE").format(target(on), _roles(others)))
    for statement in _in_order(changing, wanted, owners):
        if statement.grantees == (owners[statement.on],):
            continue  # below
        acting = statement.grantor != owners[statement.on]
        if acting:
            run(sql.SQL("SET LOCAL ROLE {}").format(sql.SQL(statement.grantor)))
        run(
            sql.SQL("GRANT {}{} TO {}{}").format(
                sql.SQL(", ").join(map(sql.SQL, statement.privileges)),
                target(statement.on),
                _roles(g for g in statement.grantees if g != owners[statement.on]),
                sql.SQL(" WITH GRANT OPTION" if statement.grantable else ""),
            )
        )
        if acting:
            run(sql.SQL("RESET ROLE"))
    for on in reversed(changing):
        own = {g.privilege for g in wanted.get(on, ()) if g.grantee == owners[on]}
        if own != {g.privilege for g in have.get(on, ()) if g.grantee == owners[on]}:
            run(sql.SQL("REVOKE ALL{} FROM {}").format(target(on), _roles([owners[on]])))
            if own:
                run(
                    sql.SQL("GRANT {}{} TO {}").format(
                        sql.SQL(", ").join(map(sql.SQL, sorted(own))),
                        target(on),
                        _roles([owners[on]]),
                    )
                )
    after = _grants(conn, side, rels)
    wrong = [on for on in changing if after.get(on, set()) != wanted.get(on, set())]
    if wrong:
        raise DependentObjects(
            "the new copy cannot be given the grants the live copy has on "
            + ", ".join(_named(live, on) for on in wrong)
            + ": a grantor no longer holds its grant option, or zdr's role is not a member "
            "of a grantor (GRANT grantor TO zdr_role)"
        )


def relations(conn: sa.Connection, schema: str) -> list[int]:
    """The OIDs of every relation of ``schema``: filtering the catalog by them uses its
    indexes, where filtering pg_class by namespace reads all of it (a big catalog)."""
    return list(
        conn.exec_driver_sql(
            """SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s""",
            (schema,),
        ).scalars()
    )


def _objects(
    conn: sa.Connection, schema: str, rels: dict[str, list[int]]
) -> list[tuple[Object, str, str]]:
    rows = conn.exec_driver_sql(_OBJECTS, {"schema": schema, "rels": rels[schema]}).all()
    return [((rel, col), kind, owner) for rel, col, kind, owner in rows]


def _grants(
    conn: sa.Connection, schema: str, rels: dict[str, list[int]]
) -> dict[Object, set[Grant]]:
    found: dict[Object, set[Grant]] = defaultdict(set)
    for rel, col, *grant in conn.exec_driver_sql(
        _GRANTS, {"schema": schema, "rels": rels[schema]}
    ).all():
        found[(rel, col)].add(Grant(*grant))
    return found


def _in_order(
    changing: Iterable[Object], wanted: dict[Object, set[Grant]], owners: dict[Object, str]
) -> list[_Statement]:
    """GRANT statements (one per object, grantor, grant option and set of privileges,
    to all its grantees), each after the grants that give its grantor the grant option."""
    by_grantee: dict[tuple[Object, str, bool, str], set[str]] = defaultdict(set)
    for on in changing:
        for g in wanted.get(on, ()):
            # An owner's grant options are its own: they cannot be granted to it.
            grantable = g.grantable and g.grantee != owners[on]
            by_grantee[(on, g.grantor, grantable, g.grantee)].add(g.privilege)
    grouped: dict[tuple[Object, str, bool, tuple[str, ...]], list[str]] = defaultdict(list)
    for (on, grantor, grantable, grantee), privileges in by_grantee.items():
        grouped[(on, grantor, grantable, tuple(sorted(privileges)))].append(grantee)
    pending = [
        _Statement(on, grantor, tuple(sorted(grantees)), privileges, grantable)
        for (on, grantor, grantable, privileges), grantees in sorted(grouped.items())
    ]
    ordered: list[_Statement] = []
    held: set[tuple[Object, str, str]] = set()  # (object, role, privilege) with grant option
    while pending:
        ready = [s for s in pending if _may_grant(s, owners, held)] or pending  # else: refused
        for s in ready:
            ordered.append(s)
            if s.grantable:
                held |= {(s.on, grantee, p) for grantee in s.grantees for p in s.privileges}
        pending = [s for s in pending if s not in ready]
    return ordered


def _may_grant(
    s: _Statement, owners: dict[Object, str], held: set[tuple[Object, str, str]]
) -> bool:
    if s.grantor == owners[s.on]:
        return True
    table = (s.on[0], "")
    return all((s.on, s.grantor, p) in held or (table, s.grantor, p) in held for p in s.privileges)


def _roles(names: Iterable[str]) -> sql.Composable:
    """Grantees as the catalog prints them: PUBLIC, or regrole's (quoted) text."""
    return sql.SQL(", ").join(sql.SQL(name) for name in names)


def _named(schema: str, on: Object) -> str:
    relation, column = on
    if not relation:
        return f"schema {schema}"
    return f"{schema}.{relation}" + (f" column {column}" if column else "")

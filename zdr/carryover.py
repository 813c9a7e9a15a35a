"""What the live copy of a read model has beyond zdr's tables, given to the copy that
replaces it, or the swap refused.

A promotion (and a rollback) exchanges schema names: the new copy arrives under
the live schema's name with only what zdr created on it. Readers rely on more:
the owner, grants (to PUBLIC, to roles, on columns), default privileges,
row-level security and its policies, indexes a DBA added, comments and storage
options. This module decides, per kind, and never drops silently:

* **carried** in the swap's transaction (``carry``): owners, grants (exactly the
  live copy's: what the new copy has beyond them is revoked), column grants,
  default privileges, row-level security and its policies, comments, storage
  options. **Indexes** a DBA added are built on the new copy *before* the swap,
  ``CONCURRENTLY`` so dual write goes on (``build_indexes``); the swap checks
  they are there.
* **refused**, naming each object and what to do (``refusals``): triggers,
  rules, constraints and columns added to the live tables, tables, views and
  sequences added to the live schema, functions, types and every other object
  in it, publications that name the live tables or schema, and objects outside
  that point at the tables by OID (views, foreign keys). None of these can be
  carried faithfully: a trigger would fire again for events it already saw, a
  function or view would keep pointing at the old copy.

What "added" means is measured, not guessed: ``baseline`` creates the live
projectors' tables in a scratch schema inside a transaction it rolls back, and
whatever the live schema has beyond that baseline was put there by someone
else. So a new version that drops a table, or a rollback of one that added a
table, is a change of the projector's, not something dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psycopg.errors
import sqlalchemy as sa
from psycopg import sql

from zdr import targets
from zdr.errors import DependentObjects
from zdr.projector import Projector

#: The scratch schema of ``baseline``: a name no replay or projection can have.
BASELINE_SCHEMA = "zdr$baseline"

#: Per kind of object in a schema: (catalog query giving identity and definition).
#: Definitions have the schema's own qualification removed, so copies compare equal.
_INVENTORY = {
    "relation": """
        SELECT c.relname, c.relkind::text FROM pg_class c
        WHERE c.relnamespace = %(nsp)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
        UNION ALL
        SELECT c.relname, 'S' FROM pg_class c
        WHERE c.relnamespace = %(nsp)s AND c.relkind = 'S' AND NOT EXISTS (
            SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
            AND d.objid = c.oid AND d.deptype IN ('a', 'i'))""",
    "column": """
        SELECT c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE c.relnamespace = %(nsp)s AND c.relkind IN ('r', 'p') AND a.attnum > 0
          AND NOT a.attisdropped""",
    "index": """
        SELECT c.relname || '.' || i.relname,
               pg_get_indexdef(x.indexrelid) || CASE WHEN x.indisvalid THEN '' ELSE ' INVALID' END
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class c ON c.oid = x.indrelid
        WHERE c.relnamespace = %(nsp)s
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid
                          AND k.conrelid = x.indrelid)""",
    "constraint": """
        SELECT c.relname || '.' || k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE c.relnamespace = %(nsp)s AND k.contype <> 'n'""",
    "trigger": """
        SELECT c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = %(nsp)s AND NOT t.tgisinternal""",
    "rule": """
        SELECT c.relname || '.' || r.rulename, pg_get_ruledef(r.oid)
        FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
        WHERE c.relnamespace = %(nsp)s AND r.rulename <> '_RETURN'""",
    "function": """
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               p.prokind::text
        FROM pg_proc p WHERE p.pronamespace = %(nsp)s""",
    "type": """
        SELECT t.typname, t.typtype::text FROM pg_type t
        WHERE t.typnamespace = %(nsp)s AND t.typtype IN ('b', 'd', 'e', 'r', 'm')
          AND NOT (t.typcategory = 'A' AND t.typelem <> 0)""",
    "operator": """SELECT o.oprname || '(' || o.oprleft::regtype || ',' || o.oprright::regtype
                   || ')', '' FROM pg_operator o WHERE o.oprnamespace = %(nsp)s""",
    "operator class": "SELECT opcname, '' FROM pg_opclass WHERE opcnamespace = %(nsp)s",
    "operator family": "SELECT opfname, '' FROM pg_opfamily WHERE opfnamespace = %(nsp)s",
    "collation": "SELECT collname, '' FROM pg_collation WHERE collnamespace = %(nsp)s",
    "conversion": "SELECT conname, '' FROM pg_conversion WHERE connamespace = %(nsp)s",
    "statistics object": "SELECT stxname, '' FROM pg_statistic_ext WHERE stxnamespace = %(nsp)s",
    "text search configuration": (
        "SELECT cfgname, '' FROM pg_ts_config WHERE cfgnamespace = %(nsp)s"
    ),
    "text search dictionary": "SELECT dictname, '' FROM pg_ts_dict WHERE dictnamespace = %(nsp)s",
    "text search parser": "SELECT prsname, '' FROM pg_ts_parser WHERE prsnamespace = %(nsp)s",
    "text search template": "SELECT tmplname, '' FROM pg_ts_template WHERE tmplnamespace = %(nsp)s",
    "extension": "SELECT extname, '' FROM pg_extension WHERE extnamespace = %(nsp)s",
}

#: What to do about each kind that is refused, said once per kind in the message.
_ADVICE = {
    "relation": "add it to a projector's tables, or move it to another schema",
    "column": "add it to the projector's table, or drop it",
    "constraint": "add it to the projector's table, or drop it",
    "trigger": "drop it, promote, and create it again on the live table (it would fire "
    "again for the replay's writes on the new copy)",
    "rule": "drop it, promote, and create it again",
}
_ADVICE_DEFAULT = "move it to another schema (ALTER ... SET SCHEMA), or drop it, then promote"


@dataclass
class Inventory:
    """What one schema holds, by kind: identity -> definition."""

    objects: dict[str, dict[str, str]] = field(default_factory=dict)

    def beyond(self, other: Inventory) -> dict[str, dict[str, str]]:
        """What this has that ``other`` has not (or has with another definition)."""
        found = {}
        for kind, mine in self.objects.items():
            theirs = other.objects.get(kind, {})
            extra = {name: d for name, d in mine.items() if theirs.get(name) != d}
            if extra:
                found[kind] = extra
        return found


def inventory(conn: sa.Connection, schema: str) -> Inventory:
    """Every object in ``schema`` that this module knows of (see ``_INVENTORY``)."""
    nsp = conn.exec_driver_sql(
        "SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,)
    ).scalar_one()
    qualifier = conn.exec_driver_sql("SELECT quote_ident(%s) || '.'", (schema,)).scalar_one()
    found = Inventory()
    for kind, query in _INVENTORY.items():
        rows = conn.exec_driver_sql(query, {"nsp": nsp}).all()
        found.objects[kind] = {name: (d or "").replace(qualifier, "") for name, d in rows}
    return found


def baseline(conn: sa.Connection, projectors: Iterable[Projector]) -> dict[str, Inventory]:
    """What zdr itself creates in each live schema for these (live) projectors, measured
    by creating their tables in scratch schemas in a transaction that is rolled back."""
    projectors = list(projectors)
    schemas = sorted({schema for p in projectors for schema in p.schemas()})
    scratch = {live: f"{BASELINE_SCHEMA}{i}" for i, live in enumerate(schemas, 1)}
    with conn.begin() as transaction:
        targets.clone(conn, projectors, scratch)
        result = {live: inventory(conn, name) for live, name in scratch.items()}
        transaction.rollback()
    return result


def build_indexes(
    engine: sa.Engine, schema_map: Mapping[str, str], base: Mapping[str, Inventory], what: str
) -> list[str]:
    """Build on the new copy each index the live tables have beyond zdr's own, with
    ``CREATE INDEX CONCURRENTLY`` (the copy's writes go on); return the ones built.

    An index of that name that an earlier try left invalid is dropped first. A
    unique index the new copy's rows violate fails here, before anything swapped.
    """
    built = []
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for live, side in schema_map.items():
            wanted = _indexes_to_build(conn, live, side, base.get(live, Inventory()))
            for table, index, definition in wanted:
                drop = (
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}")
                    .format(sql.Identifier(side, index))
                    .as_string(conn.connection.driver_connection)
                )
                taken = _relation_kind(conn, side, index)
                if taken is not None and not _invalid_index(conn, side, index):
                    raise DependentObjects(
                        f"{what} refused: index {live}.{index} cannot be built on the new copy: "
                        f"{side} has {taken} of that name already (the new projector version "
                        f"made it): rename the index on {live}, then {what} again"
                    )
                conn.exec_driver_sql(drop)  # what an earlier try left half-built
                try:
                    conn.exec_driver_sql(definition)
                except sa.exc.DBAPIError as exc:
                    conn.exec_driver_sql(drop)
                    reason = getattr(exc.orig, "diag", None)
                    detail = reason.message_primary if reason is not None else str(exc.orig)
                    raise DependentObjects(
                        f"{what} refused: index {live}.{index} (which the live copy has and zdr "
                        f"did not create) cannot be built on the new copy {side}: {detail}. "
                        "Fix the new projector version, or drop the index, then "
                        f"{what} again"
                    ) from exc
                built.append(f"{side}.{index} on {table}")
    return built


def refusals(
    conn: sa.Connection, schema_map: Mapping[str, str], base: Mapping[str, Inventory], what: str
) -> None:
    """Raise DependentObjects naming everything the swap cannot carry (nothing changed)."""
    problems = [
        f"{d}: a schema swap would leave it on the old copy"
        for d in targets.outside_dependents(conn, [*schema_map, *schema_map.values()])
    ]
    empty = Inventory()
    for live, side in schema_map.items():
        added = inventory(conn, live).beyond(base.get(live, empty))
        side_inventory = inventory(conn, side)
        for kind, objects in sorted(added.items()):
            for name in sorted(objects):
                if kind == "index":
                    if side_inventory.objects["index"].get(name) == objects[name]:
                        continue
                    problems.append(
                        f"index {live}.{name.split('.', 1)[1]} is not yet on the new copy "
                        f"({side}): promote again (it is built before the swap)"
                    )
                    continue
                advice = _ADVICE.get(kind, _ADVICE_DEFAULT)
                problems.append(f"{kind} {live}.{name} was not created by zdr: {advice}")
        problems += _publications(conn, live)
        problems += _policies_reading_other_tables(conn, live)
    if problems:
        raise DependentObjects(f"{what} refused: " + "; ".join(problems))


def carry(conn: sa.Connection, schema_map: Mapping[str, str], what: str) -> None:
    """Give each new copy the live copy's owners, grants, default privileges, row-level
    security, policies, comments and storage options, in the caller's transaction."""
    for live, side in schema_map.items():
        try:
            _carry_schema(conn, live, side)
        except sa.exc.ProgrammingError as exc:
            if not isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
                raise
            raise DependentObjects(
                f"{what} refused: zdr's database role cannot give the new copy ({side}) "
                f"what the live copy ({live}) has: {exc.orig.diag.message_primary}; make "
                "zdr's role a member of the live schema's and tables' owners (GRANT owner "
                "TO zdr_role) or run zdr as their owner"
            ) from exc


def _carry_schema(conn: sa.Connection, live: str, side: str) -> None:
    for statement in conn.exec_driver_sql(_CARRY, {"live": live, "side": side}).scalars().all():
        conn.exec_driver_sql(statement)


def _indexes_to_build(
    conn: sa.Connection, live: str, side: str, base: Inventory
) -> list[tuple[str, str, str]]:
    added = inventory(conn, live).beyond(base).get("index", {})
    present = inventory(conn, side).objects["index"]
    wanted = []
    for name, definition in added.items():
        if present.get(name) == definition:
            continue
        table, index = name.split(".", 1)
        statement = conn.exec_driver_sql(
            """SELECT regexp_replace(
                          replace(pg_get_indexdef(i.oid), ' ON ' || quote_ident(%(live)s) || '.',
                                  ' ON ' || quote_ident(%(side)s) || '.'),
                          '^CREATE (UNIQUE )?INDEX ', 'CREATE \\1INDEX CONCURRENTLY ')
               FROM pg_class i JOIN pg_namespace n ON n.oid = i.relnamespace
               WHERE n.nspname = %(live)s AND i.relname = %(index)s""",
            {"live": live, "side": side, "index": index},
        ).scalar_one()
        wanted.append((table, index, statement))
    return wanted


def _relation_kind(conn: sa.Connection, schema: str, name: str) -> str | None:
    """What ``schema.name`` is, in words, or None if there is no such relation."""
    kind = conn.exec_driver_sql(
        """SELECT CASE c.relkind WHEN 'i' THEN 'an index' WHEN 'I' THEN 'an index'
                  WHEN 'S' THEN 'a sequence' WHEN 'v' THEN 'a view' ELSE 'a table' END
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s""",
        (schema, name),
    ).scalar()
    return None if kind is None else str(kind)


def _invalid_index(conn: sa.Connection, schema: str, index: str) -> bool:
    return bool(
        conn.exec_driver_sql(
            """SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
               JOIN pg_namespace n ON n.oid = i.relnamespace
               WHERE n.nspname = %s AND i.relname = %s AND NOT x.indisvalid)""",
            (schema, index),
        ).scalar_one()
    )


def _policies_reading_other_tables(conn: sa.Connection, live: str) -> list[str]:
    """Policies on the live tables whose expression reads another relation of the live
    schema: carried, they would name it by OID and read the old copy after the swap."""
    rows = conn.exec_driver_sql(
        """SELECT DISTINCT format('policy %%I on %%I.%%I reads %%I.%%I', p.polname, n.nspname,
                                  pt.relname, n.nspname, t.relname)
           FROM pg_depend d
           JOIN pg_policy p ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
           JOIN pg_class pt ON pt.oid = p.polrelid
           JOIN pg_class t ON d.refclassid = 'pg_class'::regclass AND t.oid = d.refobjid
           JOIN pg_namespace n ON n.oid = pt.relnamespace
           WHERE n.nspname = %s AND t.relnamespace = n.oid AND t.oid <> pt.oid
           ORDER BY 1""",
        (live,),
    ).scalars()
    return [
        f"{row}: carried to the new copy it would still read the old one; drop it, promote, "
        "and create it again"
        for row in rows
    ]


def _publications(conn: sa.Connection, live: str) -> list[str]:
    """Publications that name the live tables, or the live schema, by OID."""
    by_schema = ""
    if conn.exec_driver_sql("SELECT to_regclass('pg_catalog.pg_publication_namespace')").scalar():
        by_schema = """UNION SELECT format('publication %%I publishes schema %%I', p.pubname,
                                           %(live)s)
                       FROM pg_publication_namespace pn
                       JOIN pg_publication p ON p.oid = pn.pnpubid
                       JOIN pg_namespace n ON n.oid = pn.pnnspid WHERE n.nspname = %(live)s"""
    rows = conn.exec_driver_sql(
        f"""SELECT format('publication %%I publishes %%I.%%I', p.pubname, n.nspname, c.relname)
            FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
            JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = %(live)s {by_schema} ORDER BY 1""",
        {"live": live},
    ).scalars()
    return [
        f"{row} by OID, so after the swap it would publish the old copy: drop it from the "
        "publication (ALTER PUBLICATION ... DROP), promote, then add it again"
        for row in rows
    ]


#: The statements that make the side schema's objects carry what the live schema's
#: objects of the same name have. Built in SQL from the catalog (quote_ident and
#: format's %I quote every name), so no name is ever pasted from user input.
_CARRY = """
WITH
live_nsp AS (SELECT oid, nspowner, nspacl FROM pg_namespace WHERE nspname = %(live)s),
side_nsp AS (SELECT oid, nspowner, nspacl FROM pg_namespace WHERE nspname = %(side)s),
pairs AS (  -- relations present in both schemas, by name
    SELECT l.oid AS live_oid, s.oid AS side_oid, s.relname, s.relkind,
           l.relowner AS live_owner, s.relowner AS side_owner,
           coalesce(l.relacl, acldefault((CASE WHEN l.relkind = 'S' THEN 's' ELSE 'r' END)::"char",
                                         l.relowner)) AS live_acl,
           l.relrowsecurity, l.relforcerowsecurity, l.reloptions AS live_options,
           s.relrowsecurity AS side_rls, s.relforcerowsecurity AS side_force,
           s.reloptions AS side_options
    FROM pg_class l JOIN pg_class s ON s.relname = l.relname
    WHERE l.relnamespace = (SELECT oid FROM live_nsp)
      AND s.relnamespace = (SELECT oid FROM side_nsp)
      AND l.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND s.relkind = l.relkind
),
object_kind AS (
    SELECT side_oid, CASE relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                  WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'v' THEN 'VIEW'
                                  ELSE 'TABLE' END AS alter_kind,
           format('%%I.%%I', %(side)s, relname) AS target
    FROM pairs
),
statements AS (
    -- 1. owners: the schema's, then each relation's (owned sequences follow their table)
    SELECT 1 AS step, 0 AS n, format('ALTER SCHEMA %%I OWNER TO %%s', %(side)s,
                                      l.nspowner::regrole) AS sql
    FROM live_nsp l, side_nsp s WHERE l.nspowner <> s.nspowner
    UNION ALL
    SELECT 1, 1, format('ALTER %%s %%s OWNER TO %%s', k.alter_kind, k.target,
                        p.live_owner::regrole)
    FROM pairs p JOIN object_kind k USING (side_oid)
    WHERE p.live_owner <> p.side_owner
      AND NOT (p.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d
               WHERE d.classid = 'pg_class'::regclass AND d.objid = p.side_oid
               AND d.deptype IN ('a', 'i')))
    UNION ALL
    -- 2. grants on the schema: exactly the live schema's
    SELECT 2, 0, format('REVOKE ALL ON SCHEMA %%I FROM %%s CASCADE', %(side)s,
                        {grantee})
    FROM side_nsp s, aclexplode(coalesce(s.nspacl, acldefault('n', s.nspowner))) a
    WHERE a.grantee <> (SELECT nspowner FROM live_nsp)
    GROUP BY a.grantee
    UNION ALL
    SELECT 3, 0, format('GRANT %%s ON SCHEMA %%I TO %%s%%s', a.privilege_type, %(side)s,
                        {grantee},
                        CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
    FROM live_nsp l, aclexplode(coalesce(l.nspacl, acldefault('n', l.nspowner))) a
    WHERE a.grantee <> l.nspowner
    UNION ALL
    -- 3. grants on each relation: exactly the live relation's
    SELECT 2, 1, format('REVOKE ALL ON %%s %%s FROM %%s CASCADE',
                        CASE WHEN p.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, k.target,
                        {grantee})
    FROM pairs p JOIN object_kind k USING (side_oid)
    JOIN pg_class s ON s.oid = p.side_oid,
    aclexplode(coalesce(s.relacl,
                        acldefault((CASE WHEN s.relkind = 'S' THEN 's' ELSE 'r' END)::"char",
                                             s.relowner))) a
    WHERE a.grantee <> p.live_owner
    GROUP BY p.relkind, k.target, a.grantee
    UNION ALL
    SELECT 3, 1, format('GRANT %%s ON %%s %%s TO %%s%%s', a.privilege_type,
                        CASE WHEN p.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, k.target,
                        {grantee},
                        CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
    FROM pairs p JOIN object_kind k USING (side_oid), aclexplode(p.live_acl) a
    WHERE a.grantee <> p.live_owner
    UNION ALL
    -- 4. column grants: exactly the live columns' (columns in both copies)
    SELECT 2, 2, format('REVOKE ALL (%%I) ON %%s FROM %%s CASCADE', sa.attname, k.target,
                        {grantee})
    FROM pairs p JOIN object_kind k USING (side_oid)
    JOIN pg_attribute sa ON sa.attrelid = p.side_oid AND sa.attnum > 0 AND NOT sa.attisdropped,
    aclexplode(sa.attacl) a
    WHERE sa.attacl IS NOT NULL
    GROUP BY sa.attname, k.target, a.grantee
    UNION ALL
    SELECT 3, 2, format('GRANT %%s (%%I) ON %%s TO %%s%%s', a.privilege_type, la.attname, k.target,
                        {grantee},
                        CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
    FROM pairs p JOIN object_kind k USING (side_oid)
    JOIN pg_attribute la ON la.attrelid = p.live_oid AND la.attnum > 0 AND NOT la.attisdropped
    JOIN pg_attribute sa ON sa.attrelid = p.side_oid AND sa.attname = la.attname
                        AND NOT sa.attisdropped,
    aclexplode(la.attacl) a
    WHERE la.attacl IS NOT NULL
    UNION ALL
    -- 5. default privileges given in the live schema
    SELECT 4, 0, format('ALTER DEFAULT PRIVILEGES FOR ROLE %%s IN SCHEMA %%I '
                        'GRANT %%s ON %%s TO %%s%%s',
                        d.defaclrole::regrole, %(side)s,
                        a.privilege_type,
                        CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES'
                             WHEN 'f' THEN 'FUNCTIONS' WHEN 'T' THEN 'TYPES'
                             ELSE 'SCHEMAS' END,
                        {grantee},
                        CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
    FROM pg_default_acl d, aclexplode(d.defaclacl) a
    WHERE d.defaclnamespace = (SELECT oid FROM live_nsp)
    UNION ALL
    -- 6. row-level security, as the live table has it
    SELECT 5, 0, format('ALTER TABLE %%s %%s ROW LEVEL SECURITY', k.target,
                        CASE WHEN p.relrowsecurity THEN 'ENABLE' ELSE 'DISABLE' END)
    FROM pairs p JOIN object_kind k USING (side_oid)
    WHERE p.relkind IN ('r', 'p') AND p.relrowsecurity <> p.side_rls
    UNION ALL
    SELECT 5, 1, format('ALTER TABLE %%s %%s ROW LEVEL SECURITY', k.target,
                        CASE WHEN p.relforcerowsecurity THEN 'FORCE' ELSE 'NO FORCE' END)
    FROM pairs p JOIN object_kind k USING (side_oid)
    WHERE p.relkind IN ('r', 'p') AND p.relforcerowsecurity <> p.side_force
    UNION ALL
    -- 7. policies: exactly the live table's
    SELECT 6, 0, format('DROP POLICY %%I ON %%s', sp.polname, k.target)
    FROM pairs p JOIN object_kind k USING (side_oid) JOIN pg_policy sp ON sp.polrelid = p.side_oid
    UNION ALL
    SELECT 7, 0, format('CREATE POLICY %%I ON %%s AS %%s FOR %%s TO %%s%%s%%s',
                        lp.polname, k.target,
                        CASE WHEN lp.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                        CASE lp.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT'
                             WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                        (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE r::regrole::text END,
                                           ', ') FROM unnest(lp.polroles) r),
                        CASE WHEN lp.polqual IS NOT NULL
                             THEN ' USING (' || pg_get_expr(lp.polqual, lp.polrelid) || ')'
                             ELSE '' END,
                        CASE WHEN lp.polwithcheck IS NOT NULL
                             THEN ' WITH CHECK ('
                                  || pg_get_expr(lp.polwithcheck, lp.polrelid) || ')'
                             ELSE '' END)
    FROM pairs p JOIN object_kind k USING (side_oid) JOIN pg_policy lp ON lp.polrelid = p.live_oid
    UNION ALL
    -- 8. storage options the live table has and the new copy does not set
    SELECT 8, 0, format('ALTER TABLE %%s SET (%%s)', k.target, o.option)
    FROM pairs p JOIN object_kind k USING (side_oid), unnest(p.live_options) o(option)
    WHERE p.relkind IN ('r', 'p', 'm')
      AND NOT EXISTS (SELECT 1 FROM unnest(p.side_options) s(option)
                      WHERE split_part(s.option, '=', 1) = split_part(o.option, '=', 1))
    UNION ALL
    -- 9. comments the live copy has where the new copy has none
    SELECT 9, 0, format('COMMENT ON SCHEMA %%I IS %%L', %(side)s, ld.description)
    FROM pg_description ld
    WHERE ld.classoid = 'pg_namespace'::regclass AND ld.objoid = (SELECT oid FROM live_nsp)
      AND NOT EXISTS (SELECT 1 FROM pg_description sd WHERE sd.classoid = ld.classoid
                      AND sd.objoid = (SELECT oid FROM side_nsp))
    UNION ALL
    SELECT 9, 1, CASE WHEN ld.objsubid = 0
                      THEN format('COMMENT ON %%s %%s IS %%L', k.alter_kind, k.target,
                                  ld.description)
                      ELSE format('COMMENT ON COLUMN %%s.%%I IS %%L', k.target,
                                  (SELECT attname FROM pg_attribute WHERE attrelid = p.live_oid
                                   AND attnum = ld.objsubid), ld.description) END
    FROM pairs p JOIN object_kind k USING (side_oid)
    JOIN pg_description ld ON ld.classoid = 'pg_class'::regclass AND ld.objoid = p.live_oid
    WHERE NOT EXISTS (
        SELECT 1 FROM pg_description sd WHERE sd.classoid = 'pg_class'::regclass
        AND sd.objoid = p.side_oid
        AND sd.objsubid = CASE WHEN ld.objsubid = 0 THEN 0 ELSE (
            SELECT sa.attnum FROM pg_attribute sa JOIN pg_attribute la
              ON la.attrelid = p.live_oid AND la.attnum = ld.objsubid AND sa.attname = la.attname
            WHERE sa.attrelid = p.side_oid) END)
      AND (ld.objsubid = 0 OR EXISTS (
        SELECT 1 FROM pg_attribute sa JOIN pg_attribute la
          ON la.attrelid = p.live_oid AND la.attnum = ld.objsubid AND sa.attname = la.attname
        WHERE sa.attrelid = p.side_oid AND NOT sa.attisdropped))
)
SELECT sql FROM statements ORDER BY step, n, sql
""".replace("{grantee}", "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END")

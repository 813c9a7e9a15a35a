"""Validation of the names that end up as SQL identifiers.

Names are checked against a strict pattern *and* always quoted by the driver
(``psycopg.sql.Identifier``) when they reach SQL: the pattern keeps physical
names predictable and short enough for PostgreSQL's 63-byte limit, the quoting
makes injection impossible even if a pattern were ever loosened.
"""

from __future__ import annotations

import re

from zdr.errors import InvalidName

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_SCHEMA_PREFIXES = ("pg_", "zdr")
RESERVED_SCHEMAS = {"public", "information_schema"}


def validate_key(key: object, *, what: str = "replay key") -> str:
    """Return ``key`` if it is a valid replay key or projection name, else raise InvalidName."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise InvalidName(
            f"invalid {what} {key!r}: use 1-40 characters, lower-case letters, digits "
            "and underscores, starting with a letter (pattern ^[a-z][a-z0-9_]{0,39}$)"
        )
    return key


def validate_live_schema(schema: object, *, table: str) -> str:
    """Return the schema of a projector's table if zdr can swap it, else raise InvalidName.

    A projection's tables must live in a schema of their own because promotion
    swaps whole schemas (a rename takes no lock on the tables, so readers never wait).
    """
    if schema is None:
        raise InvalidName(
            f"table {table!r} has no schema: give each projection's tables a schema of "
            "their own (Table(..., schema='my_projection')); zdr swaps whole schemas"
        )
    if not isinstance(schema, str) or not SCHEMA_PATTERN.fullmatch(schema):
        raise InvalidName(f"invalid schema {schema!r} for table {table!r}")
    if schema in RESERVED_SCHEMAS or schema.startswith(RESERVED_SCHEMA_PREFIXES):
        raise InvalidName(
            f"schema {schema!r} of table {table!r} is reserved: zdr owns schemas starting "
            "with 'zdr' and cannot swap 'public' or system schemas"
        )
    return schema

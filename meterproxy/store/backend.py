"""Which database the store lives in, chosen by one URL: the one place that tells SQLite from PostgreSQL.

``--db`` (``Settings.db``, a string) takes a bare path or ``sqlite:///path``
(SQLite, the default: one file, one writer thread) or
``postgresql://user@host/db`` (PostgreSQL: several replicas share one
database). `parse_db` reads it; everything else asks this module for a
connection and never looks at the URL itself:

- `connect` (the writer's connection, or a one-off command's);
- `read_connection` (the read side: a fresh read-only SQLite connection, or a
  read-only connection borrowed from a pool on PostgreSQL; ``close()`` returns it);
- `apply_migrations` (every registered migration set, on either backend);
- `close` (the process's read pool for that database, at shutdown).

Both kinds of connection are typed as ``sqlite3.Connection``: the PostgreSQL one
(`meterproxy.store.pg.PgConnection`) implements the part of that surface the
store uses (``execute``/``executemany`` with ``?`` placeholders, rows by index
and name, sqlite3 exception classes), so every query is written once.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

__all__ = ["DbUrl", "apply_migrations", "close", "connect", "describe", "parse_db", "read_connection"]

Dialect = Literal["sqlite", "postgresql"]


@dataclass(frozen=True, slots=True)
class DbUrl:
    dialect: Dialect
    #: A filesystem path (SQLite) or a libpq connection URL (PostgreSQL).
    target: str

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"


def parse_db(value: str | Path) -> DbUrl:
    """``/path``, ``sqlite:///rel.db``, ``sqlite:////abs.db`` or ``postgresql://...``."""
    text = str(value)
    low = text.lower()
    if low.startswith(("postgresql://", "postgres://")):
        return DbUrl("postgresql", text)
    if re.match(r"postgres(ql)?\+\w+://", low):  # SQLAlchemy-style driver suffix
        return DbUrl("postgresql", "postgresql://" + text.split("://", 1)[1])
    if low.startswith("sqlite://"):
        rest = text[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"{text!r}: use sqlite:///relative.db or sqlite:////absolute.db")
        return DbUrl("sqlite", rest[1:] or ":memory:")
    if "://" in text:
        raise ValueError(f"{text!r}: the database must be a file path, sqlite:///path or postgresql://...")
    return DbUrl("sqlite", text)


def describe(value: str | Path) -> str:
    """The URL for logs, with any password masked."""
    url = parse_db(value)
    if not url.is_postgres:
        return url.target
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url.target)


def connect(value: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A new connection of its own (the writer's, or a command's), autocommit on both backends."""
    url = parse_db(value)
    if url.is_postgres:
        from meterproxy.store.pg import connect_pg

        return cast(sqlite3.Connection, connect_pg(url.target, readonly=readonly))
    from meterproxy.store.schema import connect as sqlite_connect

    return sqlite_connect(url.target, readonly=readonly)


def read_connection(value: str | Path) -> sqlite3.Connection:
    """A read-only connection whose rows read by name (``sqlite3.Row`` or its PostgreSQL twin)."""
    url = parse_db(value)
    if url.is_postgres:
        from meterproxy.store.pg import pooled_read_connection

        return cast(sqlite3.Connection, pooled_read_connection(url.target))
    from meterproxy.store.schema import connect as sqlite_connect

    conn = sqlite_connect(url.target, readonly=True)
    conn.row_factory = sqlite3.Row
    return conn


def dialect_of(conn: sqlite3.Connection) -> Dialect:
    """``"postgresql"`` for a connection from this module on PostgreSQL, else ``"sqlite"``."""
    return cast(Dialect, getattr(conn, "dialect", "sqlite"))


def apply_migrations(conn: sqlite3.Connection) -> None:
    """Apply every registered migration set (core first, then features') on either backend."""
    if dialect_of(conn) == "postgresql":
        from meterproxy.store.pg_migrations import apply_pg_migrations

        apply_pg_migrations(conn)
        return
    from meterproxy.store.schema import apply_migrations as apply_sqlite

    apply_sqlite(conn)


def close(value: str | Path) -> None:
    """Release what this process holds for the database (PostgreSQL's read pool)."""
    url = parse_db(value)
    if url.is_postgres:
        from meterproxy.store.pg import close_pools

        close_pools(url.target)

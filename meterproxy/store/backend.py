"""Which database the store lives in, chosen by one URL: the one place that tells SQLite from PostgreSQL.

``--db`` (``Settings.db``, a string) takes a bare path or ``sqlite:///path``
(SQLite, the default: one file, one writer thread) or
``postgresql://user@host/db`` (PostgreSQL: several replicas share one
database; needs the ``meterproxy[postgres]`` extra). `parse_db` reads it;
everything else asks this module for a `Db` and never looks at the URL itself:

- `connect` (the writer's connection, or a one-off command's);
- `read_connection` (the read side: a fresh read-only SQLite connection, or a
  read-only connection borrowed from a pool on PostgreSQL; ``close()`` returns it);
- `apply_migrations` (every registered migration set, on either engine);
- `close` (the process's read pool for that database, at shutdown).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from meterproxy.store.db import Db
from meterproxy.store.dialect import DialectName
from meterproxy.store.migrations import apply_migrations
from meterproxy.store.sqlite import connect_sqlite

__all__ = [
    "DbUrl",
    "MissingDriver",
    "apply_migrations",
    "close",
    "connect",
    "describe",
    "parse_db",
    "read_connection",
    "require_driver",
]


class MissingDriver(RuntimeError):
    """A ``postgresql://`` database without the ``meterproxy[postgres]`` extra installed."""


@dataclass(frozen=True, slots=True)
class DbUrl:
    dialect: DialectName
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


def postgres() -> ModuleType:
    """`meterproxy.store.postgres`, or `MissingDriver` saying which extra to install."""
    try:
        return importlib.import_module("meterproxy.store.postgres")
    except ImportError as exc:
        raise MissingDriver(
            "--db postgresql://... needs the PostgreSQL driver, which is not installed: "
            "pip install 'meterproxy[postgres]'"
        ) from exc


def require_driver(value: str | Path) -> None:
    """Raise `MissingDriver` now if ``value`` is a PostgreSQL URL and its driver is not installed."""
    if parse_db(value).is_postgres:
        postgres()


def connect(value: str | Path, *, readonly: bool = False) -> Db:
    """A new connection of its own (the writer's, or a command's), autocommit on both engines."""
    url = parse_db(value)
    if url.is_postgres:
        db: Db = postgres().connect_pg(url.target, readonly=readonly)
        return db
    return connect_sqlite(url.target, readonly=readonly)


def read_connection(value: str | Path) -> Db:
    """A read-only connection (a pooled one on PostgreSQL: ``close()`` gives it back)."""
    url = parse_db(value)
    if url.is_postgres:
        db: Db = postgres().POOLS.connection(url.target)
        return db
    return connect_sqlite(url.target, readonly=True)


def close(value: str | Path) -> None:
    """Release what this process holds for the database (PostgreSQL's read pool)."""
    url = parse_db(value)
    if url.is_postgres:
        pools: Any = postgres().POOLS
        pools.close(url.target)

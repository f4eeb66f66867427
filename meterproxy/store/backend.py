"""Which database the store lives in, chosen by one URL: the one place that tells SQLite from PostgreSQL.

``--db`` (``Settings.db``, a string) takes a bare path or ``sqlite:///path``
(SQLite, the default: one file, one writer thread) or
``postgresql://user@host/db`` (PostgreSQL: several replicas share one
database; needs the ``meterproxy[postgres]`` extra). `parse_db` reads it;
everything else asks this module for a `Db` and never looks at the URL itself:

- `connect` (the writer's connection, or a one-off command's);
- `Readers` (the read side of a long-lived owner, the app: read-only
  connections, borrowed from a pool it opens and closes on PostgreSQL);
- `read_connection` (one read-only connection of its own: a command's);
- `apply_migrations` (every migration set, on either engine).

Nothing here is a module global: a pool is opened by the `Readers` that holds
it and closed with it (the app opens one at start-up and closes it at
shutdown), so tests that run several apps in one process, or one app after
another on databases they then drop, never share a pool or leave one open.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Self

from meterproxy.store.db import Db
from meterproxy.store.dialect import DialectName
from meterproxy.store.migrations import apply_migrations
from meterproxy.store.sqlite import connect_sqlite

__all__ = [
    "DbUrl",
    "MissingDriver",
    "Readers",
    "apply_migrations",
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
    """A read-only connection of its own (a command's; long-lived owners use `Readers`)."""
    return connect(value, readonly=True)


class Readers:
    """Read-only connections to one database, for one owner (the app), closed with it.

    SQLite: each `connection` is a fresh read-only connection (opening one is
    cheaper than a pool's bookkeeping, and WAL readers need nothing shared).
    PostgreSQL: connections are borrowed from a pool opened on first use, since
    each new one costs a server process and a round trip or three;
    ``close()`` on the borrowed connection gives it back, `close` here closes
    the pool. Thread-safe: `meterproxy.store.queries.run_read` borrows from
    worker threads.
    """

    def __init__(self, value: str | Path, *, max_size: int = 8) -> None:
        #: Which database (engine and target), as `parse_db` reads it.
        self.url = parse_db(value)
        self._max_size = max_size
        self._pool: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def connection(self) -> Db:
        if not self.url.is_postgres:
            return connect_sqlite(self.url.target, readonly=True)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the readers of {describe(self.url.target)} are closed")
            if self._pool is None:
                self._pool = postgres().ReadPool(self.url.target, self._max_size)
            pool = self._pool
        db: Db = pool.connection()
        return db

    def close(self) -> None:
        """Close the pool (PostgreSQL); connections still borrowed are closed as they come back."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The execution API every query in meterproxy goes through: `Db`, `Params`, `db_errors`.

A `Db` is one connection to either engine (`meterproxy.store.sqlite.SqliteDb`,
`meterproxy.store.postgres.PgDb`), opened by `meterproxy.store.backend`:

- ``db.execute(sql, params)`` / ``db.executemany(sql, rows)`` run SQL exactly
  as written; placeholders are ``$1, $2, ...`` on both engines (PostgreSQL's
  own, which SQLite reads as named parameters: no rewriting), and one number
  may appear several times. Rows read by index and by name (``row["ts"]``).
- ``with db.transaction():`` a write transaction, serialized against every
  other writer (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SERIALIZABLE``, whose
  conflicts `Db.is_serialization_failure` recognises so the caller can rerun);
  ``with db.snapshot():`` a read-only snapshot over several statements.
- ``db.dialect``: the named pieces where the engines differ
  (`meterproxy.store.dialect`).
- ``db.lock_request_order()`` before inserting into ``requests`` inside a
  transaction: rowids then follow commit order across PostgreSQL replicas
  (rollups and budget replicas read "rows above the last rowid"); nothing on
  SQLite, whose writers are serialized already.
- ``db.insert_many(table, columns, rows, key=...)``: bulk load, skipping rows
  whose key is already there; returns how many were added (PostgreSQL: ``COPY``
  into a temporary table, then one ``INSERT ... SELECT ... ON CONFLICT``).
- ``db.bulk_read(compose)``: bulk read, the text column of one-column rows as
  raw bytes, for exports (PostgreSQL: ``COPY (SELECT ...) TO STDOUT`` in binary
  format, straight off the wire; ``compose(p)`` writes the SELECT with
  ``p(value)`` as for `Params`, which there quotes the value into the SQL since
  ``COPY`` takes no parameters).

`Params` builds the parameter list of a composed query: ``p(value)`` appends
the value and returns its placeholder. Errors are the driver's own;
``except db_errors():`` catches those of either engine.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from meterproxy.store.dialect import Dialect

__all__ = ["Cursor", "Db", "Params", "db_errors", "placeholders"]


class Params:
    """The values of a query being composed; calling it with a value gives that value's placeholder."""

    __slots__ = ("values",)

    def __init__(self, *values: Any) -> None:
        self.values: list[Any] = list(values)

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def many(self, values: Iterable[Any]) -> str:
        """``$i, $j, ...`` for several values (an ``IN (...)`` list, a VALUES row)."""
        return ", ".join(self(v) for v in values)


def placeholders(count: int, start: int = 1) -> str:
    """``$start, ..., $(start+count-1)``: the VALUES list of a statically written INSERT."""
    return ", ".join(f"${i}" for i in range(start, start + count))


class Cursor(Protocol):
    """The DB-API cursor surface both drivers share."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int = ...) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """One connection, to either engine (see the module docstring)."""

    dialect: Dialect
    #: Where it points, as given to `meterproxy.store.backend.connect`.
    url: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor: ...

    def transaction(self) -> AbstractContextManager[Db]: ...

    def snapshot(self) -> AbstractContextManager[Db]: ...

    def lock_request_order(self) -> None: ...

    def migration_lock(self) -> AbstractContextManager[Db]: ...

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str | None = None
    ) -> int: ...

    def identity_after_copy(self, table: str) -> None: ...

    def bulk_read(self, compose: Callable[[Params], str]) -> Iterator[bytes]: ...

    def is_serialization_failure(self, exc: BaseException) -> bool: ...

    @property
    def broken(self) -> bool: ...

    @property
    def in_transaction(self) -> bool: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


def db_errors() -> tuple[type[Exception], ...]:
    """The base error classes of both drivers (``except db_errors():``).

    psycopg's only when it is loaded: a PostgreSQL error cannot be raised otherwise.
    """
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)

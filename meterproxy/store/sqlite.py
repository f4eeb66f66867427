"""`SqliteDb`: the store's `Db` on a SQLite file (the standard ``sqlite3`` module).

Every connection is in autocommit mode (``isolation_level=None``): a
transaction is exactly what `transaction` or `snapshot` opens, nothing
implicit. WAL lets readers run while the single writer commits; a read-only
connection is opened with ``mode=ro`` so it can never write.

Placeholders ``$1, $2, ...`` are SQLite named parameters here (``$1`` is the
parameter named ``1``), so positional values are bound by name: the same SQL
text runs on both engines and a number may be used twice.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

from meterproxy.store.db import Cursor, Db, Params
from meterproxy.store.dialect import SQLITE, Dialect

__all__ = ["SqliteDb", "connect_sqlite"]

_NAMES = tuple(str(i) for i in range(1, 1001))

# NULL parameters bound at the cost of any other value. The standard module passes every
# value that is not exactly an int, float, str or bytearray through its adapter protocol, and
# for ``None`` that means looking ``__adapt__`` up on its protocol type and ``__conform__`` on
# ``None``, two failing lookups that each format an AttributeError message: ~3,700
# instructions per NULL (Python 3.11; a stored proxy row binds 10-16 NULLs, a quarter of its
# insert, bench/README.md "step 5"). A registered adapter is found first, in one dict lookup;
# this one gives ``None`` back (``{}.get(None)``, a C call), which binds NULL as before. It
# only applies to ``None`` (registering it for a base type would slow every value down).
_NO_VALUES: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NO_VALUES.get)


def _bind(params: Sequence[Any] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(params, Mapping):
        return params
    return dict(zip(_NAMES, params, strict=False))


def _placeholder_hint(exc: sqlite3.ProgrammingError) -> sqlite3.ProgrammingError:
    if "has no name" in str(exc):  # a "?" placeholder: SQLite-only, and not what Db binds
        return sqlite3.ProgrammingError(f"{exc}: write placeholders as $1, $2, ... (see meterproxy.store)")
    return exc


class SqliteDb:
    """A `Db` over one ``sqlite3`` connection (see the module docstring)."""

    dialect: Dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection, url: str) -> None:
        conn.row_factory = sqlite3.Row
        self.raw = conn
        self.url = url
        self._max_variables = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            return self.raw.execute(sql, _bind(params))
        except sqlite3.ProgrammingError as exc:
            raise _placeholder_hint(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        try:
            return self.raw.executemany(sql, (_bind(r) for r in rows))
        except sqlite3.ProgrammingError as exc:
            raise _placeholder_hint(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[Db]:
        """``BEGIN IMMEDIATE``: the write lock from the first statement (joins one already open)."""
        if self.raw.in_transaction:
            yield self
            return
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[Db]:
        if self.raw.in_transaction:
            yield self
            return
        self.raw.execute("BEGIN")
        try:
            yield self
        finally:
            self.raw.execute("COMMIT")

    def lock_request_order(self) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already serialized the writers, so rowids follow commits."""

    def migration_lock(self) -> AbstractContextManager[Db]:
        """The whole migration run is one write transaction: one process migrates, the others wait."""
        return self.transaction()

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str | None = None
    ) -> int:
        """Rows in multi-row ``INSERT ... VALUES (...), (...)`` statements of up to `_ROWS_PER_INSERT`.

        One statement per slice, not one per row: the standard module releases and retakes the GIL
        around every ``sqlite3_step`` (a hand-off to a waiting event loop each time), and SQLite
        runs and resets its program once (bench/README.md, issue 21 "step 5").
        """
        width = len(columns)
        per = max(1, min(_ROWS_PER_INSERT, self._max_variables // max(width, 1)))
        names = tuple(columns)
        inserted = 0
        for start in range(0, len(rows), per):
            part = rows[start : start + per]
            values = tuple(chain.from_iterable(part))
            if len(values) != width * len(part):
                raise sqlite3.ProgrammingError(f"rows for {table} must have {width} values each")
            inserted += self.raw.execute(_insert_sql(table, names, key, len(part)), values).rowcount
        return inserted

    def bulk_read(self, compose: Callable[[Params], str]) -> Iterator[bytes]:
        """An ordinary query here (the SQLite export runs in its own process: ``export_child.py``)."""
        p = Params()
        for (value,) in self.execute(compose(p), p.values):
            if value:
                yield value.encode()

    def identity_after_copy(self, table: str) -> None:
        """Nothing: an ``INTEGER PRIMARY KEY`` always numbers past the largest id present."""

    def is_serialization_failure(self, exc: BaseException) -> bool:
        return False  # BEGIN IMMEDIATE waits for the lock instead of failing late

    @property
    def broken(self) -> bool:
        return False

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def interrupt(self) -> None:
        self.raw.interrupt()

    def close(self) -> None:
        self.raw.close()


#: Rows per INSERT statement in `SqliteDb.insert_many` (at most; fewer if SQLite's limit on
#: parameters says so). The writer inserts 8 at a time; a bulk load goes by this many.
_ROWS_PER_INSERT = 64


@lru_cache(maxsize=256)
def _insert_sql(table: str, columns: tuple[str, ...], key: str | None, rows: int) -> str:
    """The INSERT of ``rows`` rows for `SqliteDb.insert_many`, made once (the writer's every 8 rows)."""
    names = ", ".join(f'"{c}"' for c in columns)
    row = f"({', '.join('?' for _ in columns)})"  # positional: the cheapest bind sqlite3 has
    conflict = f"ON CONFLICT ({key}) DO NOTHING" if key else "ON CONFLICT DO NOTHING"
    return f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * rows)} {conflict}"


def connect_sqlite(path: str | Path, *, readonly: bool = False) -> SqliteDb:
    """A connection with the pragmas every meterproxy connection uses."""
    path = str(path)
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
    else:
        fresh = path != ":memory:" and not os.path.exists(path)
        if fresh:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Owner-only from the first byte: create the file before SQLite does.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA synchronous=NORMAL")
    return SqliteDb(conn, path)

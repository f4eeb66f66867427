"""PostgreSQL behind the sqlite3 surface the store code is written against.

The store's features (queries, rollups, budgets, imports) take a connection and
call ``conn.execute(sql, params)`` with SQLite-dialect SQL and read rows by
index or by name. `PgConnection` presents exactly that surface over a psycopg 3
connection, so one query serves both backends:

- each statement goes through `meterproxy.store.pg_sql.translate` (cached);
- rows are `PgRow`: a tuple that also answers ``row["col"]`` and ``keys()``
  like ``sqlite3.Row``; values come back as SQLite would return them
  (``sum()`` of integers is ``int``, not ``Decimal``; booleans are 0/1);
- errors are raised as the matching ``sqlite3`` exception class (the psycopg
  error is the ``__cause__``), so ``except sqlite3.OperationalError`` written
  for SQLite keeps working;
- the connection is in autocommit mode; ``BEGIN``/``COMMIT`` statements (the
  writer's transactions) work as they do on an autocommit sqlite3 connection.

Reads borrow connections from a `psycopg_pool.ConnectionPool` per database
(`read_pool`), opened read-only (``default_transaction_read_only``), and
``close()`` gives the connection back. Pools are process-wide per URL and
closed by `close_pools` at shutdown.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import RowMaker
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool

from meterproxy.store.pg_sql import split_statements, translate

__all__ = [
    "PgConnection",
    "PgCursor",
    "PgRow",
    "close_pools",
    "connect_pg",
    "is_serialization_failure",
    "read_pool",
]

_ERRORS: dict[type[psycopg.Error], type[sqlite3.Error]] = {
    psycopg.IntegrityError: sqlite3.IntegrityError,
    psycopg.DataError: sqlite3.DataError,
    psycopg.NotSupportedError: sqlite3.NotSupportedError,
    psycopg.InternalError: sqlite3.InternalError,
    # SQLite reports bad SQL and missing tables as OperationalError.
    psycopg.ProgrammingError: sqlite3.OperationalError,
    psycopg.OperationalError: sqlite3.OperationalError,
}


def _as_sqlite_error(exc: psycopg.Error) -> sqlite3.Error:
    for pg_class, sqlite_class in _ERRORS.items():
        if isinstance(exc, pg_class):
            return sqlite_class(str(exc))
    return sqlite3.DatabaseError(str(exc))


def is_serialization_failure(exc: BaseException) -> bool:
    """A transaction PostgreSQL aborted because a concurrent one won; retrying is correct."""
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    return isinstance(cause, pg_errors.SerializationFailure | pg_errors.DeadlockDetected)


class PgRow(tuple[Any, ...]):
    """A result row readable like ``sqlite3.Row``: ``row[0]``, ``row["name"]``, ``dict(row)``."""

    _index: dict[str, int]
    _names: tuple[str, ...]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key.lower()])
            except KeyError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _value(v: Any) -> Any:
    if type(v) is Decimal:
        # Only aggregates produce NUMERIC (the schema has no NUMERIC columns):
        # sum() of integers is an integer in SQLite, avg() a float.
        return int(v) if v == v.to_integral_value() else float(v)
    if type(v) is bool:
        return int(v)
    return v


def _row_factory(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    names = tuple(d.name for d in cursor.description or ())
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name.lower(), i)

    def make(values: Sequence[Any]) -> PgRow:
        row = PgRow(_value(v) for v in values)
        row._index = index
        row._names = names
        return row

    return make


class PgCursor:
    """The part of ``sqlite3.Cursor`` the store uses."""

    def __init__(self, cursor: psycopg.Cursor[PgRow] | None) -> None:
        self._cur = cursor

    @property
    def rowcount(self) -> int:
        return -1 if self._cur is None else self._cur.rowcount

    @property
    def description(self) -> Any:
        return None if self._cur is None else self._cur.description

    @property
    def lastrowid(self) -> int | None:
        raise NotImplementedError("no lastrowid on PostgreSQL: use 'RETURNING id' (works on both)")

    def _has_rows(self) -> bool:
        return self._cur is not None and self._cur.description is not None

    def fetchone(self) -> PgRow | None:
        return self._guard(lambda c: c.fetchone()) if self._has_rows() else None

    def fetchall(self) -> list[PgRow]:
        return self._guard(lambda c: c.fetchall()) if self._has_rows() else []

    def fetchmany(self, size: int = 1) -> list[PgRow]:
        return self._guard(lambda c: c.fetchmany(size)) if self._has_rows() else []

    def __iter__(self) -> Iterator[PgRow]:
        while True:
            row = self.fetchone()
            if row is None:
                return
            yield row

    def close(self) -> None:
        if self._cur is not None:
            self._cur.close()

    def _guard(self, fn: Callable[[psycopg.Cursor[PgRow]], Any]) -> Any:
        assert self._cur is not None
        try:
            return fn(self._cur)
        except psycopg.Error as exc:
            raise _as_sqlite_error(exc) from exc


class PgConnection:
    """A psycopg connection that speaks the store's SQLite dialect (see the module docstring)."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[Any], release: Callable[[], None] | None = None) -> None:
        self.raw = conn
        self._release = release
        # JSON comes back as its text, as SQLite returns it (callers json.loads it themselves).
        for name in ("json", "jsonb"):
            conn.adapters.register_loader(name, TextLoader)
        self.row_factory: Any = None  # accepted for sqlite3 compatibility; rows are always PgRow

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> PgCursor:
        statement = translate(sql)
        if statement.noop:
            return PgCursor(None)
        text = statement.sql
        if statement.replace_table is not None:
            text = text.replace("{conflict}", self._replace_clause(statement.replace_table, statement))
        cur = self.raw.cursor(row_factory=_row_factory)
        try:
            cur.execute(text, params if isinstance(params, Mapping) else tuple(params))
            for extra in statement.then:
                cur.execute(extra, ())
        except psycopg.Error as exc:
            raise _as_sqlite_error(exc) from exc
        return PgCursor(cur)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> PgCursor:
        statement = translate(sql)
        if statement.noop:
            return PgCursor(None)
        text = statement.sql
        if statement.replace_table is not None:
            text = text.replace("{conflict}", self._replace_clause(statement.replace_table, statement))
        cur = self.raw.cursor(row_factory=_row_factory)
        try:
            cur.executemany(text, [tuple(r) for r in rows])
        except psycopg.Error as exc:
            raise _as_sqlite_error(exc) from exc
        return PgCursor(cur)

    def executescript(self, script: str) -> None:
        for part in split_statements(script):
            self.execute(part)

    def commit(self) -> None:
        if self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.raw.execute("ROLLBACK")

    @property
    def broken(self) -> bool:
        """The server went away (the writer then opens a new connection)."""
        return bool(self.raw.closed or self.raw.broken)

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()
        else:
            self.raw.close()

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def _replace_clause(self, table: str, statement: Any) -> str:
        key = _primary_key(self.raw, table)
        others = [c for c in statement.replace_columns if c.lower() not in key]
        target = ", ".join(_quote(k) for k in key)
        if not others:
            return f"ON CONFLICT ({target}) DO NOTHING"
        sets = ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in others)
        return f"ON CONFLICT ({target}) DO UPDATE SET {sets}"


def _quote(name: str) -> str:
    return '"' + name.lower().replace('"', '""') + '"'


_PK_CACHE: dict[tuple[str, str], tuple[str, ...]] = {}


def _primary_key(conn: psycopg.Connection[Any], table: str) -> tuple[str, ...]:
    cache_key = (conn.info.dsn, table.lower())
    if cache_key not in _PK_CACHE:
        rows = conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY a.attnum",
            (table.lower(),),
        ).fetchall()
        if not rows:
            raise sqlite3.OperationalError(f"INSERT OR REPLACE into {table}: it has no primary key")
        _PK_CACHE[cache_key] = tuple(r[0] for r in rows)
    return _PK_CACHE[cache_key]


def connect_pg(url: str, *, readonly: bool = False) -> PgConnection:
    """A new (unpooled) connection: the writer's, or a one-off command's."""
    options = "-c default_transaction_read_only=on" if readonly else None
    kwargs: dict[str, Any] = {"autocommit": True}
    if options:
        kwargs["options"] = options
    try:
        conn = psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        raise _as_sqlite_error(exc) from exc
    return PgConnection(conn)


_POOLS: dict[str, ConnectionPool[Any]] = {}
_POOLS_LOCK = threading.Lock()


def read_pool(url: str, *, max_size: int = 8) -> ConnectionPool[Any]:
    """The process's read-only pool for ``url`` (opened on first use)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(url)
        if pool is None or pool.closed:
            pool = ConnectionPool(
                url,
                min_size=1,
                max_size=max_size,
                kwargs={"autocommit": True, "options": "-c default_transaction_read_only=on"},
                name="meterproxy-read",
                # A pooled connection the server dropped (restart, failover) is replaced, not handed out.
                check=ConnectionPool.check_connection,
                open=True,
            )
            _POOLS[url] = pool
        return pool


def pooled_read_connection(url: str) -> PgConnection:
    pool = read_pool(url)
    conn = pool.getconn(timeout=30)
    return PgConnection(conn, release=lambda: pool.putconn(conn))


def close_pools(url: str | None = None) -> None:
    """Close the read pool for ``url`` (every pool when None)."""
    with _POOLS_LOCK:
        names = [url] if url is not None else list(_POOLS)
        pools = [_POOLS.pop(n) for n in names if n in _POOLS]
    for pool in pools:
        pool.close()

"""`PgDb`: the store's `Db` on PostgreSQL (psycopg 3, the ``meterproxy[postgres]`` extra).

The SQL the store runs is PostgreSQL's own (the package docstring says how it
is written once for both engines), so this module only connects and adapts:

- statements go through psycopg's `RawCursor`: ``$1, $2, ...`` are sent to
  the server as they are, with nothing parsed or rewritten on the client;
- rows are `PgRow`: a tuple that also answers ``row["col"]`` and ``keys()``;
  an aggregate's ``numeric`` (``sum`` of a ``bigint``) loads as an ``int``
  (a ``float`` if it has a fraction): the schema has no ``numeric`` columns;
- errors are psycopg's own (``except db_errors():`` catches them);
- connections are in autocommit mode; `transaction` opens a ``SERIALIZABLE``
  one (the engine's guarantee that concurrent replicas' writes behave as if
  serial; `is_serialization_failure` tells the caller to rerun), `snapshot` a
  ``REPEATABLE READ READ ONLY`` one;
- `insert_many` loads a large batch with ``COPY ... FROM STDIN``; `bulk_read`
  reads an export with ``COPY (SELECT ...) TO STDOUT (FORMAT binary)``: the
  binary form of a ``text`` value is its UTF-8 bytes, so they come off the wire
  untouched (no str decode and re-encode, no text-COPY escaping to undo); measured
  in bench/README.md ("PostgreSQL store's export"). ``COPY`` takes no parameters,
  so `Literals` writes the values into the SQL, quoted by the driver.

Reads borrow connections from a `psycopg_pool.ConnectionPool` (`ReadPool`),
opened read-only (``default_transaction_read_only``); ``close()`` gives the
connection back. A pool belongs to its owner (the app's
`meterproxy.store.backend.Readers`), which closes it: none lives in a module
global, so several apps in one process (tests, workers) never share or leak one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.adapt import Loader
    from psycopg.rows import RowMaker
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "a postgresql:// database needs the PostgreSQL driver: pip install 'meterproxy[postgres]'"
    ) from exc

from meterproxy.store.db import Cursor, Db, Params
from meterproxy.store.dialect import POSTGRESQL, Dialect

__all__ = ["READ_POOL_APPLICATION", "PgDb", "PgRow", "ReadPool", "connect_pg"]

#: ``pg_advisory_xact_lock`` key inserts into ``requests`` take (the same key the trigger of
#: earlier versions took, so old and new replicas agree during an upgrade).
_REQUEST_ORDER_LOCK = "meterproxy.requests.insert"
#: ``application_name`` of the read pools' connections.
READ_POOL_APPLICATION = "meterproxy-read"
#: Bulk loads above this many rows go through ``COPY`` (`PgDb.insert_many`).
_COPY_MIN_ROWS = 256
#: ``pg_advisory_lock`` key for "migrations running" (the one earlier versions used).
_MIGRATION_LOCK = 0x6D657465_7270726F  # "meterpro"


class PgRow(tuple[Any, ...]):
    """A result row readable like ``sqlite3.Row``: ``row[0]``, ``row["name"]``, ``dict(row)``."""

    _index: dict[str, int]
    _names: tuple[str, ...]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key])
            except KeyError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    names = tuple(d.name for d in cursor.description or ())
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)

    def make(values: Sequence[Any]) -> PgRow:
        row = PgRow(values)
        row._index = index
        row._names = names
        return row

    return make


class _AggregateLoader(Loader):
    """``numeric`` -> ``int`` (``float`` when it has a fraction): only aggregates produce it."""

    def load(self, data: Any) -> int | float:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.adapters.register_loader("numeric", _AggregateLoader)


class Literals(Params):
    """`Params` for a statement that takes none (``COPY``): each value goes into the SQL as a
    literal, quoted by psycopg for this connection (its encoding and quoting rules)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        super().__init__()
        self._conn = conn

    def __call__(self, value: Any) -> str:
        return sql.Literal(value).as_string(self._conn)


class PgDb:
    """A `Db` over one psycopg connection (see the module docstring)."""

    dialect: Dialect = POSTGRESQL

    def __init__(
        self, conn: psycopg.Connection[Any], url: str, release: Callable[[], None] | None = None
    ) -> None:
        self.raw = conn
        self.url = url
        self._release = release
        # A pooled connection's interrupt and its return to the pool exclude each other: a
        # cancel must never reach a connection already lent to someone else (see interrupt).
        self._lending = threading.Lock()
        self._interrupted = False
        self._returned = False  # lent back to the pool: another borrower may be using it

    def _cursor(self) -> psycopg.RawCursor[PgRow]:
        return psycopg.RawCursor(self.raw, row_factory=_row_factory)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur = self._cursor()
        cur.execute(sql, tuple(params) if params else None)
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        cur = self._cursor()
        cur.executemany(sql, [tuple(r) for r in rows])  # pipelined: one round trip for the lot
        return cur

    @contextmanager
    def transaction(self) -> Iterator[Db]:
        if self.in_transaction:
            yield self
            return
        self.raw.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        try:
            yield self
        except BaseException:
            if not self.broken:
                self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[Db]:
        if self.in_transaction:
            yield self
            return
        self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield self
        finally:
            if not self.broken:
                self.raw.execute("COMMIT")

    def lock_request_order(self) -> None:
        self.raw.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_REQUEST_ORDER_LOCK,))

    @contextmanager
    def migration_lock(self) -> Iterator[Db]:
        """A session advisory lock: replicas starting at once migrate one after the other."""
        self.raw.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            yield self
        finally:
            if not self.broken:
                self.raw.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str | None = None
    ) -> int:
        """Few rows: one pipelined ``executemany``. Many: ``COPY`` into a temporary twin, then one
        ``INSERT ... SELECT`` (``COPY`` alone cannot skip rows already there)."""
        names = ", ".join(f'"{c}"' for c in columns)
        conflict = f"ON CONFLICT ({key}) DO NOTHING" if key else "ON CONFLICT DO NOTHING"
        if len(rows) <= _COPY_MIN_ROWS:
            values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
            cur = self._cursor()
            cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({values}) {conflict}", rows)
            return max(cur.rowcount, 0)
        load = f"{table}_load"
        with self.transaction():
            self.raw.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {load} AS SELECT {names} FROM {table} WITH NO DATA"
            )
            with self.raw.cursor().copy(f"COPY {load} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            added = self.raw.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {load} {conflict}")
            self.raw.execute(f"TRUNCATE {load}")
        return max(added.rowcount, 0)

    def bulk_read(self, compose: Callable[[Params], str]) -> Iterator[bytes]:
        """The one text column of ``compose``'s rows, as bytes, through one binary ``COPY``."""
        select = compose(Literals(self.raw))
        with self.raw.cursor().copy(f"COPY ({select}) TO STDOUT (FORMAT binary)") as copy:
            copy.set_types(["bytea"])  # a text value's binary form is its bytes: load them as such
            for (value,) in copy.rows():
                if value:
                    yield value

    def identity_after_copy(self, table: str) -> None:
        """After explicit ids went into an identity column, new rows must number past them."""
        for row in self.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = $1 AND is_identity = 'YES' AND column_name <> 'rowid'",
            [table],
        ).fetchall():
            column = row[0]
            self.execute(
                f"SELECT setval(pg_get_serial_sequence($1, $2), max({column})) FROM {table} "
                f"HAVING max({column}) IS NOT NULL",
                [table, column],
            )

    def is_serialization_failure(self, exc: BaseException) -> bool:
        """A transaction PostgreSQL aborted because a concurrent one won; rerunning it is correct."""
        return isinstance(exc, pg_errors.SerializationFailure | pg_errors.DeadlockDetected)

    @property
    def broken(self) -> bool:
        """The server went away (the writer then opens a new connection)."""
        return bool(self.raw.closed or self.raw.broken)

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def interrupt(self) -> None:
        """Cancel the running statement, from another thread.

        PostgreSQL delivers a cancel to the server process, not to a statement: one
        that lands after this statement ended cancels whatever that process runs
        next. So an interrupted pooled connection never goes back to the pool (`close`
        discards it), and one already returned is not interrupted at all: it may be
        running another borrower's query (an export stopped just as its worker
        finished cancelled the next test's export that way).
        """
        with self._lending:
            if self.raw.closed or self._returned:
                return
            self._interrupted = True
            self.raw.cancel_safe()

    def close(self) -> None:
        with self._lending:
            if self._release is not None:
                release, self._release = self._release, None
                if self._interrupted:
                    self.raw.close()  # the pool replaces a closed connection
                elif self.in_transaction and not self.broken:
                    self.raw.execute("ROLLBACK")
                release()
                self._returned = True
            else:
                self.raw.close()


def connect_pg(url: str, *, readonly: bool = False) -> PgDb:
    """A new (unpooled) connection: the writer's, or a one-off command's."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if readonly:
        kwargs["options"] = "-c default_transaction_read_only=on"
    conn = psycopg.connect(url, **kwargs)
    _configure(conn)
    return PgDb(conn, url)


class ReadPool:
    """Read-only connections to one database, borrowed from a pool (`meterproxy.store.backend.Readers`
    owns one, and closes it with itself)."""

    def __init__(self, url: str, max_size: int = 8) -> None:
        self.url = url
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={
                "autocommit": True,
                "options": "-c default_transaction_read_only=on",
                # So an operator (and a test) tells them apart in pg_stat_activity.
                "application_name": READ_POOL_APPLICATION,
            },
            configure=_configure,
            name=READ_POOL_APPLICATION,
            # A pooled connection the server dropped (restart, failover) is replaced.
            check=ConnectionPool.check_connection,
            open=True,
        )

    def connection(self) -> PgDb:
        pool = self._pool
        conn = pool.getconn(timeout=30)
        return PgDb(conn, self.url, release=lambda: pool.putconn(conn))

    def close(self) -> None:
        self._pool.close()

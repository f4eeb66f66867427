"""The same named migrations, applied to PostgreSQL, exactly once however many replicas start.

Migration functions are written for sqlite-utils (``fn(db)`` calling
``db.execute(sql)``). On PostgreSQL each one gets a `PgMigrationDb` whose
``execute`` goes through the SQLite->PostgreSQL translation
(`meterproxy.store.pg_sql`: ``INTEGER`` -> ``BIGINT``, ``INTEGER PRIMARY KEY``
-> identity, an implicit ``rowid`` column, ...), so the DDL is written once.
A migration that uses more of sqlite-utils than ``execute`` fails loudly here
rather than doing something different.

Two PostgreSQL-only sets frame the shared ones:

- ``meterproxy.pg`` (first): the SQLite functions the queries use
  (`meterproxy.store.pg_compat`);
- ``meterproxy.pg.requests`` (right after the core set): inserts into
  ``requests`` take a transaction-scoped advisory lock, so ``rowid`` values are
  handed out in commit order across replicas. Rollups move a ``rowid``
  watermark; with concurrent writers a lower rowid could otherwise commit
  after the watermark passed it and never be counted. The lock is held from the
  first row of a batch to its commit (milliseconds; the writer batches).

Applied names are recorded in ``_migrations (migration_set, name, applied_at)``.
The whole run holds ``pg_advisory_lock``, so N replicas starting at once
migrate once: the first applies, the others wait and then find nothing pending.
Each migration and its record commit together (PostgreSQL DDL is transactional).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlite_utils
from sqlite_utils import Migrations

from meterproxy.store.pg_compat import COMPAT_SQL, COMPAT_SQL_2
from meterproxy.store.pg_sql import split_statements

__all__ = ["PgMigrationDb", "apply_pg_migrations", "pg_migration_sets"]

#: pg_advisory_lock key for "migrations running" (any constant unique to meterproxy).
MIGRATION_LOCK = 0x6D657465_7270726F  # "meterpro"

pg_prelude = Migrations("meterproxy.pg")
pg_requests = Migrations("meterproxy.pg.requests")


class PgMigrationDb:
    """What a migration function gets on PostgreSQL: ``execute`` (translated) and ``conn``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Iterable[Any] | None = None) -> Any:
        return self.conn.execute(sql, list(params or ()))

    def executescript(self, script: str) -> None:
        for part in split_statements(script):
            self.conn.execute(part)

    def __getitem__(self, name: str) -> Any:
        raise NotImplementedError(
            f"migration uses sqlite-utils table API (db[{name!r}]); write it with db.execute() "
            "so it runs on PostgreSQL too"
        )


def _raw(db: Any, sql: str) -> None:
    # Compat DDL is PostgreSQL already (and full of % and $): no translation.
    db.conn.raw.execute(sql)


@pg_prelude()
def m001_sqlite_functions(db: sqlite_utils.Database) -> None:
    for sql in COMPAT_SQL:
        _raw(db, sql)


@pg_prelude()
def m002_sqlite_functions(db: sqlite_utils.Database) -> None:
    for sql in COMPAT_SQL_2:
        _raw(db, sql)


@pg_requests()
def m001_requests_insert_order(db: sqlite_utils.Database) -> None:
    _raw(
        db,
        """
        CREATE OR REPLACE FUNCTION meterproxy_requests_insert_lock() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        BEGIN
          PERFORM pg_advisory_xact_lock(hashtext('meterproxy.requests.insert'));
          RETURN NULL;
        END
        $fn$
        """,
    )
    _raw(
        db,
        "CREATE TRIGGER requests_insert_order BEFORE INSERT ON requests "
        "FOR EACH STATEMENT EXECUTE FUNCTION meterproxy_requests_insert_lock()",
    )


def pg_migration_sets() -> list[Migrations]:
    from meterproxy.store import migration_sets

    core, *features = migration_sets()
    return [pg_prelude, core, pg_requests, *features]


def apply_pg_migrations(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations; returns ``set:name`` of each one applied by this call."""
    raw = getattr(conn, "raw")  # noqa: B009 - a PgConnection (see backend.dialect_of)
    db = PgMigrationDb(conn)
    applied: list[str] = []
    raw.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        raw.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (migration_set TEXT NOT NULL, name TEXT NOT NULL, "
            "applied_at TEXT NOT NULL, PRIMARY KEY (migration_set, name))"
        )
        done = {(r[0], r[1]) for r in raw.execute("SELECT migration_set, name FROM _migrations").fetchall()}
        for migrations in pg_migration_sets():
            for migration in migrations._migrations:
                if (migrations.name, migration.name) in done:
                    continue
                with raw.transaction():
                    migration.fn(db)  # type: ignore[arg-type]
                    raw.execute(
                        "INSERT INTO _migrations VALUES (%s, %s, %s)",
                        (migrations.name, migration.name, str(datetime.now(UTC))),
                    )
                applied.append(f"{migrations.name}:{migration.name}")
    finally:
        raw.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied

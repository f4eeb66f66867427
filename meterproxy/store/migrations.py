"""Named, ordered migrations and the one runner that applies them to either engine.

A feature that owns tables keeps its own `Migrations` set (``meterproxy.core``,
``meterproxy.rollups``, ...) and registers it with `register_migrations`; each
migration is a function ``fn(db)`` taking a `meterproxy.store.db.Db`, written
once for both engines with the dialect's named pieces (``db.dialect.text``,
...). A migration once released is never edited: add another.

`apply_migrations` applies what is missing and records each name in
``meterproxy_migrations (migration_set, name, applied_at)``, in the same
transaction as the migration itself (DDL is transactional on both engines).
Several processes starting at once migrate once: the run holds the engine's
exclusive lock (SQLite: one ``BEGIN IMMEDIATE`` for the whole run; PostgreSQL:
a session advisory lock, each migration its own transaction), and the others
wait and then find nothing pending.

Databases created by earlier versions recorded their migrations elsewhere
(sqlite-utils' ``_sqlite_migrations``; ``_migrations`` on PostgreSQL); the
runner adopts those names the first time it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import import_module
from typing import TypeVar

from meterproxy.store.db import Db

__all__ = [
    "BUILTIN_MIGRATION_SETS",
    "Migration",
    "Migrations",
    "apply_migrations",
    "migration_sets",
    "pending_migrations",
    "register_migrations",
]

MigrationFn = Callable[[Db], None]
F = TypeVar("F", bound=MigrationFn)

TABLE = "meterproxy_migrations"
#: Where earlier versions recorded applied migrations, by engine.
_LEGACY = {"sqlite": "_sqlite_migrations", "postgresql": "_migrations"}


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    fn: MigrationFn


class Migrations:
    """One feature's ordered migrations; ``@migrations()`` on a function appends it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: list[Migration] = []

    def __call__(self, *, name: str | None = None) -> Callable[[F], F]:
        def add(fn: F) -> F:
            step = name or fn.__name__
            if any(m.name == step for m in self.steps):
                raise ValueError(f"migration {step!r} is already in set {self.name!r}")
            self.steps.append(Migration(step, fn))
            return fn

        return add


_REGISTERED: list[Migrations] = []


def register_migrations(migrations: Migrations) -> Migrations:
    if all(m.name != migrations.name for m in _REGISTERED):
        _REGISTERED.append(migrations)
    return migrations


#: Built-in sets: (module that registers the set, set name), in the order they apply. They are
#: imported before migrating so that every process applies the same complete set whatever it
#: happened to import: `serve --workers` migrates once in the supervisor, and a set first
#: registered in the workers would make them race to create its tables.
BUILTIN_MIGRATION_SETS = (
    ("meterproxy.store.schema", "meterproxy.core"),
    ("meterproxy.store.rollups", "meterproxy.rollups"),
    ("meterproxy.budgets.store", "meterproxy.budgets"),
    ("meterproxy.imports", "meterproxy.imports"),
    ("meterproxy.content", "meterproxy.content"),
)


def migration_sets() -> list[Migrations]:
    """The built-in sets in their fixed order, then any extension's in registration order."""
    for module, _ in BUILTIN_MIGRATION_SETS:
        import_module(module)
    order = {name: i for i, (_, name) in enumerate(BUILTIN_MIGRATION_SETS)}
    return sorted(_REGISTERED, key=lambda m: order.get(m.name, len(order)))  # stable for extensions


def apply_migrations(db: Db, sets: list[Migrations] | None = None) -> list[str]:
    """Apply every pending migration; returns ``set:name`` of each one this call applied."""
    applied: list[str] = []
    with db.migration_lock():
        text = db.dialect.text
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (migration_set {text} NOT NULL, name {text} NOT NULL, "
            f"applied_at {text} NOT NULL, PRIMARY KEY (migration_set, name))"
        )
        _adopt_legacy(db)
        done = {(r[0], r[1]) for r in db.execute(f"SELECT migration_set, name FROM {TABLE}").fetchall()}
        for migrations in migration_sets() if sets is None else sets:
            for step in migrations.steps:
                if (migrations.name, step.name) in done:
                    continue
                with db.transaction():
                    step.fn(db)
                    db.execute(
                        f"INSERT INTO {TABLE} (migration_set, name, applied_at) VALUES ($1, $2, $3)",
                        [migrations.name, step.name, str(datetime.now(UTC))],
                    )
                applied.append(f"{migrations.name}:{step.name}")
    return applied


def pending_migrations(db: Db) -> list[str]:
    """``set:name`` of each migration not applied yet (read-only)."""
    done: set[tuple[str, str]] = set()
    for table in (TABLE, _LEGACY[db.dialect.name]):
        if db.execute(db.dialect.table_exists, [table]).fetchone() is not None:
            done |= {(r[0], r[1]) for r in db.execute(f"SELECT migration_set, name FROM {table}").fetchall()}
    return [
        f"{m.name}:{step.name}"
        for m in migration_sets()
        for step in m.steps
        if (m.name, step.name) not in done
    ]


def _adopt_legacy(db: Db) -> None:
    legacy = _LEGACY[db.dialect.name]
    if db.execute(db.dialect.table_exists, [legacy]).fetchone() is None:
        return
    if db.execute(f"SELECT 1 FROM {TABLE} LIMIT 1").fetchone() is not None:
        return
    with db.transaction():
        db.execute(
            f"INSERT INTO {TABLE} (migration_set, name, applied_at) "
            # "WHERE": SQLite's parser needs one before an upsert clause after a SELECT.
            f"SELECT migration_set, name, applied_at FROM {legacy} WHERE 1 = 1 ON CONFLICT DO NOTHING"
        )

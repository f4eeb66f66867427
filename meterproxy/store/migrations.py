"""Named, ordered migrations and the one runner that applies them to either engine.

A feature that owns tables keeps its own `Migrations` set (``meterproxy.core``,
``meterproxy.rollups``, ...) in its module, and `MIGRATION_SETS` names it
(``module:attribute``, like an entry point), in the order the sets apply. Each
migration is a function ``fn(db)`` taking a `meterproxy.store.db.Db`, written
once for both engines with the dialect's named pieces (``db.dialect.text``,
...). A migration once released is never edited: add another.

There is no registry that importing a module fills: which sets a process
applies would then depend on what it happened to import (``serve --workers``
migrates once in the supervisor, and a set first seen in the workers would make
them race to create its tables). `migration_sets` imports exactly the declared
sets; an extension passes its own to `apply_migrations` (``extra=``), after
the built-in ones.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import import_module
from typing import TypeVar

from meterproxy.store.db import Db

__all__ = [
    "MIGRATION_SETS",
    "Migration",
    "Migrations",
    "apply_migrations",
    "migration_sets",
    "pending_migrations",
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


#: The built-in sets, ``module:attribute``, in the order they apply (the store's core first:
#: the others' tables refer to it).
MIGRATION_SETS = (
    "meterproxy.store.schema:core_migrations",
    "meterproxy.store.rollups:rollup_migrations",
    "meterproxy.budgets.store:budget_migrations",
    "meterproxy.imports:import_migrations",
    "meterproxy.content:content_migrations",
)


def migration_sets(extra: Sequence[Migrations] = ()) -> list[Migrations]:
    """The built-in sets in their fixed order, then ``extra`` (an extension's) in the order given."""
    sets: list[Migrations] = []
    for ref in MIGRATION_SETS:
        module, _, attribute = ref.partition(":")
        found = getattr(import_module(module), attribute)
        if not isinstance(found, Migrations):
            raise TypeError(f"{ref} is not a Migrations set")
        sets.append(found)
    for migrations in extra:
        if any(m.name == migrations.name for m in sets):
            raise ValueError(f"migration set {migrations.name!r} is declared twice")
        sets.append(migrations)
    return sets


def apply_migrations(db: Db, extra: Sequence[Migrations] = ()) -> list[str]:
    """Apply every pending migration of the built-in sets and ``extra``; returns ``set:name`` of
    each one this call applied."""
    applied: list[str] = []
    with db.migration_lock():
        text = db.dialect.text
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (migration_set {text} NOT NULL, name {text} NOT NULL, "
            f"applied_at {text} NOT NULL, PRIMARY KEY (migration_set, name))"
        )
        _adopt_legacy(db)
        done = {(r[0], r[1]) for r in db.execute(f"SELECT migration_set, name FROM {TABLE}").fetchall()}
        for migrations in migration_sets(extra):
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


def pending_migrations(db: Db, extra: Sequence[Migrations] = ()) -> list[str]:
    """``set:name`` of each migration not applied yet (read-only)."""
    done: set[tuple[str, str]] = set()
    for table in (TABLE, _LEGACY[db.dialect.name]):
        if db.execute(db.dialect.table_exists, [table]).fetchone() is not None:
            done |= {(r[0], r[1]) for r in db.execute(f"SELECT migration_set, name FROM {table}").fetchall()}
    return [
        f"{m.name}:{step.name}"
        for m in migration_sets(extra)
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

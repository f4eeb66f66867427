"""Persistence: one writer thread owns the write connection; readers open their own.

Write side: `StoreWriter` (``store/writer.py``) takes records from the event
loop through a bounded queue and commits them in batches on its own thread.
Read side: ``store/queries.py`` runs queries on short-lived read-only
connections off the event loop; nothing on the read side goes through the
writer.

Features add tables by registering a migration set with `register_migrations`,
the same way the core does.
"""

from __future__ import annotations

from importlib import import_module

from sqlite_utils import Migrations

__all__ = ["migration_sets", "register_migrations"]

_SETS: list[Migrations] = []


def register_migrations(migrations: Migrations) -> Migrations:
    if all(m.name != migrations.name for m in _SETS):
        _SETS.append(migrations)
    return migrations


#: Built-in features that own tables: (module that registers the set, set name), in the
#: order their migrations apply. They are imported before migrating so that every
#: process applies the same complete set whatever it happened to import: `serve
#: --workers` migrates once in the supervisor, and a set first registered in the
#: workers would make them race to create its tables.
BUILTIN_MIGRATION_SETS = (
    ("meterproxy.store.rollups", "meterproxy.rollups"),
    ("meterproxy.budgets.store", "meterproxy.budgets"),
    ("meterproxy.imports", "meterproxy.imports"),
    ("meterproxy.content", "meterproxy.content"),
)


def migration_sets() -> list[Migrations]:
    """Core first, then the built-in features in a fixed order, then any extension's."""
    from meterproxy.store.schema import core_migrations

    for module, _ in BUILTIN_MIGRATION_SETS:
        import_module(module)
    order = {name: i for i, (_, name) in enumerate(BUILTIN_MIGRATION_SETS)}
    rest = [m for m in _SETS if m is not core_migrations]
    rest.sort(key=lambda m: order.get(m.name, len(order)))  # stable: extensions keep their order
    return [core_migrations, *rest]

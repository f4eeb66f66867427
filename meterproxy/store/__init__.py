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

from sqlite_utils import Migrations

__all__ = ["migration_sets", "register_migrations"]

_SETS: list[Migrations] = []


def register_migrations(migrations: Migrations) -> Migrations:
    if all(m.name != migrations.name for m in _SETS):
        _SETS.append(migrations)
    return migrations


def migration_sets() -> list[Migrations]:
    from meterproxy.store.schema import core_migrations

    return [core_migrations, *(m for m in _SETS if m is not core_migrations)]

"""Persistence on SQLite or PostgreSQL: one SQL text per query, a few named dialect pieces, no emulator.

How to write a query (both engines run it exactly as written)
------------------------------------------------------------
Take a `Db` (``meterproxy.store.db``): the writer's (``StoreWriter.call(fn)``
runs ``fn(db)`` in a write transaction on the writer thread) or a reader's (the
app's ``backend.Readers``, ``app[READERS]``, which owns PostgreSQL's read pool:
``store.queries.run_read(readers, fn)`` runs ``fn(db)`` off the loop; a command
opens its own with ``backend.read_connection(url)``)::

    db.execute("SELECT count(*) FROM requests WHERE model = $1 AND ts >= $2", [model, since])

- Placeholders are ``$1, $2, ...`` (PostgreSQL's own; SQLite reads them as
  named parameters). Compose dynamic SQL with `Params`::

      p = Params()
      where = f"ts >= {p(since)} AND {db.dialect.json_text('tags', p, 'team')} = {p(team)}"
      db.execute(f"SELECT ... WHERE {where}", p.values)

  ``p.many(ids)`` gives an ``IN (...)`` list; `placeholders(n)` the VALUES of a
  fixed INSERT. A ``?`` fails on SQLite with a hint (and never worked on
  PostgreSQL). Rows read by index and by name (``row["ts"]``) on both.

- Write SQL the engines share: ``COALESCE`` (not ``ifnull``), ``CASE`` (not
  ``iif``), ``INSERT ... ON CONFLICT (key) DO NOTHING | DO UPDATE SET c =
  excluded.c`` (not ``INSERT OR IGNORE/REPLACE``; in ``DO UPDATE`` qualify the
  old value with the table name: ``n = t.n + excluded.n``), ``RETURNING``,
  ``SUM(CASE WHEN ... THEN 1 ELSE 0 END)`` (not ``sum(<comparison>)``),
  ``substr(ts, 1, 13)`` for an hour bucket, ``CAST(x AS BIGINT)``, window
  functions, subqueries in FROM with an alias, ``"user"`` quoted (a reserved
  word in PostgreSQL). Booleans are stored as 0/1 integers: test
  ``streamed = 1``, never a bare column as a condition.
- Where the engines differ, use the named piece of ``db.dialect``
  (`meterproxy.store.dialect`): ``json_text`` (a JSON tag), ``epoch_seconds``,
  ``table_exists``, ``list_tables``, ``trigger``, and in DDL ``text``,
  ``serial_key``, ``rowid_column``, ``table_options``; integers are ``BIGINT``
  and floats ``DOUBLE PRECISION`` on both. Add a piece there rather than
  branching on the engine.
- Bulk loads: ``db.insert_many(table, columns, rows, key=...)`` (``COPY`` on
  PostgreSQL), skipping rows whose key is already there.
- Transactions: ``with db.transaction():`` (writes, serialized; on PostgreSQL
  rerun the work when ``db.is_serialization_failure(exc)``; the writer does);
  ``with db.snapshot():`` (several reads that must agree). Inserts into
  ``requests`` call ``db.lock_request_order()`` first.
- Errors are the driver's own: ``except db_errors():``.
- Tables: a feature's `Migrations` set, named in ``MIGRATION_SETS``
  (``meterproxy.store.migrations``); one runner applies every set on both
  engines and records names in ``meterproxy_migrations``.

Why this and not SQLAlchemy Core
--------------------------------
The queries are few and mostly fixed text with a WHERE clause composed from
filters; the engines agree on nearly all of it (``ON CONFLICT``,
``RETURNING``, window functions, CTEs). What differs is a handful of
fragments, and a named function per fragment keeps the SQL readable as SQL,
greppable, and free of a 3 MB dependency and its per-statement compile cost on
the writer's hot path (SQLite must stay a one-file, no-extra install). A
query builder would earn its keep if queries were assembled from many
optional parts; here `Params` is all the composition needed.

The engines
-----------
Write side: `StoreWriter` (``store/writer.py``) takes records from the event
loop through a bounded queue and commits them in batches on its own thread.
Read side: ``store/queries.py`` and ``store/summary.py`` run on short-lived
read-only connections off the event loop. SQLite is ``sqlite3`` (stdlib);
PostgreSQL is psycopg 3 (the ``meterproxy[postgres]`` extra), loaded only
for a ``postgresql://`` URL.
"""

from __future__ import annotations

from meterproxy.store.db import Db, Params, db_errors, placeholders
from meterproxy.store.migrations import Migrations, apply_migrations, migration_sets

__all__ = [
    "Db",
    "Migrations",
    "Params",
    "apply_migrations",
    "db_errors",
    "migration_sets",
    "placeholders",
]

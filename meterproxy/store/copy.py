"""Copy a whole store to another (SQLite -> PostgreSQL, or back), idempotently, in batches.

``meterproxy migrate SOURCE TARGET`` is this module behind a progress bar. The
target is opened the way a proxy opens it (every migration applied), then each
table the two stores share is copied in the source's insertion order, in
batches, with ``INSERT ... ON CONFLICT DO NOTHING``:
a row whose key is already there is left as it is, so running the copy again,
or after it was interrupted, adds only what is missing.

What needs more than a row copy:

- ``rowid`` is never copied (each store numbers its own rows); integer primary
  keys (``webhook_outbox.id``) are, so references between tables hold, and on
  PostgreSQL the identity is moved past the copied ids afterwards.
- ``meta`` (the key-fingerprint salt): the source's salt replaces the target's
  while the target holds no requests of its own, so fingerprints of old and new
  rows match; otherwise the target keeps its own and the result says so.
- Rollups: ``requests`` rows are copied in source rowid order, so when the
  source has compacted raw rows away (retention), its rollup tables are copied
  too and the target's watermark is set to the target rowid of the last source
  row the source had rolled up. That needs a target with no requests before the
  copy. A later run (the target's ``compacted_before`` at least the source's)
  copies only the raw rows that are new; if the source has compacted past what
  the target received, the copy refuses (that history exists only in the
  source's rollups and could not be merged exactly). Without compaction the
  rollups are never copied: the target's own maintenance rolls every row up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meterproxy.store import backend
from meterproxy.store.db import Db

__all__ = ["CopyError", "CopyResult", "copy_store", "count_rows", "open_target"]

_SKIP = {
    "meterproxy_migrations",
    "_sqlite_migrations",
    "_migrations",
    "sqlite_sequence",
    "sqlite_stat1",
    "meta",
}
_ROLLUPS = {"rollup_hour", "rollup_day", "rollup_state"}
#: Kept equal to the rollups by triggers in the target: copying them too would count twice.
_DERIVED = {"rollup_day_model", "rollup_hour_model"}


class CopyError(RuntimeError):
    """The copy cannot be done exactly; the message says why and what to do."""


@dataclass
class CopyResult:
    #: table -> (rows read from the source, rows new in the target)
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def open_target(url: str) -> Db:
    """The target, migrated to the current schema (every built-in migration set)."""
    conn = backend.connect(url)
    backend.apply_migrations(conn)
    return conn


def _tables(conn: Db) -> list[str]:
    return [r[0] for r in conn.execute(conn.dialect.list_tables).fetchall()]


def _columns(conn: Db, table: str) -> list[str]:
    cur = conn.execute(f"SELECT * FROM {table} LIMIT 0")
    return [d[0] for d in cur.description]


def count_rows(conn: Db, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _order(table: str, columns: list[str]) -> str:
    """Insertion order where the table has one (``rowid``), else its columns in order."""
    if table == "requests" or "rowid" in columns:
        return "rowid"
    return ", ".join(f'"{c}"' for c in columns)


def copy_store(
    source: Db,
    target: Db,
    *,
    batch: int = 5_000,
    progress: Callable[[str, int], None] = lambda table, n: None,
) -> CopyResult:
    """Copy every shared table; ``progress(table, rows)`` after each batch."""
    result = CopyResult()
    source_tables = _tables(source)
    target_tables = set(_tables(target))
    target_fresh = count_rows(target, "requests") == 0
    source_cut, target_cut = _compacted_before(source), _compacted_before(target)
    # Rollups come along once, into an empty target; a later run (same or older source cut)
    # copies only raw rows, which the target rolls up itself.
    compacted = source_cut is not None and target_fresh
    if source_cut is not None and not target_fresh and source_cut > (target_cut or ""):
        raise CopyError(
            "the source has deleted raw rows after rolling them up (retention) that the target "
            "never received: copy into an empty target so the rollups can come along exactly"
        )
    ordered = sorted(source_tables, key=lambda t: (t != "requests", source_tables.index(t)))
    for table in ordered:
        skip = table in _SKIP or table in _DERIVED or table.startswith("sqlite_")
        if skip or (table in _ROLLUPS and not compacted):
            continue
        if table not in target_tables:
            result.notes.append(f"{table}: not in the target's schema, skipped")
            continue
        if table == "rollup_state":
            _copy_rollup_state(source, target)
            result.tables[table] = (1, 1)
            continue
        result.tables[table] = _copy_table(source, target, table, batch, progress)
    _copy_salt(source, target, target_fresh, result)
    return result


def _copy_table(
    source: Db,
    target: Db,
    table: str,
    batch: int,
    progress: Callable[[str, int], None],
) -> tuple[int, int]:
    wanted = set(_columns(target, table))
    src_columns = _columns(source, table)
    columns = [c for c in src_columns if c in wanted and c != "rowid"]
    names = ", ".join(f'"{c}"' for c in columns)
    cur = source.execute(f"SELECT {names} FROM {table} ORDER BY {_order(table, src_columns)}")
    read = added = 0
    while rows := cur.fetchmany(batch):
        with target.transaction():
            if table == "requests":
                target.lock_request_order()
            added += target.insert_many(table, columns, [tuple(r) for r in rows])
        read += len(rows)
        progress(table, len(rows))
    target.identity_after_copy(table)
    return read, added


def _compacted_before(conn: Db) -> str | None:
    if conn.execute(conn.dialect.table_exists, ["rollup_state"]).fetchone() is None:
        return None
    row = conn.execute("SELECT compacted_before FROM rollup_state WHERE id = 1").fetchone()
    return None if row is None else row[0]


def _copy_rollup_state(source: Db, target: Db) -> None:
    watermark, compacted = source.execute(
        "SELECT watermark, compacted_before FROM rollup_state WHERE id = 1"
    ).fetchone()
    last = source.execute(
        "SELECT id FROM requests WHERE rowid <= $1 ORDER BY rowid DESC LIMIT 1", [watermark]
    ).fetchone()
    mapped = 0
    if last is not None:
        mapped = target.execute("SELECT rowid FROM requests WHERE id = $1", [last[0]]).fetchone()[0]
    target.execute(
        "UPDATE rollup_state SET watermark = $1, compacted_before = $2 WHERE id = 1", [mapped, compacted]
    )


def _copy_salt(source: Db, target: Db, target_fresh: bool, result: CopyResult) -> None:
    query = "SELECT value FROM meta WHERE key = 'fingerprint_salt'"
    theirs, ours = source.execute(query).fetchone(), target.execute(query).fetchone()
    if theirs is None or (ours is not None and ours[0] == theirs[0]):
        return
    if target_fresh:
        target.execute("UPDATE meta SET value = $1 WHERE key = 'fingerprint_salt'", [theirs[0]])
        result.notes.append("meta: the source's key-fingerprint salt now applies to the target")
    else:
        result.notes.append(
            "meta: the target already had requests and keeps its own key-fingerprint salt "
            "(fingerprints of copied rows and new rows differ for the same key)"
        )

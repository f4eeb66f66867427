"""Hourly and daily rollups of the requests table, and retention that deletes only rolled-up rows.

Two tables with the same shape, ``rollup_hour`` (bucket ``YYYY-MM-DDTHH``) and
``rollup_day`` (bucket ``YYYY-MM-DD``), both in UTC, keyed by the bucket and the
dimensions a long-range summary can still group or filter by:

    model, provider, upstream, user, key_fingerprint, source

Two more, ``rollup_day_model`` and ``rollup_hour_model``, drop user and key (the
dimensions that multiply row counts) so that the common "this month by model"
reads a few hundred rows; triggers on the full tables keep each equal to its
full table summed over user and key.

Session and tags are not rolled up (a session id per row would make the rollup
as large as the raw table, and tags are open-ended): summaries that group or
filter by them read raw rows only, so over ranges older than the retention
window they see only what is left. A missing dimension is stored as ``''``
(NULL cannot take part in a primary key); the read side turns ``''`` back into
``null`` for raw and rolled-up rows alike.

Measures are sums: requests, the token counts, ``cost_pico`` (exact integer
picodollars), ``unpriced_requests`` (usage reported, model not in the price
tables), ``unmetered_requests`` (no trusted usage) and ``errors``.

Incremental by rowid, not by time: `roll_up` folds the rows with
``rowid > watermark`` into both tables (additive upserts) and moves the
watermark, in one transaction on the writer thread. A row therefore counts in
the rollups exactly once, whatever its ``ts`` (late imports included), and a
reader that takes rollups for ``rowid <= watermark`` plus raw rows above it in
one snapshot sees every row exactly once. `compact` deletes raw rows older
than the retention cutoff, only below the watermark, in small batches, and
never the row with the highest rowid (so SQLite never reuses rowids below the
watermark). Both run as ``StoreWriter.call`` work, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from meterproxy.store.db import Db, Params
from meterproxy.store.migrations import Migrations

__all__ = [
    "COARSE_DIMENSIONS",
    "DIMENSIONS",
    "MEASURES",
    "RollupState",
    "changing_row",
    "compact",
    "roll_up",
    "rollup_migrations",
    "rollup_state",
    "unroll_row",
]

#: Rolled-up dimension -> column in ``requests``.
DIMENSIONS: dict[str, str] = {
    "model": "model",
    "provider": "provider",
    "upstream": "upstream",
    "user": "user",
    "key": "key_fingerprint",
    "source": "source",
}

#: Measure -> SQL aggregate over ``requests`` rows.
MEASURES: dict[str, str] = {
    "requests": "count(*)",
    "input_tokens": "sum(input_tokens)",
    "cache_read_tokens": "sum(cache_read_tokens)",
    "cache_write_tokens": "sum(cache_write_tokens)",
    "cache_write_1h_tokens": "sum(cache_write_1h_tokens)",
    "output_tokens": "sum(output_tokens)",
    "reasoning_tokens": "sum(reasoning_tokens)",
    "web_search_requests": "sum(web_search_requests)",
    "cost_pico": "COALESCE(sum(cost_pico), 0)",
    "unpriced_requests": "SUM(CASE WHEN cost_pico IS NULL AND usage_source = 'reported' THEN 1 ELSE 0 END)",
    "unmetered_requests": "SUM(CASE WHEN usage_source <> 'reported' THEN 1 ELSE 0 END)",
    "errors": "SUM(CASE WHEN COALESCE(status, 0) >= 400 OR error IS NOT NULL THEN 1 ELSE 0 END)",
    # Where costs came from (usage.COST_SOURCES), so summaries count each kind (rollups m004).
    "partial_requests": "SUM(CASE WHEN usage_source = 'partial' THEN 1 ELSE 0 END)",
    "provider_cost_requests": "SUM(CASE WHEN cost_source = 'provider' THEN 1 ELSE 0 END)",
    "estimated_requests": "SUM(CASE WHEN cost_source = 'estimated' THEN 1 ELSE 0 END)",
    # Estimates of answers without usage (estimate_usage): never part of cost_pico (rollups m005).
    "estimated_cost_pico": "COALESCE(sum(estimated_cost_pico), 0)",
}
#: The measures the first rollup migrations created (a migration never changes once applied),
#: and those m004 and m005 added.
_M001_MEASURES = tuple(MEASURES)[:12]
_M004_MEASURES = tuple(MEASURES)[12:15]
_M005_MEASURES = tuple(MEASURES)[15:16]

#: Dimension -> its column in ``requests`` as SQL (``user`` is a reserved word in PostgreSQL).
DIMENSION_SQL: dict[str, str] = {d: '"user"' if c == "user" else c for d, c in DIMENSIONS.items()}

#: Rollup table -> width of the ``ts`` prefix that is its bucket.
TABLES = {"rollup_hour": 13, "rollup_day": 10}

rollup_migrations = Migrations("meterproxy.rollups")


@rollup_migrations()
def m001_rollups(db: Db) -> None:
    t = db.dialect.text
    dims = ", ".join(f"{_q(d)} {t} NOT NULL" for d in DIMENSIONS)
    measures = ", ".join(f"{m} BIGINT NOT NULL DEFAULT 0" for m in _M001_MEASURES)
    for table in TABLES:
        db.execute(
            f"CREATE TABLE {table} (bucket {t} NOT NULL, {dims}, {measures}, "
            f"PRIMARY KEY (bucket, {', '.join(map(_q, DIMENSIONS))})){db.dialect.table_options}"
        )
    db.execute(
        "CREATE TABLE rollup_state (id BIGINT PRIMARY KEY CHECK (id = 1), "
        f"watermark BIGINT NOT NULL, compacted_before {t})"
    )
    # Rows already present when the feature is installed are folded in by the first pass.
    db.execute("INSERT INTO rollup_state (id, watermark, compacted_before) VALUES (1, 0, NULL)")


def _q(name: str) -> str:
    """A rollup column name as SQL (``user`` is reserved in PostgreSQL)."""
    return '"user"' if name == "user" else name


#: ``rollup_day_model``: days by these dimensions only, derived from ``rollup_day`` by triggers.
COARSE_DIMENSIONS = ("model", "provider", "upstream", "source")


def _coarse_table(db: Db, fine: str, coarse: str) -> None:
    """Create ``coarse`` = ``fine`` summed over user and key, kept equal by triggers on ``fine``."""
    # Triggers, not the roll-up itself: whoever writes the fine table (the roll-up's
    # upserts, an importer taking a replaced row out) keeps the coarse one right.
    t = db.dialect.text
    dims = ", ".join(COARSE_DIMENSIONS)
    measures = ", ".join(f"{m} BIGINT NOT NULL DEFAULT 0" for m in _M001_MEASURES)
    db.execute(
        f"CREATE TABLE {coarse} (bucket {t} NOT NULL, "
        f"{', '.join(f'{d} {t} NOT NULL' for d in COARSE_DIMENSIONS)}, {measures}, "
        f"PRIMARY KEY (bucket, {dims})){db.dialect.table_options}"
    )
    _coarse_triggers(db, fine, coarse, _M001_MEASURES)
    key = ("bucket", *COARSE_DIMENSIONS)
    db.execute(
        f"INSERT INTO {coarse} ({', '.join([*key, *_M001_MEASURES])}) "
        f"SELECT {', '.join(key)}, {', '.join(f'sum({m})' for m in _M001_MEASURES)} FROM {fine} "
        f"GROUP BY {', '.join(key)}"
    )


def _coarse_triggers(db: Db, fine: str, coarse: str, measures: tuple[str, ...]) -> None:
    """The triggers that keep ``coarse`` equal to ``fine`` summed, for these measures."""
    key = ("bucket", *COARSE_DIMENSIONS)
    match = " AND ".join(f"{d} = {{row}}.{d}" for d in key)
    add_new = (
        f"INSERT INTO {coarse} ({', '.join([*key, *measures])}) "
        f"VALUES ({', '.join(f'NEW.{c}' for c in [*key, *measures])}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
        f"{', '.join(f'{m} = {coarse}.{m} + excluded.{m}' for m in measures)}"
    )
    take_old = (
        f"UPDATE {coarse} SET {', '.join(f'{m} = {m} - OLD.{m}' for m in measures)} "
        f"WHERE {match.format(row='OLD')}"
    )
    for statement in [
        *db.dialect.trigger(f"{fine}_ai", "AFTER INSERT", fine, [add_new]),
        *db.dialect.trigger(f"{fine}_au", "AFTER UPDATE", fine, [take_old, add_new]),
        *db.dialect.trigger(f"{fine}_ad", "AFTER DELETE", fine, [take_old]),
    ]:
        db.execute(statement)


@rollup_migrations()
def m002_rollup_day_model(db: Db) -> None:
    # A month by model reads ~30 x 12 rows here instead of ~30 x (models x users x keys).
    _coarse_table(db, "rollup_day", "rollup_day_model")


@rollup_migrations()
def m003_rollup_hour_model(db: Db) -> None:
    # The whole hours at the ends of an unaligned range, by model: ~12 rows an hour, not ~600.
    _coarse_table(db, "rollup_hour", "rollup_hour_model")


@rollup_migrations()
def m004_cost_source_counts(db: Db) -> None:
    # Summaries count each kind of cost (usage.COST_SOURCES): new measures in every rollup table,
    # and the coarse tables' triggers rebuilt to maintain them. Rows rolled up before this count 0
    # in the new measures (before it, every cost but an import's agent figure was computed).
    _add_measures(db, _M004_MEASURES, (*_M001_MEASURES, *_M004_MEASURES))


@rollup_migrations()
def m005_estimated_cost(db: Db) -> None:
    # The estimated cost of answers without usage, summed apart from spend (meterproxy/estimate.py).
    _add_measures(db, _M005_MEASURES, (*_M001_MEASURES, *_M004_MEASURES, *_M005_MEASURES))


def _add_measures(db: Db, added: tuple[str, ...], all_measures: tuple[str, ...]) -> None:
    """New measure columns in every rollup table; the coarse tables' triggers rebuilt to keep them."""
    for table in (*TABLES, "rollup_day_model", "rollup_hour_model"):
        for m in added:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {m} BIGINT NOT NULL DEFAULT 0")
    for fine, coarse in (("rollup_day", "rollup_day_model"), ("rollup_hour", "rollup_hour_model")):
        for suffix in ("ai", "au", "ad"):
            db.execute(db.dialect.drop_trigger(f"{fine}_{suffix}", fine))
        _coarse_triggers(db, fine, coarse, all_measures)


@dataclass(slots=True, frozen=True)
class RollupState:
    #: Every ``requests`` row with ``rowid <= watermark`` is in both rollup tables.
    watermark: int
    #: Raw rows older than this ``ts`` may have been deleted (None: nothing deleted yet).
    compacted_before: str | None


def rollup_state(conn: Db) -> RollupState:
    row = conn.execute("SELECT watermark, compacted_before FROM rollup_state WHERE id = 1").fetchone()
    return RollupState(int(row[0]), row[1])


def _upsert_sql(table: str, width: int) -> str:
    dims = list(DIMENSIONS)
    select = [
        f"substr(ts, 1, {width})",
        *(f"COALESCE({DIMENSION_SQL[d]}, '')" for d in dims),
        *MEASURES.values(),
    ]
    updates = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in MEASURES)
    names = ", ".join(map(_q, dims))
    return (
        f"INSERT INTO {table} (bucket, {names}, {', '.join(MEASURES)}) SELECT {', '.join(select)} "
        f"FROM requests WHERE rowid > $1 AND rowid <= $2 "
        f"GROUP BY {', '.join(str(i + 1) for i in range(len(dims) + 1))} "
        f"ON CONFLICT (bucket, {names}) DO UPDATE SET {updates}"
    )


_UPSERTS = [_upsert_sql(table, width) for table, width in TABLES.items()]

#: SQLite: the rows to fold in are grouped by hour once, into this temporary table, and both
#: upserts read its few rows. SQLite groups by sorting every row, and sorting them once per table
#: was half the roll-up's cost, on the writer thread beside the event loop (~40,000 instructions
#: per row -> ~22,000, bench/README.md, issue 21 "step 5"). PostgreSQL groups by hashing, in its own
#: process: it keeps `_UPSERTS`, one statement per table.
_BATCH = "rollup_batch"


def _batch_sql() -> tuple[str, str, list[str], str]:
    """(create the temporary table, fill it with the rows' hours, the upserts from it, empty it)."""
    dims = list(DIMENSIONS)
    names = ", ".join(map(_q, dims))
    measures = ", ".join(MEASURES)
    width = max(TABLES.values())
    keys = ", ".join(str(i + 1) for i in range(len(dims) + 1))
    create = (
        f"CREATE TEMP TABLE IF NOT EXISTS {_BATCH} (bucket TEXT NOT NULL, "
        f"{', '.join(f'{_q(d)} TEXT NOT NULL' for d in dims)}, "
        f"{', '.join(f'{m} INTEGER NOT NULL' for m in MEASURES)})"
    )
    select = [
        f"substr(ts, 1, {width})",
        *(f"COALESCE({DIMENSION_SQL[d]}, '')" for d in dims),
        *MEASURES.values(),
    ]
    fill = (
        f"INSERT INTO {_BATCH} (bucket, {names}, {measures}) SELECT {', '.join(select)} "
        f"FROM requests WHERE rowid > $1 AND rowid <= $2 GROUP BY {keys}"
    )
    upserts = []
    for table, table_width in TABLES.items():
        bucket = "bucket" if table_width == width else f"substr(bucket, 1, {table_width})"
        updates = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in MEASURES)
        upserts.append(
            f"INSERT INTO {table} (bucket, {names}, {measures}) "
            f"SELECT {bucket}, {names}, {', '.join(f'sum({m})' for m in MEASURES)} FROM {_BATCH} "
            # "WHERE": SQLite's parser needs one before an upsert clause after a SELECT.
            f"WHERE 1 = 1 GROUP BY {keys} ON CONFLICT (bucket, {names}) DO UPDATE SET {updates}"
        )
    return create, fill, upserts, f"DELETE FROM {_BATCH}"


_BATCH_CREATE, _BATCH_FILL, _BATCH_UPSERTS, _BATCH_EMPTY = _batch_sql()


def roll_up(conn: Db, batch: int = 50_000) -> int:
    """Fold up to ``batch`` rows above the watermark into the rollups; returns how many.

    Call inside a write transaction (``StoreWriter.call`` provides one).
    """
    low = rollup_state(conn).watermark
    row = conn.execute(
        "SELECT count(*), max(rowid) FROM "
        "(SELECT rowid FROM requests WHERE rowid > $1 ORDER BY rowid LIMIT $2) AS batch",
        [low, batch],
    ).fetchone()
    count, high = int(row[0]), row[1]
    if not count:
        return 0
    if conn.dialect.in_process:
        conn.execute(_BATCH_CREATE)
        conn.execute(_BATCH_FILL, [low, high])
        for sql in _BATCH_UPSERTS:
            conn.execute(sql)
        conn.execute(_BATCH_EMPTY)
    else:
        for sql in _UPSERTS:
            conn.execute(sql, [low, high])
    conn.execute("UPDATE rollup_state SET watermark = $1 WHERE id = 1", [high])
    return count


def compact(conn: Db, cutoff: str, batch: int = 5_000) -> int:
    """Delete up to ``batch`` raw rows with ``ts < cutoff`` that are already rolled up.

    Call inside a write transaction; repeat until it returns 0. Records the
    cutoff so readers know raw rows before it may be gone.
    """
    state = rollup_state(conn)
    top = conn.execute("SELECT max(rowid) FROM requests").fetchone()[0]
    if top is None:
        return 0
    limit = min(state.watermark, int(top) - 1)
    deleted = conn.execute(
        "DELETE FROM requests WHERE rowid IN "
        "(SELECT rowid FROM requests WHERE ts < $1 AND rowid <= $2 ORDER BY ts LIMIT $3)",
        [cutoff, limit, batch],
    ).rowcount
    if deleted and (state.compacted_before is None or cutoff > state.compacted_before):
        conn.execute("UPDATE rollup_state SET compacted_before = $1 WHERE id = 1", [cutoff])
    return int(deleted)


def unroll_row(conn: Db, rid: str) -> None:
    """Take one already rolled-up row back out of the rollups, before it is replaced or deleted.

    Rollups fold a row in once, by rowid; a row replaced after that would count
    twice (old values in the rollups, new row above the watermark), a row deleted
    would still count. Rows above the watermark are not in the rollups yet: nothing
    to do. Call inside the write transaction that changes the row.
    """
    rowid = _rolled_up(conn, rid)
    if rowid is not None:
        _take_out(conn, rowid)


@contextmanager
def changing_row(conn: Db, rid: str) -> Iterator[None]:
    """Keep the rollups equal to their rows while one row is updated in place (``reprice``).

    The rolled-up row's measures are read before and after the update, and their
    difference is added to its hour and day buckets (the by-model tables follow
    through their triggers), so every measure that depends on the changed
    columns follows (``cost_pico``, ``estimated_cost_pico``, ``unpriced_requests``,
    the cost-source counts), not only those a caller thought of. The update must
    not change a rolled-up dimension or ``ts``. Rows above the watermark are not
    rolled up yet: nothing to do. Use inside the write transaction that updates
    the row.
    """
    rowid = _rolled_up(conn, rid)
    if rowid is None:
        yield
        return
    dims = ", ".join(f"COALESCE({column}, '')" for column in DIMENSION_SQL.values())
    ts, *key = conn.execute(f"SELECT ts, {dims} FROM requests WHERE rowid = $1", [rowid]).fetchone()
    before = _measures(conn, rowid)
    yield
    delta = [new - old for new, old in zip(_measures(conn, rowid), before, strict=True)]
    if not any(delta):
        return
    sets = ", ".join(f"{m} = {m} + ${i}" for i, m in enumerate(MEASURES, 1))
    for table, width in TABLES.items():
        p = Params(*delta)
        where = " AND ".join(
            f"{_q(d)} = {p(v)}" for d, v in zip(("bucket", *DIMENSIONS), (ts[:width], *key), strict=True)
        )
        conn.execute(f"UPDATE {table} SET {sets} WHERE {where}", p.values)


def _measures(conn: Db, rowid: int) -> list[int]:
    """One row's measures, as the roll-up sums them."""
    row = conn.execute(f"SELECT {', '.join(MEASURES.values())} FROM requests WHERE rowid = $1", [rowid])
    return [int(v or 0) for v in row.fetchone()]


def _rolled_up(conn: Db, rid: str) -> int | None:
    """The rowid of request ``rid`` if the rollups hold it (at or below the watermark)."""
    found = conn.execute("SELECT rowid FROM requests WHERE id = $1", [rid]).fetchone()
    if found is None or int(found[0]) > rollup_state(conn).watermark:
        return None
    return int(found[0])


def _take_out(conn: Db, rowid: int) -> None:
    dims = [f"COALESCE({column}, '')" for column in DIMENSION_SQL.values()]
    for table, width in TABLES.items():
        values = conn.execute(
            f"SELECT substr(ts, 1, {width}), {', '.join(dims)}, {', '.join(MEASURES.values())} "
            f"FROM requests WHERE rowid = $1 GROUP BY {', '.join(str(i + 1) for i in range(len(dims) + 1))}",
            [rowid],
        ).fetchone()
        bucket_and_dims, measures = list(values[: len(dims) + 1]), list(values[len(dims) + 1 :])
        p = Params(*measures)
        sets = ", ".join(f"{m} = {m} - ${i}" for i, m in enumerate(MEASURES, 1))
        keys = zip(("bucket", *DIMENSIONS), bucket_and_dims, strict=True)
        where = " AND ".join(f"{_q(d)} = {p(v)}" for d, v in keys)
        conn.execute(f"UPDATE {table} SET {sets} WHERE {where}", p.values)

"""Importing usage that never went through the proxy (coding agents' local logs).

An importer turns lines of a log into `RequestRecord`s with ``source`` set to
where they came from (``claude-code``, ``zeroclaw``, ...); this module writes
them. The design rests on three rules:

- **Stable ids.** A record's id is derived from its source and the source's own
  keys (Claude Code's message id + request id; a line's ``id``, or the line's
  bytes), never from the clock, so re-running an import finds the same ids and
  ``ON CONFLICT DO NOTHING`` adds nothing twice. When a source writes growing
  snapshots of one answer (Claude Code's streaming entries), `ImportStore.write`
  keeps the largest one (``keep="largest"``): a later, bigger snapshot replaces
  a smaller one already stored, a smaller one never replaces a bigger one.
- **Offsets commit with the rows.** For tailed files the byte offset reached is
  stored in ``import_files`` in the same transaction as the rows read up to it,
  so a crash never skips or repeats lines. The file's inode and a hash of its
  first bytes are stored too: a different inode (rotation) or a changed head /
  shorter size (truncation) restarts reading from the beginning.
- **Counted once with the proxy.** An agent that ran through the proxy is in
  its own log too. Rows carry the provider's request id
  (``provider_request_id``: Claude Code's ``requestId`` is Anthropic's
  ``request-id`` header); an imported entry whose id a proxied row already has
  is skipped (counted in ``already proxied``), and a proxied row that arrives
  after the import replaces the imported one (`meterproxy.imports.dedup`).
- **Priced by our tables.** Records carrying token counts are priced by
  `PriceBook` exactly as proxied ones are; a cost the source reported itself is
  kept in ``provider_cost_usd`` and used as the cost only when our tables cannot
  price the line (unknown model, or only a total token count).

The CLI is its own process and may run while a proxy writes the same database:
`ImportStore` opens its own connection (WAL, ``busy_timeout``) and writes in
short ``BEGIN IMMEDIATE`` transactions.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from meterproxy.pricing import PriceBook
from meterproxy.store import Db, Migrations, Params
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.rollups import unroll_row
from meterproxy.store.schema import COLUMNS, record_to_row
from meterproxy.usage import RequestRecord

__all__ = [
    "FileState",
    "ImportStats",
    "ImportStore",
    "import_migrations",
    "price_imported",
    "proxied_request_ids",
    "stable_id",
]

import_migrations = Migrations("meterproxy.imports")


@import_migrations()
def m001_import_files(db: Db) -> None:
    t = db.dialect.text
    db.execute(
        f"""
        CREATE TABLE import_files (
            source {t} NOT NULL,
            path {t} NOT NULL,
            inode BIGINT,
            "offset" BIGINT NOT NULL DEFAULT 0,
            size BIGINT,
            mtime_ns BIGINT,
            head {t},
            updated {t},
            PRIMARY KEY (source, path)
        )
        """
    )


HEAD_BYTES = 256


def stable_id(source: str, *keys: str) -> str:
    """A UUID-shaped id that is a pure function of the source and its keys."""
    digest = hashlib.sha256("\x1f".join((source, *keys)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16]))


def price_imported(book: PriceBook, record: RequestRecord, reported_cost: Decimal | None) -> None:
    """Set the record's cost from our tables, or from the source's own figure."""
    record.provider_cost_usd = reported_cost
    record.cost_usd = None
    record.priced_model = None
    if record.usage is not None and not record.extra.get("total_only"):
        result = book.price(
            model=record.model,
            usage=record.usage,
            at=record.ts,
            provider=record.provider or None,
            service_tier=record.service_tier,
        )
        if result is not None:
            record.cost_usd = result.cost_usd
            record.priced_model = result.model
            record.cost_source = "computed"
            if not record.provider:
                record.provider = result.provider
            return
    if reported_cost is not None:
        record.cost_usd = reported_cost
        record.cost_source = "provider"
        record.extra["cost_from"] = "source"


@dataclass(slots=True)
class ImportStats:
    """What one import run did; `summary` is the line the CLI prints."""

    files: int = 0
    lines: int = 0
    records: int = 0
    inserted: int = 0
    replaced: int = 0
    duplicates: int = 0
    skipped: int = 0
    unchanged: int = 0
    #: Entries the proxy already recorded (same provider request id): not imported again.
    proxied: int = 0
    malformed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.inserted} new, {self.replaced} updated, {self.duplicates} already imported, "
            + (f"{self.proxied} already proxied, " if self.proxied else "")
            + f"{self.skipped} skipped, {len(self.malformed)} malformed "
            f"({self.records} records from {self.lines} lines in {self.files} files"
            + (f", {self.unchanged} unchanged files not re-read)" if self.unchanged else ")")
        )


@dataclass(slots=True)
class FileState:
    """Where reading a file got to (a row of ``import_files``)."""

    inode: int | None = None
    offset: int = 0
    size: int | None = None
    mtime_ns: int | None = None
    head: str | None = None


class ImportStore:
    """The import side's own write connection (a separate process from the proxy)."""

    def __init__(self, db_path: str | Path) -> None:
        self.conn = connect(db_path)
        apply_migrations(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ImportStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def file_state(self, source: str, path: str) -> FileState | None:
        row = self.conn.execute(
            'SELECT inode, "offset", size, mtime_ns, head FROM import_files WHERE source = $1 AND path = $2',
            [source, path],
        ).fetchone()
        return FileState(*row) if row else None

    def write(
        self,
        records: Sequence[RequestRecord],
        stats: ImportStats,
        *,
        keep: Literal["first", "largest"] = "first",
        file: tuple[str, str, FileState] | None = None,
    ) -> None:
        """Store `records` (and a file's new state) in one transaction.

        The rows to insert are gathered first and go in as one bulk load
        (`Db.insert_many`: ``COPY`` on PostgreSQL, one ``executemany`` on SQLite),
        not one statement per row; a later entry of the same id that wins
        (``keep="largest"``) replaces the gathered row, or the stored one.
        """
        with self.conn.transaction():
            self.conn.lock_request_order()
            existing = self._existing([r.id for r in records])
            proxied = proxied_request_ids(self.conn, [r.provider_request_id for r in records])
            new: dict[str, tuple[Any, ...]] = {}
            for record in records:
                if record.provider_request_id in proxied:
                    stats.proxied += 1
                    continue
                if record.id not in existing:
                    new[record.id] = record_to_row(record)
                    stats.inserted += 1
                elif keep == "largest" and _size(record) > existing[record.id]:
                    if record.id not in new:
                        # Deleted and inserted again (a new rowid), so the rollups fold it in anew.
                        unroll_row(self.conn, record.id)
                        self.conn.execute("DELETE FROM requests WHERE id = $1", [record.id])
                    new[record.id] = record_to_row(record)
                    stats.replaced += 1
                else:
                    stats.duplicates += 1
                existing[record.id] = max(existing.get(record.id, (0, 0)), _size(record))
            if new:
                self.conn.insert_many("requests", COLUMNS, list(new.values()), key="id")
            if file is not None:
                self._save_state(*file)

    def _existing(self, ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), 500):
            p = Params()
            marks = p.many(unique[start : start + 500])
            for rid, out, inp in self.conn.execute(
                f"SELECT id, output_tokens, input_tokens FROM requests WHERE id IN ({marks})", p.values
            ):
                found[rid] = (out, inp)
        return found

    def _save_state(self, source: str, path: str, state: FileState) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        self.conn.execute(
            'INSERT INTO import_files (source, path, inode, "offset", size, mtime_ns, head, updated)'
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (source, path) DO UPDATE SET "
            'inode = excluded.inode, "offset" = excluded."offset", size = excluded.size, '
            "mtime_ns = excluded.mtime_ns, head = excluded.head, updated = excluded.updated",
            [source, path, state.inode, state.offset, state.size, state.mtime_ns, state.head, now],
        )

    def save_state(self, source: str, path: str, state: FileState) -> None:
        with self.conn.transaction():
            self._save_state(source, path, state)


def proxied_request_ids(conn: Db, ids: Iterable[str | None]) -> set[str]:
    """Which of these provider request ids a proxied row already carries."""
    found: set[str] = set()
    unique = [i for i in dict.fromkeys(ids) if i]
    for start in range(0, len(unique), 500):
        p = Params()
        marks = p.many(unique[start : start + 500])
        found.update(
            row[0]
            for row in conn.execute(
                f"SELECT provider_request_id FROM requests WHERE provider_request_id IN ({marks}) "
                "AND source = 'proxy'",
                p.values,
            )
        )
    return found


def _size(record: RequestRecord) -> tuple[int, int]:
    u = record.tokens
    return (u.output_tokens, u.input_tokens)

"""The requests table, its migrations, and how a `RequestRecord` becomes a row.

Migrations are named, ordered functions in sqlite-utils' `Migrations` set
``meterproxy.core``; one applied is never edited (add a new one instead). Other
features (budgets, imports, rollups) keep their own migration sets, so their
histories never interleave with this one.

Costs are stored twice from one computation: ``cost_usd`` as the exact decimal
text (what a person reads in the sqlite3 shell) and ``cost_pico`` as an integer
number of 10^-12 USD, which SQL can sum exactly over millions of rows (a float
column would drift). Prices are per million tokens with at most six decimals,
so every cost is a whole number of picodollars; anything finer is rounded
half-even and the rounding is the one place precision is lost.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils import Migrations

from meterproxy.money import stored_cost_text, to_pico
from meterproxy.timestamps import format_ts
from meterproxy.usage import RequestRecord

__all__ = [
    "COLUMNS",
    "apply_migrations",
    "connect",
    "core_migrations",
    "record_to_row",
]


core_migrations = Migrations("meterproxy.core")


@core_migrations()
def m001_requests(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            ts TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT 'proxy',
            upstream TEXT,
            provider TEXT,
            endpoint TEXT,
            method TEXT,
            requested_model TEXT,
            model TEXT,
            priced_model TEXT,
            status INTEGER,
            streamed INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            cache_read_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            web_search_requests INTEGER NOT NULL DEFAULT 0,
            cost_usd TEXT,
            cost_pico INTEGER,
            provider_cost_usd TEXT,
            usage_source TEXT NOT NULL,
            service_tier TEXT,
            duration_ms REAL,
            ttfb_ms REAL,
            upstream_ms REAL,
            user TEXT,
            session TEXT,
            tags TEXT NOT NULL DEFAULT '{}',
            key_fingerprint TEXT,
            error TEXT,
            client_disconnected INTEGER NOT NULL DEFAULT 0,
            usage_injected INTEGER NOT NULL DEFAULT 0,
            extra TEXT
        )
        """
    )
    db.execute("CREATE INDEX requests_ts ON requests (ts)")
    db.execute("CREATE INDEX requests_session_ts ON requests (session, ts)")
    db.execute("CREATE INDEX requests_user_ts ON requests (user, ts)")
    db.execute("CREATE INDEX requests_model_ts ON requests (model, ts)")


@core_migrations()
def m002_meta(db: sqlite_utils.Database) -> None:
    # Installation-wide values; the key-fingerprint salt lives here so every
    # process (and every replica on a shared store) fingerprints alike.
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('fingerprint_salt', ?)", [secrets.token_hex(16)])


@core_migrations()
def m003_provider_request_id(db: sqlite_utils.Database) -> None:
    # Which provider request a row is: an imported agent log entry whose request id a
    # proxied row already has is the same request, counted once (meterproxy.imports).
    db.execute("ALTER TABLE requests ADD COLUMN provider_request_id TEXT")
    db.execute("CREATE INDEX requests_provider_request_id ON requests (provider_request_id)")


COLUMNS = [
    "id",
    "ts",
    "source",
    "upstream",
    "provider",
    "endpoint",
    "method",
    "requested_model",
    "model",
    "priced_model",
    "status",
    "streamed",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "cost_usd",
    "cost_pico",
    "provider_cost_usd",
    "usage_source",
    "service_tier",
    "duration_ms",
    "ttfb_ms",
    "upstream_ms",
    "user",
    "session",
    "tags",
    "key_fingerprint",
    "error",
    "client_disconnected",
    "usage_injected",
    "extra",
    "provider_request_id",
]


def record_to_row(record: RequestRecord) -> tuple[Any, ...]:
    u = record.tokens
    cost = record.cost_usd
    pico = to_pico(cost) if cost is not None else None
    return (
        record.id,
        format_ts(record.ts),
        record.source,
        record.upstream,
        record.provider,
        record.endpoint,
        record.method,
        record.requested_model,
        record.model,
        record.priced_model,
        record.status,
        int(record.streamed),
        u.input_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.cache_write_1h_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        u.web_search_requests,
        stored_cost_text(pico),
        pico,
        str(record.provider_cost_usd) if record.provider_cost_usd is not None else None,
        record.usage_source,
        record.service_tier,
        record.duration_ms,
        record.ttfb_ms,
        record.upstream_ms,
        record.user,
        record.session,
        json.dumps(record.tags, sort_keys=True, separators=(",", ":")),
        record.key_fingerprint,
        record.error,
        int(record.client_disconnected),
        int(record.usage_injected),
        json.dumps(record.extra, default=str) if record.extra else None,
        record.provider_request_id,
    )


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pragmas every meterproxy connection uses."""
    path = str(path)
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        fresh = path != ":memory:" and not os.path.exists(path)
        if fresh:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Owner-only from the first byte: create the file before SQLite does.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def apply_migrations(conn: sqlite3.Connection) -> None:
    """Apply every registered migration set (core first, then features')."""
    from meterproxy.store import migration_sets

    db = sqlite_utils.Database(conn)
    for migrations in migration_sets():
        migrations.apply(db)

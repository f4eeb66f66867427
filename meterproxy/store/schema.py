"""The requests table, its migrations, and how a `RequestRecord` becomes a row.

Migrations are named, ordered functions in the `Migrations` set
``meterproxy.core`` (``store/migrations.py``); one applied is never edited (add a new one instead). Other
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
import secrets
from typing import Any

from meterproxy.money import stored_cost_text, to_pico
from meterproxy.store.db import Db
from meterproxy.store.migrations import Migrations
from meterproxy.timestamps import format_ts
from meterproxy.usage import RequestRecord

__all__ = [
    "COLUMNS",
    "core_migrations",
    "record_to_row",
]

core_migrations = Migrations("meterproxy.core")


#: The per-modality token columns m007 adds, in `Usage`'s field order.
MODALITY_COLUMNS = (
    "audio_input_tokens",
    "audio_cache_read_tokens",
    "image_input_tokens",
    "audio_output_tokens",
    "image_output_tokens",
)


@core_migrations()
def m001_requests(db: Db) -> None:
    t = db.dialect.text
    db.execute(
        f"""
        CREATE TABLE requests (
            id {t} PRIMARY KEY,
            ts {t} NOT NULL,
            source {t} NOT NULL DEFAULT 'proxy',
            upstream {t},
            provider {t},
            endpoint {t},
            method {t},
            requested_model {t},
            model {t},
            priced_model {t},
            status BIGINT,
            streamed BIGINT NOT NULL DEFAULT 0,
            input_tokens BIGINT NOT NULL DEFAULT 0,
            cache_read_tokens BIGINT NOT NULL DEFAULT 0,
            cache_write_tokens BIGINT NOT NULL DEFAULT 0,
            cache_write_1h_tokens BIGINT NOT NULL DEFAULT 0,
            output_tokens BIGINT NOT NULL DEFAULT 0,
            reasoning_tokens BIGINT NOT NULL DEFAULT 0,
            web_search_requests BIGINT NOT NULL DEFAULT 0,
            cost_usd {t},
            cost_pico BIGINT,
            provider_cost_usd {t},
            usage_source {t} NOT NULL,
            service_tier {t},
            duration_ms DOUBLE PRECISION,
            ttfb_ms DOUBLE PRECISION,
            upstream_ms DOUBLE PRECISION,
            "user" {t},
            session {t},
            tags {t} NOT NULL DEFAULT '{{}}',
            key_fingerprint {t},
            error {t},
            client_disconnected BIGINT NOT NULL DEFAULT 0,
            usage_injected BIGINT NOT NULL DEFAULT 0,
            extra {t}
            {db.dialect.rowid_column}
        )
        """
    )
    db.execute("CREATE INDEX requests_ts ON requests (ts)")
    db.execute("CREATE INDEX requests_session_ts ON requests (session, ts)")
    db.execute('CREATE INDEX requests_user_ts ON requests ("user", ts)')
    db.execute("CREATE INDEX requests_model_ts ON requests (model, ts)")


@core_migrations()
def m002_meta(db: Db) -> None:
    # Installation-wide values; the key-fingerprint salt lives here so every
    # process (and every replica on a shared store) fingerprints alike.
    db.execute(f"CREATE TABLE meta (key {db.dialect.text} PRIMARY KEY, value {db.dialect.text} NOT NULL)")
    db.execute("INSERT INTO meta (key, value) VALUES ('fingerprint_salt', $1)", [secrets.token_hex(16)])


@core_migrations()
def m003_provider_request_id(db: Db) -> None:
    # Which provider request a row is: an imported agent log entry whose request id a
    # proxied row already has is the same request, counted once (meterproxy.imports).
    db.execute(f"ALTER TABLE requests ADD COLUMN provider_request_id {db.dialect.text}")
    db.execute("CREATE INDEX requests_provider_request_id ON requests (provider_request_id)")


#: What earlier versions installed into a PostgreSQL schema to emulate SQLite there (functions,
#: aggregates, a view, the requests insert-order trigger). Queries no longer need any of it.
_EMULATION = (
    "DROP VIEW IF EXISTS sqlite_master",
    "DROP AGGREGATE IF EXISTS sum(boolean)",
    "DROP AGGREGATE IF EXISTS json_group_array(anycompatible)",
    "DROP FUNCTION IF EXISTS sqlite_bool_sum(bigint, boolean)",
    "DROP FUNCTION IF EXISTS sqlite_json_array(anycompatiblearray)",
    "DROP FUNCTION IF EXISTS ifnull(anycompatible, anycompatible)",
    "DROP FUNCTION IF EXISTS ifnull(text, text)",
    "DROP FUNCTION IF EXISTS ifnull(bigint, text)",
    "DROP FUNCTION IF EXISTS ifnull(double precision, text)",
    "DROP FUNCTION IF EXISTS ifnull(numeric, text)",
    "DROP FUNCTION IF EXISTS json_extract(text, text)",
    "DROP FUNCTION IF EXISTS strftime(text, text)",
    "DROP FUNCTION IF EXISTS sqlite_ts(text)",
    "DROP FUNCTION IF EXISTS json(text)",
    "DROP FUNCTION IF EXISTS iif(boolean, anycompatible, anycompatible)",
    "DROP FUNCTION IF EXISTS iif(bigint, anycompatible, anycompatible)",
    # Its trigger goes with it (CASCADE); writers now take the same lock themselves.
    "DROP FUNCTION IF EXISTS meterproxy_requests_insert_lock() CASCADE",
    # Where they recorded applied migrations (adopted into meterproxy_migrations by now).
    "DROP TABLE IF EXISTS _migrations",
)


@core_migrations()
def m004_no_sqlite_emulation(db: Db) -> None:
    if db.dialect.name == "postgresql":
        for statement in _EMULATION:
            db.execute(statement)
    else:
        db.execute("DROP TABLE IF EXISTS _sqlite_migrations")


@core_migrations()
def m005_import_endpoints(db: Db) -> None:
    # Imported rows name their endpoint as proxied rows of the same call do ("messages",
    # not "/v1/messages"; an agent log's calls by their provider's chat endpoint, not "").
    db.execute("UPDATE requests SET endpoint = 'messages' WHERE endpoint = '/v1/messages'")
    db.execute(
        "UPDATE requests SET endpoint = CASE provider WHEN 'anthropic' THEN 'messages' "
        "WHEN 'gemini' THEN 'generate_content' ELSE 'chat' END "
        "WHERE endpoint = '' AND source <> 'proxy'"
    )


@core_migrations()
def m006_cost_source(db: Db) -> None:
    # Where each row's cost came from (usage.COST_SOURCES). Rows before this were computed from
    # reported or partial usage, or (imports) taken from the agent log where our tables could not.
    db.execute(f"ALTER TABLE requests ADD COLUMN cost_source {db.dialect.text}")
    db.execute(
        "UPDATE requests SET cost_source = CASE "
        "WHEN cost_pico IS NULL THEN NULL "
        "WHEN usage_source = 'partial' THEN 'partial' "
        "WHEN priced_model IS NULL AND provider_cost_usd IS NOT NULL THEN 'provider' "
        "ELSE 'computed' END"
    )


@core_migrations()
def m007_modality_tokens(db: Db) -> None:
    # Audio and image tokens, billed at their own rates (OpenAI realtime, images, audio):
    # subsets of input_tokens / output_tokens, zero for text-only rows (see usage.py).
    for column in MODALITY_COLUMNS:
        db.execute(f"ALTER TABLE requests ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0")


@core_migrations()
def m008_ts_covering_index(db: Db) -> None:
    # The page's session list and "most expensive requests" group or sort a whole
    # range: with these columns in the ts index they read the index alone (80,000
    # rows over 30 days: ~150 ms of table reads become ~15 ms, bench/sessions_bench.py).
    # It replaces requests_ts (its prefix), so the writer still maintains one index here.
    db.execute(
        "CREATE INDEX requests_ts_cover ON requests "
        "(ts, session, cost_pico, input_tokens, output_tokens, duration_ms)"
    )
    db.execute("DROP INDEX requests_ts")


@core_migrations()
def m009_estimated_cost(db: Db) -> None:
    # estimate_usage: the priced estimate of an answer that reported no usage, apart from cost_pico
    # so that no sum of spend can include it (meterproxy/estimate.py). NULL on every other row.
    db.execute(f"ALTER TABLE requests ADD COLUMN estimated_cost_usd {db.dialect.text}")
    db.execute("ALTER TABLE requests ADD COLUMN estimated_cost_pico BIGINT")


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
    "cost_source",
    *MODALITY_COLUMNS,
    "estimated_cost_usd",
    "estimated_cost_pico",
]


#: `json.dumps` with these options, made once: with any option it builds an encoder per call.
_tags_json = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_extra_json = json.JSONEncoder(default=str).encode


def record_to_row(record: RequestRecord) -> tuple[Any, ...]:
    u = record.tokens
    cost = record.cost_usd
    pico = to_pico(cost) if cost is not None else None
    extra, source = record.extra, record.cost_source if cost is not None else None
    estimate = record.estimate if cost is None else None
    estimated = None
    if estimate is not None:
        extra = {**extra, "estimate": estimate.as_dict()}
        if estimate.cost_usd is not None:
            estimated, source = to_pico(estimate.cost_usd), "estimated"
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
        _tags_json(record.tags) if record.tags else "{}",
        record.key_fingerprint,
        record.error,
        int(record.client_disconnected),
        int(record.usage_injected),
        _extra_json(extra) if extra else None,
        record.provider_request_id,
        source,
        u.audio_input_tokens,
        u.audio_cache_read_tokens,
        u.image_input_tokens,
        u.audio_output_tokens,
        u.image_output_tokens,
        stored_cost_text(estimated),
        estimated,
    )

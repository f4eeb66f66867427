"""Rows of one kind look alike whatever their source or path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from openai import AsyncOpenAI

from meterproxy.store.backend import connect
from meterproxy.store.migrations import apply_migrations
from meterproxy.testing import Reply
from tests.helpers.sdk import SDK_TIMEOUT


async def test_model_listing_rows_name_their_provider(make_proxy, upstream) -> None:
    upstream.reply("/v1/models", Reply(body=b'{"object":"list","data":[{"id":"gpt-4o","object":"model"}]}'))
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    models = [m.id async for m in client.models.list()]
    assert models == ["gpt-4o"]
    [row] = await proxy.rows(1)
    assert (row["provider"], row["endpoint"], row["usage_source"]) == ("openai", "models", "none")


def test_migration_renames_old_import_endpoints(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = connect(db)
    apply_migrations(conn)
    rows = [
        ("a", "claude_code", "anthropic", "/v1/messages"),
        ("b", "zeroclaw", "openai", ""),
        ("c", "zeroclaw", "anthropic", ""),
        ("d", "proxy", "", "other"),
    ]
    for rid, source, provider, endpoint in rows:
        conn.execute(
            "INSERT INTO requests (id, ts, source, provider, endpoint, usage_source) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            (rid, "2026-12-01T00:00:00.000000Z", source, provider, endpoint, "reported"),
        )
    # Undo m004 as if the database predated it, then migrate again.
    conn.execute("DELETE FROM meterproxy_migrations WHERE name = 'm005_import_endpoints'")
    conn.execute("UPDATE requests SET endpoint = '/v1/messages' WHERE id = 'a'")
    apply_migrations(conn)
    got = dict(conn.execute("SELECT id, endpoint FROM requests").fetchall())
    conn.close()
    assert got == {"a": "messages", "b": "chat", "c": "messages", "d": "other"}
    assert sqlite3.connect(db).execute("SELECT count(*) FROM requests").fetchone() == (4,)

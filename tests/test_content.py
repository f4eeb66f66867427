"""store_content: opt-in request/answer text, redacted before it is written, never exported."""

from __future__ import annotations

import sqlite3

import aiohttp
import openai
import pytest

from meterproxy.settings import SettingsError, load_settings
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.sdk import SDK_TIMEOUT

MARKER = "PROMPT-MARKER-5b1e-quarterly-plan"
EMAIL = "jane.doe@example.com"
KEY_IN_PROMPT = "sk-proj-abcdefghijklmnopqrstuv123456"


def content_rows(db: object) -> list[tuple[str, str, str, int]]:
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute("SELECT id, request, response, truncated FROM request_content").fetchall()
    finally:
        conn.close()


async def wait_content(proxy: ProxyHarness, n: int) -> list[tuple[str, str, str, int]]:
    def enough() -> list[tuple[str, str, str, int]]:
        rows = content_rows(proxy.db)
        return rows if len(rows) >= n else []

    return await proxy.until(enough, what=f"{n} content rows")


async def test_enabled_content_is_stored_redacted_and_kept_out_of_exports(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx)
    proxy = await make_proxy(store_content=True, content_redact_patterns=[r"[\w.]+@[\w.]+\.\w+"])
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-000000000000"
    )
    prompt = f"{MARKER} mail {EMAIL} my key is {KEY_IN_PROMPT}"
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    [(rid, request, response, truncated)] = await wait_content(proxy, 1)
    assert MARKER in request
    assert EMAIL not in request and KEY_IN_PROMPT not in request and "[REDACTED]" in request
    # The answer as the client got it: the injected usage chunk was stripped before capture.
    assert response == load_fixture("openai_chat_stream_no_usage").body.decode()
    assert "London" in text and "London" in response
    assert truncated == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/api/requests/{rid}/content") as resp:
            body = await resp.json()
            assert body["request"] == request and body["response"] == response
        for fmt in ("csv", "jsonl"):
            async with http.get(f"{proxy.url}/api/export", params={"format": fmt}) as resp:
                exported = await resp.text()
                assert rid in exported and MARKER not in exported
        async with http.get(f"{proxy.url}/api/requests") as resp:
            assert MARKER not in await resp.text()
    for f in proxy.db.parent.iterdir():
        if f.name.startswith(proxy.db.name):
            data = f.read_bytes()
            assert EMAIL.encode() not in data and KEY_IN_PROMPT.encode() not in data


async def test_content_is_capped_and_follows_its_request_when_deleted(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy(store_content=True, content_max_bytes=40)
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-x")
    await client.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": "x" * 200}])
    [(rid, request, response, truncated)] = await wait_content(proxy, 1)
    assert len(request.encode()) <= 40 and len(response.encode()) <= 40 and truncated == 1
    assert response == fx.body[:40].decode()
    conn = sqlite3.connect(proxy.db)
    with conn:
        conn.execute("DELETE FROM requests WHERE id = ?", [rid])
    assert content_rows(proxy.db) == []


async def test_off_by_default_nothing_is_kept(upstream: FakeUpstream, proxy: object) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-x")  # type: ignore[attr-defined]
    await client.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": MARKER}])
    [row] = await proxy.rows(1)  # type: ignore[attr-defined]
    assert content_rows(proxy.db) == []  # type: ignore[attr-defined]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy.url}/api/requests/{row['id']}/content") as resp,  # type: ignore[attr-defined]
    ):
        assert resp.status == 404


def test_a_bad_redaction_pattern_is_a_clear_settings_error() -> None:
    with pytest.raises(SettingsError, match="content_redact_patterns"):
        load_settings(None, cli={"content_redact_patterns": ["(unclosed"]}, env={})

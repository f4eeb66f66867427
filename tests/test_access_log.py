"""``access_log``: one line per request, nothing secret in it; and the line ``serve`` leaves when it stops."""

from __future__ import annotations

import logging
from decimal import Decimal

import openai
import pytest

from meterproxy.money import usd_text
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT

KEY = "sk-live-access-log-0000000000"
PROMPT = "the secret plan is in this prompt"


async def _chat(url: str, n: int) -> None:
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{url}/openai/v1", api_key=KEY, max_retries=0)
    for _ in range(n):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], user="alice"
        )
    await client.close()


async def test_access_log_writes_one_line_per_request_without_keys_or_content(
    make_proxy: ProxyFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy(access_log=True)
    with caplog.at_level(logging.INFO, logger="meterproxy.access"):
        await _chat(proxy.url, 3)
        rows = await proxy.rows(3)
    lines = [r.getMessage() for r in caplog.records if r.name == "meterproxy.access"]
    assert len(lines) == 3
    row = rows[0]
    assert lines[0].startswith(f"200 POST openai chat {row['model']} ")
    assert f"in={row['input_tokens']} out={row['output_tokens']} " in lines[0]
    assert f"cost={usd_text(Decimal(row['cost_usd']))} " in lines[0]
    assert f"{row['duration_ms']:.0f}ms id={row['id']}" in lines[0]
    everything = "\n".join(lines)
    for secret in (KEY, KEY[-12:], PROMPT, "alice", row["key_fingerprint"]):
        assert secret not in everything


async def test_access_log_is_off_by_default(
    make_proxy: ProxyFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy()
    with caplog.at_level(logging.INFO):
        await _chat(proxy.url, 1)
        await proxy.rows(1)
    assert not [r for r in caplog.records if r.name == "meterproxy.access"]


async def test_stopping_logs_the_records_flushed(
    make_proxy: ProxyFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy()
    with caplog.at_level(logging.INFO, logger="meterproxy.app"):
        await _chat(proxy.url, 2)
        await proxy.server.close()  # runs the app's cleanup: the writer flushes and stops
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped:")]
    assert f"flushed to {proxy.db} (2 written since start, 0 dropped)" in line

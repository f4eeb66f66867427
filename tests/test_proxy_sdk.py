"""The official SDKs against a running meterproxy, with a fake upstream replaying real bytes.

What a user does: point ``base_url`` at the proxy and change nothing else. The
rows in SQLite must carry the exact token counts and a cost computed from the
price tables.
"""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest

from meterproxy.pricing import PriceBook
from meterproxy.testing import FakeUpstream, load_fixture
from meterproxy.timestamps import parse_ts
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT


def expected_cost(model: str, fx_expect: dict[str, int], ts: str) -> Decimal | None:

    usage = Usage(
        **{
            k: fx_expect.get(k, 0)
            for k in (
                "input_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "cache_write_1h_tokens",
                "output_tokens",
                "reasoning_tokens",
            )
        }
    )
    result = PriceBook.default().price(model=model, usage=usage, at=parse_ts(ts))
    return None if result is None else result.cost_usd


def assert_row_matches(row: dict[str, object], expect: dict[str, object]) -> None:
    for field in (
        "input_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
    ):
        assert row[field] == expect.get(field, 0), field
    assert row["model"] == expect["model"]
    assert row["usage_source"] == expect["usage_source"]


async def test_openai_sdk_streaming_without_usage_request(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx)
    proxy = await make_proxy()
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-key-123456789"
    )
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is the capital of the UK?"}],
        stream=True,
        extra_headers={
            "X-Meter-User": "alice",
            "X-Meter-Session": "s1",
            "X-Meter-Tags": "team=search,env=prod",
        },
    )
    chunks = [c async for c in stream]
    # The client did not ask for usage, so it never sees the usage-only chunk.
    assert all(c.usage is None for c in chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "The capital of the UK is London."
    )
    sent = upstream.received[-1]
    assert b'"stream_options":{"include_usage":true}' in sent.body
    assert not any(h.lower().startswith("x-meter-") for h in sent.headers)
    assert sent.headers["Authorization"] == "Bearer sk-test-key-123456789"

    [row] = await proxy.rows(1)
    assert_row_matches(row, fx.expect)
    assert row["user"] == "alice" and row["session"] == "s1"
    assert row["tags"] == '{"env":"prod","team":"search"}'
    assert row["streamed"] == 1 and row["usage_injected"] == 1
    assert row["key_fingerprint"] and "sk-test" not in row["key_fingerprint"]
    cost = expected_cost(fx.expect["model"], fx.expect, row["ts"])
    assert cost is not None and Decimal(row["cost_usd"]) == cost
    assert row["cost_pico"] == int(cost * 10**12)


async def test_openai_sdk_streaming_with_usage_gets_it(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx)
    proxy = await make_proxy()
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-x")
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == fx.expect["input_tokens"]
    [row] = await proxy.rows(1)
    assert row["usage_injected"] == 0
    assert_row_matches(row, fx.expect)


async def test_openai_sdk_non_streaming_and_responses_and_embeddings(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    chat, resp, emb = (
        load_fixture(n) for n in ("openai_chat_json", "openai_responses_json", "openai_embeddings_json")
    )
    upstream.replay(chat)
    upstream.replay(resp)
    upstream.replay(emb)
    proxy = await make_proxy()
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-x")
    completion = await client.chat.completions.create(
        model="o3-mini", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.usage is not None and completion.usage.prompt_tokens == chat.expect["input_tokens"]
    await client.responses.create(model="gpt-4.1", input="x")
    await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    rows = await proxy.rows(3)
    by_endpoint = {r["endpoint"]: r for r in rows}
    assert_row_matches(by_endpoint["chat"], chat.expect)
    assert_row_matches(by_endpoint["responses"], resp.expect)
    assert_row_matches(by_endpoint["embeddings"], emb.expect)
    for row in rows:
        assert row["cost_usd"] is not None, row["model"]


@pytest.mark.parametrize("name", ["anthropic_messages_stream", "anthropic_messages_stream_delta_full_usage"])
async def test_anthropic_sdk_streaming(upstream: FakeUpstream, make_proxy: ProxyFactory, name: str) -> None:
    fx = load_fixture(name)
    upstream.replay(fx, path="/v1/messages")
    proxy = await make_proxy()
    client = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-test"
    )
    async with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        metadata={"user_id": "bob"},
    ) as stream:
        final = await stream.get_final_message()
    assert final.usage.output_tokens == fx.expect["output_tokens"]
    sent = upstream.received[-1].headers
    # SDK 2.x sends the key as a bearer token; older ones as x-api-key. Either must pass through.
    assert "sk-ant-test" in (sent.get("x-api-key") or sent.get("authorization") or "")
    [row] = await proxy.rows(1)
    assert_row_matches(row, fx.expect)
    assert row["cache_write_1h_tokens"] == fx.expect.get("cache_write_1h_tokens", 0)
    assert row["user"] == "bob"
    assert row["upstream"] == "anthropic" and row["provider"] == "anthropic"
    cost = expected_cost(fx.expect["model"], fx.expect, row["ts"])
    assert cost is not None and Decimal(row["cost_usd"]) == cost


async def test_anthropic_sdk_non_streaming(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    fx = load_fixture("anthropic_messages_json")
    upstream.replay(fx, path="/v1/messages")
    proxy = await make_proxy()
    client = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-test"
    )
    message = await client.messages.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.output_tokens == fx.expect["output_tokens"]
    [row] = await proxy.rows(1)
    assert_row_matches(row, fx.expect)
    assert row["cost_usd"] is not None


async def test_google_genai_sdk_streaming(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    from google import genai
    from google.genai import types

    fx = load_fixture("gemini_stream_sse")
    # The SDK's API version (v1beta, v1) varies by release; answer on both.
    for version in ("v1beta", "v1"):
        upstream.replay(fx, path=f"/{version}/models/gemini-2.5-flash:streamGenerateContent")
    proxy = await make_proxy()
    client = genai.Client(
        api_key="AIzaTestKey", http_options=types.HttpOptions(base_url=f"{proxy.url}/gemini/")
    )
    text = ""
    async for chunk in await client.aio.models.generate_content_stream(
        model="gemini-2.5-flash", contents="hi"
    ):
        text += chunk.text or ""
    assert text
    [row] = await proxy.rows(1)
    assert_row_matches(row, fx.expect)
    assert row["requested_model"] == "gemini-2.5-flash"
    assert row["cost_usd"] is not None

"""The forwarding contract: what reaches the upstream, what comes back, what is recorded."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import pytest
from yarl import URL

from meterproxy.testing import FakeUpstream, Reply, load_fixture
from tests.conftest import ProxyFactory, ProxyHarness


async def test_bytes_reach_the_client_exactly_as_the_upstream_sent_them(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    fx = load_fixture("anthropic_messages_stream")
    upstream.replay(
        fx, path="/v1/messages", chunk_size=7, headers={"X-Request-Id": "req_1", "Retry-After": "3"}
    )
    body = b'{"model":"claude-sonnet-4-5","max_tokens":5,"stream":true,"messages":[]}'
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.post(f"{proxy.url}/anthropic/v1/messages", data=body, headers={"x-api-key": "k"}) as resp,
    ):
        got = await resp.read()
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req_1" and resp.headers["Retry-After"] == "3"
        assert resp.headers["Content-Type"] == fx.content_type
    assert got == fx.body
    assert upstream.received[-1].body == body  # Anthropic: never rewritten


async def test_request_headers_pass_through_minus_hop_by_hop_host_and_ours(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    headers = {
        "Authorization": "Bearer sk-abc",
        "OpenAI-Organization": "org-1",
        "X-Custom": "kept",
        "X-Meter-User": "u1",
        "X-Meter-Session": "s1",
        "X-Meter-Tags": "a=b",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "hop",
        "Keep-Alive": "timeout=5",
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            URL(f"{proxy.url}/v1/chat/completions?x=1&y=%2F", encoded=True),
            data=b'{"model":"gpt-4o"}',
            headers=headers,
        ) as resp,
    ):
        assert resp.status == 200
        await resp.read()
    sent = upstream.received[-1]
    assert sent.path_qs == "/v1/chat/completions?x=1&y=%2F"
    assert sent.headers["Authorization"] == "Bearer sk-abc"
    assert sent.headers["OpenAI-Organization"] == "org-1"
    assert sent.headers["X-Custom"] == "kept"
    assert sent.headers["Content-Type"] == "application/json"
    for gone in ("X-Meter-User", "X-Meter-Session", "X-Meter-Tags", "X-Drop-Me", "Keep-Alive"):
        assert gone not in sent.headers
    assert sent.headers["Host"] == f"127.0.0.1:{upstream.port}"
    [row] = await proxy.rows(1)
    assert row["user"] == "u1" and row["session"] == "s1"


async def test_unknown_route_is_404_json_and_nothing_is_sent(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    async with aiohttp.ClientSession() as client:
        for path in ("/nowhere/v1/chat/completions", "/openai/../etc/passwd", "/openai/%2e%2e/x"):
            async with client.get(f"{proxy.url}{path}") as resp:
                assert resp.status == 404, path
                body = await resp.json()
                assert body["error"]["code"] == "no_route"
    assert upstream.received == []


async def test_upstream_error_status_and_body_pass_through_and_are_recorded(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    error = b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}'
    upstream.reply("/v1/chat/completions", Reply(body=error, status=429, headers={"Retry-After": "20"}))
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/v1/chat/completions", data=b'{"model":"gpt-4o-mini"}') as resp,
    ):
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "20"
        assert await resp.read() == error
    [row] = await proxy.rows(1)
    assert row["status"] == 429
    assert row["usage_source"] == "missing" and row["cost_usd"] is None
    assert "rate_limit_exceeded" in row["error"]


async def test_connection_refused_is_a_502_json_error_and_recorded(make_proxy: ProxyFactory) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()
    proxy = await make_proxy(upstreams={"dead": f"http://127.0.0.1:{dead_port}"})
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/dead/v1/chat/completions", data=b'{"model":"gpt-4o"}') as resp,
    ):
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unreachable"
    rows = await proxy.rows(1)
    assert rows[-1]["status"] == 502 and rows[-1]["upstream"] == "dead"


async def test_upstream_silent_before_headers_is_a_504(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.reply("/v1/chat/completions", Reply(body=b"{}", stall=5))
    proxy = await make_proxy(read_timeout=0.3)
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/v1/chat/completions", data=b'{"model":"gpt-4o"}') as resp,
    ):
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    [row] = await proxy.rows(1)
    assert row["status"] == 504


async def test_body_over_the_limit_is_413(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(max_body_bytes=1000)
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/v1/chat/completions", data=b"x" * 5000) as resp,
    ):
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"
    assert upstream.received == []


async def test_upstream_dying_mid_stream_cuts_the_client_and_is_flagged(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx, cut_after=len(fx.body) // 2)
    body = b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}'
    got = b""
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.post(f"{proxy.url}/v1/chat/completions", data=body) as resp:
                async for chunk in resp.content.iter_any():
                    got += chunk
    assert got and fx.body.startswith(got)
    [row] = await proxy.rows(1)
    assert row["error"] and "mid-answer" in row["error"]
    assert row["usage_source"] == "missing" and row["cost_usd"] is None


async def test_client_hanging_up_mid_stream_still_records_the_usage(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    # Slow stream: the client leaves after the first event; the usage arrives later.
    upstream.replay(fx, delay=0.05)
    body = b'{"model":"gpt-4o-mini","stream":true}'
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/v1/chat/completions", data=body) as resp,
    ):
        await resp.content.readany()
        resp.close()
    [row] = await proxy.rows(1)
    assert row["client_disconnected"] == 1
    assert row["usage_source"] == "reported"
    assert row["input_tokens"] == fx.expect["input_tokens"]
    assert row["output_tokens"] == fx.expect["output_tokens"]
    assert row["cost_usd"] is not None


async def test_gzip_answer_is_forwarded_compressed_and_still_metered(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    fx = load_fixture("openai_chat_json")
    compressed = gzip.compress(fx.body)
    upstream.reply("/v1/chat/completions", Reply(body=compressed, headers={"Content-Encoding": "gzip"}))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.post(
            f"{proxy.url}/v1/chat/completions",
            data=b'{"model":"o3-mini"}',
            headers={"Accept-Encoding": "gzip, zstd"},
        ) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == compressed
    # Codings the tap cannot read are not offered upstream (so the answer stays meterable).
    assert upstream.received[-1].headers["Accept-Encoding"] == "gzip"
    [row] = await proxy.rows(1)
    assert row["input_tokens"] == fx.expect["input_tokens"] and row["usage_source"] == "reported"


async def test_unmetered_paths_are_forwarded_and_recorded_without_usage(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    upstream.reply("/v1/models", Reply(body=b'{"object":"list","data":[]}'))
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/v1/models") as resp:
        assert resp.status == 200
        assert await resp.read() == b'{"object":"list","data":[]}'
    [row] = await proxy.rows(1)
    assert row["usage_source"] == "none" and row["endpoint"] == "models" and row["method"] == "GET"
    assert row["provider"] == "openai"


async def test_concurrent_streams_are_each_recorded_exactly(
    upstream: FakeUpstream, proxy: ProxyHarness
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx, chunk_size=11)
    body = b'{"model":"gpt-4o-mini","stream":true}'

    async def one(client: aiohttp.ClientSession, i: int) -> bytes:
        async with client.post(
            f"{proxy.url}/v1/chat/completions", data=body, headers={"X-Meter-Session": f"s{i}"}
        ) as resp:
            return await resp.read()

    async with aiohttp.ClientSession() as client:
        answers = await asyncio.gather(*(one(client, i) for i in range(40)))
    expected = load_fixture("openai_chat_stream_no_usage").body
    assert all(a == expected for a in answers)
    rows = await proxy.rows(40)
    assert sorted(r["session"] for r in rows) == sorted(f"s{i}" for i in range(40))
    assert {r["input_tokens"] for r in rows} == {fx.expect["input_tokens"]}

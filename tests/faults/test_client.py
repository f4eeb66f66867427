"""Client faults: hang-ups at every stage, slow and oversized bodies, idle connection floods.

The proxy's promise is the same as for upstream faults: a clear JSON error
where one can still be delivered, a stored record (with ``client_disconnected``
set when the client left, and the usage the upstream still reported), and a
proxy that keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory
from tests.helpers.faults import CHAT, CHAT_STREAM, post, row_for, session_id, still_serving


async def _hang_up_after(proxy_url: str, path: str, body: bytes, sid: str, *, read_bytes: int) -> int:
    """Send a request, read ``read_bytes`` of the answer (0: not even the headers), then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy_url.rsplit(":", 1)[1]))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Meter-Session: {sid}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    got = 0
    while got < read_bytes:
        chunk = await asyncio.wait_for(reader.read(65536), timeout=10)
        if not chunk:
            break
        got += len(chunk)
    writer.transport.abort()
    return got


async def test_client_gone_before_headers_while_upstream_stalls(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx, stall=0.5)
    proxy = await make_proxy(inject_stream_usage=False)
    sid = session_id()
    assert await _hang_up_after(proxy.url, "/v1/chat/completions", CHAT_STREAM, sid, read_bytes=0) == 0
    row = await row_for(proxy, sid)
    assert row["client_disconnected"] == 1
    # The upstream still answered (and billed): the drain read its usage.
    assert row["usage_source"] == "reported" and row["input_tokens"] == fx.expect["input_tokens"]
    await still_serving(proxy, upstream)


async def test_client_gone_mid_stream_usage_still_drained(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx, delay=0.05)
    proxy = await make_proxy()  # usage injected: the usage chunk comes only at the very end
    sid = session_id()
    got = await _hang_up_after(proxy.url, "/v1/chat/completions", CHAT_STREAM, sid, read_bytes=300)
    assert 300 <= got < len(fx.body)
    row = await row_for(proxy, sid)
    assert row["client_disconnected"] == 1 and row["status"] == 200
    assert row["usage_source"] == "reported" and row["output_tokens"] == fx.expect["output_tokens"]
    await still_serving(proxy, upstream)


async def test_client_gone_while_upstream_stalls_mid_stream(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    first, rest = fx.body[:400], fx.body[400:]

    async def stalling(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        await request.read()
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(0.6)  # the client leaves during this silence
        await response.write(rest)
        await response.write_eof()
        return response

    upstream.replies["/v1/chat/completions"] = stalling
    proxy = await make_proxy(inject_stream_usage=False)
    sid = session_id()
    got = await _hang_up_after(proxy.url, "/v1/chat/completions", CHAT_STREAM, sid, read_bytes=1)
    assert 0 < got <= 400 + 1024  # headers and the first bytes only
    row = await row_for(proxy, sid)
    assert row["client_disconnected"] == 1
    assert row["usage_source"] == "reported" and row["input_tokens"] == fx.expect["input_tokens"]
    await still_serving(proxy, upstream)


async def test_drain_is_bounded_in_time_and_count(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx, delay=0.4)  # ~10 s to stream the whole answer
    proxy = await make_proxy(inject_stream_usage=False, disconnect_drain_timeout=0.5, max_draining=1)
    sids = [session_id() for _ in range(3)]
    await asyncio.gather(
        *(_hang_up_after(proxy.url, "/v1/chat/completions", CHAT_STREAM, s, read_bytes=1) for s in sids)
    )
    rows = [await row_for(proxy, s, timeout=8) for s in sids]  # well before the 10 s stream ends
    assert all(r["client_disconnected"] == 1 for r in rows)
    # Nobody drained long enough to see the final usage chunk.
    assert all(r["usage_source"] == "missing" for r in rows)
    await still_serving(proxy, upstream)


async def test_body_over_limit_is_413_json_and_never_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(max_body_bytes=1000)
    sid = session_id()
    big = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"a" * 5000 + b'"}]}'
    status, body, err, _ = await post(proxy, "/v1/chat/completions", big, session=sid)
    assert err is None and status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and "1000" in error["message"]
    assert upstream.received == []
    row = await row_for(proxy, sid)
    assert row["status"] == 413 and "1000" in row["error"]
    await still_serving(proxy, upstream)


async def test_slowloris_body_gets_408_and_is_recorded(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(request_body_timeout=0.5)
    sid = session_id()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Meter-Session: {sid}\r\n"
        f"Content-Length: {len(CHAT)}\r\n\r\n".encode()
    )
    answer = b""
    for i in range(len(CHAT)):  # one byte every 0.1 s: 6+ s for the whole body, bounded
        writer.write(CHAT[i : i + 1])
        try:
            await writer.drain()
            answer += await asyncio.wait_for(reader.read(4096), timeout=0.1)
        except (TimeoutError, ConnectionError):
            continue
        if answer:
            break
    writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"body_timeout" in answer
    assert upstream.received == []
    row = await row_for(proxy, sid)
    assert row["status"] == 408
    await still_serving(proxy, upstream)


async def test_hundreds_of_idle_connections(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    idle: list[asyncio.StreamWriter] = []
    try:
        for i in range(300):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
            if i % 2:  # half of them also start a request and never finish its headers
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            idle.append(writer)
        await asyncio.gather(*(w.drain() for w in idle))
        # Everyone else is still served, several at once.
        await asyncio.gather(*(still_serving(proxy, upstream) for _ in range(5)))
    finally:
        for writer in idle:
            writer.transport.abort()
    await still_serving(proxy, upstream)


async def test_client_gone_mid_body_is_recorded_and_not_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy()
    sid = session_id()
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Meter-Session: {sid}\r\n"
        f"Content-Length: {len(CHAT) + 100}\r\n\r\n".encode()
        + CHAT
    )
    await writer.drain()
    await asyncio.sleep(0.1)  # the client's pacing: the head and part of the body, a pause, then gone
    writer.transport.abort()
    row = await row_for(proxy, sid)
    assert row["client_disconnected"] == 1 and row["status"] is None
    assert upstream.received == []
    await still_serving(proxy, upstream)

"""Upstream faults: every way a provider (or the network to it) can misbehave.

Each test runs a real server on 127.0.0.1 (`RawUpstream` for the nasty ones,
`FakeUpstream` where a well-formed server suffices) and checks the three things
the proxy promises: the client gets what the upstream sent or a clear JSON
error, the request is recorded with its status, error and any usage seen, and
the proxy keeps serving.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import pytest

from meterproxy.testing import FakeUpstream, Reply, free_port, load_fixture
from meterproxy.testing_raw import RawConnection, respond
from tests.conftest import ProxyFactory
from tests.helpers.faults import (
    CHAT,
    CHAT_STREAM,
    RawFactory,
    post,
    proxy_for,
    row_for,
    session_id,
    still_serving,
)

CHAT_PATH = "/raw/v1/chat/completions"


async def test_connection_refused_is_json_502(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    proxy = await proxy_for(make_proxy, f"http://127.0.0.1:{free_port()}", upstream)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, session=sid)
    assert err is None and status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    row = await row_for(proxy, sid)
    assert row["status"] == 502 and "unreachable" in row["error"]
    assert row["usage_source"] == "missing" and row["cost_usd"] is None
    await still_serving(proxy, upstream)


async def test_reset_before_headers_is_json_502(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def script(conn: RawConnection) -> None:
        conn.reset()

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, session=sid)
    assert err is None and status == 502
    assert json.loads(body)["error"]["type"] == "meterproxy_error"
    row = await row_for(proxy, sid)
    assert row["status"] == 502 and row["error"]
    await still_serving(proxy, upstream)


async def test_close_after_partial_head_is_json_502(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Ty")
        conn.close()

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, session=sid)
    assert err is None and status == 502, (status, body)
    assert (await row_for(proxy, sid))["status"] == 502
    await still_serving(proxy, upstream)


async def test_stall_before_headers_is_json_504(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def script(conn: RawConnection) -> None:
        await asyncio.sleep(30)  # never answers; the proxy's read timeout fires first

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, read_timeout=0.5)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, session=sid)
    assert err is None and status == 504
    assert json.loads(body)["error"]["code"] == "upstream_timeout"
    row = await row_for(proxy, sid)
    assert row["status"] == 504 and "timed out" in row["error"]
    await still_serving(proxy, upstream)


async def test_reset_mid_stream_aborts_client_and_flags_record(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    half = fx.body[: len(fx.body) // 2]

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, content_type="text/event-stream", length=False) + half)
        await asyncio.sleep(0.05)  # the upstream's pacing: half an answer, then a reset
        conn.reset()

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert status == 200
    assert isinstance(err, aiohttp.ClientPayloadError), "the client must see the stream end uncleanly"
    assert half.startswith(body)
    row = await row_for(proxy, sid)
    assert row["status"] == 200 and "mid-answer" in row["error"]
    assert row["usage_source"] == "missing" and row["model"] == "gpt-4o-mini-2024-07-18"
    await still_serving(proxy, upstream)


async def test_stall_mid_stream_beyond_read_timeout(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, content_type="text/event-stream", length=False) + fx.body[:300])
        await asyncio.sleep(30)  # the fault: a stall mid-stream, past the proxy's read timeout

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, read_timeout=0.5, inject_stream_usage=False)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert status == 200 and body == fx.body[:300]
    assert isinstance(err, aiohttp.ClientPayloadError)
    row = await row_for(proxy, sid)
    assert "read timeout" in row["error"]
    await still_serving(proxy, upstream)


async def test_byte_by_byte_answer_passes_exactly(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    wire = respond(200, fx.body, content_type="text/event-stream")

    async def script(conn: RawConnection) -> None:
        # Head and the first events one byte at a time, the rest in odd-sized pieces.
        await conn.send(wire[:600], chunk=1, delay=0.0005)
        await conn.send(wire[600:], chunk=37)

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    sid = session_id()
    status, body, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert err is None and status == 200 and body == fx.body
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "reported"
    assert (row["input_tokens"], row["output_tokens"]) == (
        fx.expect["input_tokens"],
        fx.expect["output_tokens"],
    )
    await still_serving(proxy, upstream)


async def test_malformed_sse_and_bad_json_pass_through(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    body = (
        b"data: {not json\n\n"
        b"event: x\ndata\n\n"
        b": comment\n"
        b'data: {"model":"m1","choices":[],"usage":{"prompt_tokens":"ten","completion_tokens":2}}\n\n'
        b'data: {"model":"m1","choices":[],"usage":{"prompt_tokens":5,"compl'  # truncated, no terminator
    )

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, body, content_type="text/event-stream"))

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    sid = session_id()
    status, got, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert err is None and status == 200 and got == body
    row = await row_for(proxy, sid)
    # The only complete usage frame had a string count: flagged, no tokens counted, not priced.
    assert row["usage_source"] == "invalid"
    assert row["input_tokens"] == 0 and row["cost_usd"] is None
    await still_serving(proxy, upstream)


async def test_truncated_json_body(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    cut = fx.body[:-40]

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, cut))

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    sid = session_id()
    status, got, err, _ = await post(proxy, CHAT_PATH, session=sid)
    assert err is None and status == 200 and got == cut
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "missing" and row["input_tokens"] == 0
    assert "not valid JSON" in (row["extra"] or "")
    await still_serving(proxy, upstream)


async def test_non_utf8_bytes_pass_through(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    body = (
        b'data: {"model":"m\xff\xfe","choices":[{"delta":{"content":"\xc3\x28\x80"}}]}\n\n'
        b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
        b"data: \xf0\x9f\x98\n\ndata: [DONE]\n\n"
    )

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, body, content_type="text/event-stream"), chunk=7)

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    sid = session_id()
    status, got, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert err is None and status == 200 and got == body
    row = await row_for(proxy, sid)
    assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (3, 4, "reported")
    await still_serving(proxy, upstream)


async def test_gigantic_event_passes_and_later_usage_is_read(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    raw_upstream: RawFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real limit is 16 MiB; a 1 MiB limit shows the same behaviour with 3 MiB on the wire.
    monkeypatch.setattr("meterproxy.sse.MAX_EVENT_BYTES", 1024 * 1024)
    giant = b"data: " + b"x" * (3 * 1024 * 1024) + b"\n\n"
    usage = b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22}}\n\n'

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, content_type="text/event-stream", length=False))
        await conn.send(giant, chunk=256 * 1024)
        await conn.send(usage)
        conn.close()

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    sid = session_id()
    status, got, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert err is None and status == 200
    assert len(got) == len(giant) + len(usage) and got == giant + usage
    row = await row_for(proxy, sid)
    assert (row["input_tokens"], row["output_tokens"]) == (11, 22)
    assert "oversized" in row["extra"]
    await still_serving(proxy, upstream)


async def test_wrong_content_type(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    stream = load_fixture("openai_chat_stream_usage").body
    as_json = load_fixture("openai_chat_json")

    async def script(conn: RawConnection) -> None:
        assert conn.request is not None
        if b'"stream":true' in conn.request.body:
            await conn.send(respond(200, stream, content_type="application/json"))  # SSE labelled JSON
        else:
            await conn.send(respond(200, as_json.body, content_type="text/event-stream"))  # JSON labelled SSE

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    for body, expected in ((CHAT_STREAM, stream), (CHAT, as_json.body)):
        sid = session_id()
        status, got, err, _ = await post(proxy, CHAT_PATH, body, session=sid)
        assert err is None and status == 200 and got == expected
        row = await row_for(proxy, sid)
        assert row["status"] == 200 and row["usage_source"] in ("missing", "reported")
    await still_serving(proxy, upstream)


async def test_gzip_body_passes_compressed_and_is_metered(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    packed = gzip.compress(fx.body)
    upstream.reply("/v1/chat/completions", Reply(packed, headers={"Content-Encoding": "gzip"}, chunk_size=50))
    proxy = await make_proxy()
    sid = session_id()
    status, got, err, headers = await post(proxy, "/v1/chat/completions", session=sid)
    assert err is None and status == 200
    assert got == packed and headers["Content-Encoding"] == "gzip"
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "reported" and row["input_tokens"] == fx.expect["input_tokens"]

    # A corrupt gzip body still reaches the client byte for byte; the tap gives up with a note.
    broken = packed[:20] + b"\x00garbage\xff" + packed[20:]
    upstream.reply("/v1/chat/completions", Reply(broken, headers={"Content-Encoding": "gzip"}))
    sid = session_id()
    status, got, err, _ = await post(proxy, "/v1/chat/completions", session=sid)
    assert err is None and status == 200 and got == broken
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "missing" and "tap error" in row["extra"]
    await still_serving(proxy, upstream)


async def test_error_statuses_with_and_without_bodies(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    cases = {
        "/v1/chat/completions": (429, b'{"error":{"type":"rate_limit","message":"slow down"}}'),
        "/v1/responses": (500, b""),
        "/v1/embeddings": (401, b'{"error":{"message":"bad key"}}'),
        "/v1/completions": (503, b"<html>upstream down</html>"),
    }

    async def script(conn: RawConnection) -> None:
        assert conn.request is not None
        path = conn.request.request_line.split()[1]
        status, body = cases[path]
        await conn.send(respond(status, body, content_type="application/json" if body else None))

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    for path, (code, body) in cases.items():
        sid = session_id()
        status, got, err, _ = await post(proxy, "/raw" + path, session=sid)
        assert err is None and (status, got) == (code, body)
        row = await row_for(proxy, sid)
        assert row["status"] == code and row["input_tokens"] == 0
        if b"slow down" in body:
            assert "slow down" in row["error"]
    await still_serving(proxy, upstream)


async def test_http10_close_delimited_body(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_json")

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, version="1.0", length=False) + fx.body, chunk=100)
        conn.close()  # end of body = end of connection

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    sid = session_id()
    status, got, err, _ = await post(proxy, CHAT_PATH, session=sid)
    assert err is None and status == 200 and got == fx.body
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "reported" and row["output_tokens"] == fx.expect["output_tokens"]
    await still_serving(proxy, upstream)


def _chunked(data: bytes, sizes: list[int]) -> bytes:
    out, pos = bytearray(), 0
    for size in sizes:
        piece = data[pos : pos + size]
        if not piece:
            break
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        pos += len(piece)
    if pos < len(data):
        out += f"{len(data) - pos:X}\r\n".encode() + data[pos:] + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


async def test_chunked_framing_odd_sizes_and_broken_framing(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    good = _chunked(fx.body, [1, 2, 3, 500, 7, 1, 4096])

    async def script(conn: RawConnection) -> None:
        assert conn.request is not None
        head = respond(
            200, content_type="text/event-stream", headers={"Transfer-Encoding": "chunked"}, length=False
        )
        if b'"user":"broken"' in conn.request.body:
            # The upstream's pacing: a good chunk, then garbage in its own read, then the close.
            await conn.send(head + b"6\r\n" + fx.body[:6] + b"\r\n")
            await asyncio.sleep(0.1)
            await conn.send(b"ZZZZ\r\nnot a chunk\r\n")
            await asyncio.sleep(0.2)
            conn.close()
        else:
            await conn.send(head + good, chunk=13)

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, inject_stream_usage=False)
    sid = session_id()
    status, got, err, _ = await post(proxy, CHAT_PATH, CHAT_STREAM, session=sid)
    assert err is None and status == 200 and got == fx.body
    assert (await row_for(proxy, sid))["usage_source"] == "reported"

    sid = session_id()
    broken_req = CHAT_STREAM[:-1] + b',"user":"broken"}'
    status, got, err, _ = await post(proxy, CHAT_PATH, broken_req, session=sid)
    assert status == 200 and isinstance(err, aiohttp.ClientPayloadError)
    assert fx.body.startswith(got)
    row = await row_for(proxy, sid)
    assert "mid-answer" in row["error"]
    await still_serving(proxy, upstream)


async def test_endless_stream_stops_when_client_leaves(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    stopped = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, content_type="text/event-stream", length=False))
        event = b'data: {"model":"m","choices":[{"delta":{"content":"more"}}]}\n\n'
        for _ in range(1_000_000):  # bounded, but far longer than the test
            if not await conn.send(event * 50):
                break
            await asyncio.sleep(0.001)  # an endless stream, paced so the loop stays responsive
        stopped.set()

    raw = await raw_upstream(script)
    proxy = await proxy_for(
        make_proxy, raw, upstream, inject_stream_usage=False, disconnect_drain_timeout=0.3
    )
    sid = session_id()
    async with aiohttp.ClientSession() as client:
        resp = await client.post(
            f"{proxy.url}{CHAT_PATH}", data=CHAT_STREAM, headers={"X-Meter-Session": sid}
        )
        got = 0
        async for chunk in resp.content.iter_any():
            got += len(chunk)
            if got > 200_000:
                break
        resp.close()  # hang up mid-stream
    # The proxy drains for at most disconnect_drain_timeout, then lets the upstream go.
    await asyncio.wait_for(stopped.wait(), timeout=15)
    row = await row_for(proxy, sid)
    assert row["client_disconnected"] == 1 and row["status"] == 200
    await still_serving(proxy, upstream)

"""WebSockets through the proxy: relayed byte for byte, closed together, metered per response.

The upstream is a real WebSocket server on 127.0.0.1 (aiohttp's) replaying the server
messages of real sessions (``tests/fixtures/ws``); the clients are the official SDKs
(openai's realtime client, google-genai's live client) or the ``websockets`` library.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import zlib
from decimal import Decimal
from typing import Any

import pytest
import websockets
from aiohttp import WSMsgType, web
from openai import AsyncOpenAI

from meterproxy.app import PROXY
from meterproxy.testing_raw import RawConnection, RawUpstream
from meterproxy.wsframes import DeflateParams, MessageDecoder, parse_deflate_params
from tests.helpers.sdk import SDK_TIMEOUT
from tests.helpers.waits import WAIT_S
from tests.helpers.ws import messages, realtime_session, ws_upstream, ws_url

N_SESSIONS = 500


# ---- the frame decoder, on the RFC's own example bytes -------------------------------

RFC6455_EXAMPLES = [
    # RFC 6455 section 5.7: unmasked and masked "Hello", fragmented "Hello", a ping between.
    (b"\x81\x05Hello", None, [b"Hello"]),
    (b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58", None, [b"Hello"]),
    (b"\x01\x03Hel\x89\x05Hello\x80\x02lo", None, [b"Hello"]),
    (b"\x82\x7e\x01\x00" + bytes(256), None, [bytes(256)]),
    (b"\x82\x7f" + (65536).to_bytes(8, "big") + bytes(65536), None, [bytes(65536)]),
    # RFC 7692 section 7.2.3: "Hello" compressed twice with context takeover, then fragmented.
    (
        bytes(
            [0xC1, 0x07, 0xF2, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00, 0xC1, 0x05, 0xF2, 0x00, 0x11, 0x00, 0x00]
        ),
        DeflateParams(),
        [b"Hello", b"Hello"],
    ),
    (bytes([0x41, 0x03, 0xF2, 0x48, 0xCD, 0x80, 0x04, 0xC9, 0xC9, 0x07, 0x00]), DeflateParams(), [b"Hello"]),
    # RFC 7692 section 7.2.3.3: a message compressed without compression (BTYPE=00).
    (
        bytes([0xC1, 0x0B, 0x00, 0x05, 0x00, 0xFA, 0xFF, 0x48, 0x65, 0x6C, 0x6C, 0x6F, 0x00]),
        DeflateParams(),
        [b"Hello"],
    ),
]


@pytest.mark.parametrize(("wire", "deflate", "expected"), RFC6455_EXAMPLES)
def test_decoder_reads_the_rfc_examples_whole_and_byte_by_byte(
    wire: bytes, deflate: DeflateParams | None, expected: list[bytes]
) -> None:
    whole = MessageDecoder(deflate)
    assert [m.payload for m in whole.feed(wire)] == expected
    split = MessageDecoder(deflate)
    got = [m.payload for i in range(len(wire)) for m in split.feed(wire[i : i + 1])]
    assert got == expected
    assert whole.broken is None and split.broken is None


def test_decoder_skips_a_message_over_its_limit_and_keeps_the_window_in_step() -> None:
    deflate = DeflateParams()
    compressor = zlib.compressobj(wbits=-15)

    def frame(payload: bytes) -> bytes:
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(b"\x00\x00\xff\xff")
        data = data[:-4]
        assert len(data) < 65536
        return bytes([0xC1, 126]) + len(data).to_bytes(2, "big") + data

    bomb = b"A" * 5_000_000  # inflates from a few KiB
    decoder = MessageDecoder(deflate, max_message=1_000_000)
    out = decoder.feed(frame(bomb) + frame(b'{"type":"response.done"}'))
    assert [m.skipped for m in out] == [True, False]
    assert out[1].payload == b'{"type":"response.done"}'


def test_decoder_stops_on_broken_framing_without_raising() -> None:
    decoder = MessageDecoder()
    assert decoder.feed(b"\x80\x02lo") == []  # a continuation with no message
    assert decoder.broken is not None
    assert decoder.feed(b"\x81\x05Hello") == []


def test_deflate_parameters_per_direction() -> None:
    header = "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
    assert parse_deflate_params(header, from_server=True) == DeflateParams(15, True)
    assert parse_deflate_params(header, from_server=False) == DeflateParams(10, False)
    assert parse_deflate_params(None, from_server=True) is None
    assert parse_deflate_params("x-webkit-deflate-frame", from_server=True) is None


# ---- a WebSocket upstream ---------------------------------------------------------------


async def test_openai_realtime_sdk_through_the_proxy_one_row_per_response(make_proxy, upstream) -> None:
    seen = ws_upstream(upstream, "/v1/realtime", realtime_session)
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-test-realtime", base_url=f"{proxy.url}/v1")
    received: list[str] = []
    async with client.realtime.connect(
        model="gpt-realtime", extra_headers={"X-Meter-User": "alice", "X-Meter-Session": "call-1"}
    ) as conn:
        for _ in range(2):
            await conn.response.create()
            async for event in conn:
                received.append(event.type)
                if event.type == "response.done":
                    break
    rows = await proxy.rows(2)
    assert received[0] == "session.created"
    assert received.count("response.done") == 2
    first, second = rows
    assert [first["provider"], first["endpoint"], first["method"], first["status"]] == [
        "openai",
        "realtime",
        "GET",
        101,
    ]
    assert first["model"] == "gpt-4o-realtime-preview-2025-06-03"
    assert first["requested_model"] == "gpt-realtime"
    assert (first["input_tokens"], first["output_tokens"], first["usage_source"]) == (72, 79, "reported")
    assert (second["input_tokens"], second["cache_read_tokens"], second["output_tokens"]) == (132, 64, 121)
    # gpt-4o-realtime-preview's text, cached and audio rates, each on its part:
    # 55 text in x $5 + 64 cached x $2.50 + 13 audio in x $40 + 30 text out x $20 + 91 audio out x $80.
    assert Decimal(first["cost_usd"]) == (72 * Decimal(5) + 79 * Decimal(20)) / 10**6
    assert Decimal(second["cost_usd"]) == Decimal("0.008835")
    assert (second["audio_input_tokens"], second["audio_output_tokens"]) == (13, 91)
    details = json.loads(second["extra"])["usage_details"]
    assert details["input_audio_tokens"] == 13 and details["output_audio_tokens"] == 91
    assert json.loads(first["extra"])["ws_session"] == json.loads(second["extra"])["ws_session"]
    assert first["user"] == "alice" and first["session"] == "call-1"
    assert first["key_fingerprint"] and "sk-test" not in json.dumps(rows)
    # Our headers never reach the provider; the key and the upgrade do.
    handshake = seen[0].headers
    assert "x-meter-user" not in handshake and handshake["authorization"] == "Bearer sk-test-realtime"
    assert seen[0].query_string == "model=gpt-realtime"
    await _no_session_left(proxy)


async def _no_session_left(proxy: Any) -> None:
    sessions = proxy.app[PROXY].sessions
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while sessions.open and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert sessions.open == 0


async def test_responses_over_websocket_as_codex_uses_it(make_proxy, upstream) -> None:
    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        async for msg in ws:
            if json.loads(msg.data)["type"] == "response.create":
                for event in messages("openai_responses_ws"):
                    await ws.send_str(event)

    seen = ws_upstream(upstream, "/v1/responses", serve)
    proxy = await make_proxy()
    headers = {"Authorization": "Bearer sk-codex", "OpenAI-Beta": "responses_websockets=2026-02-04"}
    got: list[str] = []
    async with websockets.connect(f"{ws_url(proxy.url)}/v1/responses", additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "response.create", "model": "o3-mini", "input": "hi"}))
        while True:
            text = await ws.recv()
            got.append(text)
            if json.loads(text)["type"] == "response.completed":
                break
    assert got == messages("openai_responses_ws")  # every message, unchanged, in order
    [row] = await proxy.rows(1)
    assert (row["endpoint"], row["model"], row["input_tokens"], row["output_tokens"]) == (
        "responses",
        "o3-mini-2025-01-31",
        13,
        532,
    )
    assert row["reasoning_tokens"] == 256 and row["cost_usd"] is not None
    assert seen[0].headers["openai-beta"] == "responses_websockets=2026-02-04"
    await _no_session_left(proxy)


async def test_gemini_live_sdk_through_the_proxy_one_row_per_turn(make_proxy, upstream) -> None:
    from google import genai

    path = "/ws/google.ai.generativelanguage.{}.GenerativeService.BidiGenerateContent"
    events = messages("gemini_live_turns")
    setups: list[dict[str, Any]] = []

    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        setup = json.loads(await ws.receive_str())
        setups.append(setup)
        await ws.send_bytes(events[0].encode())  # Gemini Live answers in binary frames
        turns = [events[1:5], events[5:9], events[9:13]]
        async for _msg in ws:
            for event in turns.pop(0):
                await ws.send_bytes(event.encode())
            if not turns:
                break

    for version in ("v1beta", "v1alpha", "v1"):
        ws_upstream(upstream, path.format(version), serve)
    proxy = await make_proxy()
    client = genai.Client(api_key="gk-test", http_options={"base_url": f"{proxy.url}/gemini/"})
    # google-genai always dials wss:// for Live; the proxy here listens without TLS (an
    # operator terminates TLS in front of it), so only the scheme is put back.
    base = f"{ws_url(proxy.url)}/gemini"
    client._api_client._websocket_base_url = lambda *args, **kwargs: base  # type: ignore[method-assign]
    client._api_client._websocket_ssl_ctx = {}
    completed = 0
    async with client.aio.live.connect(
        model="gemini-live-2.5-flash-preview", config={"response_modalities": ["AUDIO"]}
    ) as session:
        for _ in range(3):
            await session.send_client_content(turns={"role": "user", "parts": [{"text": "hi"}]})
            async for message in session.receive():
                if message.server_content and message.server_content.turn_complete:
                    completed += 1
                    break
    rows = await proxy.rows(3)
    assert completed == 3
    assert setups[0]["setup"]["model"] == "models/gemini-live-2.5-flash-preview"
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [(6276, 179), (6562, 111), (6750, 70)]
    assert {r["provider"] for r in rows} == {"gemini"} and {r["endpoint"] for r in rows} == {"live"}
    assert {r["model"] for r in rows} == {"gemini-live-2.5-flash-preview"}
    assert json.loads(rows[1]["extra"])["usage_details"] == {
        "input_text_tokens": 6548,
        "input_audio_tokens": 14,
        "output_audio_tokens": 111,
    }
    await _no_session_left(proxy)


@pytest.mark.parametrize("mode", ["whole", "fragmented", "deflate"])
async def test_frames_reach_the_client_unchanged_however_they_are_framed(make_proxy, mode: str) -> None:
    """A raw upstream writes frames byte by byte: whole, as 1-byte continuation frames, compressed."""
    events = messages("openai_realtime")
    wire = b"".join(_frames(e.encode(), mode) for e in events)

    async def script(conn: RawConnection) -> None:
        assert conn.request is not None
        key = _header(conn.request.head, b"sec-websocket-key")
        extensions = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if mode == "deflate" else ""
        await conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {_accept(key)}\r\n{extensions}\r\n".encode()
        )
        await conn.send(wire, chunk=1)
        await conn.send(b"\x88\x02\x03\xe8")  # close 1000
        await conn.reader.read(100)

    async with RawUpstream(script) as raw:
        proxy = await make_proxy(upstreams={"openai": raw.url})
        compression = "deflate" if mode == "deflate" else None
        got = []
        async with websockets.connect(f"{ws_url(proxy.url)}/v1/realtime", compression=compression) as ws:
            async for text in ws:
                got.append(text)
        assert got == events
        rows = await proxy.rows(2)
        assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [(72, 79), (132, 121)]
        await _no_session_left(proxy)


def _frames(payload: bytes, mode: str) -> bytes:
    if mode == "whole":
        return _frame(0x81, payload)
    if mode == "fragmented":
        parts = [payload[i : i + 1] for i in range(len(payload))]
        out = [_frame(0x01, parts[0])]
        out += [_frame(0x00, p) for p in parts[1:-1]]
        out.append(_frame(0x80, parts[-1]))
        return b"".join(out)
    comp = zlib.compressobj(wbits=-15)
    data = comp.compress(payload) + comp.flush(zlib.Z_SYNC_FLUSH)
    return _frame(0xC1, data[:-4])  # no context takeover needed: a fresh compressor each time


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([first, n])
    elif n < 65536:
        head = bytes([first, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 127]) + n.to_bytes(8, "big")
    return head + payload


def _header(head: bytes, name: bytes) -> str:
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode()
    raise AssertionError(f"no {name!r} header")


def _accept(key: str) -> str:
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    return base64.b64encode(digest).decode()


# ---- many sessions, closes, refusals -------------------------------------------------------


async def test_500_concurrent_sessions_relay_in_order_and_close_together(make_proxy, upstream) -> None:
    """500 sessions open at once; each echoes its numbered frames in order, byte for byte; half
    are closed by the client, half by the upstream, and each close reaches the other side."""
    n, per_session = N_SESSIONS, 5
    closed_by_upstream: list[int] = []
    upstream_saw_close: list[int] = []

    async def echo(ws: web.WebSocketResponse, request: web.Request) -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.data.startswith("bye"):
                closed_by_upstream.append(int(msg.data[4:]))
                await ws.close(code=4000, message=b"upstream says bye")
                return
            else:
                await ws.send_str(msg.data)
        upstream_saw_close.append(ws.close_code or 0)

    ws_upstream(upstream, "/echo", echo)
    proxy = await make_proxy()
    sessions = proxy.app[PROXY].sessions
    url = f"{ws_url(proxy.url)}/openai/echo"
    all_open = asyncio.Event()
    opened = 0

    async def one(i: int) -> tuple[int, list[str | bytes], int | None]:
        nonlocal opened
        async with websockets.connect(url, open_timeout=60, ping_interval=None) as ws:
            opened += 1
            if opened == n:
                all_open.set()
            await asyncio.wait_for(all_open.wait(), 120)
            sent: list[str | bytes] = []
            for k in range(per_session):
                frame: str | bytes = f"s{i}-m{k}-é" if k % 2 == 0 else bytes([i % 256, k]) * 50
                sent.append(frame)
                await ws.send(frame)
            got = [await ws.recv() for _ in range(per_session)]
            assert got == sent
            if i % 2:
                await ws.send(f"bye {i}")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                return i, got, closed.value.rcvd.code if closed.value.rcvd else None
            await ws.close()
            return i, got, None

    async def watch_open() -> int:
        await all_open.wait()
        return sessions.open

    results, peak = await asyncio.gather(asyncio.gather(*(one(i) for i in range(n))), watch_open())
    assert peak == n  # every session was open through the proxy at the same time
    assert len(results) == n
    assert {code for i, _, code in results if i % 2} == {4000}
    await _no_session_left(proxy)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(upstream_saw_close) < n // 2 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert sorted(closed_by_upstream) == list(range(1, n, 2))
    assert len(upstream_saw_close) == n // 2  # the clients' closes reached the upstream
    rows = await proxy.rows(n)
    assert len(rows) == n and {r["usage_source"] for r in rows} == {"none"}
    assert {r["status"] for r in rows} == {101}


async def test_client_that_vanishes_closes_the_upstream_and_a_cut_response_is_recorded(
    make_proxy, upstream
) -> None:
    upstream_closed = asyncio.Event()

    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        events = messages("openai_realtime")
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(events[1])  # response.created, and never its response.done
        finally:  # a plain end, or the handler cancelled because the connection went
            upstream_closed.set()

    ws_upstream(upstream, "/v1/realtime", serve)
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    key = base64.b64encode(b"0123456789abcdef").decode()
    writer.write(
        b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        + f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        + _masked(b'{"type":"response.create"}')
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101") and _accept(key).encode() in head
    assert b"response.created" in await reader.read(4096)
    writer.transport.abort()  # no close frame: the TCP connection just goes
    await asyncio.wait_for(upstream_closed.wait(), 10)
    [row] = await proxy.rows(1)
    assert row["usage_source"] == "missing" and "closed before the response finished" in row["error"]
    assert row["cost_usd"] is None
    await _no_session_left(proxy)


def _masked(payload: bytes, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + key + masked


async def test_an_upgrade_the_upstream_refuses_is_relayed_and_recorded(make_proxy, upstream) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "bad key"}},
            status=401,
        )

    upstream.replies["/v1/realtime"] = refuse
    proxy = await make_proxy()
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{ws_url(proxy.url)}/v1/realtime?model=gpt-realtime"):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    [row] = await proxy.rows(1)
    assert (row["status"], row["endpoint"]) == (401, "realtime")
    assert "invalid_api_key" in row["error"]


async def test_an_unroutable_websocket_goes_nowhere(make_proxy) -> None:
    async with RawUpstream() as evil:
        proxy = await make_proxy()
        for path in (f"//127.0.0.1:{evil.port}/v1/realtime", "/nowhere/v1/realtime", "/openai/../x"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{ws_url(proxy.url)}{path}"):
                    pass
            assert refused.value.response.status_code in (400, 404)
        assert evil.connections == 0


def test_realtime_input_transcription_is_its_own_row_at_the_transcription_model() -> None:
    from meterproxy.providers.live import RealtimeParser

    parser = RealtimeParser("gpt-realtime")
    session = {
        "type": "session.updated",
        "session": {
            "type": "realtime",
            "model": "gpt-realtime",
            "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
        },
    }
    assert parser.on_server_message(json.dumps(session).encode()) == []
    # The event as the Realtime reference documents it (GA shape, usage of type tokens).
    event = (
        b'{"type":"conversation.item.input_audio_transcription.completed","event_id":"event_CCXGRvtUVrax5SJAnNOWZ",'
        b'"item_id":"item_CCXGQ4e1ht4cOraEYcuR2","content_index":0,"transcript":"Hey, can you hear me?",'
        b'"usage":{"type":"tokens","total_tokens":22,"input_tokens":13,'
        b'"input_token_details":{"text_tokens":0,"audio_tokens":13},"output_tokens":9}}'
    )
    [row] = parser.on_server_message(event)
    assert row.result.model == "gpt-4o-transcribe" and row.result.usage_source == "reported"
    assert row.result.usage is not None
    assert (row.result.usage.input_tokens, row.result.usage.audio_input_tokens) == (13, 13)
    assert row.result.usage.output_tokens == 9

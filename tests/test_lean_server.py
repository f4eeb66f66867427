"""The lean server (meterproxy.server) on the wire: what its docstring promises, byte by byte.

Raw sockets, so every framing case is exactly what a client could send:
pipelined requests answered in order (proxy routes and the application's own
paths mixed on one connection), request smuggling shapes refused and never
forwarded, head limits, HTTP/1.0 clients, HEAD, chunked request bodies (whole
and over the limit), an upgrade request handed to the application, and idle
keep-alive connections closed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httptools
import pytest

from meterproxy import server as lean
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.waits import WAIT_S

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


class _Answers:
    """Parses answers off a raw connection (llhttp callbacks)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[dict[str, Any]] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        headers = dict(self._headers)
        self.done.append({"status": self.parser.get_status_code(), "headers": headers, "body": self._body})
        self._headers, self._body = [], b""


async def _exchange(
    proxy: ProxyHarness, data: bytes, answers: int, close_wait: float = 0.5
) -> tuple[list[dict[str, Any]], bool]:
    """Send ``data`` at once; read until ``answers`` answers are complete. Returns them and
    whether the proxy then closed the connection within ``close_wait`` seconds (a test that
    expects the close waits long, one that expects a kept connection briefly)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    parsed = _Answers()
    try:
        writer.write(data)
        await writer.drain()
        while len(parsed.done) < answers:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=WAIT_S)
            if not chunk:
                break
            parsed.parser.feed_data(chunk)
        try:
            closed = await asyncio.wait_for(reader.read(1), timeout=close_wait) == b""
        except TimeoutError:
            closed = False
        return parsed.done, closed
    finally:
        writer.transport.abort()


def _post(path: str, body: bytes = CHAT, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_pipelined_requests_are_answered_in_order_across_proxy_and_app_paths(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy()
    data = (
        _post("/v1/chat/completions")
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        + _post("/v1/chat/completions")
        + b"GET /nowhere/x HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers, closed = await _exchange(proxy, data, 4)
    assert [a["status"] for a in answers] == [200, 200, 200, 404]
    assert answers[0]["body"] == fx.body and answers[2]["body"] == fx.body
    assert json.loads(answers[1]["body"])["status"] in ("ok", "degraded")
    assert json.loads(answers[3]["body"])["error"]["code"] == "no_route"
    assert not closed  # keep-alive across both kinds of path
    assert len(await proxy.rows(2)) == 2


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\nabcd",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Length: 4\n\nabcd",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;\x00\r\nabcd\r\n0\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "space-before-colon", "te-not-final-chunked", "bare-lf", "bad-chunk"],
)
async def test_smuggling_shapes_get_400_close_and_reach_no_upstream(
    upstream: FakeUpstream, make_proxy: ProxyFactory, head: bytes
) -> None:
    proxy = await make_proxy()
    answers, closed = await _exchange(proxy, head, 1, close_wait=WAIT_S)
    assert [a["status"] for a in answers] == [400]
    assert closed
    assert upstream.received == []


async def test_a_head_past_the_limit_gets_431_and_is_never_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy()
    many = "".join(f"X-Pad-{i}: {'v' * 60}\r\n" for i in range(lean.MAX_HEADERS + 1))
    answers, closed = await _exchange(proxy, _post("/v1/chat/completions", extra=many), 1, close_wait=WAIT_S)
    assert [a["status"] for a in answers] == [431] and closed
    long_value = f"X-Long: {'v' * (lean.MAX_HEAD_BYTES + 1)}\r\n"
    answers, closed = await _exchange(
        proxy, _post("/v1/chat/completions", extra=long_value), 1, close_wait=WAIT_S
    )
    assert [a["status"] for a in answers] == [431] and closed
    assert upstream.received == []


async def test_a_head_sent_slowly_gets_431_once_it_passes_the_limit(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    """The limits hold for a head that never completes: checked at the end of each read.

    The head is counted as its URL plus each header's name, value and 4; a header is
    known once the next one starts. 65 lines of 1009 pass 64 KiB only with the last
    one, known when the "X" after it arrives: every byte sent has been read when the
    limit is passed, so the answer cannot be lost to a reset.
    """
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    parsed = _Answers()
    try:
        start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        line = f"X-Pad: {'v' * 1000}\r\n".encode()
        counted = len(b"/v1/chat/completions") + len(b"Host") + len(b"x") + 4
        assert counted + 64 * 1009 <= lean.MAX_HEAD_BYTES < counted + 65 * 1009
        writer.write(start)
        for _ in range(13):
            writer.write(line * 5)  # in pieces: the head is never complete at the end of a read
            await writer.drain()
        writer.write(b"X")
        while not parsed.done:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=WAIT_S)
            assert chunk, "closed without an answer"
            parsed.parser.feed_data(chunk)
        assert [a["status"] for a in parsed.done] == [431]
        assert await asyncio.wait_for(reader.read(1), timeout=WAIT_S) == b""
    finally:
        writer.transport.abort()
    assert upstream.received == []


async def test_http10_client_gets_the_stream_ended_by_the_close(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx)  # the fake upstream answers chunked: HTTP/1.0 cannot carry that
    proxy = await make_proxy(inject_stream_usage=False)
    request = _post("/v1/chat/completions").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), timeout=WAIT_S)  # to the close
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    assert body == fx.body
    (row,) = await proxy.rows(1)
    assert row["usage_source"] == "reported"


async def test_head_request_gets_headers_only_and_keeps_the_connection(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("openai_chat_json"), path="/v1/models")
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\nHEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while raw.count(b"\r\n\r\n") < 2:  # two heads and not a byte of body
            chunk = await asyncio.wait_for(reader.read(65536), timeout=WAIT_S)
            assert chunk, raw
            raw += chunk
        heads = raw.split(b"\r\n\r\n")
        assert heads[2] == b"" and all(h.startswith(b"HTTP/1.1 200") for h in heads[:2])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # still open, still in step
        chunk = await asyncio.wait_for(reader.read(65536), timeout=WAIT_S)
        assert chunk.startswith(b"HTTP/1.1 200")
    finally:
        writer.transport.abort()
    assert [r.method for r in upstream.received] == ["HEAD"]


async def test_chunked_request_body_is_forwarded_whole_with_a_length(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy()
    pieces = [CHAT[:10], CHAT[10:11], CHAT[11:]]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answers, _ = await _exchange(proxy, head + chunked, 1)
    assert answers[0]["status"] == 200 and answers[0]["body"] == fx.body
    (received,) = upstream.received
    assert received.body == CHAT
    assert received.headers["Content-Length"] == str(len(CHAT))
    assert "Transfer-Encoding" not in received.headers


async def test_chunked_body_over_the_limit_is_413_recorded_and_never_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(max_body_bytes=1000)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Meter-Session: big\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunks = b"".join(b"%x\r\n%b\r\n" % (300, b"a" * 300) for _ in range(5)) + b"0\r\n\r\n"
    answers, closed = await _exchange(proxy, head + chunks, 1, close_wait=WAIT_S)
    assert answers[0]["status"] == 413 and closed
    assert json.loads(answers[0]["body"])["error"]["code"] == "body_too_large"
    assert upstream.received == []
    (row,) = await proxy.rows(1)
    assert row["status"] == 413 and row["session"] == "big"


@pytest.mark.parametrize(
    "connection", ["Connection: Upgrade\r\n", ""], ids=["upgrade", "upgrade-header-only"]
)
async def test_upgrade_request_goes_to_the_application(
    upstream: FakeUpstream, make_proxy: ProxyFactory, connection: str
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx, path="/v1/responses")
    proxy = await make_proxy()
    request = (
        f"GET /v1/responses HTTP/1.1\r\nHost: x\r\n{connection}Upgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    answers, closed = await _exchange(proxy, request, 1, close_wait=WAIT_S)
    # The application's WebSocket relay (meterproxy.websocket) takes it and hands back what
    # the upstream answered; this upstream speaks no WebSocket, so that is a plain 200,
    # never a 101 from nowhere, and the connection is not kept for another request.
    assert answers[0]["status"] == 200 and answers[0]["body"] == fx.body
    assert [r.method for r in upstream.received] == ["GET"]
    assert closed
    # A real tunnel through the lean server: tests/test_websocket.py (it runs on it too).


async def test_idle_keepalive_connections_are_closed(
    upstream: FakeUpstream, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lean, "KEEPALIVE_TIMEOUT", 0.3)
    monkeypatch.setattr(lean, "SWEEP_INTERVAL", 0.1)
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    try:
        while True:  # the answer, then the close (well within the deadline)
            chunk = await asyncio.wait_for(reader.read(65536), timeout=WAIT_S)
            if not chunk:
                break
            got += chunk
    finally:
        writer.transport.abort()
    assert got.startswith(b"HTTP/1.1 200")


async def _read_answers(reader: asyncio.StreamReader, parsed: _Answers, n: int) -> None:
    while len(parsed.done) < n:
        chunk = await asyncio.wait_for(reader.read(65536), timeout=WAIT_S)
        if not chunk:
            return
        parsed.parser.feed_data(chunk)


async def test_expect_100_continue_gets_100_before_the_body_is_sent(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy()
    head = _post("/v1/chat/completions", extra="Expect: 100-continue\r\n")[: -len(CHAT)]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    parsed = _Answers()
    try:
        writer.write(head)  # the head alone: a client that waits for 100 Continue
        await _read_answers(reader, parsed, 1)
        assert [a["status"] for a in parsed.done] == [100]
        assert upstream.received == []
        writer.write(CHAT)
        await _read_answers(reader, parsed, 2)
    finally:
        writer.transport.abort()
    assert [a["status"] for a in parsed.done] == [100, 200]
    assert parsed.done[1]["body"] == fx.body
    (received,) = upstream.received
    assert received.body == CHAT
    assert "Expect" not in received.headers  # the body was read whole: nothing to wait for upstream
    assert len(await proxy.rows(1)) == 1


async def test_expect_100_continue_for_a_body_over_the_limit_gets_413_not_100(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(max_body_bytes=1000)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5000\r\n\r\n"
    )
    answers, closed = await _exchange(proxy, head, 1)  # the body is never sent
    assert [a["status"] for a in answers] == [413]
    assert closed
    assert upstream.received == []
    (row,) = await proxy.rows(1)
    assert row["status"] == 413


async def test_an_expectation_other_than_100_continue_gets_417(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy()
    answers, closed = await _exchange(proxy, _post("/v1/chat/completions", extra="Expect: teapot\r\n"), 1)
    assert [a["status"] for a in answers] == [417]
    assert json.loads(answers[0]["body"])["error"]["code"] == "expectation_failed"
    assert closed
    assert upstream.received == []


async def test_curl_sends_a_large_body_on_our_100_continue(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """curl asks for 100 Continue before a body over 1 MiB (and waits 1 s without one)."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy()
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"a" * 2_000_000 + b'"}]}'
    payload = tmp_path / "body.json"
    payload.write_bytes(body)
    url = f"http://127.0.0.1:{proxy.server.port}/v1/chat/completions"
    process = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-v",
        "--data-binary",
        f"@{payload}",
        "-H",
        "Content-Type: application/json",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert out == fx.body
    assert b"Expect: 100-continue" in err  # curl asked ...
    assert b"HTTP/1.1 100 Continue" in err  # ... and we answered, rather than curl giving up waiting
    (received,) = upstream.received
    assert received.body == body

"""The upstream client (`meterproxy.upstream`) against a raw server that says exact bytes.

The proxy-level behaviour (502/504, mid-answer faults, drains) is tested through
the proxy in tests/faults; here are the client's own guarantees: keep-alive
reuse and when a connection must not be reused, interim answers, HEAD, the
three body framings and how each one fails, flow control, timeouts, and the
exact bytes of the request on the wire.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest
from yarl import URL

from meterproxy.testing_raw import RawConnection, RawUpstream, respond
from meterproxy.upstream import (
    HIGH_WATER,
    UpstreamBroken,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamTimeout,
)
from tests.helpers.budgets import wait_for


async def _body(resp: UpstreamResponse) -> bytes:
    out = b""
    while chunk := await resp.read():
        out += chunk
    return out


async def _get(client: UpstreamClient, url: str, method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    resp = await client.request(method, URL(url, encoded=True), [("Accept", "*/*")], body)
    try:
        return resp.status, await _body(resp)
    finally:
        resp.release()


async def _keep_alive(conn: RawConnection, answer: bytes) -> None:
    """Answer every request on the connection the same way, until the client closes it."""
    while conn.request is not None:
        await conn.send(answer)
        await conn.next_request()


async def test_keep_alive_connection_is_reused() -> None:
    async def script(conn: RawConnection) -> None:
        await _keep_alive(conn, respond(200, b'{"ok":1}'))

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        for _ in range(5):
            assert await _get(client, raw.url + "/v1/x") == (200, b'{"ok":1}')
        assert raw.connections == 1
        await client.close()


@pytest.mark.parametrize(
    "answer",
    [
        respond(200, b"done", headers={"Connection": "close"}),
        respond(200, b"done", version="1.0"),  # HTTP/1.0 without keep-alive
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_connection_the_server_will_close_is_not_reused(answer: bytes) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(answer)

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        for _ in range(3):
            assert await _get(client, raw.url + "/") == (200, b"done")
        assert raw.connections == 3
        await client.close()


async def test_request_bytes_on_the_wire_are_exact() -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, b"{}"))

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        body = b'{"model": "gpt-4o", "x": "\xc3\xa9"}'
        resp = await client.request(
            "POST",
            URL(raw.url + "/v1/a%2Fb/chat?key=k%20v&x=1", encoded=True),
            [("Authorization", "Bearer sk-1"), ("X-Custom", "one"), ("x-custom", "two")],
            body,
        )
        await _body(resp)
        resp.release()
        got = raw.requests[0]
        assert got.head == (
            b"POST /v1/a%2Fb/chat?key=k%20v&x=1 HTTP/1.1\r\n"
            + f"Host: 127.0.0.1:{raw.port}\r\n".encode()
            + b"Authorization: Bearer sk-1\r\nX-Custom: one\r\nx-custom: two\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert got.body == body
        await client.close()


async def test_interim_100_continue_is_skipped() -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        await _keep_alive(conn, respond(201, b"made", headers={"X-A": "1"}))

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        resp = await client.request("POST", URL(raw.url + "/"), [], b"{}")
        assert (resp.status, resp.reason, resp.headers["X-A"]) == (201, "X", "1")
        assert "Link" not in resp.headers
        assert await _body(resp) == b"made"
        resp.release()
        assert await _get(client, raw.url + "/") == (201, b"made")  # the connection is still usable
        assert raw.connections == 1
        await client.close()


async def test_head_answer_has_no_body_whatever_its_length_says() -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        await asyncio.sleep(30)  # a client waiting for 1234 bytes would hang here

    client = UpstreamClient(read_timeout=5)
    async with RawUpstream(script) as raw:
        assert await asyncio.wait_for(_get(client, raw.url + "/", method="HEAD"), 3) == (200, b"")
        await client.close()


async def test_chunked_body_is_decoded_and_delivered_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, length=False, headers={"Transfer-Encoding": "chunked"}))
        await conn.send(b"5\r\nhello\r\n")
        await go_on.wait()
        await conn.send(b"6\r\n world\r\n0\r\n\r\n")

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        assert await asyncio.wait_for(resp.read(), 3) == b"hello"  # before the rest exists
        go_on.set()
        assert await _body(resp) == b" world"
        resp.release()
        await client.close()


async def test_close_delimited_body_ends_on_fin_and_breaks_on_reset() -> None:
    async def clean(conn: RawConnection) -> None:
        await conn.send(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        conn.close()

    async def reset(conn: RawConnection) -> None:
        await conn.send(b"HTTP/1.0 200 OK\r\n\r\npart")
        await asyncio.sleep(0.05)  # the upstream's pacing: part of the body, then a reset
        conn.reset()

    client = UpstreamClient()
    async with RawUpstream(clean) as raw:
        assert await _get(client, raw.url + "/") == (200, b"all of it")
    async with RawUpstream(reset) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        got = b""
        with pytest.raises(UpstreamBroken):
            while chunk := await resp.read():
                got += chunk
        assert got == b"part"  # what did arrive is delivered before the error
        resp.release()
    await client.close()


@pytest.mark.parametrize(
    "tail",
    [b"zz\r\nbad\r\n", b"5\r\nhel"],  # a bad chunk size; a chunk cut by the close
    ids=["bad-chunk-size", "cut-chunk"],
)
async def test_broken_chunked_framing_mid_body(tail: bytes) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, length=False, headers={"Transfer-Encoding": "chunked"}))
        await conn.send(b"4\r\ngood\r\n")
        await asyncio.sleep(0.05)  # the upstream's pacing: a good chunk, then the broken one
        await conn.send(tail)
        conn.close()

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        got = b""
        with pytest.raises(UpstreamBroken):
            while chunk := await resp.read():
                got += chunk
        assert got.startswith(b"good")
        resp.release()
        await client.close()


async def test_garbage_instead_of_a_status_line_fails_the_request() -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        with pytest.raises(UpstreamBroken, match="head"):
            await client.request("GET", URL(raw.url + "/"), [])
        await client.close()


async def test_close_before_answering_and_refused_connections() -> None:
    async def script(conn: RawConnection) -> None:
        conn.close()

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        with pytest.raises(UpstreamConnectError, match="before answering"):
            await client.request("GET", URL(raw.url + "/"), [])
        port = raw.port
    with pytest.raises(UpstreamConnectError, match="cannot connect"):
        await client.request("GET", URL(f"http://127.0.0.1:{port}/"), [])
    await client.close()


async def test_read_timeout_before_and_after_the_head() -> None:
    async def silent(conn: RawConnection) -> None:
        await asyncio.sleep(30)  # the fault: no answer; the client's read timeout fires first

    async def stalls(conn: RawConnection) -> None:
        await conn.send(respond(200, length=False, headers={"Transfer-Encoding": "chunked"}))
        await conn.send(b"3\r\nabc\r\n")
        await asyncio.sleep(30)  # the fault: a stall after the head

    client = UpstreamClient(read_timeout=0.3)
    async with RawUpstream(silent) as raw:
        with pytest.raises(UpstreamTimeout, match="before answering"):
            await client.request("GET", URL(raw.url + "/"), [])
    async with RawUpstream(stalls) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        assert await resp.read() == b"abc"
        with pytest.raises(UpstreamTimeout, match="mid-answer"):
            await resp.read()
        resp.release()
    await client.close()


async def test_read_timeout_on_a_reused_connection_counts_from_its_own_request() -> None:
    """The read timer outlives an answer (one per connection, not per request): a later
    request on the same connection still times out, and not before its own timeout."""
    answered = 0

    async def script(conn: RawConnection) -> None:
        nonlocal answered
        while conn.request is not None and answered < 2:
            await conn.send(respond(200, b'{"ok":1}'))
            answered += 1
            await conn.next_request()
        await asyncio.sleep(30)  # the fault: the third request gets no answer

    client = UpstreamClient(read_timeout=0.5)
    loop = asyncio.get_running_loop()
    async with RawUpstream(script) as raw:
        assert await _get(client, raw.url + "/") == (200, b'{"ok":1}')
        # Past most of the first request's timeout, so a timer left from it would fire early.
        await asyncio.sleep(0.4)
        assert await _get(client, raw.url + "/") == (200, b'{"ok":1}')
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match="before answering"):
            await client.request("GET", URL(raw.url + "/"), [])
        assert loop.time() - started >= 0.5
        assert raw.connections == 1
    await client.close()


async def test_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    blob = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, blob, content_type="application/octet-stream"), chunk=64 * 1024)

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        conn = resp._conn  # the upstream keeps sending; we do not read, so the socket gets paused
        await wait_for(lambda: conn._paused, what="the socket paused past the high-water mark")
        assert conn._buffered <= HIGH_WATER + 256 * 1024
        assert await _body(resp) == blob
        resp.release()
        await client.close()


async def test_idle_connection_closed_by_the_server_is_not_reused() -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, b"one"))
        await asyncio.sleep(0.05)  # the upstream's pacing: the connection goes idle, then closes
        conn.close()  # the server ends the idle keep-alive connection

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        assert await _get(client, raw.url + "/") == (200, b"one")
        await wait_for(lambda: not client._idle.get(("http", "127.0.0.1", raw.port)), what="the close seen")
        assert await _get(client, raw.url + "/") == (200, b"one")
        assert raw.connections == 2
        await client.close()


async def test_close_fails_answers_in_flight() -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, length=False, headers={"Transfer-Encoding": "chunked"}))
        await conn.send(b"2\r\nhi\r\n")
        await asyncio.sleep(30)  # an answer still in flight when the client closes

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        assert await resp.read() == b"hi"
        await client.close()
        with pytest.raises(UpstreamBroken, match="shut down"):
            await resp.read()
        resp.release()
        with pytest.raises(UpstreamConnectError):
            await client.request("GET", URL(raw.url + "/"), [])


async def test_answer_released_unread_closes_its_connection() -> None:
    async def script(conn: RawConnection) -> None:
        await _keep_alive(conn, respond(200, b"x" * 100_000))

    client = UpstreamClient()
    async with RawUpstream(script) as raw:
        resp = await client.request("GET", URL(raw.url + "/"), [])
        resp.release()  # e.g. the client hung up: the rest of this body must not reach the next request
        assert await _get(client, raw.url + "/") == (200, b"x" * 100_000)
        assert raw.connections == 2
        await client.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_upstream_is_verified(tmp_path: Path) -> None:
    """Real providers are HTTPS: the certificate is checked, and a trusted one works with keep-alive."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    connections = 0
    handlers_done = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, handlers_done
        connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(respond(200, b'{"tls":true}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            handlers_done += 1

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/models"
    try:
        untrusting = UpstreamClient()  # the system's CAs: a self-signed certificate is refused
        with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.request("GET", URL(url), [])
        await untrusting.close()

        trusting = UpstreamClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(3):
            assert await _get(trusting, url) == (200, b'{"tls":true}')
        await trusting.close()
        assert connections == 1  # three requests, one kept-alive connection (the refused one never got here)
        # The handler sees the client's close before the server goes.
        await wait_for(lambda: handlers_done == connections, what="the handler to see the close")
    finally:
        server.close()
        await server.wait_closed()


async def test_idle_connections_are_closed_after_keepalive_timeout() -> None:
    closed_by_client = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, b"ok"))
        if await conn.next_request() is None:  # the client closed the idle connection
            closed_by_client.set()

    client = UpstreamClient(keepalive_timeout=0.2)
    async with RawUpstream(script) as raw:
        assert await _get(client, raw.url + "/") == (200, b"ok")
        await asyncio.wait_for(closed_by_client.wait(), 5)  # no further request needed to trigger it
        assert not any(client._idle.values())
        await client.close()

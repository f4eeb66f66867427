"""Response desync: an upstream that says more than one answer must never leak into another.

An upstream (buggy, or hostile) can write bytes after a complete answer: a second
whole response in the same write, a trailing half response, or stray bytes that
arrive while the connection sits idle in the pool. None of those bytes belong to
any request we sent, so the connection they came on is closed and never reused:
the first client gets exactly the first answer (one status, one Content-Length),
and the next, unrelated client gets its own answer on a fresh connection, not the
leftover (which would otherwise be read as its answer, or hang it until
``read_timeout``).

Each case runs two sequential clients through the real proxy against a raw
socket upstream on 127.0.0.1, the extra bytes sent whole and in 1-byte fragments.
"""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from meterproxy.testing import FakeUpstream
from meterproxy.testing_raw import RawConnection, respond
from meterproxy.upstream import UpstreamClient
from tests.conftest import ProxyFactory
from tests.helpers.faults import RawFactory, post, proxy_for, row_for, session_id, still_serving
from tests.helpers.waits import WAIT_S

CHAT_PATH = "/raw/v1/chat/completions"
FIRST = respond(200, b'{"first":true}', headers={"X-Answer": "first"})
FRESH = respond(200, b'{"fresh":true}', headers={"X-Answer": "fresh"})
TEAPOT = (
    b"HTTP/1.1 418 I'm a teapot\r\nContent-Type: text/plain\r\nX-Answer: teapot\r\n"
    b"Content-Length: 9\r\n\r\nI'm short"
)

EXTRA = {
    "second-whole-answer": TEAPOT,
    "trailing-partial-answer": b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 50\r\n\r\nhalf",
    "trailing-partial-head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "garbage": b"\x00\x01not http at all",
}


@pytest.mark.parametrize("fragment", [None, 1], ids=["whole", "1-byte"])
@pytest.mark.parametrize("extra", list(EXTRA.values()), ids=list(EXTRA))
async def test_bytes_after_a_complete_answer_never_reach_the_next_client(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    raw_upstream: RawFactory,
    extra: bytes,
    fragment: int | None,
) -> None:
    first_connection = True

    async def script(conn: RawConnection) -> None:
        nonlocal first_connection
        if first_connection:
            first_connection = False
            await conn.send(FIRST + extra, chunk=fragment)
        else:
            await conn.send(FRESH)
        # Keep the connection open and answer anything else sent on it as the leftover would.
        while await conn.next_request() is not None:
            await conn.send(FRESH)

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream, read_timeout=5)

    sid1 = session_id()
    status, body, err, headers = await post(proxy, CHAT_PATH, session=sid1)
    assert err is None
    assert (status, body) == (200, b'{"first":true}')
    assert headers["X-Answer"] == "first" and headers["Content-Length"] == "14"

    sid2 = session_id()
    status, body, err, headers = await post(proxy, CHAT_PATH, session=sid2)
    assert err is None, err
    assert (status, body) == (200, b'{"fresh":true}')
    assert headers["X-Answer"] == "fresh"
    assert raw.connections == 2, "the connection that carried extra bytes was reused"

    assert (await row_for(proxy, sid1))["status"] == 200
    assert (await row_for(proxy, sid2))["status"] == 200
    await still_serving(proxy, upstream)


async def test_bytes_arriving_on_an_idle_pooled_connection_close_it(raw_upstream: RawFactory) -> None:
    """Stray bytes while the connection waits in the pool: closed there, before anyone reuses it."""
    sent_first = asyncio.Event()
    send_extra = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        if conn.request is not None and b"/first" in conn.request.head:
            await conn.send(FIRST)
            sent_first.set()
            await send_extra.wait()
            await conn.send(TEAPOT)
            await conn.reader.read()  # until the client closes this connection
            return
        while conn.request is not None:
            await conn.send(FRESH)
            await conn.next_request()

    raw = await raw_upstream(script)
    client = UpstreamClient(read_timeout=5)
    try:
        resp = await client.request("GET", URL(raw.url + "/first"), [])
        assert resp.status == 200 and await resp.read() == b'{"first":true}'
        assert await resp.read() == b""
        resp.release()
        assert raw.connections == 1
        send_extra.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while client._idle.get(("http", "127.0.0.1", raw.port)):
            assert loop.time() < deadline, "the connection with stray bytes stayed in the pool"
            await asyncio.sleep(0.01)

        resp = await client.request("GET", URL(raw.url + "/second"), [])
        assert resp.status == 200 and resp.headers["X-Answer"] == "fresh"
        resp.release()
        assert raw.connections == 2
    finally:
        await client.close()


async def test_bytes_waiting_in_the_socket_when_reused_are_caught(raw_upstream: RawFactory) -> None:
    """Extra bytes already in the kernel when the pool hands the connection out: not reused.

    The stray bytes are written with no await between that write and the next
    request, so the event loop has had no chance to read them: only the peek at
    the socket before reuse can see them.
    """
    first: list[RawConnection] = []

    async def script(conn: RawConnection) -> None:
        if conn.request is not None and b"/first" in conn.request.head:
            first.append(conn)
            await conn.send(FIRST)
            await conn.reader.read()  # until the client closes this connection
            return
        while conn.request is not None:
            await conn.send(FRESH)
            await conn.next_request()

    raw = await raw_upstream(script)
    client = UpstreamClient(read_timeout=5)
    try:
        resp = await client.request("GET", URL(raw.url + "/first"), [])
        body = b""
        while chunk := await resp.read():
            body += chunk
        assert body == b'{"first":true}'
        resp.release()
        first[0].writer.write(TEAPOT)  # lands in the client's socket buffer at once (loopback)
        resp = await client.request("GET", URL(raw.url + "/second"), [])
        assert resp.status == 200 and resp.headers["X-Answer"] == "fresh"
        resp.release()
        assert raw.connections == 2
    finally:
        await client.close()

"""The upstream client delivers exactly the body the server framed, however the bytes arrive.

Hypothesis picks a body, a framing (Content-Length, chunked with arbitrary
chunk sizes and extensions, or delimited by the connection's close), whether
interim 1xx answers come first, and where the server's bytes are cut into
separate writes (a short pause between pieces, so they arrive as separate
reads). A real asyncio server on 127.0.0.1 writes them. The properties:

- the bytes `UpstreamResponse.read` returns, joined, are exactly the body;
- the status and a header come through;
- a keep-alive framing leaves the connection reusable: a second request on it
  gets its own answer whole, on the same connection (the parser's state
  between answers is clean).
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from meterproxy.upstream import UpstreamClient

SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """(the wire bytes of one answer, its body, its framing)."""
    size = draw(st.one_of(st.integers(0, 64), st.integers(65, 3000)))
    body = draw(st.binary(min_size=size, max_size=size))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    head = b""
    for _ in range(draw(st.integers(0, 2))):
        head += b"HTTP/1.1 100 Continue\r\n\r\n"
    head += b"HTTP/1.1 200 OK\r\nX-Probe: yes\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body, body, framing
    if framing == "close":
        return head + b"Connection: close\r\n\r\n" + body, body, framing
    sizes = draw(st.lists(st.integers(1, 700), max_size=12))
    wire, at = head + b"Transfer-Encoding: chunked\r\n\r\n", 0
    for size in [*sizes, len(body)]:
        piece = body[at : at + size]
        if not piece:
            continue
        ext = b";ext=1" if draw(st.booleans()) else b""
        wire += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        at += len(piece)
    return wire + b"0\r\n\r\n", body, framing


async def _exchange(wire: bytes, cuts: list[int], framing: str) -> tuple[int, str, bytes, bytes | None, int]:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            at = 0
            for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
                if cut > at:
                    writer.write(wire[at:cut])
                    await writer.drain()
                    await asyncio.sleep(0.001)  # separate reads on the client side
                    at = cut
            if framing == "close":
                writer.close()
                return
            await reader.readuntil(b"\r\n\r\n")
            writer.write(SECOND)
            await writer.drain()
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test's loop is ending: this server's work is done
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x")
    client = UpstreamClient(read_timeout=10)
    try:
        resp = await client.request("POST", url, [("Content-Type", "application/json")], b"{}")
        status, probe, got = resp.status, resp.headers.get("X-Probe", ""), b""
        while chunk := await resp.read():
            got += chunk
        resp.release()
        second = None
        if framing != "close":
            again = await client.request("GET", url, [])
            second = await again.read() + await again.read()
            again.release()
        return status, probe, got, second, connections
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers(), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_body_is_exact_however_it_is_framed_and_split(
    answer: tuple[bytes, bytes, str], cuts: list[int]
) -> None:
    wire, body, framing = answer
    status, probe, got, second, connections = asyncio.run(_exchange(wire, cuts, framing))
    assert (status, probe) == (200, "yes")
    assert got == body
    if framing != "close":
        assert second == b"second"
        assert connections == 1

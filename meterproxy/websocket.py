"""WebSocket sessions: the upgrade handshake upstream, then a byte tunnel both ways.

meterproxy does not terminate WebSockets: it forwards the client's upgrade
request to the routed upstream (same routing, same refusal of anything not
configured), relays the upstream's answer, and after a ``101 Switching
Protocols`` copies raw bytes in both directions until either side closes. The
frames therefore reach each peer exactly as sent, in order: masking, ping and
pong, close frames and any negotiated extension (``permessage-deflate``) are the
peers' own business. A copy of each direction is handed to an observer
(``on_server_bytes`` / ``on_client_bytes``) that decodes frames for metering
(`meterproxy.wsframes`, `meterproxy.providers.realtime`); it reads, never edits.

The pieces, in the order they fire:

1. `is_upgrade` decides from the request head alone (``GET`` with
   ``Upgrade: websocket`` and ``Connection: upgrade``); requests without it never
   reach this module, and an upstream that answers them with a 101 is refused by
   the HTTP client instead.
2. `handshake` opens a fresh connection to the upstream (never a pooled one: it
   will be consumed by the tunnel), sends the upgrade request with the
   client's headers (hop-by-hop ones dropped, ``Upgrade``/``Connection`` and
   every ``Sec-WebSocket-*`` kept so the key, subprotocols and extensions are
   negotiated end to end) and reads the answer's head. Anything but a 101 is read
   whole (bounded) and returned as an ordinary answer for the client.
3. `relay` runs the tunnel over a `ClientSide` (the accepted client connection:
   ``read``/``write``/``close``; `AiohttpClientSide` adapts an aiohttp request)
   and an `UpstreamSocket`. Both directions are back-pressured: a slow reader
   on one side slows the writer on the other, never our memory. When either
   side ends (close, reset, EOF) the other is closed too, after what was
   already read has been passed on; `relay` returns only when both are closed.

Nothing here knows about providers, records or aiohttp's internals beyond the
adapter at the bottom; the proxy wires these pieces to the meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from meterproxy.http_headers import HOP_BY_HOP

__all__ = [
    "AiohttpClientSide",
    "ClientSide",
    "Handshake",
    "HandshakeError",
    "RelayResult",
    "UpstreamSocket",
    "handshake",
    "is_upgrade",
    "relay",
]

#: Largest handshake answer head, and body of a refused (non-101) handshake, that we read.
MAX_HEAD = 64 * 1024
MAX_REFUSAL_BODY = 1024 * 1024
#: Bytes buffered from a side before it is paused (the other side is not keeping up).
HIGH_WATER = 256 * 1024
READ_SIZE = 64 * 1024

# Client headers never copied upstream: every hop-by-hop one (`upgrade_headers` writes the
# upgrade's own Upgrade and Connection), Host (set by `handshake`) and Content-Length.
_DROP = HOP_BY_HOP | {"host", "content-length"}


def is_upgrade(method: str, headers: MultiMapping[str]) -> bool:
    """Does this request ask for a WebSocket (RFC 6455 section 4.1)?"""
    if method != "GET":
        return False
    upgrade = {t.strip().lower() for v in headers.getall("upgrade", ()) for t in v.split(",")}
    connection = {t.strip().lower() for v in headers.getall("connection", ()) for t in v.split(",")}
    return "websocket" in upgrade and "upgrade" in connection


class HandshakeError(Exception):
    """The upstream could not be reached or answered the upgrade with garbage."""


class UpstreamSocket:
    """The upstream's side of a switched connection: raw bytes in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        """The next bytes from the upstream; b"" once it closed (a reset counts as closed)."""
        try:
            return await self._reader.read(READ_SIZE)
        except (ConnectionError, OSError, ssl.SSLError):
            return b""

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        """Close after flushing what is buffered (a close frame just relayed must get out)."""
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    def abort(self) -> None:
        transport = self._writer.transport
        transport.abort()


@dataclass(slots=True)
class Handshake:
    """The upstream's answer to an upgrade request: a 101 with its socket, or an ordinary answer."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    socket: UpstreamSocket | None = None  # set for a 101
    body: bytes = b""  # the body of any other answer


def upgrade_headers(client_headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """The client's headers as they go upstream: ours (``drop``) and hop-by-hop ones removed."""
    out = [(n, v) for n, v in client_headers if n.lower() not in _DROP and n.lower() not in drop]
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"), *out]


async def handshake(
    url: URL,
    headers: Iterable[tuple[str, str]],
    *,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float,
    read_timeout: float,
) -> Handshake:
    """Send the upgrade request to ``url`` on a new connection; return its answer (see module doc).

    ``headers`` go out as given (the caller filtered them, see `upgrade_headers`);
    ``Host`` is set here. Raises `HandshakeError` (or `TimeoutError`) when there is
    no usable answer.
    """
    host = url.raw_host or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    kwargs: dict[str, Any] = {"limit": READ_SIZE * 2}
    if url.scheme == "https":
        kwargs["ssl"] = ssl_context or ssl.create_default_context()
        kwargs["server_hostname"] = host
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, **kwargs)
    except TimeoutError:
        raise TimeoutError(f"connecting to {host}:{port} took over {connect_timeout:g} s") from None
    except (OSError, ssl.SSLError) as exc:
        raise HandshakeError(f"cannot connect to {host}:{port}: {exc}") from exc
    lines = [f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: {url.raw_authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    lines.append("\r\n")
    try:
        writer.write("".join(lines).encode("utf-8", "surrogateescape"))
        async with asyncio.timeout(read_timeout):
            answer = await _read_answer(reader)
    except BaseException as exc:
        writer.transport.abort()
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"upstream sent no upgrade answer within {read_timeout:g} s") from None
        if isinstance(exc, OSError | ssl.SSLError | asyncio.IncompleteReadError | asyncio.LimitOverrunError):
            raise HandshakeError(f"upstream closed or broke the handshake: {exc}") from exc
        raise
    if answer.status == 101:
        answer.socket = UpstreamSocket(reader, writer)
    else:
        writer.transport.abort()
    return answer


class _AnswerHead:
    """httptools callbacks collecting one answer (the head; the body only when it is not a 101)."""

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.head_done = False
        self.done = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= MAX_REFUSAL_BODY:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


async def _read_answer(reader: asyncio.StreamReader) -> Handshake:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise HandshakeError("upstream's handshake answer head is too large")
    collected = _AnswerHead()
    parser = httptools.HttpResponseParser(collected)
    while True:
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # the head of a 101 is complete; what follows is the upstream's frames
        except httptools.HttpParserError as exc:
            raise HandshakeError(f"malformed handshake answer from upstream: {exc}") from exc
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (103 Early Hints): the real one follows.
            head = await reader.readuntil(b"\r\n\r\n")
            collected = _AnswerHead()
            parser = httptools.HttpResponseParser(collected)
            continue
        break
    headers: CIMultiDict[str] = CIMultiDict(
        (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
        for n, v in collected.headers
    )
    reason = collected.reason.decode("utf-8", "surrogateescape").strip()
    answer = Handshake(status=status, reason=reason, headers=headers)
    if status == 101:
        return answer
    # A refusal (401, 403, 404, 426...): read its body so the client gets it as sent.
    while not collected.done:
        data = await reader.read(READ_SIZE)
        if not data:
            with contextlib.suppress(httptools.HttpParserError):
                parser.feed_data(b"")
            break
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise HandshakeError(f"malformed handshake answer from upstream: {exc}") from exc
        if collected.size > MAX_REFUSAL_BODY:
            break
    answer.body = b"".join(collected.body)
    return answer


class ClientSide(Protocol):
    """The accepted client connection, after the 101 went out: raw bytes in and out."""

    async def read(self) -> bytes:
        """The next bytes from the client; b"" once it closed."""

    async def write(self, data: bytes) -> None:
        """Send bytes to the client, waiting while its buffer is full; raises if it is gone."""

    def close(self) -> None:
        """Close the client connection after flushing what is buffered."""


@dataclass(slots=True)
class RelayResult:
    """What the tunnel carried and who ended it."""

    client_bytes: int = 0  # client -> upstream
    server_bytes: int = 0  # upstream -> client
    ended_by: str = ""  # "client", "upstream" or "shutdown"
    errors: list[str] = field(default_factory=list)


async def relay(
    client: ClientSide,
    upstream: UpstreamSocket,
    *,
    on_server_bytes: Callable[[bytes], None] | None = None,
    on_client_bytes: Callable[[bytes], None] | None = None,
    first_server_bytes: bytes = b"",
) -> RelayResult:
    """Copy bytes both ways until either side ends; then close both (see module docstring).

    The observers get each chunk after it was passed on and must not raise (an
    observer that does is dropped, the tunnel carries on). Cancelling `relay`
    (server shutdown) closes both sides and returns normally.
    """
    result = RelayResult()
    observers: dict[str, Callable[[bytes], None] | None] = {
        "server": on_server_bytes,
        "client": on_client_bytes,
    }

    def observe(side: str, data: bytes) -> None:
        observer = observers[side]
        if observer is None:
            return
        try:
            observer(data)
        except Exception as exc:  # a metering bug never breaks the tunnel
            observers[side] = None
            result.errors.append(f"{side} observer failed: {exc!r}")

    async def downstream() -> None:
        data = first_server_bytes
        while True:
            if data:
                await client.write(data)
                result.server_bytes += len(data)
                observe("server", data)
            data = await upstream.read()
            if not data:
                return

    async def upstream_pump() -> None:
        while data := await client.read():
            await upstream.write(data)
            result.client_bytes += len(data)
            observe("client", data)

    down = asyncio.ensure_future(downstream())
    up = asyncio.ensure_future(upstream_pump())
    try:
        done, _ = await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
        result.ended_by = "upstream" if down in done else "client"
        for task in done:
            exc = task.exception()
            if exc is not None:
                # A write to the side that is gone: that side ended the session.
                result.ended_by = "client" if task is down else "upstream"
    except asyncio.CancelledError:
        result.ended_by = "shutdown"
    finally:
        for task in (down, up):
            task.cancel()
        await asyncio.gather(down, up, return_exceptions=True)
        client.close()
        upstream.close()
        await upstream.wait_closed()
    return result


class AiohttpClientSide:
    """`ClientSide` over an aiohttp request whose 101 answer has been prepared.

    aiohttp has already marked the connection as upgraded (it saw ``Upgrade:
    websocket``) and keeps any bytes that came after the request head; the
    adapter takes them, and everything after, through the protocol's payload
    parser slot, the same slot aiohttp's own ``WebSocketResponse`` uses. Writes
    go through the prepared response, which back-pressures on the transport.
    """

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client connection already closed")
        self._transport = transport
        self._response = response
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        protocol = request.protocol
        protocol.keep_alive(False)
        # Feeds the bytes aiohttp buffered after the request head right away.
        protocol.set_parser(self)  # type: ignore[arg-type]

    # -- aiohttp's payload parser interface (called by its protocol) -----------
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()
        return False, b""

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- ClientSide ----------------------------------------------------------
    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof or self._transport.is_closing():
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("client connection closed")
        await self._response.write(data)

    def close(self) -> None:
        self._transport.close()
        self._eof = True
        self._wake()

"""A raw-socket upstream for fault tests: it says exactly the bytes a script tells it to.

`FakeUpstream` (in `meterproxy.testing`) is a well-behaved aiohttp server; the
faults that matter most are the ones a well-behaved server cannot produce: a
reset before any header, an HTTP/1.0 body delimited by closing the connection,
hand-written chunked framing, a status line dribbled out byte by byte.
`RawUpstream` runs a plain ``asyncio`` server on 127.0.0.1 and hands each
connection, once its request has been read, to a script::

    async def script(conn: RawConnection) -> None:
        await conn.send(b"HTTP/1.0 200 OK\\r\\n\\r\\npartial")
        conn.reset()

    async with RawUpstream(script) as raw:
        ...

It counts every connection it accepts (``connections``), so a security test can
run one as the "evil" host and assert that nothing ever reached it. Every
connection is closed when the server closes; scripts that loop (an endless
stream) must stop when `RawConnection.closed` says the peer went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["RawConnection", "RawRequest", "RawUpstream", "Script", "respond"]


@dataclass
class RawRequest:
    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")


@dataclass
class RawConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    request: RawRequest | None = None
    sent: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    async def send(self, data: bytes, *, delay: float = 0.0, chunk: int | None = None) -> bool:
        """Write ``data`` (in pieces of ``chunk`` bytes, ``delay`` apart); False once the peer is gone."""
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            if self.closed:
                return False
            self.writer.write(data[i : i + step])
            try:
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                return False
            self.sent += len(data[i : i + step])
            if delay:
                await asyncio.sleep(delay)
        return not self.closed

    async def next_request(self) -> RawRequest | None:
        """Read the next request on this keep-alive connection (None once the peer closed it)."""
        self.request = await _read_request(self.reader)
        return self.request

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0): the harshest way to die."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


Script = Callable[[RawConnection], Awaitable[None]]


def respond(
    status: int = 200,
    body: bytes = b"",
    *,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    version: str = "1.1",
    length: bool = True,
) -> bytes:
    """A response head (and body) as bytes; ``length=False`` leaves framing to the caller."""
    lines = [f"HTTP/{version} {status} X"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    try:
        body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return RawRequest(head, body)


class RawUpstream:
    """An asyncio TCP server on 127.0.0.1 that runs ``script`` for each request it reads."""

    def __init__(self, script: Script | None = None, *, read_request: bool = True) -> None:
        self.script = script
        self.read_request = read_request
        self.connections = 0
        self.requests: list[RawRequest] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        conn = RawConnection(reader, writer)
        try:
            if self.read_request:
                conn.request = await _read_request(reader)
                if conn.request is None:
                    return
                self.requests.append(conn.request)
            if self.script is not None:
                await self.script(conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

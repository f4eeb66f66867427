"""The upstream client: HTTP/1.1 on pooled keep-alive connections, parsed by llhttp.

Why our own and not aiohttp's ``ClientSession``: a request through
``ClientSession`` costs about 100 µs of CPU on the benchmark VM (request and
response objects, timers, tracing hooks, cookie and redirect machinery we turn
off anyway), a third of everything the proxy spends on a request; this client
costs about 30 µs (``bench/README.md``, "upstream client"). meterproxy only
ever talks to the upstreams its operator configured, always the same way, so
the client does exactly that and no more:

- one request at a time per connection (no pipelining), over a LIFO pool of
  idle connections per origin; an idle connection is closed after
  ``keepalive_timeout`` or when the server closes it;
- the request goes out as given: method, the raw (still encoded) path and
  query, the caller's headers in order, then ``Host`` and ``Content-Length``
  set here, and the body bytes;
- the answer is parsed by ``httptools`` (llhttp, the C parser Node.js uses):
  interim 1xx answers are skipped, then status, reason and headers, then the
  body as it arrives, chunked framing removed, with no added buffering: each
  `UpstreamResponse.read` returns whatever has arrived since the last call.
  While more than ``high_water`` bytes wait for a slow reader, the socket stops
  being read (the kernel's window then slows the upstream, not our memory);
- errors are three types: `UpstreamConnectError` (refused, unresolvable, TLS,
  a connection that closed before the answer's headers), `UpstreamTimeout`
  (connect, or ``read_timeout`` without a byte), `UpstreamBroken` (closed or
  malformed mid-body, including a reset of a body delimited by the close).

A connection goes back to the pool only when its answer was read to the end
and both sides allow keep-alive; every other outcome closes it, so a half-read
answer can never leak into the next request.

Bytes after a complete answer belong to no request we sent (a second response
in the same write, a trailing partial one, garbage): the parser is stopped at
the first of them (`_Connection.on_message_begin`), so they never touch the
answer being relayed, and the connection is closed rather than pooled. The
same holds for bytes that arrive while the connection idles in the pool (they
are parsed as they arrive and close it there) and for bytes already waiting in
the socket when the pool hands the connection out (`UpstreamClient._pool_get`
peeks before reuse). Bytes sent only after the next request went out cannot be told
apart from its answer; HTTP/1.1 itself gives no way to.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import select
import ssl
import time
from collections.abc import Iterable
from typing import Any

import httptools
from multidict import CIMultiDict
from yarl import URL

from meterproxy.http_headers import header_text

log = logging.getLogger(__name__)

__all__ = [
    "Sent",
    "UpstreamBroken",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
]

#: Bytes of body waiting for the reader before the socket is paused.
HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """Any failure talking to an upstream."""


class UpstreamConnectError(UpstreamError):
    """No answer could be had: refused, unresolvable, TLS failure, closed before the headers."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connecting, or waiting for the next byte of the answer, took too long."""


class UpstreamBroken(UpstreamError):
    """The answer started but did not end properly (connection lost or bad framing mid-body)."""


class _BytesAfterAnswer(Exception):
    """Raised from a parser callback to stop llhttp at bytes that follow a complete answer."""


def _poller(transport: asyncio.BaseTransport) -> select.poll | None:
    """A ``poll`` object watching the connection's socket for input (None: no socket)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


_Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer in flight on it (httptools callbacks)."""

    def __init__(self, client: UpstreamClient, origin: _Origin) -> None:
        self._client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.poller: select.poll | None = None
        self.closed = False
        self.idle_since = 0.0
        #: Bytes came after a complete answer: the connection was closed, never to be reused.
        self.unexpected_bytes = False
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        # The read timer outlives an answer: armed by the first `send`, it is left running
        # when the answer completes (an answer in flight, if any, is checked when it fires),
        # because arming and cancelling a loop timer per request costs ~2.4 µs on uvloop.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._last_read = 0.0
        self._read_timeout = 0.0
        self._reset_answer()

    def _reset_answer(self) -> None:
        # The fields an answer sets, back to "none yet". The body deque is kept (an answer
        # leaves it empty when it is pooled), the read timeout is set by `send`.
        self._headers_done: asyncio.Future[None] | None = None
        self._reason = b""
        self._header_list: list[tuple[bytes, bytes]] = []
        self._interim = False
        self.status = 0
        self.headers_complete = False
        self.complete = False
        self.keep_alive = False
        self.head = False
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._close_delimited = False

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.poller = _poller(transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _BytesAfterAnswer):
                raise
            # The answer in flight (if any) is complete and keeps its bytes; only the
            # connection goes, so whatever followed can never be read as another answer.
            self.unexpected_bytes = True
            host, port = self.origin[1:]
            log.warning("upstream %s:%s sent bytes after a complete answer; connection closed", host, port)
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream switched protocols, which meterproxy does not relay"))
        except httptools.HttpParserError as exc:
            what = "mid-body" if self.headers_complete else "in its answer's head"
            self._fail(UpstreamBroken(f"malformed HTTP from upstream {what}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()  # a kept read timer must not hold a closed connection until it fires
        self._client._forget(self)
        if self._headers_done is None and not self._chunks:
            return  # idle in the pool: nothing in flight
        if self.complete:
            return
        if self.headers_complete and self._close_delimited and exc is None:
            # A body delimited by the connection's close has ended cleanly.
            self._on_message_complete()
            return
        if not self.headers_complete:
            self._fail(UpstreamConnectError(f"upstream closed the connection before answering ({exc})"))
        else:
            self._fail(UpstreamBroken(f"upstream connection closed mid-body ({exc})"))

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        if self.headers_complete or self._headers_done is None:
            # A final answer was already parsed (or no request is in flight): these
            # bytes answer nothing we asked.
            raise _BytesAfterAnswer

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_list.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 100 Continue, 103 Early Hints: not the answer; the final one follows.
            self._interim = True
            self._header_list = []
            self._reason = b""
            return
        self.status = status
        self.headers_complete = True
        self.keep_alive = self._parser.should_keep_alive()
        delimited = self.head or status in (204, 304)
        if not delimited:
            for n, v in self._header_list:  # one pass: a length, or chunked framing
                if len(n) in (14, 17):  # the lengths of the two names: no other is lowercased
                    lower = n.lower()
                    if lower == b"content-length" or (
                        lower == b"transfer-encoding" and b"chunked" in v.lower()
                    ):
                        delimited = True
                        break
        self._close_delimited = not delimited
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)
        if self.head:
            # No body follows a HEAD answer, whatever its Content-Length says; llhttp
            # cannot be told so, hence this connection is not reused.
            self.keep_alive = False
            self._on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self.complete:
            self.complete = True  # the read timer, if still armed, finds nothing to time when it fires
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _on_message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True  # the read timer, if still armed, finds nothing to time when it fires
        self._wake()

    # -- the answer ------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self.complete:
            self._error = error
        self._cancel_timer()
        hd = self._headers_done
        if hd is not None and not hd.done():
            hd.set_exception(error)
        self._wake()
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_timer(self, due: float) -> None:
        self._timer_due = due
        self._timer = self._loop.call_at(due, self._check_timeout)

    def _check_timeout(self) -> None:
        # One timer per connection, moved lazily: reading a chunk only stamps the time.
        self._timer = None
        if self.complete or self._headers_done is None or self._error is not None or self.closed:
            return  # no answer in flight: the timer lapses; the next `send` arms it again
        due = self._last_read + self._read_timeout
        if self._loop.time() < due:
            self._arm_timer(due)
            return
        what = "before answering" if not self.headers_complete else "mid-answer"
        self._fail(UpstreamTimeout(f"upstream sent nothing for {self._read_timeout:g} s {what}"))

    def send(self, data: bytes, body: bytes, read_timeout: float, head: bool) -> asyncio.Future[None]:
        """Send a request (``data``, then ``body`` if any: a large body is not copied into it)."""
        assert self.transport is not None
        self._reset_answer()
        self.head = head
        self._headers_done = self._loop.create_future()
        self._read_timeout = read_timeout
        self._last_read = now = self._loop.time()
        due = now + read_timeout
        if self._timer is None:
            self._arm_timer(due)
        elif self._timer_due > due:  # a shorter timeout than the running timer's: re-armed
            self._timer.cancel()
            self._arm_timer(due)
        # else: the running timer fires no later than this request's due, and moves itself on
        self.transport.write(data)
        if body:
            self.transport.write(body)
        return self._headers_done

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._header_list

    @property
    def raw_reason(self) -> bytes:
        return self._reason.strip()

    def take(self) -> bytes | None:
        """Everything that has arrived since the last call; b"" at the end; None: nothing yet."""
        if self._chunks:
            chunks = self._chunks
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            if self._paused and self.transport is not None and not self.closed:
                self._paused = False
                self.transport.resume_reading()
            return data
        if self._error is not None:
            raise self._error
        if self.complete:
            return b""
        return None

    async def read(self) -> bytes:
        """Everything that has arrived since the last call (waiting for some); b"" at the end."""
        while True:
            data = self.take()
            if data is not None:
                return data
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """The caller is done with this answer: pooled if it ended cleanly, else closed."""
        if self.complete and self._error is None and self.keep_alive and not self.closed and not self._chunks:
            self._client._pool_put(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """An upstream's answer: status, reason and headers now, the body by `read`."""

    __slots__ = ("_conn", "_headers", "_released", "raw_headers", "raw_reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._released = False
        self.status = conn.status
        #: The reason phrase and the headers in order, as llhttp handed them over: the proxy
        #: relays them as bytes, decoding only the few it reads (no multidict, no str copies).
        self.raw_reason = conn.raw_reason
        self.raw_headers = conn.raw_headers
        self._headers: CIMultiDict[str] | None = None

    @property
    def reason(self) -> str:
        return header_text(self.raw_reason)

    @property
    def header_list(self) -> list[tuple[str, str]]:
        """The headers in order as text (decoded on each use)."""
        return [(header_text(n), header_text(v)) for n, v in self.raw_headers]

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers as a case-insensitive multidict (built on first use)."""
        if self._headers is None:
            self._headers = CIMultiDict(self.header_list)
        return self._headers

    async def read(self) -> bytes:
        """The body bytes that have arrived since the last call; b"" once it is complete.

        Raises `UpstreamBroken` or `UpstreamTimeout` if the body does not end properly.
        """
        return await self._conn.read()

    def take(self) -> bytes | None:
        """`read` without waiting: None when nothing has arrived since the last call."""
        return self._conn.take()

    def release(self) -> None:
        """Done with this answer: the connection is pooled if it was read to a clean end."""
        if self._released:
            return
        self._released = True
        self._conn.release()


class Sent:
    """A request on its way: its connection, and a future done once the answer's head is in."""

    __slots__ = ("conn", "head_done")

    def __init__(self, conn: _Connection, head_done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.head_done = head_done

    def ready(self) -> bool:
        """The head is in and the whole answer with it, read cleanly: `response` needs no wait."""
        conn = self.conn
        head_done = self.head_done
        return (
            head_done.done()
            and not head_done.cancelled()
            and head_done.exception() is None
            and conn.complete
            and conn._error is None
        )

    def response(self) -> UpstreamResponse:
        """The answer, once `ready` (the head future done without error)."""
        return UpstreamResponse(self.conn)

    async def answer(self) -> UpstreamResponse:
        """Wait for the answer's head (the connection is closed if that fails)."""
        try:
            await self.head_done
        except BaseException:
            self.conn.close()
            raise
        return UpstreamResponse(self.conn)


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the configured upstreams. Close with `close`."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        keepalive_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self._ssl = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None
        #: Per URL object (the proxy's routes are memoized: the same object for the same path):
        #: the URL itself (so its id is not reused while kept), method, origin and the
        #: encoded request line with the Host line. Query-less URLs only (a query may carry
        #: a key: never kept); bounded.
        self._targets: dict[int, tuple[URL, str, _Origin, bytes]] = {}

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    # -- the pool --------------------------------------------------------------
    def _pool_put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = []
        idle.append(conn)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections idle past ``keepalive_timeout`` (after a burst, nothing else would)."""
        self._sweep = None
        cutoff = time.monotonic() - self.keepalive_timeout
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= cutoff]:
                idle.remove(conn)
                conn.close()
        if any(self._idle.values()):
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive_timeout, self._sweep_idle)

    def _pool_get(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                continue
            # An idle keep-alive connection must have nothing to read: anything there (bytes, or
            # the peer's FIN) is left over from the previous answer and would be taken for the
            # next one's. A zero-timeout ``poll`` (not ``select``: file descriptors go past 1024)
            # on the connection's own poller, made once: one system call per reuse.
            poller = conn.poller
            if now - conn.idle_since > self.keepalive_timeout or (poller is not None and poller.poll(0)):
                conn.close()
                continue
            return conn
        return None

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, origin: _Origin) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if scheme == "https":
            kwargs = {"ssl": self._ssl_context(), "server_hostname": host}

        def protocol() -> _Connection:
            return _Connection(self, origin)

        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(protocol, host, port, **kwargs)
        except TimeoutError:
            limit = self.connect_timeout
            raise UpstreamTimeout(f"connecting to {host}:{port} took over {limit:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        self._open.add(conn)
        return conn

    # -- requests ----------------------------------------------------------------
    @staticmethod
    def _origin(url: URL) -> _Origin:
        return (url.scheme, url.raw_host or "", url.port or (443 if url.scheme == "https" else 80))

    def _target(self, method: str, url: URL) -> tuple[_Origin, bytes]:
        """The origin to connect to and the request's first two lines, encoded (memoized)."""
        known = self._targets.get(id(url))
        if known is not None and known[0] is url and known[1] == method:
            return known[2], known[3]
        origin = self._origin(url)
        start = f"{method} {url.raw_path_qs} HTTP/1.1\r\nHost: {url.raw_authority}\r\n"
        prefix = start.encode("utf-8", "surrogateescape")
        if not url.raw_query_string:
            if len(self._targets) >= 256:
                self._targets.clear()
            self._targets[id(url)] = (url, method, origin, prefix)
        return origin, prefix

    @staticmethod
    def _head(
        prefix: bytes, method: str, headers: Iterable[tuple[str, str]] | bytes, body: bytes
    ) -> tuple[bytes, bytes]:
        """The request as written: its head (with a body up to 64 KiB), and a larger body apart."""
        if not isinstance(headers, bytes):  # bytes: lines already encoded (the lean server's, as received)
            text = "".join([f"{name}: {value}\r\n" for name, value in headers])
            headers = text.encode("utf-8", "surrogateescape")
        with_length = body or method not in ("GET", "HEAD")
        end = b"Content-Length: %d\r\n\r\n" % len(body) if with_length else b"\r\n"
        if len(body) <= 65536:
            return b"".join((prefix, headers, end, body)), b""
        return b"".join((prefix, headers, end)), body

    def send_pooled(
        self, method: str, url: URL, headers: Iterable[tuple[str, str]] | bytes, body: bytes = b""
    ) -> Sent | None:
        """Send one request now on an idle pooled connection; None if there is none (then `request`).

        The returned `Sent` is the connection and a future done when the answer's
        head is in (or failed): `answer` makes the response of it. Nothing here waits,
        so a caller can go on in a callback instead of a task.
        """
        if self._closed:
            return None
        origin, prefix = self._target(method, url)
        conn = self._pool_get(origin)
        if conn is None:
            return None
        data, rest = self._head(prefix, method, headers, body)
        return Sent(conn, conn.send(data, rest, self.read_timeout, method == "HEAD"))

    async def request(
        self, method: str, url: URL, headers: Iterable[tuple[str, str]] | bytes, body: bytes = b""
    ) -> UpstreamResponse:
        """Send one request and wait for the answer's head. The caller must `release` it.

        ``headers`` are (name, value) pairs, or header lines already encoded
        (``b"Name: value\\r\\n"`` each), sent as they are.
        """
        if self._closed:
            raise UpstreamConnectError("the upstream client is closed")
        sent = self.send_pooled(method, url, headers, body)
        if sent is None:
            origin, prefix = self._target(method, url)
            conn = await self._connect(origin)
            data, rest = self._head(prefix, method, headers, body)
            sent = Sent(conn, conn.send(data, rest, self.read_timeout, method == "HEAD"))
        return await sent.answer()

    async def close(self) -> None:
        """Close every connection, idle or busy; answers in flight fail with `UpstreamBroken` now."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            # Fail the reader at once rather than on connection_lost (a loop turn or more
            # later): at shutdown the caller wants to record the cut answers straight away.
            conn._fail(UpstreamBroken("meterproxy shut down before the answer ended"))
        self._idle.clear()
        self._open.clear()

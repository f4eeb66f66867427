"""The lean HTTP/1.1 server: proxy routes on an llhttp protocol, everything else to aiohttp.

Why: aiohttp's server costs most of what the proxy spends on a request
(request and response objects, the router, middlewares, a task per request;
``bench/README.md``, "the forwarding path"). The proxy routes need none of it,
so each client connection is an `asyncio.Protocol` that parses requests with
``httptools`` (llhttp, the parser Node.js uses, which the upstream client already
uses for answers) and hands a read request straight to `Proxy.run` with a
`ClientSide` that writes to the socket. Every other path (``/api``, the
dashboard, ``/metrics``, ``/healthz``) and every upgrade request goes, byte for
byte, to the same aiohttp application in-process: a request handler of aiohttp's
own is attached to the connection through `_AppTransport` and is fed the request
rebuilt from what llhttp parsed. One port serves both, as before.

Why this is safe:

- **Parsing strictness.** llhttp in its strict default mode: a request with both
  ``Content-Length`` and ``Transfer-Encoding``, a repeated or malformed
  ``Content-Length``, bad chunk sizes, bare CR/LF, spaces before colons or a
  ``Transfer-Encoding`` other than a final ``chunked`` are refused with a 400 and
  the connection is closed, never forwarded (no request smuggling: the upstream
  only ever receives a request re-framed by our own client with its own
  ``Content-Length``). The head is bounded (`MAX_HEAD_BYTES`, `MAX_HEADERS`: 431).
- **Limits.** The body is bounded by ``max_body_bytes`` (413 as soon as the
  declared or received size passes it, recorded, never forwarded; the rest of the
  body is read and dropped, then the connection is closed) and in time by
  ``request_body_timeout`` (408, recorded). A client gone mid-body is recorded.
  Idle keep-alive connections are closed after `KEEPALIVE_TIMEOUT`.
- **Expect.** ``Expect: 100-continue`` gets its ``100 Continue`` only when the
  request's turn comes and nothing refused it; a body refused from its head
  (413 declared too large, 503 over the body budget) gets that final answer
  instead and the connection is closed, no body having been sent. Any other
  expectation gets 417. ``Expect`` is not forwarded: the upstream gets the body
  whole with the head.
- **Pipelining.** Requests on one connection are answered strictly in order: the
  next one is not started until the answer before it has ended; while one is
  waiting, the socket is not read (the client's own window bounds our memory).
- **Upgrades.** An ``Upgrade`` request (WebSocket) goes to the aiohttp
  application like the admin paths, which treats it exactly as before; if that
  answers 101, the connection is aiohttp's from then on.
- **Back-pressure.** The socket's write buffer above its high-water mark makes
  the writer wait (`_Conn.pause_writing`), as aiohttp's ``drain`` did: a slow
  reader slows its upstream, not our memory.
- **No task per request where a callback does** (`Proxy.relay_soon`). A read
  request goes out at once on an idle pooled upstream connection, and the
  exchange waits for the answer's head in a callback; if the whole answer came
  with it and the client takes our writes (`_Request.ready`: connected, below the
  high-water mark), it is relayed, tapped and recorded in that callback, and the
  answer leaves in one ``send``. It is safe because it is the same steps, not a
  second forwarding path: parsing, limits and refusals happen before it, on the
  llhttp callbacks above, exactly as before; it only runs when nothing could make
  the coroutine wait (no gate to consult, strict durability off, the answer
  complete without error, the client ready), so the coroutine's waits and its
  fault handling are never skipped, only not needed; and every other case
  (a budget, a new upstream connection, a stream still arriving, an upstream
  error, a slow or gone client) hands the exchange, where it stands, to the same
  coroutine in a task. Pipelining is unchanged (the answer ends through the same
  `_Request` before the next request starts), and shutdown waits for an exchange
  parked in a callback as for a task (`Proxy.drain`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import httptools
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from meterproxy.app_state import PROXY
from meterproxy.bad_requests import BAD_REQUESTS
from meterproxy.body_budget import RETRY_AFTER_SECONDS, OverBudget
from meterproxy.http_errors import json_error
from meterproxy.proxy import Proxy
from meterproxy.routing import RouteError

__all__ = ["KEEPALIVE_TIMEOUT", "MAX_HEADERS", "MAX_HEAD_BYTES", "LeanServer", "app_path_matcher", "run"]

log = logging.getLogger(__name__)

#: Largest request head (request line and headers) accepted, like aiohttp's 8 KiB lines x a few.
MAX_HEAD_BYTES = 64 * 1024
#: Most header fields accepted in one request (aiohttp's default limit too).
MAX_HEADERS = 128
#: Seconds an idle keep-alive connection is kept (aiohttp's default).
KEEPALIVE_TIMEOUT = 75.0
#: How often idle connections are looked for.
SWEEP_INTERVAL = 5.0
#: Seconds a refused request's remaining bytes are read and dropped before the close.
LINGER = 2.0
#: Bytes of an answer held back at most before they are sent (see `_Request`).
_HOLD_MAX = 64 * 1024
#: Lengths of the request header names `_Conn.on_headers_complete` reads: content-length,
#: transfer-encoding, upgrade, expect (any other name is not lowercased and compared).
_FIELD_LENGTHS = frozenset({14, 17, 7, 6})
#: Method names as text, without a decode per request.
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}


def app_path_matcher(app: web.Application) -> Callable[[str], bool]:
    """Which raw paths the aiohttp application serves itself (all but its catch-all route).

    A path is the application's when its first segment is the first segment of
    one of the application's own routes (``/api/...``, ``/dashboard/...``,
    ``/healthz``, ``/metrics``), or it is ``/``. Erring towards the application
    is harmless: its catch-all route is the same proxy, only slower.
    """
    firsts: set[str] = set()
    for resource in app.router.resources():
        canonical = resource.canonical
        if canonical in ("/{tail}", "/{tail:.*}"):
            continue
        first = canonical[1:].split("/", 1)[0]
        if first and "{" not in first:
            firsts.add(first)

    def is_app_path(path: str) -> bool:
        if path == "/":
            return True
        return path[1:].partition("/")[0] in firsts

    return is_app_path


class _Request:
    """One request as llhttp parses it, and its answer: the `ClientSide` the proxy writes to.

    One object per request serves both (no second one per answer): the fields
    below ``conn`` are the answer's. The head and body pieces of the answer are
    held back (``out``) until the proxy has nothing more to give right now
    (`flush`, called before it waits on the upstream) or the answer ends: a JSON
    answer that arrived in one read leaves in one ``write`` system call, head,
    body and end together, instead of two or three.
    """

    __slots__ = (
        "announced",
        "body",
        "body_size",
        "chunked",
        "complete",
        "conn",
        "continued",
        "done",
        "expect",
        "for_app",
        "framed",
        "head_done",
        "head_only",
        "headers",
        "held",
        "keep_alive",
        "method",
        "out",
        "out_size",
        "path",
        "query",
        "refusal",
        "started",
        "url",
        "version",
    )

    # Set once the head is complete (`_Conn.on_headers_complete`):
    method: str
    version: str
    keep_alive: bool
    head_only: bool
    path: str  # raw (still percent-encoded) path and query
    query: str
    for_app: bool
    chunked: bool
    announced: bool

    def __init__(self, conn: _Conn, url: bytes) -> None:
        # Only what can be read before the head is complete is set here; the rest is
        # set by `_Conn.on_headers_complete` (method, version, path, framing, ...).
        self.conn = conn
        self.url = url
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.complete = False
        #: ``Expect: 100-continue``: the client waits for our ``100 Continue`` before its body;
        #: ``continued`` once we sent it.
        self.expect = False
        self.continued = False
        #: Our own answer (413, 408), recorded already; sent when it is this request's turn.
        self.refusal: web.Response | None = None
        #: Bytes reserved for this body in the proxy's `BodyBudget` (given back exactly once),
        #: and whether they were reserved whole from Content-Length (else chunk by chunk).
        self.held = 0
        self.started = time.perf_counter()
        #: The answer: ended (``done``), its pieces held back (``out``, ``out_size`` bytes of
        #: body), chunk-framed by us (``framed``).
        self.done = False
        self.out: list[bytes] = []
        self.out_size = 0
        self.framed = False

    def str_headers(self) -> list[tuple[str, str]]:
        return [
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self.headers
        ]

    def raw_target(self) -> tuple[str, str]:
        """The raw (still percent-encoded) path and query."""
        return self.path, self.query

    # -- the answer (ClientSide) ----------------------------------------------------------
    async def respond(self, response: web.StreamResponse) -> None:
        self.send_whole(response)

    def send_whole(self, response: web.StreamResponse) -> None:
        """One answer of our own (an error, a budget refusal), head and body at once."""
        body = response.body if isinstance(response, web.Response) else b""
        assert isinstance(body, bytes)
        headers = [
            (k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
            for k, v in response.headers.items()
            if k.lower() != "content-length"
        ]
        headers.append((b"Content-Length", b"%d" % len(body)))
        out = [b"HTTP/1.1 %d %b\r\n" % (response.status, response.reason.encode("utf-8", "surrogateescape"))]
        for n, v in headers:
            out += (n, b": ", v, b"\r\n")
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        if not self.head_only:
            out.append(body)
        self.conn.send(b"".join(out))
        self._finish()

    async def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.start_now(status, reason, headers)

    def start_now(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """`start`, which never waits: the head is only held (see the class docstring).

        The upstream's headers are never decoded: each line is its name and value as
        llhttp accepted them (no CR, LF or NUL in either).
        """
        # Never raises for a client that is gone: the first `write` does (see ClientSide).
        out = self.out
        out.append(b"HTTP/1.1 %d %b\r\n" % (status, reason))
        delimited = status < 200 or status in (204, 304) or self.head_only
        for n, v in headers:
            out += (n, b": ", v, b"\r\n")
            if not delimited and len(n) == 14 and n.lower() == b"content-length":
                delimited = True
        if not delimited:
            if self.version == "1.1":
                self.framed = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the close ends the body
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")

    def flush(self) -> None:
        out = self.out
        if out:
            self.conn.send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self.out_size = 0

    async def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.gone:
            raise ConnectionResetError("the client hung up")
        if self.head_only:
            return
        if conn.write_paused:
            self.flush()
            await conn.writable()
        self.write_now(data)

    def ready(self) -> bool:
        conn = self.conn
        return not conn.gone and not conn.write_paused

    def write_now(self, data: bytes) -> None:
        """`write` while `ready`: held, never waiting (the caller checked `ready`)."""
        if not self.head_only:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data) if self.framed else data)
            self.out_size += len(data)
            if self.out_size >= _HOLD_MAX:
                self.flush()

    async def end(self) -> None:
        self.end_now()

    def end_now(self) -> None:
        if self.framed and not self.head_only:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self._finish()

    def abort(self) -> None:
        self.done = True
        self.flush()  # what was relayed so far goes out before the cut, as it did unheld
        self.conn.abort()

    def exchange_over(self) -> None:
        """The proxy's exchange for this request has ended (its ``done`` callback)."""
        self.conn._release(self)  # the exchange kept the body until it ended
        if not self.done:
            self.conn.abort()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.conn.answered(self.keep_alive)


class _AppTransport(asyncio.Transport):
    """aiohttp's request handler's transport: its writes go to the client's socket."""

    def __init__(self, conn: _Conn) -> None:
        super().__init__()
        self._conn = conn
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._conn.app_output(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self._closing or self._conn.gone

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._conn.app_closed(self)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def pause_reading(self) -> None:
        self._conn.pause_reading("app")

    def resume_reading(self) -> None:
        self._conn.resume_reading("app")

    def is_reading(self) -> bool:
        return "app" not in self._conn.read_pauses

    def get_write_buffer_size(self) -> int:
        transport = self._conn.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    @property
    def _sendfile_compatible(self) -> object:
        # asyncio's loop.sendfile reads this first; NotImplementedError is what makes aiohttp's
        # FileResponse write the file itself (uvloop raises the same from loop.sendfile).
        raise NotImplementedError("no sendfile through the application's transport")


class _AppAnswer:
    """The application's answer, parsed only to see where it ends (llhttp callbacks)."""

    __slots__ = ("_conn", "_ended", "_head_only", "_interim", "parser")

    def __init__(self, conn: _Conn, head_only: bool) -> None:
        self._conn = conn
        self._head_only = head_only
        self._interim = False
        self._ended = False
        self.parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._conn.tunnel()
        except httptools.HttpParserError:
            # Cannot happen with aiohttp's writer; if it did, no later answer could be trusted.
            self._ended = True
            self._conn.close()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            self._conn.tunnel()
            self._ended = True
        elif status < 200:
            self._interim = True
        elif self._head_only:
            self._end()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._conn.app_answered()


class _HeadTooLarge(Exception):
    """Raised from an llhttp callback: the request head passed MAX_HEAD_BYTES or MAX_HEADERS."""


class _Conn(asyncio.Protocol):
    """One client connection: llhttp callbacks; requests answered strictly in order."""

    def __init__(self, server: LeanServer) -> None:
        self._server = server
        self._proxy = server.proxy
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.gone = False
        self.write_paused = False
        self._write_waiter: asyncio.Future[None] | None = None
        self.read_pauses: set[str] = set()
        self._parsing: _Request | None = None
        self._header_list: list[tuple[bytes, bytes]] = []  # the headers of ``_parsing``
        self._queue: collections.deque[_Request] = collections.deque()
        self.active: _Request | None = None  # the request being answered
        self._closing = False  # no more requests: close once the active answer ends
        self._body_timer: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()
        # The aiohttp side, attached on the first request for the application.
        self._app: RequestHandler | None = None
        self._app_transport: _AppTransport | None = None
        self._app_answer: _AppAnswer | None = None
        self._tunnel = False
        self._after_upgrade = b""

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            if self._app is not None:
                self._app.data_received(data)
            return
        if self._closing:
            return  # a refused request's leftovers: read and dropped until we close
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The upgrade request is whole; the bytes after it belong to the new protocol.
            self._after_upgrade = data[exc.args[0] :]
            self.pause_reading("upgrade")
            if self._app is not None and self.active is not None and self.active.for_app:
                self._app.data_received(self._after_upgrade)
                self._after_upgrade = b""
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._bad_request(431, "request_head_too_large", "the request head is too large")
            else:
                raise
        except httptools.HttpParserError as exc:
            self._bad_request(400, "bad_request", f"malformed HTTP request: {exc}")
            return
        request = self._parsing
        if request is not None:
            if not request.head_done:
                self._head_check(request)
            elif not request.for_app:
                self._arm_body_timer(request)

    def _arm_body_timer(self, request: _Request) -> None:
        """The head is in, the body is not: it has ``request_body_timeout`` to arrive (else 408)."""
        if self._body_timer is None and request.refusal is None:
            self._body_timer = self._loop.call_later(self._proxy.body_timeout, self._body_too_slow, request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._server.connections.discard(self)
        self._cancel_body_timer()
        request = self._parsing
        if request is not None and request.head_done and not request.for_app and request.refusal is None:
            message = "client hung up before sending its whole body"
            self._refuse(request, 400, "client_gone", message)
        # Bodies read but never forwarded give their bytes back (a forwarded one does when its
        # exchange ends).
        for queued in self._queue:
            self._release(queued)
        if request is not None and request is not self.active:
            self._release(request)
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._app is not None:
            app, self._app = self._app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._app is not None:
            self._app.resume_writing()

    # -- llhttp callbacks ------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        # The first callback of a request (no on_message_begin: one callback fewer per
        # request); a URL split over reads comes in pieces.
        request = self._parsing
        if request is None:
            self._parsing = request = _Request(self, url)
            self._header_list = request.headers
        else:
            request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Sizes are checked once the head is complete (`on_headers_complete`), or at the end
        # of each read that leaves it incomplete (`data_received`): the same limits, the same
        # answers, checked once per read instead of once per header.
        self._header_list.append((name, value))

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        parser = self._parser
        # One pass over the headers: the head's size and count (431), and the four fields
        # read here (looked at only when the name has the length of one of them).
        headers = request.headers
        size = len(request.url)
        length = -1
        upgrade = parser.should_upgrade()
        chunked = False
        expect: bytes | None = None
        for name, value in headers:
            n = len(name)
            size += n + len(value) + 4
            if n in _FIELD_LENGTHS:
                lower = name.lower()
                if lower == b"content-length" and value.strip().isdigit():
                    length = int(value)
                elif lower == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif lower == b"upgrade":
                    upgrade = True  # with or without "Connection: upgrade": the application decides
                elif lower == b"expect":
                    expect = value.strip().lower()
        if size > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            raise _HeadTooLarge
        request.head_done = True
        raw_method = parser.get_method()
        request.method = method = _METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        request.head_only = method == "HEAD"
        request.version = version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        request.chunked = chunked
        request.announced = False
        target = request.url.decode("utf-8", "surrogateescape")
        path, _, request.query = target.partition("?")
        request.path = path
        request.for_app = for_app = upgrade or self._server.is_app_path(path)
        if upgrade:
            request.keep_alive = False  # unless the application answers 101 (then it is a tunnel)
        if for_app:
            pass  # the application answers Expect itself (aiohttp sends its own 100 Continue)
        elif expect is not None and version != "1.0" and expect != b"100-continue":
            # RFC 9110 10.1.1: an expectation we cannot meet (there is no other) gets 417.
            message = "the only expectation this server meets is 100-continue"
            self._refuse(request, 417, "expectation_failed", message)
        elif length > self._proxy.max_body_bytes:
            self._too_large(request)
        elif length > 0:
            # Reserved whole before a byte of it is read: a body that cannot fit is never read.
            request.announced = True
            self._take(request, length)
        if expect is not None:
            # HTTP/1.0 clients never wait for a 100 (RFC 9110 10.1.1); the application sends its own.
            request.expect = expect == b"100-continue" and version != "1.0" and not for_app
        if self.active is None and not self._queue and not self.gone:
            self.active = request  # its turn at once: `_next` without the queue
            self._dispatch(request)
        else:
            self._queue.append(request)
            if self.active is None:
                self._next()

    def _head_check(self, request: _Request) -> None:
        """A head still incomplete at the end of a read: past the limits already (431)?"""
        headers = request.headers
        size = len(request.url) + sum([len(n) + len(v) + 4 for n, v in headers])
        if size > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            self._bad_request(431, "request_head_too_large", "the request head is too large")

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        if request.refusal is not None:
            return  # read and dropped
        request.body_size += len(body)
        if request.for_app:
            if request is self.active:
                self._to_app(request, body)
            else:
                request.body.append(body)
            return
        if request.body_size > self._proxy.max_body_bytes:
            request.body.clear()
            self._too_large(request)
            return
        if not request.announced and not self._take(request, len(body)):
            return  # over the budget: refused, what it held given back
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        request.complete = True
        self._parsing = None
        if self._body_timer is not None:
            self._cancel_body_timer()
        if self._closing and self.active is None:
            self.close()  # the rest of a refused body is in: the answer went out before it
            return
        if request is self.active:
            if request.for_app:
                if request.chunked:
                    self._to_app(request, b"0\r\n\r\n")
            elif request.refusal is None:
                self._start_exchange(request)
        else:
            # Pipelined behind an answer still going: read no further until it is its turn.
            self.pause_reading("pipelined")

    # -- answering in order ------------------------------------------------------------
    def _next(self) -> None:
        """Start answering the next request in line (the one before has ended)."""
        if not self._queue or self.gone:
            return
        request = self.active = self._queue.popleft()
        self._dispatch(request)

    def _dispatch(self, request: _Request) -> None:
        """Its turn has come: answer ``request`` as far as it can be now."""
        if request.refusal is not None:
            request.send_whole(request.refusal)
        elif request.for_app:
            self._start_app(request)
        elif request.complete:
            self._start_exchange(request)
        elif request.expect and request.body_size == 0 and (request.chunked or request.announced):
            # Its turn, and nothing refused it (413, 417, 503 went out above as the final
            # answer instead, and the client never sends the body): now we want the body.
            request.continued = True
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _start_exchange(self, request: _Request) -> None:
        proxy = self._proxy
        try:
            target = proxy.route(request.path, request.query)
        except RouteError as exc:
            self._release(request)
            request.send_whole(json_error(404, "no_route", str(exc)))
            return
        pieces = request.body
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        request.body = []
        exchange = proxy.begin_raw(
            request.method, target, request.headers, request.query, body, request.started
        )
        proxy.relay_soon(exchange, request, request.exchange_over, self._loop)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.gone:
            transport.write(data)

    async def writable(self) -> None:
        """Wait until the socket's write buffer is below its low-water mark again."""
        if not self.write_paused or self.gone:
            return
        if self._write_waiter is None or self._write_waiter.done():
            self._write_waiter = self._loop.create_future()
        await self._write_waiter

    def answered(self, keep_alive: bool) -> None:
        """The active request's answer has ended."""
        self.active = None
        self.idle_since = time.monotonic()
        if not keep_alive or self._closing:
            self._close_soon()
            return
        if self._queue:
            self._next()
        if not self._queue and self.read_pauses:
            self.resume_reading("pipelined")

    def _close_soon(self) -> None:
        """Close, but let a client still sending (a refused body) read our answer first."""
        self._closing = True
        request = self._parsing
        if request is not None and request.expect and not request.continued and not request.body_size:
            self.close()  # the client waits for a 100 Continue that will not come: no body follows
        elif request is not None and not request.complete:
            # Closing with unread input would reset the connection, and the client could
            # lose our answer; drop its bytes for a moment instead.
            self.resume_reading("pipelined")
            self._loop.call_later(LINGER, self.close)
        else:
            self.close()

    def abort(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def pause_reading(self, why: str) -> None:
        if not self.read_pauses and self.transport is not None and not self.gone:
            self.transport.pause_reading()
        self.read_pauses.add(why)

    def resume_reading(self, why: str) -> None:
        if why not in self.read_pauses:
            return
        self.read_pauses.discard(why)
        if not self.read_pauses and self.transport is not None and not self.gone:
            self.transport.resume_reading()

    # -- requests answered before forwarding --------------------------------------------
    def _refuse(self, request: _Request, status: int, code: str, message: str) -> web.Response:
        """Record the refusal of a proxy request (413, 408, client gone) and build its answer."""
        raw_path, raw_query = request.raw_target()
        try:
            target = self._proxy.route(raw_path, raw_query)
        except RouteError as exc:
            response = json_error(404, "no_route", str(exc))
        else:
            gone = code == "client_gone"
            headers = request.str_headers()
            response = self._proxy.refuse(
                request.method, target, headers, raw_query, status, code, message, gone=gone
            )
        request.refusal = response
        request.keep_alive = False
        request.body = []
        self._release(request)
        return response

    # -- the proxy's budget of request bodies held in memory (issue 14.7) ---------------
    def _take(self, request: _Request, n: int) -> bool:
        """Reserve ``n`` more bytes for this body, or refuse it with 503 + Retry-After."""
        try:
            self._proxy.body_budget.take(n)
        except OverBudget as exc:
            message = f"too many request bodies in memory right now ({exc}); retry shortly"
            response = self._refuse(request, 503, "bodies_over_budget", message)
            if response.status == 503:
                response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            self._cancel_body_timer()
            if request is self.active:
                self._next_refusal(request)
            return False
        request.held += n
        return True

    def _release(self, request: _Request) -> None:
        if request.held:
            self._proxy.body_budget.give_back(request.held)
            request.held = 0

    def _too_large(self, request: _Request) -> None:
        if request.refusal is None:
            message = f"request body is larger than the {self._proxy.max_body_bytes}-byte limit"
            self._refuse(request, 413, "body_too_large", message)
            self._cancel_body_timer()
            if request is self.active:
                self._next_refusal(request)

    def _body_too_slow(self, request: _Request) -> None:
        self._body_timer = None
        if request.complete or request.refusal is not None or self.gone:
            return
        message = f"request body not received within {self._proxy.body_timeout:g} s"
        self._refuse(request, 408, "body_timeout", message)
        if request is self.active:
            self._next_refusal(request)

    def _next_refusal(self, request: _Request) -> None:
        assert request.refusal is not None
        request.send_whole(request.refusal)

    def _bad_request(self, status: int, code: str, message: str) -> None:
        """The input cannot be parsed: answer it (unless an earlier answer is still going) and close.

        Nothing of it is forwarded or recorded (as with aiohttp's own parser): the
        request never became one.
        """
        self._closing = True
        self._parsing = None
        self._report_bad_request(message)
        active = self.active
        if active is not None and active.complete:
            return  # an earlier request's answer is going out; the close follows it
        if active is not None and active.for_app:
            self.close()  # the application was mid-request: nothing sensible to add
            return
        if not self.gone:
            body = json_error(status, code, message).body
            assert isinstance(body, bytes)
            reason = _REASONS.get(status, b"Error")
            self.send(
                b"HTTP/1.1 %d %b\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (status, reason, len(body), body)
            )
            self.close()

    def _report_bad_request(self, message: str) -> None:
        """Counted in ``meterproxy_bad_requests_total``, logged once per client per interval."""
        limiter = self._server.app.get(BAD_REQUESTS)
        if limiter is not None:
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            limiter.report(str(peer[0]) if peer else "unknown", message)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # -- the aiohttp application -------------------------------------------------------
    def _start_app(self, request: _Request) -> None:
        if self._app is None:
            self._app_transport = _AppTransport(self)
            self._app = self._server.app_handler()
            self._app.connection_made(self._app_transport)
            if self.write_paused:
                self._app.pause_writing()
        app = self._app
        self._app_answer = _AppAnswer(self, head_only=request.method == "HEAD")
        version = request.version.encode()
        lines = [b"%b %b HTTP/%b\r\n" % (request.method.encode(), request.url, version)]
        lines.extend([b"%b: %b\r\n" % (n, v) for n, v in request.headers])
        lines.append(b"\r\n")
        app.data_received(b"".join(lines))
        body, request.body = request.body, []
        for piece in body:
            self._to_app(request, piece)
        if request.complete and request.chunked:
            self._to_app(request, b"0\r\n\r\n")
        if self._after_upgrade:
            rest, self._after_upgrade = self._after_upgrade, b""
            app.data_received(rest)

    def _to_app(self, request: _Request, data: bytes) -> None:
        if self._app is None:
            return
        if request.chunked and data != b"0\r\n\r\n":
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._app.data_received(data)

    def app_output(self, data: bytes) -> None:
        self.send(data)
        if self._app_answer is not None and not self._tunnel:
            self._app_answer.feed(data)

    def app_answered(self) -> None:
        request = self.active
        self._app_answer = None
        if request is not None and request.for_app:
            self.answered(request.keep_alive)

    def tunnel(self) -> None:
        """The application switched protocols (101): every byte is its own from now on."""
        self._tunnel = True
        self._app_answer = None
        self.read_pauses.clear()
        if self.transport is not None and not self.gone:
            self.transport.resume_reading()

    def app_closed(self, transport: _AppTransport) -> None:
        """aiohttp closed its side: after an answer it ends by closing, or when idle."""
        if transport is not self._app_transport:
            return
        app, self._app, self._app_transport = self._app, None, None
        if app is not None:
            self._loop.call_soon(app.connection_lost, None)
        active = self.active
        if self._tunnel or (active is not None and active.for_app):
            self.close()


class LeanServer:
    """Listens on one address; a `_Conn` per connection, in front of ``app``.

    `start` runs the application's startup (its cleanup contexts open the store,
    the meter and the proxy) exactly as aiohttp's runner does; `close` stops
    listening, lets answers in flight finish (bounded by ``shutdown_timeout``),
    then runs the application's shutdown and cleanup.
    """

    def __init__(self, app: web.Application, *, shutdown_timeout: float = 60.0) -> None:
        self.app = app
        self.connections: set[_Conn] = set()
        self.is_app_path = app_path_matcher(app)
        self._shutdown_timeout = shutdown_timeout
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
        self._server: asyncio.AbstractServer | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._proxy: Proxy | None = None
        self._closed = False
        self.port = 0

    @property
    def proxy(self) -> Proxy:
        assert self._proxy is not None, "LeanServer.start() first"
        return self._proxy

    def app_handler(self) -> RequestHandler:
        """A request handler of aiohttp's own, for one connection's application requests."""
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self, host: str = "", port: int = 0, *, sock: socket.socket | None = None) -> None:
        """Set the app up, then accept on ``sock`` (already listening) or on a new ``host:port``.

        ``serve`` hands over the socket it bound before building the app: connections made
        meanwhile wait in its backlog and are answered now. Binding again instead left a gap
        in which connections were refused, and reset the ones already queued.
        """
        await self._runner.setup()
        self._proxy = self.app[PROXY]
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: _Conn(self), sock=sock, backlog=1024)
        else:
            self._server = await loop.create_server(lambda: _Conn(self), host, port, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweep = loop.call_later(SWEEP_INTERVAL, self._close_idle)

    def _close_idle(self) -> None:
        """Close keep-alive connections idle past KEEPALIVE_TIMEOUT (one timer for all)."""
        cutoff = time.monotonic() - KEEPALIVE_TIMEOUT
        for conn in list(self.connections):
            if conn.active is None and conn.idle_since < cutoff:
                conn.close()
        self._sweep = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._close_idle)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            if conn.active is None:
                conn.close()
        # The proxy's cleanup waits (bounded) for exchanges still answering or draining.
        await self._runner.cleanup()
        for conn in list(self.connections):
            conn.abort()


def run(app: web.Application, *, sock: socket.socket, shutdown_timeout: float) -> None:
    """Serve ``app`` on the listening ``sock`` until SIGINT or SIGTERM (``meterproxy serve``,
    each of its workers: `meterproxy.runtime.serve_on`)."""

    async def serve() -> None:
        server = LeanServer(app, shutdown_timeout=shutdown_timeout)
        await server.start(sock=sock)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(serve())

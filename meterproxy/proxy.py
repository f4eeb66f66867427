"""Forwarding: relay a request to its upstream and tap its answer, one `Exchange` at a time.

Each request is one `Exchange` (`meterproxy.exchange`) that every stage below takes
and fills in; the answer goes back through a `ClientSide`, so the same stages serve
aiohttp's server (`Proxy.handle`, `AiohttpClient`) and the lean protocol of
`meterproxy.server`. Server-specific work (reading the body, the limits on it) is the
caller's; routing, gating, forwarding, tapping and recording are here.

The stages of one request, in the order they fire:

1. **routed** (`routing.route`): the raw path picks a configured upstream, or the
   client gets a 404 and nothing is sent anywhere.
2. **request read**: the body is read whole (bounded by ``max_body_bytes``, 413
   beyond) because the model, stream flag and user live in it; LLM request
   bodies are small next to their answers. All bodies held at once are bounded
   too (`meterproxy.body_budget`, 503 beyond).
3. **gated** (`Meter.check_gates`): budgets may answer instead of the upstream.
   After this point the request is on its way and will be recorded whatever
   happens.
4. **forwarded**: headers pass through except hop-by-hop ones, ``Host`` and our
   own ``X-Meter-*``; the body is byte for byte, unless usage reporting is
   injected into an OpenAI-style stream (`Provider.prepare_request`).
5. **streamed back**: status and headers as the upstream sent them, then each
   chunk as it arrives (`UpstreamResponse.read`, no added buffering) through
   the `ResponseTap`, which reads usage from a copy. The upstream side is our
   own lean HTTP/1.1 client (`meterproxy.upstream`), not aiohttp's.
6. **finished** (`Meter.request_finished`): the record is priced and handed to
   the sinks. Too late to change anything the client saw.

The lean server runs these stages without a task when nothing in them would
wait (`Proxy.relay_soon`: a whole answer on a pooled connection, relayed from
the callback that receives it); everything else runs them in a task (`run`).

Faults: no answer from the upstream gives a JSON 502 (refused, reset) or 504
(timeout). An upstream that dies mid-answer makes us cut the client's
connection the same way, never end it cleanly, so the client can tell the
answer is incomplete. A client that hangs up mid-stream makes us keep reading
the upstream (bounded in time and in how many at once) so the record has the
usage the provider will bill. Requests answered before forwarding (413, a body
slower than ``request_body_timeout``: 408, a client gone mid-body) are recorded
too. With ``durability="strict"`` the end of each answer (its last byte or
terminating chunk) waits until the record is committed. Each of these is proven
by a test listed in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from meterproxy import providers
from meterproxy.attribution import (
    AGENT_SESSION_HEADERS,
    ATTRIBUTION_HEADERS,
    READ_HEADERS,
    agent_session,
    agent_user,
    api_key,
    authorization_key,
    bounded,
    fingerprint,
    parse_tags,
)
from meterproxy.aws_sigv4 import AwsSigner
from meterproxy.body_budget import RETRY_AFTER_SECONDS, BodyBudget, OverBudget, read_body
from meterproxy.credentials import carried, scrub_record
from meterproxy.exchange import ClientNow, ClientSide, Exchange
from meterproxy.http_errors import json_error
from meterproxy.http_headers import HOP_BY_HOP, HOP_BY_HOP_BYTES, header_text
from meterproxy.logs import redact
from meterproxy.meter import Meter
from meterproxy.providers.base import ParseResult, RequestInfo
from meterproxy.providers.batches import result_id
from meterproxy.routing import RouteError, Target, Upstream, route
from meterproxy.tap import ResponseTap, decodable_encodings
from meterproxy.upstream import Sent, UpstreamBroken, UpstreamClient, UpstreamError
from meterproxy.usage import CapturedContent, EstimateSource, RequestIds, RequestRecord
from meterproxy.websocket import is_upgrade
from meterproxy.wsproxy import LiveSessions

__all__ = ["HOP_BY_HOP", "STRICT_COMMIT_WAIT", "AiohttpClient", "Proxy"]

log = logging.getLogger(__name__)

_V = TypeVar("_V")

#: durability="strict": longest wait for a record's commit before the answer is finished anyway.
STRICT_COMMIT_WAIT = 30.0

#: ``Expect`` too: the body is read whole before it goes upstream, so there is nothing to wait for
#: (and an upstream that does not know the expectation would answer 417).
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", *ATTRIBUTION_HEADERS}
#: Methods that only probe a server (Claude Code sends ``HEAD`` to its base URL at start-up):
#: on a path no provider meters they are forwarded but not recorded, being no LLM usage.
_PROBE_METHODS = frozenset({"HEAD", "OPTIONS"})
#: The answer headers `Proxy._answer_headers` reads or drops, by kind (one lookup per header).
_CONTENT_TYPE, _CONTENT_ENCODING, _REQUEST_ID, _X_REQUEST_ID, _CONNECTION, _HOP_BY_HOP = range(6)
_ANSWER_HEADER_KINDS = {
    **dict.fromkeys(HOP_BY_HOP_BYTES, _HOP_BY_HOP),
    b"content-type": _CONTENT_TYPE,
    b"content-encoding": _CONTENT_ENCODING,
    # Where the provider puts its own id for a request (Anthropic, then OpenAI and its copies).
    b"request-id": _REQUEST_ID,
    b"x-request-id": _X_REQUEST_ID,
    b"connection": _CONNECTION,
}


#: The built-in upstreams' wire family: the provider of their rows that no parser meters
#: (``GET /v1/models``), so rows of one provider look alike whatever the path.
_UPSTREAM_FAMILY = {"openai": "openai", "anthropic": "anthropic", "gemini": "gemini", "bedrock": "bedrock"}


_UNMETERED_ENDPOINTS = frozenset({"models", "other"})
#: Batch result ids remembered per process, so a results file downloaded twice is metered once.
_BATCH_SEEN_MAX = 200_000


def _unmetered_endpoint(path: str) -> str:
    """A bounded name for a path no provider meters: ``models`` for model listings, else ``other``."""
    tail = path.rstrip("/").rsplit("/", 1)[-1]
    return "models" if tail == "models" or path.rstrip("/").endswith("/models") else "other"


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names listed in ``Connection``: hop-by-hop for this hop only (RFC 9110 7.6.1)."""
    return {
        t.strip().lower() for name, value in headers if name.lower() == "connection" for t in value.split(",")
    }


def _filter_accept_encoding(value: str) -> str:
    """Keep only codings the tap can decompress, so compressed answers are still metered."""
    readable = decodable_encodings()
    kept = [part for part in value.split(",") if part.split(";")[0].strip().lower() in readable]
    return ", ".join(p.strip() for p in kept) or "identity"


#: The names attribution reads, as llhttp hands them over: the only request headers decoded.
_READ_RAW = frozenset(name.encode("ascii") for name in READ_HEADERS)
_AGENT_SESSION_HEADERS = frozenset(AGENT_SESSION_HEADERS)
#: `_DROP_REQUEST` as bytes.
_DROP_REQUEST_RAW = frozenset(name.encode("ascii") for name in _DROP_REQUEST)


def _first_values_raw(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """`_first_values` of the headers attribution reads (`READ_HEADERS`), from llhttp's bytes."""
    found: dict[str, str] = {}
    for name, value in reversed(headers):
        lower = name.lower()
        if lower in _READ_RAW:
            found[lower.decode("ascii")] = header_text(value)
    return found


def _text_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(header_text(name), header_text(value)) for name, value in headers]


def _first_values(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased name -> the first value sent under it (what ``CIMultiDict.get`` returns)."""
    found: dict[str, str] = {}
    for name, value in reversed(headers):
        found[name.lower()] = value
    return found


#: Entries a per-proxy memo holds before it starts over (paths and keys in use are few).
_MEMO_MAX = 1024


def _remember(memo: dict[str, _V], key: str, value: _V) -> None:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value


class AiohttpClient:
    """`ClientSide` over aiohttp's server: a `web.StreamResponse` on the handler's request."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def respond(self, response: web.StreamResponse) -> None:
        self.response = response  # the handler returns it; aiohttp sends it

    async def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        response = self.response = web.StreamResponse(status=status, reason=header_text(reason))
        for name, value in headers:
            response.headers.add(header_text(name), header_text(value))
        await response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def flush(self) -> None:
        pass  # aiohttp's writer sends each write itself

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class Proxy:
    def __init__(
        self,
        *,
        upstreams: dict[str, Upstream],
        meter: Meter,
        client: UpstreamClient,
        fingerprint_salt: bytes,
        inject_stream_usage: bool = True,
        drain_timeout: float = 60.0,
        max_draining: int = 64,
        body_timeout: float = 60.0,
        max_body_bytes: int = 32 * 1024 * 1024,
        max_buffered_body_bytes: int = 256 * 1024 * 1024,
        durable: Callable[[], Awaitable[object]] | None = None,
        content_limit: int = 0,
        estimate_limit: int = 0,
        registry: providers.ProviderRegistry | None = None,
        signers: Mapping[str, AwsSigner] | None = None,
    ) -> None:
        self.upstreams = upstreams
        # Batch results already metered by this process (a second download adds nothing).
        self._batch_seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        # aws_sigv4: upstreams whose requests are re-signed with the operator's AWS credentials.
        self.signers = dict(signers or {})
        self.providers = registry or providers.ProviderRegistry.builtin()
        self.meter = meter
        self.client = client
        self._salt = fingerprint_salt
        self._inject = inject_stream_usage
        self._drain_timeout = drain_timeout
        self._max_draining = max_draining
        self.body_timeout = body_timeout
        self.max_body_bytes = max_body_bytes
        self.body_budget = BodyBudget(max_buffered_body_bytes)
        # durability="strict": awaited (bounded) before an answer's last byte goes out; it
        # returns once every record submitted so far is committed.
        self._durable = durable
        # store_content: bytes kept of each request body and answer (0: nothing kept).
        self._content_limit = content_limit
        # estimate_usage: bytes of each answer held (in memory only) to count if it has no usage.
        self._estimate_limit = estimate_limit
        self.draining = 0
        self.in_flight = 0
        self._tasks: set[asyncio.Future[None]] = set()
        #: WebSocket requests: tunnelled and metered per response (`meterproxy.wsproxy`).
        self.sessions = LiveSessions(
            meter=meter,
            fingerprint_salt=fingerprint_salt,
            connect_timeout=client.connect_timeout,
            read_timeout=client.read_timeout,
            estimate_limit=estimate_limit,
        )
        # Per-request work that depends only on a few repeating values, memoized (bounded):
        # routes of query-less paths, the provider of an upstream path, a key's fingerprint.
        self._routes: dict[str, Target] = {}
        self._providers: dict[str, tuple[providers.Provider | None, str]] = {}
        self._fingerprints: dict[str, str | None] = {}
        self._auth_fingerprints: dict[str, str | None] = {}
        #: The records' ids: a third of `new_request_id`'s instructions (`RequestIds`).
        self._ids = RequestIds()

    def route(self, raw_path: str, raw_query: str) -> Target:
        """`routing.route` for this proxy's upstreams (raises `RouteError`), memoized by path."""
        if raw_query:
            return route(raw_path, raw_query, self.upstreams)  # queries may carry keys: never kept
        target = self._routes.get(raw_path)
        if target is None:
            target = route(raw_path, raw_query, self.upstreams)
            _remember(self._routes, raw_path, target)
        return target

    def _detect(self, path: str) -> tuple[providers.Provider | None, str]:
        """The provider of an upstream path and the endpoint it names (memoized)."""
        try:
            return self._providers[path]
        except KeyError:
            provider = self.providers.detect(path)
            endpoint = provider.endpoint(path) if provider else _unmetered_endpoint(path)
            _remember(self._providers, path, (provider, endpoint))
            return provider, endpoint

    def _fingerprint(self, key: str | None) -> str | None:
        if key is None:
            return None
        try:
            return self._fingerprints[key]
        except KeyError:
            value = fingerprint(key, self._salt)
            _remember(self._fingerprints, key, value)
            return value

    def _key_fingerprint(self, headers: dict[str, str], raw_query: str) -> str | None:
        """`fingerprint` of `api_key`; memoized by ``Authorization`` value when that names the key."""
        auth = headers.get("authorization")
        if auth:
            try:
                return self._auth_fingerprints[auth]
            except KeyError:
                key = authorization_key(auth)
                if key is not None:  # the key is the header's own: nothing else is read
                    value = self._fingerprint(key)
                    _remember(self._auth_fingerprints, auth, value)
                    return value
        return self._fingerprint(api_key(headers, raw_query))

    # -- aiohttp's server ----------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The catch-all route of the aiohttp application."""
        started = time.perf_counter()
        try:
            # Raw (still percent-encoded) path and query: the upstream gets them as sent.
            raw_path, _, raw_query = request.raw_path.partition("?")
            target = self.route(raw_path, raw_query)
        except RouteError as exc:
            return json_error(404, "no_route", str(exc))
        headers = list(request.headers.items())
        method = request.method
        if is_upgrade(method, request.headers):
            # WebSockets (Realtime, Codex's Responses socket, Gemini Live): tunnelled, metered
            # per response (`meterproxy.wsproxy`); requests without the upgrade never get there.
            drop = frozenset(ATTRIBUTION_HEADERS) | _connection_tokens(headers)
            record = self._new_record(method, target, None, RequestInfo(), _first_values(headers), raw_query)
            return await self.sessions.handle(request, target, record, drop)
        try:
            body, held = await read_body(request, self.body_budget, self.max_body_bytes, self.body_timeout)
        except OverBudget as exc:
            return self.refuse_busy(method, target, headers, raw_query, str(exc))
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            message = "client hung up before sending its whole body"
            return self.refuse(method, target, headers, raw_query, 400, "client_gone", message, gone=True)
        except asyncio.CancelledError:
            # A server that cancels handlers when the client leaves (handler_cancellation).
            message = "client hung up mid-body"
            self.refuse(method, target, headers, raw_query, 400, "client_gone", message, gone=True)
            raise
        except web.HTTPRequestEntityTooLarge:
            return self.refuse_too_large(method, target, headers, raw_query)
        except TimeoutError:
            return self.refuse_slow_body(method, target, headers, raw_query)

        exchange = self.begin(method, target, headers, raw_query, body, started)
        client = AiohttpClient(request)
        # The exchange runs in its own task, shielded: if the server cancels this
        # handler because the client hung up, the task keeps reading the upstream
        # (bounded drain) and still records the request.
        task = self.spawn(exchange, client)
        # The body is held until the exchange is over (whoever waits for it).
        task.add_done_callback(lambda _: self.body_budget.give_back(held))
        await asyncio.shield(task)
        assert client.response is not None
        return client.response

    def spawn(
        self, exchange: Exchange, client: ClientSide, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[None]:
        """Run ``exchange`` in a task of its own, tracked for `drain`.

        A caller that holds its loop passes it: finding the running loop costs a
        ``getpid`` system call on Python 3.11, once per request.
        """
        task = (loop or asyncio.get_running_loop()).create_task(self.run(exchange, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for every exchange task, e.g. abandoned streams still draining."""
        # Again while any are left: an exchange waiting in a callback (`relay_soon`) may hand
        # over to a task once its upstream answers.
        deadline = time.monotonic() + timeout
        while self._tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.wait(list(self._tasks), timeout=left)

    # -- routed, request read --------------------------------------------------------
    def begin(
        self,
        method: str,
        target: Target,
        headers: list[tuple[str, str]],
        raw_query: str,
        body: bytes,
        started: float,
    ) -> Exchange:
        """The request is routed and read whole: inspect it and open its record."""
        return self._open(method, target, _first_values(headers), headers, raw_query, body, started)

    def begin_raw(
        self,
        method: str,
        target: Target,
        raw_headers: list[tuple[bytes, bytes]],
        raw_query: str,
        body: bytes,
        started: float,
    ) -> Exchange:
        """`begin` with the request's headers as llhttp parsed them (the lean server).

        They stay bytes to the upstream: only the few attribution reads are decoded
        (`READ_HEADERS`), and `_prepare_upstream_request` filters them as bytes.
        """
        exchange = self._open(method, target, _first_values_raw(raw_headers), [], raw_query, body, started)
        exchange.raw_headers = raw_headers
        return exchange

    def _open(
        self,
        method: str,
        target: Target,
        first_values: dict[str, str],
        headers: list[tuple[str, str]],
        raw_query: str,
        body: bytes,
        started: float,
    ) -> Exchange:
        provider, endpoint = self._detect(target.path)
        info = provider.inspect_request(target.path, body) if provider else RequestInfo()
        record = self._new_record(method, target, provider, info, first_values, raw_query, endpoint)
        record.request_bytes = len(body)
        if self._content_limit and provider is not None:
            # The client's own body, before any injection: what the operator asked to keep.
            record.content = CapturedContent(
                request=body[: self._content_limit], truncated=len(body) > self._content_limit
            )
        return Exchange(method, target, provider, info, record, body, headers, started)

    def _new_record(
        self,
        method: str,
        target: Target,
        provider: providers.Provider | None,
        info: RequestInfo,
        headers: dict[str, str],
        raw_query: str,
        endpoint: str | None = None,
    ) -> RequestRecord:
        """The record of a request as far as it is known before forwarding.

        ``headers``: the first value of each header attribution reads. Built with the
        record's defaults and then only what this request sets, attribute by attribute
        (a keyword per field through the 40-field constructor costs twice as much).
        """
        user = body_session = None
        if info.user:
            user, body_session = agent_user(info.user)
        get = headers.get
        session = get("x-meter-session")
        if not session and not _AGENT_SESSION_HEADERS.isdisjoint(headers):
            session = agent_session(headers)
        record = RequestRecord(id=self._ids())  # an id given: the default factory is not called
        record.upstream = name = target.upstream.name
        record.method = method
        if provider is not None:
            record.provider = provider.name
            record.endpoint = endpoint or provider.endpoint(target.path)
        else:
            record.provider = _UPSTREAM_FAMILY.get(name, "")
            record.endpoint = endpoint or _unmetered_endpoint(target.path)
            record.usage_source = "none"
        record.requested_model = info.model
        record.streamed = info.stream
        record.user = bounded(get("x-meter-user") or user)
        record.session = bounded(session or body_session)
        tags = get("x-meter-tags")
        if tags:
            record.tags = parse_tags(tags)
        record.key_fingerprint = self._key_fingerprint(headers, raw_query)
        record.service_tier = info.service_tier
        record.max_output_tokens = info.max_output_tokens
        record.output_choices = info.choices
        return record

    def refuse(
        self,
        method: str,
        target: Target,
        headers: list[tuple[str, str]],
        raw_query: str,
        status: int,
        code: str,
        message: str,
        gone: bool = False,
    ) -> web.Response:
        """A request we answer ourselves before forwarding (413, 408): recorded, never sent on."""
        provider, endpoint = self._detect(target.path)
        record = self._new_record(
            method, target, provider, RequestInfo(), _first_values(headers), raw_query, endpoint
        )
        record.status, record.error, record.usage_source = (None if gone else status), message, "none"
        record.client_disconnected = gone
        self.meter.request_finished(record)
        return json_error(status, code, message)

    def refuse_too_large(
        self, method: str, target: Target, headers: list[tuple[str, str]], raw_query: str
    ) -> web.Response:
        message = f"request body is larger than the {self.max_body_bytes}-byte limit"
        return self.refuse(method, target, headers, raw_query, 413, "body_too_large", message)

    def refuse_busy(
        self, method: str, target: Target, headers: list[tuple[str, str]], raw_query: str, why: str
    ) -> web.Response:
        message = f"too many request bodies in memory right now ({why}); retry shortly"
        response = self.refuse(method, target, headers, raw_query, 503, "bodies_over_budget", message)
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    def refuse_slow_body(
        self, method: str, target: Target, headers: list[tuple[str, str]], raw_query: str
    ) -> web.Response:
        message = f"request body not received within {self.body_timeout:g} s"
        return self.refuse(method, target, headers, raw_query, 408, "body_timeout", message)

    # -- gated, forwarded, streamed back, finished -------------------------------------
    async def run(self, exchange: Exchange, client: ClientSide) -> None:
        """Everything after the request is read: gates, upstream, answer, record."""
        record = exchange.record
        blocked = await self.meter.check_gates(record)
        if blocked is not None:
            # The gate recorded the refusal itself.
            try:
                await client.respond(blocked)
            except ConnectionResetError:
                pass
            return
        self._prepare_upstream_request(exchange)
        await self._forwarding(exchange, client, None)

    async def _forwarding(self, exchange: Exchange, client: ClientSide, sent: Sent | None) -> None:
        """Forwarded (``sent``: already, by `relay_soon`), streamed back, finished."""
        self.in_flight += 1
        try:
            await self._forward(exchange, client, sent)
        finally:
            self._ended(exchange)

    def _ended(self, exchange: Exchange) -> None:
        """An exchange is over, however it went: out of the in-flight count, recorded once."""
        self.in_flight -= 1
        if not exchange.recorded:
            exchange.record.duration_ms = (time.perf_counter() - exchange.started) * 1000
            self._finish(exchange)

    # -- the callback relay (lean server) -----------------------------------------------
    def relay_soon(
        self, exchange: Exchange, client: ClientNow, done: Callable[[], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        """`run` without a task when nothing needs one; ``done()`` once the exchange is over.

        With no request gate to consult (no budget configured) and strict durability off, the
        request goes out at once on an idle pooled connection, and the rest of the
        exchange waits in a callback on the answer's head, not in a task. If the
        whole answer came with its head (a JSON answer, a short stream sent at once)
        and the client is taking our writes, it is relayed, tapped and recorded
        right there, in that callback (`_relay_now`). Anything else (a gate, strict
        durability, no idle connection, an answer still arriving, an upstream
        error, a client gone or not reading) runs in a task as `run`, taking over
        where the callback left off: the same code as before handles all of those.
        """
        if self._durable is not None or not client.ready() or not self.meter.gates_idle():
            self._spawn_done(loop, self.run(exchange, client), done)
            return
        self._prepare_upstream_request(exchange)
        exchange.sent_at = time.perf_counter()
        headers = self._upstream_headers(exchange)
        sent = self.client.send_pooled(exchange.method, exchange.target.url, headers, exchange.body)
        if sent is None:
            self._spawn_done(loop, self._forwarding(exchange, client, None), done)
            return
        self.in_flight += 1
        head_done = sent.head_done
        # Tracked like a task: `drain` waits for it (and whatever task it hands over to);
        # `_head_in` takes it out.
        self._tasks.add(head_done)
        head_done.add_done_callback(lambda _: self._head_in(exchange, client, sent, done, loop))

    def _spawn_done(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], done: Callable[[], None]
    ) -> None:
        task = loop.create_task(coro)  # the loop as given: finding it costs a getpid on 3.11
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: done())

    def _head_in(
        self,
        exchange: Exchange,
        client: ClientNow,
        sent: Sent,
        done: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The answer's head is in (or the request failed): relay it now, or hand over to a task."""
        self._tasks.discard(sent.head_done)
        if not sent.ready() or sent.conn.status == 101 or not client.ready():
            self.in_flight -= 1
            self._spawn_done(loop, self._forwarding(exchange, client, sent), done)
            return
        try:
            self._relay_now(exchange, client, sent)
        except Exception:
            log.exception("relaying the answer to request %s failed", exchange.record.id)
        finally:
            self._ended(exchange)
            done()

    def _relay_now(self, exchange: Exchange, client: ClientNow, sent: Sent) -> None:
        """`_relay` for an answer that is all here, the client ready: nothing waits.

        The same steps in the same order as the loop of `_relay` takes for such an
        answer (one piece of body, then its end), with `ClientNow`'s methods that
        only hold or send; the record gets the same times and the tap's result.
        """
        record = exchange.record
        upstream = exchange.upstream = sent.response()
        try:
            headers = self._answer_headers(exchange)
            client.start_now(upstream.status, upstream.raw_reason, headers)
            chunk = upstream.take()
            tap = exchange.tap
            out = tap.feed(chunk) if chunk and tap is not None else chunk
            # As `_relay`: the first byte of body, else the head, is the first byte.
            record.ttfb_ms = (time.perf_counter() - exchange.started) * 1000
            if out:
                client.write_now(out)
            if tap is not None:
                tail = tap.finish()
                if tail:
                    client.write_now(tail)
            client.end_now()
        finally:
            record.upstream_ms = (time.perf_counter() - exchange.sent_at) * 1000
            upstream.release()  # read to its end already: pooled (first, whatever the tap says)
            if exchange.tap is not None:
                self._take_result(exchange)

    def _prepare_upstream_request(self, exchange: Exchange) -> None:
        """Usage injection into the body, and the headers that go upstream."""
        provider = exchange.provider
        injected = False
        if provider and self._inject:
            exchange.body, injected = provider.prepare_request(
                exchange.target.path, exchange.body, exchange.info
            )
        exchange.record.usage_injected = injected
        signer = self.signers.get(exchange.target.upstream.name)
        raw = exchange.raw_headers
        if raw is not None:
            if signer is None:
                exchange.wire = self._wire_headers(raw, provider is not None, injected)
                return
            exchange.headers, exchange.raw_headers = _text_headers(raw), None  # signed as text
        headers = exchange.headers
        connection = _connection_tokens(headers)
        out: list[tuple[str, str]] = []
        for name, value in headers:
            lower = name.lower()
            if lower in _DROP_REQUEST or lower in connection:
                continue
            if lower == "accept-encoding" and provider is not None:
                value = "identity" if injected else _filter_accept_encoding(value)
            out.append((name, value))
        if signer is not None:
            out = signer.sign(exchange.method, exchange.target.url, out, exchange.body)
        exchange.headers = out

    @staticmethod
    def _wire_headers(raw: list[tuple[bytes, bytes]], metered: bool, injected: bool) -> bytes:
        """The header lines that go upstream, from llhttp's bytes: the same filter, never decoded.

        Each line is rebuilt from a name and value llhttp accepted (no CR, LF or NUL in
        either, no space before the colon), so nothing can be smuggled into the head.
        """
        return Proxy._filter_wire(raw, metered, injected, frozenset())

    @staticmethod
    def _filter_wire(
        raw: list[tuple[bytes, bytes]], metered: bool, injected: bool, connection: frozenset[bytes]
    ) -> bytes:
        """`_wire_headers` minus the names in ``connection`` too.

        One pass over the headers, not a look for ``Connection`` first and the filter
        after: the names a ``Connection`` header lists are known only once it is read,
        so when it lists a name not dropped anyway (``keep-alive``, ``close`` are) the
        pass is made again with them.
        """
        out: list[bytes] = []
        listed: set[bytes] | None = None
        for name, value in raw:
            lower = name.lower()
            if lower in _DROP_REQUEST_RAW or lower in connection:
                if lower == b"connection" and not connection:
                    listed = {t.strip().lower() for t in value.split(b",")} | (listed or set())
                continue
            if lower == b"accept-encoding" and metered:
                value = b"identity" if injected else _filter_accept_encoding(header_text(value)).encode()
            out += (name, b": ", value, b"\r\n")
        if listed is not None and not listed.issubset(_DROP_REQUEST_RAW):
            return Proxy._filter_wire(raw, metered, injected, frozenset(listed))
        return b"".join(out)

    def _upstream_headers(self, exchange: Exchange) -> list[tuple[str, str]] | bytes:
        return exchange.wire if exchange.wire is not None else exchange.headers

    async def _forward(self, exchange: Exchange, client: ClientSide, sent: Sent | None) -> None:
        record = exchange.record
        try:
            if sent is None:
                exchange.sent_at = time.perf_counter()
                upstream = await self.client.request(
                    exchange.method, exchange.target.url, self._upstream_headers(exchange), exchange.body
                )
            else:
                upstream = await sent.answer()
        except TimeoutError:
            record.status, record.error = 504, "upstream timed out before answering"
            await self._respond(client, json_error(504, "upstream_timeout", record.error))
            return
        except UpstreamError as exc:
            record.status, record.error = 502, f"upstream unreachable: {exc}"
            await self._respond(client, json_error(502, "upstream_unreachable", record.error))
            return
        if upstream.status == 101 and not self._upgrade_expected(exchange):
            upstream.release()  # its answer never "ends": the connection is closed, not pooled
            record.status = 502
            record.error = "upstream answered 101 Switching Protocols though no switch was asked for"
            await self._respond(client, json_error(502, "upstream_switched_protocols", record.error))
            return
        exchange.upstream = upstream
        try:
            await self._relay(exchange, client)
        finally:
            if not exchange.recorded:
                record.upstream_ms = (time.perf_counter() - exchange.sent_at) * 1000
            upstream.release()

    @staticmethod
    def _upgrade_expected(exchange: Exchange) -> bool:
        """Did this exchange ask the upstream to switch protocols? Never, on this path.

        A client's WebSocket upgrade is tunnelled by `meterproxy.wsproxy` before any
        exchange exists, and ``Upgrade`` is hop-by-hop, never forwarded from here; so
        a 101 answering a forwarded request is the upstream's fault (answered 502).
        """
        return False

    @staticmethod
    async def _respond(client: ClientSide, response: web.Response) -> None:
        try:
            await client.respond(response)
        except ConnectionResetError:
            pass

    def _open_tap(self, exchange: Exchange, content_type: bytes, content_encoding: str | None) -> None:
        """Answer headers are in: a tap to read usage from the body, if a provider speaks here."""
        upstream, record, provider = exchange.upstream, exchange.record, exchange.provider
        assert upstream is not None
        record.status = upstream.status
        if provider is None:
            return
        sse = b"text/event-stream" in content_type.lower()
        parser = provider.new_parser(exchange.target.url.path or "", exchange.info, record.usage_injected)
        on_headers = getattr(parser, "on_headers", None)
        if on_headers is not None:  # usage in the answer's head (Bedrock's token-count headers)
            on_headers(upstream.headers)
        capture_limit = self._estimate_limit
        if record.content is not None and self._content_limit > capture_limit:
            capture_limit = self._content_limit
        exchange.tap = ResponseTap(
            parser,
            sse=sse,
            rewrite=record.usage_injected,
            content_encoding=content_encoding,
            capture_limit=capture_limit,
        )
        if sse:
            record.streamed = True

    def _answer_headers(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """Open the tap; the upstream's headers minus hop-by-hop ones (and a length the tap voids).

        The headers stay llhttp's bytes: only the few read here are decoded, the rest
        are relayed as they came.
        """
        assert exchange.upstream is not None
        headers = exchange.upstream.raw_headers
        content_type, content_encoding, connection = b"", None, b""
        request_id = x_request_id = b""  # the provider's own id: Anthropic's, else OpenAI's
        drops = False
        kinds = _ANSWER_HEADER_KINDS
        for name, value in headers:
            kind = kinds.get(name.lower())
            if kind is None:  # most headers: relayed, nothing to read
                continue
            if kind == _CONTENT_TYPE:
                if not content_type:
                    content_type = value
            elif kind == _CONTENT_ENCODING:
                if content_encoding is None:
                    content_encoding = header_text(value)
            elif kind == _REQUEST_ID:
                if not request_id:
                    request_id = value
            elif kind == _X_REQUEST_ID:
                if not x_request_id:
                    x_request_id = value
            elif kind == _CONNECTION:
                connection += b"," + value
                drops = True
            else:  # another hop-by-hop header
                drops = True
        if request_id or x_request_id:
            exchange.record.provider_request_id = header_text(request_id or x_request_id)[:200]
        self._open_tap(exchange, content_type, content_encoding)
        drop = HOP_BY_HOP_BYTES
        if connection:
            drop = drop | {t.strip().lower() for t in connection.split(b",")}
        if exchange.tap is not None and exchange.tap.rewriting:
            drop = drop | {b"content-length"}
            drops = True
        if not drops:
            return headers  # nothing to take out (the usual JSON answer): relayed as it came
        return [(name, value) for name, value in headers if name.lower() not in drop]

    async def _relay(self, exchange: Exchange, client: ClientSide) -> None:
        """Stream the answer to the client through the tap; cut, drain or finish as things go."""
        upstream, record = exchange.upstream, exchange.record
        assert upstream is not None
        headers = self._answer_headers(exchange)
        # Strict durability: the client must not see the end of the answer before the
        # record is committed. A chunked answer ends with `end`; one with a
        # Content-Length ends with its last byte, so that byte is held back.
        hold = self._durable is not None and any(n.lower() == b"content-length" for n, _ in headers)
        held = b""
        try:
            try:
                await client.start(upstream.status, upstream.raw_reason, headers)
            except ConnectionResetError:
                exchange.client_gone = True
            record.ttfb_ms = (time.perf_counter() - exchange.started) * 1000
            first_byte = True
            drain_until: float | None = None  # set once the client is gone and we read on for usage
            while True:
                chunk = upstream.take()
                if chunk is None:
                    # Nothing more has arrived: what the client side holds back (the head,
                    # the body so far) goes out before we wait. An answer that is all here
                    # already (most JSON answers) leaves in one write, its end included.
                    client.flush()
                    chunk = await upstream.read()
                if not chunk:
                    break
                out = exchange.tap.feed(chunk) if exchange.tap is not None else chunk
                if exchange.client_gone:
                    if drain_until is None or time.monotonic() > drain_until:
                        break
                    continue
                if hold and out:
                    out = held + out
                    held, out = out[-1:], out[:-1]
                if not out:
                    continue
                if first_byte:
                    record.ttfb_ms = (time.perf_counter() - exchange.started) * 1000
                    first_byte = False
                try:
                    await client.write(out)
                except ConnectionResetError:
                    drain_until = self._client_left(exchange)
                    if drain_until is None:
                        break
            await self._end(exchange, client, held)
        except UpstreamBroken as exc:
            record.error = f"upstream broke off mid-answer: {exc}"
            client.abort()
        except TimeoutError:
            record.error = "upstream went silent mid-answer (read timeout)"
            client.abort()
        except ConnectionResetError:
            record.client_disconnected = True
        finally:
            if exchange.draining:
                self.draining -= 1
                exchange.draining = False
            if exchange.client_gone:
                record.client_disconnected = True
            if exchange.tap is not None:
                self._take_result(exchange)

    def _client_left(self, exchange: Exchange) -> float | None:
        """The client hung up mid-answer: until when to read on for usage (None: stop now)."""
        exchange.client_gone = True
        exchange.record.client_disconnected = True
        if self.draining >= self._max_draining:
            return None  # too many streams draining already
        self.draining += 1
        exchange.draining = True
        if exchange.tap is None or not exchange.record.streamed:
            return None
        return time.monotonic() + self._drain_timeout

    async def _end(self, exchange: Exchange, client: ClientSide, held: bytes) -> None:
        """The upstream's body ended: flush the tap, record (strict: first), send the rest."""
        tap = exchange.tap
        tail = tap.finish() if tap is not None else b""
        if exchange.client_gone:
            return
        if self._durable is not None:
            if tap is not None:
                self._take_result(exchange)
            client.flush()  # all but the held end goes out before the wait for the commit
            await self._record_durably(exchange)
        tail = held + tail
        if tail:
            await client.write(tail)
        await client.end()

    def _finish(self, exchange: Exchange) -> None:
        record = exchange.record
        if record.error or record.extra or record.content is not None:
            # The credential headers go upstream unchanged, so they are still in the exchange.
            raw = exchange.raw_headers
            headers = exchange.headers if raw is None else _text_headers(raw)
            self._finish_record(record, carried(headers, exchange.target.url.raw_query_string))
        elif record.method not in _PROBE_METHODS or record.endpoint not in _UNMETERED_ENDPOINTS:
            # `_finish_record` with nothing to scrub (no error, no notes, no content).
            self.meter.request_finished(record)

    def _finish_record(self, record: RequestRecord, secrets: tuple[str, ...] = ()) -> None:
        if record.method in _PROBE_METHODS and record.endpoint in _UNMETERED_ENDPOINTS:
            return  # a probe, not LLM usage: neither an error nor an unmetered request
        # Error texts come from the upstream or the network and may echo a credential:
        # first the exact ones this request carried (whatever their shape), then known shapes.
        scrub_record(record, secrets)
        if record.error:
            record.error = redact(record.error)
        self.meter.request_finished(record)

    async def _record_durably(self, exchange: Exchange) -> None:
        """Finish the record now and wait (bounded) until the store has committed it."""
        assert self._durable is not None
        record = exchange.record
        now = time.perf_counter()
        record.upstream_ms = (now - exchange.sent_at) * 1000
        record.duration_ms = (now - exchange.started) * 1000
        exchange.recorded = True
        self._finish(exchange)
        try:
            await asyncio.wait_for(self._durable(), STRICT_COMMIT_WAIT)
        except Exception as exc:
            # Availability wins past the bound: the answer goes out, the record stays queued.
            log.error("record %s not committed within %g s: %r", record.id, STRICT_COMMIT_WAIT, exc)

    def _take_result(self, exchange: Exchange) -> None:
        tap, record = exchange.tap, exchange.record
        assert tap is not None
        exchange.tap = None
        result = tap.result()
        captured = tap.captured if self._content_limit or self._estimate_limit else None
        if captured is not None and record.content is not None:
            record.content.response = captured[: self._content_limit]
            record.content.truncated = (
                record.content.truncated or tap.capture_truncated or len(captured) > self._content_limit
            )
        if captured is not None and self._estimate_limit and result.usage is None:
            # Counted (and dropped) on the writer thread: `meterproxy.estimate`.
            content_type = exchange.upstream.headers.get("content-type", "") if exchange.upstream else ""
            record.estimate_source = EstimateSource(
                exchange.body, captured, tap.capture_truncated, content_type
            )
        record.usage = result.usage
        record.usage_source = result.usage_source
        record.model = result.model or record.requested_model
        record.provider_cost_usd = result.provider_cost_usd
        if result.service_tier:
            record.service_tier = result.service_tier
        if result.error and not record.error:
            record.error = result.error
        if result.notes:
            record.extra["notes"] = result.notes[:10]
        if result.details:
            record.extra["usage_details"] = result.details
        if result.children:
            self._batch_results(record, result.children)

    def _batch_results(self, download: RequestRecord, children: list[tuple[str, ParseResult]]) -> None:
        """One row per batch result, each with a stable id (`meterproxy.providers.batches`)."""
        for key, child in children:
            rid = result_id(download.upstream, key)
            container, _, item = key.partition("/")
            if rid in self._batch_seen:
                continue  # downloaded before: metered once
            self._batch_seen[rid] = None
            if len(self._batch_seen) > _BATCH_SEEN_MAX:
                self._batch_seen.popitem(last=False)
            record = dataclasses.replace(
                download,
                id=rid,
                endpoint="batch",
                status=child.status,
                streamed=False,
                usage=child.usage,
                usage_source=child.usage_source,
                requested_model=child.model,
                model=child.model,
                service_tier=child.service_tier,
                error=child.error,
                content=None,
                estimate_source=None,
                tags=dict(download.tags),
                extra={"batch": container, "result": item},
                duration_ms=None,
                ttfb_ms=None,
                upstream_ms=None,
                provider_request_id=None,
            )
            self._finish_record(record)

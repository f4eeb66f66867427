"""WebSocket requests through the proxy: routed, gated, tunnelled, one record per response.

The stages, in the order they fire (the HTTP path's, where they apply):

1. **routed**: by the proxy, exactly like any request (a path that names no
   upstream is a 404 and nothing is opened anywhere).
2. **gated**: budgets see the session's template record (user, key, model from
   ``?model=``) and may refuse it before anything goes upstream. A session is
   admitted like one request: a reserve budget's hold is settled by its first
   response's row (which carries the session's id); later responses count as
   spend when they finish, but an open session is never cut by a budget.
3. **handshake** (`websocket.handshake`): the upgrade goes to the routed URL on a
   new connection. No answer: a recorded 502/504. Any answer but a 101 is
   relayed as an ordinary answer and recorded with its status.
4. **tunnel** (`websocket.relay`): after the 101 the bytes flow untouched both
   ways; a copy of each direction goes through a `wsframes.MessageDecoder` into
   the dialect's `providers.live` parser. Each response it finishes becomes a
   record at once (one row per response; why: `meterproxy.providers.live`).
5. **closed**: either side's close closes the other; responses still open are
   recorded as cut, and a session with no response gets one row of its own.
   Server shutdown (`LiveSessions.close`) ends every tunnel the same way.

Credentials: the key is fingerprinted from the usual headers, or from the
``openai-insecure-api-key.`` subprotocol browsers use for Realtime; it is never
stored or logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time

from aiohttp import web
from multidict import MultiMapping

from meterproxy.attribution import fingerprint
from meterproxy.estimate import ws_frame
from meterproxy.meter import Meter
from meterproxy.providers.base import error_text, loads
from meterproxy.providers.live import LiveParser, LiveResponse, live_kind
from meterproxy.routing import Target
from meterproxy.usage import WS_MESSAGES, EstimateSource, RequestRecord, new_request_id, utcnow
from meterproxy.websocket import (
    AiohttpClientSide,
    Handshake,
    HandshakeError,
    UpstreamSocket,
    handshake,
    relay,
    upgrade_headers,
)
from meterproxy.wsframes import MessageDecoder, parse_deflate_params

__all__ = ["LiveSessions"]

log = logging.getLogger(__name__)

# Never copied from the upstream's 101 onto ours: aiohttp frames the (empty) body itself.
_DROP_ANSWER = frozenset({"content-length", "transfer-encoding", "keep-alive", "date", "server"})
_KEY_SUBPROTOCOL = "openai-insecure-api-key."


def _subprotocol_key(headers: MultiMapping[str]) -> str | None:
    """The API key a browser passes as a Realtime subprotocol (it cannot set headers)."""
    for value in headers.getall("sec-websocket-protocol", ()):
        for token in value.split(","):
            token = token.strip()
            if token.startswith(_KEY_SUBPROTOCOL):
                return token[len(_KEY_SUBPROTOCOL) :] or None
    return None


class LiveSessions:
    """The WebSocket sessions of one proxy: opens, meters and, at shutdown, closes them."""

    def __init__(
        self,
        *,
        meter: Meter,
        fingerprint_salt: bytes,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        estimate_limit: int = 0,
    ) -> None:
        self.meter = meter
        # estimate_usage: bytes of each side's text messages held to estimate a response
        # that ends without usage (0: nothing held).
        self._estimate_limit = estimate_limit
        self._salt = fingerprint_salt
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl = ssl_context
        self._relays: set[asyncio.Future[None]] = set()
        self.open = 0

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])  # WebSockets upgrade HTTP/1.1 only
            self._ssl = ctx
        return self._ssl

    async def close(self) -> None:
        """Server shutdown: end every tunnel (both sides closed) and record what they carried."""
        relays = list(self._relays)
        for task in relays:
            task.cancel()
        if relays:
            await asyncio.wait(relays, timeout=10)

    async def handle(
        self,
        request: web.Request,
        target: Target,
        template: RequestRecord,
        drop_headers: frozenset[str],
    ) -> web.StreamResponse:
        """Run one WebSocket request (see module docstring); ``template`` is its base record.

        ``drop_headers`` (lower case) are not forwarded: meterproxy's own and those the
        client's ``Connection`` header names.
        """
        started = time.perf_counter()
        kind = live_kind(target.path)
        parser: LiveParser | None = kind.new_parser(request.query_string) if kind else None
        template.method = "GET"
        template.streamed = True
        template.usage_source = "none"
        if kind is not None:
            template.provider, template.endpoint = kind.provider, kind.endpoint
        if parser is not None:
            template.requested_model = parser.model
        if template.key_fingerprint is None:
            template.key_fingerprint = fingerprint(_subprotocol_key(request.headers), self._salt)
        template.extra["ws_session"] = template.id
        blocked = await self.meter.check_gates(template)
        if blocked is not None:
            return blocked

        headers = upgrade_headers(request.headers.items(), drop_headers)
        try:
            answer = await handshake(
                target.url,
                headers,
                ssl_context=self._ssl_context() if target.url.scheme == "https" else None,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )
        except TimeoutError as exc:
            return self._refused(template, started, 504, "upstream_timeout", f"upstream timed out: {exc}")
        except HandshakeError as exc:
            message = f"upstream unreachable: {exc}"
            return self._refused(template, started, 502, "upstream_unreachable", message)
        if answer.socket is None:
            return self._not_upgraded(template, started, answer)
        return await self._tunnel(request, template, parser, answer, started)

    def _refused(
        self, template: RequestRecord, started: float, status: int, code: str, message: str
    ) -> web.Response:
        template.status, template.error = status, message
        template.duration_ms = (time.perf_counter() - started) * 1000
        self.meter.request_finished(template)
        return web.json_response(
            {"error": {"type": "meterproxy_error", "code": code, "message": message}}, status=status
        )

    def _not_upgraded(self, template: RequestRecord, started: float, answer: Handshake) -> web.Response:
        """The upstream answered the upgrade with an ordinary answer: relayed as it came."""
        template.status = answer.status
        template.duration_ms = (time.perf_counter() - started) * 1000
        if answer.status >= 400:
            body = loads(answer.body)
            err = body.get("error") if isinstance(body, dict) else None
            template.error = error_text(err) if err else f"upstream refused the upgrade ({answer.status})"
        self.meter.request_finished(template)
        response = web.Response(status=answer.status, reason=answer.reason, body=answer.body)
        for name, value in answer.headers.items():
            if name.lower() not in _DROP_ANSWER and name.lower() not in ("connection", "upgrade"):
                response.headers.add(name, value)
        return response

    async def _tunnel(
        self,
        request: web.Request,
        template: RequestRecord,
        parser: LiveParser | None,
        answer: Handshake,
        started: float,
    ) -> web.StreamResponse:
        assert answer.socket is not None
        upstream = answer.socket
        template.status = 101
        for name in ("request-id", "x-request-id"):
            if value := answer.headers.get(name):
                template.provider_request_id = value[:200]
                break
        response = web.StreamResponse(status=101, reason=answer.reason or "Switching Protocols")
        for name, value in answer.headers.items():
            if name.lower() not in _DROP_ANSWER:
                response.headers.add(name, value)
        try:
            await response.prepare(request)
            client = AiohttpClientSide(request, response)
        except (ConnectionError, RuntimeError) as exc:
            upstream.abort()
            template.client_disconnected, template.error = True, f"client gone before the tunnel: {exc}"
            self.meter.request_finished(template)
            return response
        template.ttfb_ms = (time.perf_counter() - started) * 1000
        # The session runs in its own task: a handler cancelled because the client went
        # away (or by the server) leaves it to end the tunnel and record what it carried.
        task = asyncio.ensure_future(self._session(client, upstream, template, parser, answer, started))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        await asyncio.shield(task)
        return response

    async def _session(
        self,
        client: AiohttpClientSide,
        upstream: UpstreamSocket,
        template: RequestRecord,
        parser: LiveParser | None,
        answer: Handshake,
        started: float,
    ) -> None:
        self.open += 1
        rows = 0
        notes: list[str] = []
        extensions = answer.headers.get("sec-websocket-extensions")
        server_frames = MessageDecoder(parse_deflate_params(extensions, from_server=True))
        client_frames = MessageDecoder(parse_deflate_params(extensions, from_server=False))
        texts = _EstimateTexts(self._estimate_limit) if self._estimate_limit and parser else None

        def finished(responses: list[LiveResponse]) -> None:
            nonlocal rows
            for live in responses:
                rows += 1
                record = self._response_record(template, live, rows)
                if texts is not None and live.estimable:
                    if record.usage is None:
                        record.estimate_source = texts.source()
                    texts.answer_done()
                self.meter.request_finished(record)

        def on_server(data: bytes) -> None:
            if parser is None:
                return
            for message in server_frames.feed(data):
                if message.skipped:
                    notes.append("a server message larger than the tap's limit was not read")
                    continue
                if texts is not None:
                    texts.server(message.payload)
                finished(parser.on_server_message(message.payload))

        def on_client(data: bytes) -> None:
            if parser is None:
                return
            for message in client_frames.feed(data):
                if not message.skipped:
                    if texts is not None:
                        texts.client(message.payload)
                    parser.on_client_message(message.payload)

        try:
            result = await relay(client, upstream, on_server_bytes=on_server, on_client_bytes=on_client)
        finally:
            self.open -= 1
        if parser is not None:
            finished(parser.finish())
        for decoder, side in ((server_frames, "server"), (client_frames, "client")):
            if decoder.broken:
                notes.append(f"{side} frames not readable: {decoder.broken}")
        notes.extend(result.errors)
        if rows == 0:
            # A session without a response still shows up, once.
            template.duration_ms = (time.perf_counter() - started) * 1000
            template.client_disconnected = result.ended_by == "client"
            template.extra["ws_bytes"] = {"client": result.client_bytes, "server": result.server_bytes}
            if notes:
                template.extra["notes"] = notes[:10]
            self.meter.request_finished(template)
        elif notes:
            log.warning("websocket session %s: %s", template.id, "; ".join(notes[:5]))

    @staticmethod
    def _response_record(template: RequestRecord, live: LiveResponse, n: int) -> RequestRecord:
        result = live.result
        record = dataclasses.replace(
            template,
            # The first response's row takes the session's id: the reservation a reserve budget
            # made when admitting the session (under that id) settles when this row commits,
            # instead of being held, and refreshed, for as long as the process lives.
            id=template.id if n == 1 else new_request_id(),
            ts=utcnow(),
            tags=dict(template.tags),
            extra={"ws_session": template.id, "ws_response": n},
            usage=result.usage,
            usage_source=result.usage_source,
            model=result.model or template.requested_model,
            error=result.error,
            duration_ms=(live.ended - live.started) * 1000,
            ttfb_ms=None,
        )
        if n == 1 and "reserved_usd" in template.extra:
            record.extra["reserved_usd"] = template.extra["reserved_usd"]  # what it settles
        if result.service_tier:
            record.service_tier = result.service_tier
        if live.details:
            record.extra["usage_details"] = live.details
        if result.notes:
            record.extra["notes"] = result.notes[:10]
        return record


class _EstimateTexts:
    """What an estimate of a session's response is counted from (``estimate_usage`` only).

    The prompt is every text message the client sent in the session so far (a
    response's input is the whole conversation: Realtime, Live and chained Responses
    keep it server-side), the answer the server's text messages since the last
    response ended. Audio (``input_audio_buffer.append``, Live's ``realtimeInput``
    media, audio deltas) is never held. Each side holds at most ``limit`` bytes; the
    messages are framed by `estimate.ws_frame`, and counted on the store writer's thread.
    """

    __slots__ = ("_answer", "_cut", "_limit", "_prompt")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._prompt = bytearray()
        self._answer = bytearray()
        self._cut = False

    def client(self, payload: bytes) -> None:
        head = payload[:128]
        if b"input_audio_buffer.append" in head or (b'"realtimeInput"' in head and b'"text"' not in payload):
            return
        self._keep(self._prompt, payload)

    def server(self, payload: bytes) -> None:
        head = payload[:128]
        text_delta = b'delta"' in head and b'audio.delta"' not in head
        if text_delta or (b'"serverContent"' in head and b'"text"' in payload):
            self._cut = not self._keep(self._answer, payload) or self._cut

    def _keep(self, into: bytearray, payload: bytes) -> bool:
        framed = ws_frame(payload)
        if len(into) + len(framed) > self._limit:
            return False
        into += framed
        return True

    def source(self) -> EstimateSource:
        return EstimateSource(bytes(self._prompt), bytes(self._answer), self._cut, WS_MESSAGES)

    def answer_done(self) -> None:
        self._answer.clear()
        self._cut = False

"""Forwarding: one aiohttp handler that relays a request and taps its answer.

The stages of one request, in the order they fire:

1. **routed** (`routing.route`): the raw path picks a configured upstream, or the
   client gets a 404 and nothing is sent anywhere.
2. **request read**: the body is read whole (bounded by ``max_body_bytes``, 413
   beyond) because the model, stream flag and user live in it; LLM request
   bodies are small next to their answers.
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
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from meterproxy import providers
from meterproxy.attribution import ATTRIBUTION_HEADERS, api_key, fingerprint, parse_tags
from meterproxy.logs import redact
from meterproxy.meter import Meter
from meterproxy.providers.base import RequestInfo
from meterproxy.routing import RouteError, Target, Upstream, route
from meterproxy.tap import ResponseTap, decodable_encodings
from meterproxy.upstream import UpstreamBroken, UpstreamClient, UpstreamError, UpstreamResponse
from meterproxy.usage import CapturedContent, RequestRecord

__all__ = ["HOP_BY_HOP", "STRICT_COMMIT_WAIT", "Proxy", "json_error"]

log = logging.getLogger(__name__)

#: durability="strict": longest wait for a record's commit before the answer is finished anyway.
STRICT_COMMIT_WAIT = 30.0

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", *ATTRIBUTION_HEADERS}


def json_error(status: int, code: str, message: str) -> web.Response:
    """meterproxy's own errors: one JSON shape, readable by every provider's SDK."""
    return web.json_response(
        {"error": {"type": "meterproxy_error", "code": code, "message": message}}, status=status
    )


def _connection_tokens(headers: MultiMapping[str]) -> set[str]:
    """Header names listed in ``Connection``: hop-by-hop for this hop only (RFC 9110 7.6.1)."""
    return {t.strip().lower() for value in headers.getall("connection", ()) for t in value.split(",")}


def _filter_accept_encoding(value: str) -> str:
    """Keep only codings the tap can decompress, so compressed answers are still metered."""
    readable = decodable_encodings()
    kept = [part for part in value.split(",") if part.split(";")[0].strip().lower() in readable]
    return ", ".join(p.strip() for p in kept) or "identity"


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
        durable: Callable[[], Awaitable[object]] | None = None,
        content_limit: int = 0,
    ) -> None:
        self.upstreams = upstreams
        self.meter = meter
        self.client = client
        self._salt = fingerprint_salt
        self._inject = inject_stream_usage
        self._drain_timeout = drain_timeout
        self._max_draining = max_draining
        self._body_timeout = body_timeout
        # durability="strict": awaited (bounded) before an answer's last byte goes out; it
        # returns once every record submitted so far is committed.
        self._durable = durable
        # store_content: bytes kept of each request body and answer (0: nothing kept).
        self._content_limit = content_limit
        self._recorded_early: set[str] = set()
        self.draining = 0
        self.in_flight = 0
        self._tasks: set[asyncio.Future[web.StreamResponse]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            # Raw (still percent-encoded) path and query: the upstream gets them as sent.
            raw_path, _, raw_query = request.raw_path.partition("?")
            target = route(raw_path, raw_query, self.upstreams)
        except RouteError as exc:
            return json_error(404, "no_route", str(exc))

        provider = providers.detect(target.path)
        try:
            if request.content.is_eof():
                body = await request.read()  # all of it is here already (the usual small body)
            else:
                async with asyncio.timeout(self._body_timeout):
                    body = await request.read()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            message = "client hung up before sending its whole body"
            return self._refuse(request, target, provider, 400, "client_gone", message, gone=True)
        except asyncio.CancelledError:
            # A server that cancels handlers when the client leaves (handler_cancellation).
            self._refuse(request, target, provider, 400, "client_gone", "client hung up mid-body", gone=True)
            raise
        except web.HTTPRequestEntityTooLarge:
            limit = request.app._client_max_size
            message = f"request body is larger than the {limit}-byte limit"
            return self._refuse(request, target, provider, 413, "body_too_large", message)
        except TimeoutError:
            message = f"request body not received within {self._body_timeout:g} s"
            return self._refuse(request, target, provider, 408, "body_timeout", message)

        info = provider.inspect_request(target.path, body) if provider else RequestInfo()
        record = self._new_record(request, target, provider, info)
        if self._content_limit and provider is not None:
            # The client's own body, before any injection: what the operator asked to keep.
            record.content = CapturedContent(
                request=body[: self._content_limit], truncated=len(body) > self._content_limit
            )
        blocked = await self.meter.check_gates(record)
        if blocked is not None:
            return blocked

        injected = False
        if provider and self._inject:
            body, injected = provider.prepare_request(target.path, body, info)
        record.usage_injected = injected
        out_headers = self._request_headers(request, metered=provider is not None, injected=injected)

        # The forwarding runs in its own task, shielded: if the server cancels this
        # handler because the client hung up, the task keeps reading the upstream
        # (bounded drain) and still records the request.
        task = asyncio.ensure_future(
            self._forward_and_record(request, target.url, body, out_headers, provider, info, record, started)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _new_record(
        self, request: web.Request, target: Target, provider: providers.Provider | None, info: RequestInfo
    ) -> RequestRecord:
        headers = request.headers
        return RequestRecord(
            upstream=target.upstream.name,
            provider=provider.name if provider else "",
            endpoint=provider.endpoint(target.path) if provider else "other",
            method=request.method,
            requested_model=info.model,
            streamed=info.stream,
            user=headers.get("x-meter-user") or info.user,
            session=headers.get("x-meter-session"),
            tags=parse_tags(headers.get("x-meter-tags")),
            key_fingerprint=fingerprint(api_key(headers, request.query_string), self._salt),
            service_tier=info.service_tier,
            usage_source="missing" if provider else "none",
        )

    def _refuse(
        self,
        request: web.Request,
        target: Target,
        provider: providers.Provider | None,
        status: int,
        code: str,
        message: str,
        gone: bool = False,
    ) -> web.Response:
        """A request we answer ourselves before forwarding (413, 408): recorded, never sent on."""
        record = self._new_record(request, target, provider, RequestInfo())
        record.status, record.error, record.usage_source = (None if gone else status), message, "none"
        record.client_disconnected = gone
        self.meter.request_finished(record)
        return json_error(status, code, message)

    async def _forward_and_record(
        self,
        request: web.Request,
        url: URL,
        body: bytes,
        headers: CIMultiDict[str],
        provider: providers.Provider | None,
        info: RequestInfo,
        record: RequestRecord,
        started: float,
    ) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._forward(request, url, body, headers, provider, info, record, started)
        finally:
            self.in_flight -= 1
            if record.id in self._recorded_early:
                self._recorded_early.discard(record.id)
            else:
                record.duration_ms = (time.perf_counter() - started) * 1000
                self._finish(record)

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for every forwarding task, e.g. abandoned streams still draining."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def _request_headers(self, request: web.Request, *, metered: bool, injected: bool) -> CIMultiDict[str]:
        connection = _connection_tokens(request.headers)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _DROP_REQUEST or lower in connection:
                continue
            if lower == "accept-encoding" and metered:
                value = "identity" if injected else _filter_accept_encoding(value)
            out.add(name, value)
        return out

    async def _forward(
        self,
        request: web.Request,
        url: URL,
        body: bytes,
        headers: CIMultiDict[str],
        provider: providers.Provider | None,
        info: RequestInfo,
        record: RequestRecord,
        started: float,
    ) -> web.StreamResponse:
        sent_at = time.perf_counter()
        try:
            upstream = await self.client.request(request.method, url, headers.items(), body)
        except TimeoutError:
            record.status, record.error = 504, "upstream timed out before answering"
            return json_error(504, "upstream_timeout", record.error)
        except UpstreamError as exc:
            record.status, record.error = 502, f"upstream unreachable: {exc}"
            return json_error(502, "upstream_unreachable", record.error)

        try:
            return await self._relay(request, url, upstream, provider, info, record, started, sent_at)
        finally:
            if record.id not in self._recorded_early:
                record.upstream_ms = (time.perf_counter() - sent_at) * 1000
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        url: URL,
        upstream: UpstreamResponse,
        provider: providers.Provider | None,
        info: RequestInfo,
        record: RequestRecord,
        started: float,
        sent_at: float,
    ) -> web.StreamResponse:
        record.status = upstream.status
        content_type = upstream.headers.get("content-type", "")
        tap: ResponseTap | None = None
        if provider is not None:
            parser = provider.new_parser(url.path or "", info, record.usage_injected)
            tap = ResponseTap(
                parser,
                sse="text/event-stream" in content_type.lower(),
                rewrite=record.usage_injected,
                content_encoding=upstream.headers.get("content-encoding"),
                capture_limit=self._content_limit if record.content is not None else 0,
            )
            record.streamed = record.streamed or "text/event-stream" in content_type.lower()

        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        connection = _connection_tokens(upstream.headers)
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection:
                continue
            if lower == "content-length" and tap is not None and tap.rewriting:
                continue
            response.headers.add(name, value)

        client_gone = False
        drain_deadline: float | None = None
        drain_slot = False
        # Strict durability: the client must not see the end of the answer before the
        # record is committed. A chunked answer ends with write_eof; one with a
        # Content-Length ends with its last byte, so that byte is held back.
        hold = self._durable is not None and "content-length" in response.headers
        held = b""
        try:
            try:
                await response.prepare(request)
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                client_gone = True
            record.ttfb_ms = (time.perf_counter() - started) * 1000
            first_byte = True
            while chunk := await upstream.read():
                out = tap.feed(chunk) if tap is not None else chunk
                if client_gone:
                    if drain_deadline is None or time.monotonic() > drain_deadline:
                        break
                    continue
                if hold and out:
                    out = held + out
                    held, out = out[-1:], out[:-1]
                if out:
                    if first_byte:
                        record.ttfb_ms = (time.perf_counter() - started) * 1000
                        first_byte = False
                    try:
                        await response.write(out)
                    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                        client_gone = True
                        record.client_disconnected = True
                        drain_slot = self._start_drain()
                        if not drain_slot or tap is None or not record.streamed:
                            break
                        drain_deadline = time.monotonic() + self._drain_timeout
            tail = tap.finish() if tap is not None else b""
            if not client_gone and self._durable is not None:
                if tap is not None:
                    self._take_result(tap, record)
                    tap = None
                await self._record_durably(record, started, sent_at)
            tail = held + tail
            if tail and not client_gone:
                await response.write(tail)
            if not client_gone:
                await response.write_eof()
        except UpstreamBroken as exc:
            record.error = f"upstream broke off mid-answer: {exc}"
            self._abort(request)
        except TimeoutError:
            record.error = "upstream went silent mid-answer (read timeout)"
            self._abort(request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            record.client_disconnected = True
        finally:
            if drain_slot:
                self.draining -= 1
            if client_gone:
                record.client_disconnected = True
            if tap is not None:
                self._take_result(tap, record)
        return response

    def _finish(self, record: RequestRecord) -> None:
        # Error texts come from the upstream or the network and may echo a credential.
        if record.error:
            record.error = redact(record.error)
        self.meter.request_finished(record)

    async def _record_durably(self, record: RequestRecord, started: float, sent_at: float) -> None:
        """Finish the record now and wait (bounded) until the store has committed it."""
        assert self._durable is not None
        now = time.perf_counter()
        record.upstream_ms = (now - sent_at) * 1000
        record.duration_ms = (now - started) * 1000
        self._recorded_early.add(record.id)
        self._finish(record)
        try:
            await asyncio.wait_for(self._durable(), STRICT_COMMIT_WAIT)
        except Exception as exc:
            # Availability wins past the bound: the answer goes out, the record stays queued.
            log.error("record %s not committed within %g s: %r", record.id, STRICT_COMMIT_WAIT, exc)

    def _start_drain(self) -> bool:
        """Take one of the bounded drain slots (False: too many streams draining already)."""
        if self.draining >= self._max_draining:
            return False
        self.draining += 1
        return True

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    @staticmethod
    def _take_result(tap: ResponseTap, record: RequestRecord) -> None:
        result = tap.result()
        captured = tap.captured
        if captured is not None and record.content is not None:
            record.content.response = captured
            record.content.truncated = record.content.truncated or tap.capture_truncated
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

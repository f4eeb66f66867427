"""Anthropic Messages API (``/v1/messages``), streaming and not.

Usage in a stream is spread over two events: ``message_start`` carries the
input side (``input_tokens``, ``cache_read_input_tokens``,
``cache_creation_input_tokens`` and its ``cache_creation`` 5m/1h split) and a
first ``output_tokens``; each ``message_delta`` carries **cumulative** counts.
So a delta replaces the fields it names and leaves the others as
``message_start`` set them (newer API versions repeat the input fields on the
delta, older ones do not): never add.

Anthropic reports ``input_tokens`` *without* cached tokens; our `Usage` counts
every prompt token, so input = input + cache read + cache creation.

``usage.speed: "fast"`` (fast mode) is billed at its own rates: the parser
reports it as the service tier ``fast``, which the price tables price as a tier.
``/messages/count_tokens`` answers a count, not usage: its requests cost
nothing and are recorded with ``usage_source = "none"``.

A stream cut before its ``message_delta`` (an ``event: error`` after
``message_start``, a dropped connection) has only message_start's numbers: they are
recorded as ``usage_source = "partial"``, a lower bound, never as a complete report.

Extended thinking: newer answers report ``usage.output_tokens_details.thinking_tokens``;
``output_tokens`` already includes them, so they become ``reasoning_tokens`` (a subset).

**Claude on Vertex AI** speaks the same format at
``.../publishers/anthropic/models/MODEL:rawPredict`` (a JSON answer) and
``:streamRawPredict`` (SSE). The model is in the path, not the body (which carries
``anthropic_version: vertex-2023-10-16`` instead); ``count-tokens:rawPredict`` is
Vertex's token counter.
"""

from __future__ import annotations

import re
from typing import Any

from meterproxy.providers.base import (
    BadUsage,
    ParseResult,
    RequestInfo,
    count,
    error_text,
    find_json_value,
    int_or_none,
    loads,
    quiet_run_end,
)
from meterproxy.sse import SSEEvent
from meterproxy.usage import Usage

__all__ = ["AnthropicParser", "AnthropicProvider", "normalize_anthropic_usage"]

_VERTEX = re.compile(r"/publishers/anthropic/models/([^/:]+):(raw|streamRaw)Predict$")
#: What stops `AnthropicParser.quiet`'s run: the events `on_event` reads (by name, with or without
#: the space after ``event:``; a name in text only makes the run stop early), and a nameless event
#: with usage.
_QUIET_STOPS = (b"message_start", b"message_delta", b"event: error", b"event:error", b'"usage"')
_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")


def normalize_anthropic_usage(raw: dict[str, Any]) -> Usage:
    uncached = count(raw, "input_tokens")
    cache_read = count(raw, "cache_read_input_tokens")
    cache_write = count(raw, "cache_creation_input_tokens")
    split = raw.get("cache_creation")
    write_1h = count(split, "ephemeral_1h_input_tokens") if isinstance(split, dict) else 0
    if write_1h > cache_write:
        raise BadUsage("ephemeral_1h_input_tokens exceeds cache_creation_input_tokens")
    tool_use = raw.get("server_tool_use")
    output = count(raw, "output_tokens")
    details = raw.get("output_tokens_details")
    thinking = count(details, "thinking_tokens") if isinstance(details, dict) else 0
    if thinking > output:
        raise BadUsage("thinking_tokens exceeds output_tokens")
    return Usage(
        input_tokens=uncached + cache_read + cache_write,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=write_1h,
        output_tokens=output,
        reasoning_tokens=thinking,
        web_search_requests=count(tool_use, "web_search_requests") if isinstance(tool_use, dict) else 0,
    )


class AnthropicParser:
    __slots__ = ("_counting", "_final", "_raw", "_result", "_streamed", "_tainted")

    def __init__(self, counting: bool = False) -> None:
        self._result = ParseResult()
        # count_tokens: the answer's ``input_tokens`` is a count, never billed usage.
        self._counting = counting
        # The provider's own usage fields, merged event by event (cumulative semantics).
        self._raw: dict[str, Any] = {}
        # A usage frame was unreadable: later deltas cannot make the sum whole again
        # (input tokens come only in message_start), so the usage stays invalid.
        self._tainted = False
        # A stream's usage is complete only once a message_delta carried it; cut before
        # (an error event after message_start, a dropped connection) it is a lower bound.
        self._streamed = False
        self._final = False

    def _merge(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            self._flag("usage is not an object")
            return
        for key, value in usage.items():
            if value is not None:
                self._raw[key] = value
        if self._tainted:
            return
        try:
            self._result.usage = normalize_anthropic_usage(self._raw)
            self._result.usage_source = "reported"
        except BadUsage as exc:
            self._flag(str(exc))
            return
        if self._raw.get("speed") == "fast":
            self._result.service_tier = "fast"

    def _flag(self, why: str) -> None:
        self._tainted = True
        self._result.usage = None
        self._result.usage_source = "invalid"
        self._result.notes.append(why)

    def quiet(self, events: bytes) -> tuple[int, bytes]:
        """Whole events: how many leading bytes of them `on_event` would only pass on, and those bytes.

        Content deltas, block starts and stops, pings and ``message_stop`` carry nothing read here,
        and most of a stream is made of them: the tap takes such runs with a few byte searches
        instead of an event object each (bench/README.md, "An Anthropic stream's quiet events").
        The run stops before the first event that may matter (`_QUIET_STOPS`); that one and the
        rest go through `on_event`. Nothing is ever rewritten in an Anthropic stream.
        """
        cut = quiet_run_end(events, _QUIET_STOPS)
        if not cut:
            return 0, b""
        self._streamed = True
        return cut, events[:cut] if cut < len(events) else events

    def on_event(self, event: SSEEvent) -> bytes | None:
        self._streamed = True
        name = event.event
        if name in ("message_start", "message_delta", "error") or (name is None and b'"usage"' in event.data):
            payload = loads(event.data)
            if not isinstance(payload, dict):
                if name in ("message_start", "message_delta") or b'"usage"' in event.data:
                    self._flag("malformed usage event")
                else:
                    self._result.notes.append("malformed stream event")
                return event.raw
            kind = payload.get("type", name)
            if kind == "message_start":
                message = payload.get("message")
                if isinstance(message, dict):
                    if isinstance(message.get("model"), str):
                        self._result.model = message["model"]
                    if message.get("usage") is not None:
                        self._merge(message["usage"])
            elif kind == "message_delta":
                if payload.get("usage") is not None:
                    self._merge(payload["usage"])
                    self._final = True
            elif kind == "error":
                self._result.error = error_text(payload.get("error"))
        return event.raw

    def on_body(self, body: bytes, truncated: bool) -> None:
        obj = loads(body) if not truncated else None
        if isinstance(obj, dict):
            if isinstance(obj.get("model"), str):
                self._result.model = obj["model"]
            if obj.get("type") == "error" or "error" in obj:
                self._result.error = error_text(obj.get("error"))
            if obj.get("usage") is not None and not self._counting:
                self._merge(obj["usage"])
        elif truncated:
            model = find_json_value(body, "model")
            self._result.model = model if isinstance(model, str) else None
            usage = find_json_value(body, "usage")
            if usage is not None:
                self._merge(usage)
        elif body.strip():
            self._result.notes.append("answer is not valid JSON")

    def result(self) -> ParseResult:
        if self._counting and self._result.usage_source == "missing":
            self._result.usage_source = "none"
        if self._streamed and not self._final and self._result.usage_source == "reported":
            self._result.usage_source = "partial"
        return self._result


class AnthropicProvider:
    name = "anthropic"

    def matches(self, path: str) -> bool:
        return (
            path.endswith("/messages")
            or path.endswith("/messages/count_tokens")
            or _VERTEX.search(path) is not None
        )

    @staticmethod
    def _counting(path: str) -> bool:
        vertex = _VERTEX.search(path)
        return path.endswith("/count_tokens") or (vertex is not None and vertex.group(1) == "count-tokens")

    def endpoint(self, path: str) -> str:
        return "count_tokens" if self._counting(path) else "messages"

    def inspect_request(self, path: str, body: bytes) -> RequestInfo:
        obj = loads(body) if body else None
        info = RequestInfo(body=obj)
        vertex = _VERTEX.search(path)
        if vertex is not None:
            info.stream = vertex.group(2) == "streamRaw"
            if vertex.group(1) != "count-tokens":
                info.model = vertex.group(1)
        if isinstance(obj, dict):
            if isinstance(obj.get("model"), str):
                info.model = obj["model"]
            info.stream = info.stream or obj.get("stream") is True
            meta = obj.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
                info.user = meta["user_id"]
            if isinstance(obj.get("service_tier"), str):
                info.service_tier = obj["service_tier"]
            info.max_output_tokens = int_or_none(obj.get("max_tokens"))
        return info

    def prepare_request(self, path: str, body: bytes, info: RequestInfo) -> tuple[bytes, bool]:
        return body, False  # Anthropic always reports usage

    def new_parser(self, path: str, info: RequestInfo, injected: bool) -> AnthropicParser:
        return AnthropicParser(counting=self._counting(path))

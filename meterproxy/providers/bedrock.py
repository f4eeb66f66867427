"""Amazon Bedrock Runtime: Converse, ConverseStream, InvokeModel, InvokeModelWithResponseStream.

Paths are ``/model/MODEL_ID/{converse, converse-stream, invoke,
invoke-with-response-stream}`` (the model id percent-encoded, ``%3A`` for its
``:``). Where usage is, per operation:

- **Converse**: the JSON answer's ``usage`` (``inputTokens``, ``outputTokens``,
  ``cacheReadInputTokens``, ``cacheWriteInputTokens``).
- **ConverseStream**: the AWS event-stream (``application/vnd.amazon.eventstream``,
  binary frames with CRCs, decoded by botocore's ``EventStreamBuffer`` as they
  arrive); the ``metadata`` event carries the same ``usage``.
- **InvokeModel**: the model's own JSON (Anthropic's ``usage`` for Claude, Nova's
  ``usage``...) and, for every model, the answer headers
  ``X-Amzn-Bedrock-Input-Token-Count`` / ``-Output-Token-Count`` (and the cache
  read/write counts), which win when present.
- **InvokeModelWithResponseStream**: event-stream ``chunk`` events whose payload is
  ``{"bytes": base64(model JSON)}``; the last one carries
  ``amazon-bedrock-invocationMetrics`` (``inputTokenCount``, ``outputTokenCount``,
  ``cacheRead/WriteInputTokenCount``). Claude's own ``message_start`` /
  ``message_delta`` usage is read too (with the cache split), and is what counts
  when the metrics are absent.

The row's ``requested_model`` is the Bedrock model id as asked (an inference profile's
region prefix included); ``model`` is the vendor's name for it (the answer's own
``model`` when Claude names it), which is what the price tables know.

Bedrock counts ``inputTokens`` without the cached ones (like Anthropic), so our
input = input + cache read + cache write. An ``exception`` event mid-stream
(throttling, validation) is recorded as the error; a stream cut before its usage
keeps what it saw as ``partial``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from botocore.eventstream import EventStreamBuffer, ParserError

from meterproxy.providers.anthropic import normalize_anthropic_usage
from meterproxy.providers.base import (
    BadUsage,
    ParseResult,
    RequestInfo,
    count,
    error_text,
    int_or_none,
    loads,
)
from meterproxy.sse import SSEEvent
from meterproxy.usage import Usage

__all__ = ["BedrockParser", "BedrockProvider", "normalize_bedrock_usage", "vendor_model"]

_PATH = re.compile(r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
_ENDPOINTS = {
    "converse": "converse",
    "converse-stream": "converse_stream",
    "invoke": "invoke",
    "invoke-with-response-stream": "invoke_stream",
}
# A Bedrock model id -> the vendor's own name, which the price tables know:
# "us.anthropic.claude-3-7-sonnet-20250219-v1:0" -> "claude-3-7-sonnet-20250219".
_REGION_PREFIX = re.compile(r"^(?:us|eu|apac|jp|au|ca|us-gov|global)\.(?=[a-z0-9-]+\.)")
_VENDOR_PREFIX = re.compile(r"^[a-z0-9-]+\.")
_VERSION_SUFFIX = re.compile(r"-v\d+(?::\d+)?$")


def vendor_model(model_id: str) -> str:
    """The model's vendor name inside a Bedrock model id (region, vendor and version dropped)."""
    name = _REGION_PREFIX.sub("", model_id, count=1)
    name = _VENDOR_PREFIX.sub("", name, count=1)
    return _VERSION_SUFFIX.sub("", name)


#: A JSON answer kept for reading at its end (usage sits in the first few KiB of Converse's).
_MAX_BODY = 8 * 1024 * 1024

_HEADERS = {
    "x-amzn-bedrock-input-token-count": "inputTokens",
    "x-amzn-bedrock-output-token-count": "outputTokens",
    "x-amzn-bedrock-cache-read-input-token-count": "cacheReadInputTokens",
    "x-amzn-bedrock-cache-write-input-token-count": "cacheWriteInputTokens",
}


def normalize_bedrock_usage(usage: Any) -> Usage:
    """Converse ``usage`` (or invocation metrics / headers, mapped to its names)."""
    if not isinstance(usage, dict) or not ("inputTokens" in usage or "outputTokens" in usage):
        raise BadUsage("usage has no token counts")
    cache_read = count(usage, "cacheReadInputTokens")
    cache_write = count(usage, "cacheWriteInputTokens")
    return Usage(
        input_tokens=count(usage, "inputTokens") + cache_read + cache_write,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=count(usage, "outputTokens"),
    )


def _metrics_usage(metrics: Any) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        return {}
    names = {
        "inputTokenCount": "inputTokens",
        "outputTokenCount": "outputTokens",
        "cacheReadInputTokenCount": "cacheReadInputTokens",
        "cacheWriteInputTokenCount": "cacheWriteInputTokens",
    }
    return {ours: metrics[theirs] for theirs, ours in names.items() if theirs in metrics}


class BedrockParser:
    """One answer's usage; event streams are fed chunk by chunk (`on_chunk`)."""

    def __init__(self, operation: str, model: str | None) -> None:
        self._operation = operation
        # The answered model: Converse names none, so the vendor's name for the id asked.
        self._result = ParseResult(model=vendor_model(model) if model else None)
        self._events = EventStreamBuffer()
        self._header_usage: dict[str, Any] = {}
        self._anthropic: dict[str, Any] = {}  # Claude's own stream usage, merged
        self._final = False
        self._streamed = False
        self._broken = False
        # The answer's content type decides: an event stream is decoded as it arrives,
        # anything else (JSON, an error) is kept (bounded) and read at the end.
        self._eventstream = False
        self._body = bytearray()

    # -- the answer's head --------------------------------------------------------
    def on_headers(self, headers: Mapping[str, str]) -> None:
        content_type = headers.get("content-type", "").lower()
        self._eventstream = content_type.startswith("application/vnd.amazon.eventstream")
        for name, key in _HEADERS.items():
            value = headers.get(name)
            if value is not None and value.strip().isdigit():
                self._header_usage[key] = int(value.strip())

    # -- event streams ------------------------------------------------------------
    def on_chunk(self, data: bytes) -> None:
        """Bytes of the answer as they arrive (any split)."""
        if not self._eventstream:
            if len(self._body) < _MAX_BODY:
                self._body += data[: _MAX_BODY - len(self._body)]
            return
        self._streamed = True
        if self._broken:
            return
        try:
            self._events.add_data(data)
            for message in self._events:
                self._on_message(message.headers, message.payload)
        except ParserError as exc:
            # A corrupt frame: what was read stays; the rest of the stream is not trusted.
            self._broken = True
            self._result.notes.append(f"event stream unreadable: {type(exc).__name__}")

    def _on_message(self, headers: Mapping[str, Any], payload: bytes) -> None:
        kind = headers.get(":message-type")
        if kind == "exception" or kind == "error":
            name = headers.get(":exception-type") or headers.get(":error-code") or "exception"
            body = loads(payload)
            message = body.get("message") if isinstance(body, dict) else None
            self._result.error = f"{name}: {message}"[:500] if message else str(name)[:500]
            return
        event = headers.get(":event-type")
        body = loads(payload)
        if not isinstance(body, dict):
            self._result.notes.append(f"unreadable {event} event")
            return
        if event == "metadata":
            self._take(body.get("usage"))
            self._final = self._final or body.get("usage") is not None
        elif event == "chunk":
            self._on_model_chunk(body.get("bytes"))

    def _on_model_chunk(self, encoded: Any) -> None:
        try:
            chunk = loads(base64.b64decode(encoded, validate=True)) if isinstance(encoded, str) else None
        except (binascii.Error, ValueError):
            chunk = None
        if not isinstance(chunk, dict):
            self._result.notes.append("unreadable model chunk")
            return
        metrics = chunk.get("amazon-bedrock-invocationMetrics")
        if metrics is not None:
            self._take(_metrics_usage(metrics))
            self._final = True
            return
        kind = chunk.get("type")
        message = chunk.get("message")
        if kind == "message_start" and isinstance(message, dict):
            if isinstance(message.get("model"), str):
                self._result.model = message["model"]
            self._merge_anthropic(message.get("usage"))
        elif kind == "message_delta":
            self._merge_anthropic(chunk.get("usage"))
        elif kind == "error":
            self._result.error = error_text(chunk.get("error"))

    def _merge_anthropic(self, usage: Any) -> None:
        if not isinstance(usage, dict) or self._final:
            return
        self._anthropic.update({k: v for k, v in usage.items() if v is not None})
        try:
            self._result.usage = normalize_anthropic_usage(self._anthropic)
            self._result.usage_source = "reported"
        except BadUsage as exc:
            self._flag(str(exc))

    # -- whole answers ------------------------------------------------------------
    def on_event(self, event: SSEEvent) -> bytes | None:
        return event.raw  # Bedrock never answers with SSE

    def on_body(self, body: bytes, truncated: bool) -> None:
        if self._streamed:
            return  # an event stream, read chunk by chunk already
        if not body and self._body:
            body, truncated = bytes(self._body), len(self._body) >= _MAX_BODY
        obj = loads(body) if not truncated else None
        if isinstance(obj, dict):
            if obj.get("message") and not obj.get("usage") and not obj.get("output"):
                self._result.error = str(obj["message"])[:500]  # an AWS error answer
            usage = obj.get("usage")
            if isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage):
                self._merge_anthropic(usage)  # Claude's own answer (InvokeModel)
            elif usage is not None:
                self._take(usage)
            if isinstance(obj.get("model"), str) and self._operation == "invoke":
                self._result.model = obj["model"]
        elif body.strip() and not truncated:
            self._result.notes.append("answer is not valid JSON")

    def _take(self, usage: Any) -> None:
        try:
            self._result.usage = normalize_bedrock_usage(usage)
            self._result.usage_source = "reported"
        except BadUsage as exc:
            self._flag(str(exc))

    def _flag(self, why: str) -> None:
        self._result.usage = None
        self._result.usage_source = "invalid"
        self._result.notes.append(why)

    def result(self) -> ParseResult:
        if self._header_usage:
            # InvokeModel's headers: Bedrock's own count, for every model family.
            self._take(self._header_usage)
            return self._result
        if self._streamed and not self._final and self._result.usage_source == "reported":
            self._result.usage_source = "partial"
        return self._result


def _output_limit(body: Any) -> int | None:
    """The output limit a Bedrock request sets: Converse's ``inferenceConfig.maxTokens``, or the
    model family's own field in an InvokeModel body (Claude and Mistral ``max_tokens``, Llama
    ``max_gen_len``, Titan ``textGenerationConfig.maxTokenCount``, Nova
    ``inferenceConfig.max_new_tokens``)."""
    if not isinstance(body, dict):
        return None
    for outer, inner in (
        ("inferenceConfig", "maxTokens"),
        ("inferenceConfig", "max_new_tokens"),
        ("textGenerationConfig", "maxTokenCount"),
    ):
        config = body.get(outer)
        if isinstance(config, dict) and (limit := int_or_none(config.get(inner))) is not None:
            return limit
    for name in ("max_tokens", "max_gen_len"):
        if (limit := int_or_none(body.get(name))) is not None:
            return limit
    return None


class BedrockProvider:
    name = "bedrock"

    def matches(self, path: str) -> bool:
        return _PATH.search(path) is not None

    def endpoint(self, path: str) -> str:
        match = _PATH.search(path)
        return _ENDPOINTS[match.group(2)] if match else "other"

    def inspect_request(self, path: str, body: bytes) -> RequestInfo:
        match = _PATH.search(path)
        obj = loads(body) if body else None
        return RequestInfo(
            model=unquote(match.group(1)) if match else None,
            stream=match is not None and match.group(2) in ("converse-stream", "invoke-with-response-stream"),
            body=obj,
            max_output_tokens=_output_limit(obj),
        )

    def prepare_request(self, path: str, body: bytes, info: RequestInfo) -> tuple[bytes, bool]:
        return body, False  # Bedrock always reports usage

    def new_parser(self, path: str, info: RequestInfo, injected: bool) -> BedrockParser:
        match = _PATH.search(path)
        return BedrockParser(match.group(2) if match else "", info.model)

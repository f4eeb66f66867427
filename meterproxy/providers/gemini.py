"""Google Gemini ``generateContent`` / ``streamGenerateContent`` (AI Studio and Vertex).

Every chunk of a stream repeats ``usageMetadata`` as a running total, so the last
one wins. Vertex sends early chunks with no counts (or only some), which must
not overwrite a total: a chunk's usage is taken only when it carries
``promptTokenCount`` or ``candidatesTokenCount``/``totalTokenCount``.

Without ``alt=sse`` a stream is one JSON array that grows chunk by chunk; it is
read as a whole body at the end.

Gemini reports thinking separately: our output = ``candidatesTokenCount +
thoughtsTokenCount`` (reasoning = ``thoughtsTokenCount``), and input =
``promptTokenCount + toolUsePromptTokenCount``.
"""

from __future__ import annotations

import re
from typing import Any

from meterproxy.providers.base import (
    BadUsage,
    ParseResult,
    RequestInfo,
    choices_asked,
    count,
    find_json_value,
    int_or_none,
    loads,
)
from meterproxy.sse import SSEEvent
from meterproxy.usage import Usage

__all__ = ["GeminiParser", "GeminiProvider", "normalize_gemini_usage"]

_MODEL_IN_PATH = re.compile(r"models/([^/:]+):(?:stream)?[gG]enerateContent$")


def normalize_gemini_usage(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        raise BadUsage("usageMetadata is not an object")
    thoughts = count(meta, "thoughtsTokenCount")
    cached = count(meta, "cachedContentTokenCount")
    input_tokens = count(meta, "promptTokenCount") + count(meta, "toolUsePromptTokenCount")
    if cached > input_tokens:
        raise BadUsage("cachedContentTokenCount exceeds promptTokenCount")
    return Usage(
        input_tokens=input_tokens,
        cache_read_tokens=cached,
        output_tokens=count(meta, "candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
    )


def _has_counts(meta: Any) -> bool:
    return isinstance(meta, dict) and any(
        k in meta for k in ("promptTokenCount", "candidatesTokenCount", "totalTokenCount")
    )


class GeminiParser:
    __slots__ = ("_final", "_result", "_streamed")

    def __init__(self) -> None:
        self._result = ParseResult()
        # An SSE stream's running total is final once a candidate says why it finished;
        # cut before, it is a lower bound ("partial").
        self._streamed = False
        self._final = False

    def _take(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self._result.notes.append("malformed chunk")
            return
        if isinstance(obj.get("modelVersion"), str):
            self._result.model = obj["modelVersion"]
        if obj.get("error"):
            err = obj["error"]
            self._result.error = (
                f"{err.get('status', '')}: {err.get('message', '')}"[:500]
                if isinstance(err, dict)
                else str(err)[:500]
            )
        meta = obj.get("usageMetadata")
        if _has_counts(meta):
            try:
                self._result.usage = normalize_gemini_usage(meta)
                self._result.usage_source = "reported"
            except BadUsage as exc:
                self._result.usage = None
                self._result.usage_source = "invalid"
                self._result.notes.append(str(exc))

    def on_event(self, event: SSEEvent) -> bytes | None:
        self._streamed = True
        data = event.data
        if b'"finishReason"' in data:
            self._final = True
        if b'"usageMetadata"' in data or b'"error"' in data or self._result.model is None:
            chunk = loads(data)
            if chunk is None and b'"usageMetadata"' in data:
                # An unreadable usage frame: flagged, unless a later chunk's running total replaces it.
                self._result.usage, self._result.usage_source = None, "invalid"
            self._take(chunk)
        return event.raw

    def on_body(self, body: bytes, truncated: bool) -> None:
        obj = loads(body) if not truncated else None
        if isinstance(obj, list):  # streamGenerateContent without alt=sse
            for item in obj:
                self._take(item)
        elif isinstance(obj, dict):
            self._take(obj)
        elif truncated:
            self._take(
                {
                    "modelVersion": find_json_value(body, "modelVersion"),
                    "usageMetadata": find_json_value(body, "usageMetadata"),
                }
            )
        elif body.strip():
            self._result.notes.append("answer is not valid JSON")

    def result(self) -> ParseResult:
        if self._streamed and not self._final and self._result.usage_source == "reported":
            self._result.usage_source = "partial"
        return self._result


class GeminiProvider:
    name = "gemini"

    def matches(self, path: str) -> bool:
        return path.endswith(":generateContent") or path.endswith(":streamGenerateContent")

    def endpoint(self, path: str) -> str:
        return "stream_generate_content" if path.endswith(":streamGenerateContent") else "generate_content"

    def inspect_request(self, path: str, body: bytes) -> RequestInfo:
        match = _MODEL_IN_PATH.search(path)
        obj = loads(body) if body else None
        config = obj.get("generationConfig") if isinstance(obj, dict) else None
        limit = int_or_none(config.get("maxOutputTokens")) if isinstance(config, dict) else None
        return RequestInfo(
            model=match.group(1) if match else None,
            stream=path.endswith(":streamGenerateContent"),
            body=obj,
            max_output_tokens=limit,
            choices=choices_asked(config.get("candidateCount")) if isinstance(config, dict) else 1,
        )

    def prepare_request(self, path: str, body: bytes, info: RequestInfo) -> tuple[bytes, bool]:
        return body, False

    def new_parser(self, path: str, info: RequestInfo, injected: bool) -> GeminiParser:
        return GeminiParser()

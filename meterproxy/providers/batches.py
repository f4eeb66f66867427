"""Batch results, metered when the client downloads them, at the batch tier.

A batch is billed per request it ran, at half price; the usage of each request is
in the results file, which the client downloads when the batch is done:

- **OpenAI**: ``GET /v1/files/FILE_ID/content`` of the batch's output file, JSON
  lines ``{"id", "custom_id", "response": {"status_code", "body": {... "model",
  "usage"}}, "error"}``. The same path serves any other file (uploads, fine-tune
  data): a line that is not a batch result is simply not one, and a file with
  none is recorded as a plain download (``usage_source = "none"``).
- **Anthropic**: ``GET /v1/messages/batches/BATCH_ID/results``, JSON lines
  ``{"custom_id", "result": {"type": "succeeded", "message": {... "model",
  "usage"}}}`` (``errored`` / ``canceled`` / ``expired`` results are not billed).

Each result becomes a row of its own (``endpoint = "batch"``, ``service_tier =
"batch"``, its own model and usage), next to the row of the download itself.
Its id is a pure function of the upstream, the file or batch and the result's
id, so a second download of the same results adds nothing: the store keeps the
first row (``ON CONFLICT (id) DO NOTHING``) and the proxy does not hand a
result it has already metered to the sinks again (within the process).

Results files can be large: lines are read as they pass (`on_chunk`), one at a
time, never the whole file; a line longer than ``MAX_LINE`` is skipped (noted).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from meterproxy.providers.anthropic import normalize_anthropic_usage
from meterproxy.providers.base import BadUsage, ParseResult, RequestInfo, error_text, loads
from meterproxy.providers.openai import normalize_openai_usage
from meterproxy.sse import SSEEvent

__all__ = ["BatchResultsParser", "BatchResultsProvider", "result_id"]

MAX_LINE = 16 * 1024 * 1024
_OPENAI_FILE = re.compile(r"/files/([^/]+)/content$")
_ANTHROPIC_RESULTS = re.compile(r"/messages/batches/([^/]+)/results$")


def result_id(upstream: str, key: str) -> str:
    """The row id of one batch result (``key``: its file or batch / its id): the same however
    often its results are downloaded."""
    digest = hashlib.sha256("\x1f".join(("batch", upstream, key)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16]))


class BatchResultsParser:
    """Reads a results file line by line; each result is a child `ParseResult`."""

    def __init__(self, family: str, container: str) -> None:
        self._family = family
        self.container = container
        self._result = ParseResult(usage_source="none")
        self._line = bytearray()
        self._skipping = False

    # -- the answer as it passes ------------------------------------------------------
    def on_chunk(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:])
                return
            self._keep(data[start:end])
            self._end_line()
            start = end + 1

    def _keep(self, piece: bytes) -> None:
        if self._skipping or not piece:
            return
        if len(self._line) + len(piece) > MAX_LINE:
            self._skipping, self._line = True, bytearray()
            return
        self._line += piece

    def _end_line(self) -> None:
        if self._skipping:
            self._result.notes.append("a results line over the size limit was skipped")
        elif self._line.strip():
            self._on_line(bytes(self._line))
        self._line, self._skipping = bytearray(), False

    def _on_line(self, line: bytes) -> None:
        obj = loads(line)
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            return  # not a batch result (any other file the same path serves)
        child = self._anthropic(obj) if self._family == "anthropic" else self._openai(obj)
        key = obj.get("id") if isinstance(obj.get("id"), str) else obj["custom_id"]
        # The key names its file (or batch) too: custom ids repeat across batches.
        self._result.children.append((f"{self.container}/{key}", child))

    @staticmethod
    def _openai(obj: dict[str, Any]) -> ParseResult:
        child = ParseResult(usage_source="none", service_tier="batch")
        response = obj.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            child.status = response["status_code"]
        if obj.get("error"):
            child.error = error_text(obj["error"])
        if not isinstance(body, dict):
            return child
        if isinstance(body.get("model"), str):
            child.model = body["model"]
        if body.get("error"):
            child.error = error_text(body["error"])
        if body.get("usage") is not None:
            try:
                child.usage = normalize_openai_usage(body["usage"])
                child.usage_source = "reported"
            except BadUsage as exc:
                child.usage_source = "invalid"
                child.notes.append(str(exc))
        return child

    @staticmethod
    def _anthropic(obj: dict[str, Any]) -> ParseResult:
        child = ParseResult(usage_source="none", service_tier="batch")
        result = obj.get("result")
        if not isinstance(result, dict):
            return child
        kind = result.get("type")
        message = result.get("message")
        if kind != "succeeded" or not isinstance(message, dict):
            err = result.get("error")
            if isinstance(err, dict) and isinstance(err.get("error"), dict):
                err = err["error"]  # the API's error envelope, as an HTTP error body has it
            child.error = error_text(err) if err else f"batch request {kind}"
            return child
        child.status = 200
        if isinstance(message.get("model"), str):
            child.model = message["model"]
        usage = message.get("usage")
        if isinstance(usage, dict):
            try:
                child.usage = normalize_anthropic_usage(usage)
                child.usage_source = "reported"
            except BadUsage as exc:
                child.usage_source = "invalid"
                child.notes.append(str(exc))
        return child

    # -- the parser protocol ------------------------------------------------------------
    def on_event(self, event: SSEEvent) -> bytes | None:
        return event.raw

    def on_body(self, body: bytes, truncated: bool) -> None:
        if body:  # a tap that kept the body whole (no on_chunk): read it now
            self.on_chunk(body)
        self._end_line()

    def result(self) -> ParseResult:
        return self._result


class BatchResultsProvider:
    """The download of a batch's results: OpenAI's file content, Anthropic's results."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pattern = _ANTHROPIC_RESULTS if name == "anthropic" else _OPENAI_FILE

    def matches(self, path: str) -> bool:
        return self._pattern.search(path) is not None

    def endpoint(self, path: str) -> str:
        return "batch_results" if self.name == "anthropic" else "file_content"

    def inspect_request(self, path: str, body: bytes) -> RequestInfo:
        return RequestInfo()

    def prepare_request(self, path: str, body: bytes, info: RequestInfo) -> tuple[bytes, bool]:
        return body, False

    def new_parser(self, path: str, info: RequestInfo, injected: bool) -> BatchResultsParser:
        match = self._pattern.search(path)
        return BatchResultsParser(self.name, match.group(1) if match else path)

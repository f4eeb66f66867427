"""The small protocol every provider's usage parser implements, and shared helpers.

A `Provider` knows three things about one wire family (OpenAI, Anthropic,
Gemini): which request paths speak it, what a request asks for (model, stream,
user), and how to read usage out of the answer. The answer is read by a
`UsageParser`, one per request, fed either SSE events as they pass through the
proxy (`on_event`) or, for a plain JSON answer, the body once it has ended
(`on_body`). Parsers never raise on bad input: a malformed frame is flagged
(`usage_source="invalid"` or an ``error``) and the bytes still reach the client,
because the tap that drives them swallows nothing it forwards.

In a stream the proxy rewrote (it added ``stream_options.include_usage``),
`on_event` also decides what the client sees: it returns the event's bytes,
rewritten bytes, or ``None`` to drop the usage-only chunk the client never
asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import orjson

from meterproxy.sse import SSEEvent
from meterproxy.usage import Usage

__all__ = [
    "BadUsage",
    "ParseResult",
    "Provider",
    "RequestInfo",
    "UsageParser",
    "count",
    "error_text",
    "find_json_value",
    "loads",
    "quiet_run_end",
    "to_decimal",
]


class BadUsage(ValueError):
    """A usage frame whose numbers cannot be trusted (negative, not an integer, absurd)."""


# No real request reports more tokens than this; larger numbers are corrupt frames.
MAX_TOKENS = 10**12


def count(obj: Any, key: str) -> int:
    """A token count from a usage object: absent or null is 0, anything odd is `BadUsage`."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        return 0
    # bool is an int subclass; a float like 12.0 is tolerated, 12.5 is not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadUsage(f"{key}={value!r} is not a token count")
    if isinstance(value, float):
        if not value.is_integer():
            raise BadUsage(f"{key}={value!r} is not a whole number")
        value = int(value)
    if value < 0 or value > MAX_TOKENS:
        raise BadUsage(f"{key}={value!r} is out of range")
    return value


def to_decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() else None


def loads(data: bytes | str) -> Any:
    """Parse JSON; None when it is not JSON (callers flag, never raise)."""
    try:
        return orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return None


def find_json_value(buf: bytes, key: str) -> Any:
    """The value of the last ``"key":`` in a JSON text we could not parse whole.

    Used on the tail of answers too large to keep: usage objects sit at the
    end of OpenAI, Anthropic and Gemini bodies.
    """
    needle = f'"{key}"'.encode()
    text = buf.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = len(buf)
    while True:
        pos = buf.rfind(needle, 0, pos)
        if pos < 0:
            return None
        # Map the byte offset into the decoded text (same prefix decoded).
        start = len(buf[:pos].decode("utf-8", errors="replace")) + len(key) + 2
        rest = text[start:].lstrip()
        if rest.startswith(":"):
            try:
                value, _ = decoder.raw_decode(rest[1:].lstrip())
                return value
            except ValueError:
                pass


def error_text(err: Any) -> str:
    """A provider's error object as one bounded line: ``"type: code: message"`` (those present)."""
    if isinstance(err, dict):
        parts = [str(err.get(k)) for k in ("type", "code", "message") if err.get(k)]
        return ": ".join(parts)[:500] or "error"
    return str(err)[:500] if err else "error"


@dataclass(slots=True)
class RequestInfo:
    """What the client's request asked for, read before forwarding."""

    model: str | None = None
    stream: bool = False
    user: str | None = None
    service_tier: str | None = None
    body: Any = None
    #: The output limit the request asked for (max_tokens and its spellings), if any.
    max_output_tokens: int | None = None
    #: How many answers it asks the model to generate (OpenAI ``n``/``best_of``, Gemini
    #: ``candidateCount``): each may reach the output limit, and every one is billed.
    choices: int = 1


def choices_asked(*values: Any) -> int:
    """The number of generated answers a request asks for (at least 1), from its counts."""
    return max([1, *(n for v in values if (n := int_or_none(v)) is not None)])


def int_or_none(value: Any) -> int | None:
    """A JSON integer (not a bool) or None: for limits read from a client's body."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(slots=True)
class ParseResult:
    usage: Usage | None = None
    usage_source: str = "missing"
    model: str | None = None
    error: str | None = None
    provider_cost_usd: Decimal | None = None
    service_tier: str | None = None
    notes: list[str] = field(default_factory=list)
    #: Token counts by modality when the provider splits them (``input_audio_tokens``,
    #: ``output_image_tokens``...), kept on the record as ``extra.usage_details``.
    details: dict[str, int] = field(default_factory=dict)
    #: A result's own HTTP status, when it is one of several in an answer (a batch result).
    status: int | None = None
    #: Requests billed inside this answer, each recorded as a row of its own: (stable key,
    #: result). A batch's results file holds one per request the batch ran.
    children: list[tuple[str, ParseResult]] = field(default_factory=list)


class UsageParser(Protocol):
    def on_event(self, event: SSEEvent) -> bytes | None:
        """Take one SSE event; return the bytes the client should get (None drops it)."""

    def on_body(self, body: bytes, truncated: bool) -> None:
        """Take a whole JSON answer (``truncated``: only head and tail were kept)."""

    def result(self) -> ParseResult: ...


class Provider(Protocol):
    name: str

    def matches(self, path: str) -> bool:
        """Does this wire family serve ``path`` (the path upstream, without query)?"""

    def endpoint(self, path: str) -> str:
        """A short, bounded name for the operation (chat, responses, messages, ...)."""

    def inspect_request(self, path: str, body: bytes) -> RequestInfo: ...

    def prepare_request(self, path: str, body: bytes, info: RequestInfo) -> tuple[bytes, bool]:
        """Return the body to send upstream and whether usage reporting was injected."""

    def new_parser(self, path: str, info: RequestInfo, injected: bool) -> UsageParser: ...


def quiet_run_end(events: bytes, stops: tuple[bytes, ...]) -> int:
    """Where a parser's quiet run ends in ``events`` (whole SSE events): before the first event that
    holds any of ``stops``. ``len(events)`` when none does, 0 when the first one does.

    A marker found anywhere inside an event stops the run at that event's start (the blank line
    before it): a marker in text only stops it early, which costs a decoded event, never a byte.
    """
    cut = len(events)
    for marker in stops:
        i = events.find(marker, 0, cut)
        if i >= 0:
            cut = i
    if cut < len(events):
        cut = events.rfind(b"\n\n", 0, cut) + 2  # back to the start of that event
        if cut < 2:
            return 0
    return cut

"""What one proxied request cost: the normalized `Usage` and the `RequestRecord`.

Every provider reports usage in its own shape; the provider parsers in
`meterproxy.providers` turn each shape into one `Usage` with fixed meanings so
that pricing, storage, metrics and budgets never look at a provider's wire
format again:

- ``input_tokens``: every prompt token the provider processed, cached ones
  included.
- ``cache_read_tokens`` and ``cache_write_tokens``: subsets of ``input_tokens``.
  ``cache_write_1h_tokens`` is the part of ``cache_write_tokens`` written with
  Anthropic's one-hour TTL (the rest is the 5-minute default).
- ``output_tokens``: every generated token, reasoning included.
- ``reasoning_tokens``: a subset of ``output_tokens``.
- ``audio_input_tokens`` / ``image_input_tokens`` and ``audio_output_tokens`` /
  ``image_output_tokens``: the parts of input and output in another modality, which
  the price tables may rate apart (``audio_cache_read_tokens``: cached audio input).

A `RequestRecord` is built by the proxy while a request is in flight and is
frozen in spirit once the meter receives it: sinks (store, metrics, budgets)
read it and never change it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

__all__ = [
    "COST_SOURCES",
    "WS_MESSAGES",
    "Estimate",
    "EstimateSource",
    "RequestIds",
    "RequestRecord",
    "Usage",
    "new_request_id",
    "utcnow",
]

#: Where a row's cost came from:
#: ``computed``: reported usage x the price tables (the normal case);
#: ``partial``: usage from a stream cut before its final report, priced as the lower bound it is;
#: ``provider``: the provider's (or agent log's) own figure, used where the tables cannot price;
#: ``estimated``: no usage was reported; meterproxy counted the tokens itself (``estimate_usage``).
#: Such a row's cost is in ``estimated_cost_pico``, never in ``cost_usd`` (`meterproxy.estimate`).
COST_SOURCES = ("computed", "partial", "provider", "estimated")


@dataclass(slots=True)
class Usage:
    """Token counts of one answer, normalized across providers (see module docstring)."""

    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    # Per-request fees some providers report next to tokens (e.g. web search calls).
    web_search_requests: int = 0
    # Modalities billed at their own rates (OpenAI realtime, images, audio): subsets of
    # input_tokens / output_tokens; ``audio_cache_read_tokens`` is also part of
    # cache_read_tokens. Zero everywhere else, where every token is text.
    audio_input_tokens: int = 0
    audio_cache_read_tokens: int = 0
    image_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_output_tokens: int = 0

    @property
    def uncached_input_tokens(self) -> int:
        """Input tokens billed at the plain input rate."""
        return max(self.input_tokens - self.cache_read_tokens - self.cache_write_tokens, 0)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


#: Usage's counters in order; they are also the stored row's column names.
USAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Usage))


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    """A time-ordered id (UUIDv7 layout), so ids sort roughly by arrival."""
    ms = time.time_ns() // 1_000_000
    # Uniqueness, not secrecy: the Mersenne Twister (reseeded in forked workers) costs no
    # syscall, where os.urandom showed up at 4 % of the event loop's time under load.
    rand = random.getrandbits(74)
    value = (
        (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    )
    # Formatted by hand: the same text as str(uuid.UUID(int=value)), at a third of its cost.
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: The hex digit of each 4-bit number, and three of each 12-bit number: an id's text
#: without a format per id.
_HEX1 = "0123456789abcdef"
_HEX3 = tuple(f"{i:03x}" for i in range(4096))


class RequestIds:
    """`new_request_id`'s ids for one owner (the proxy), at a third of the instructions.

    The same UUIDv7 layout and text (time-ordered by millisecond, version 7, RFC 9562
    variant), but RFC 9562's "method 1": the 74 random bits are 50 drawn once per
    instance (again in a forked child) and a 24-bit counter started at a random value,
    so an id costs a counter step and four table lookups instead of 74 fresh random
    bits formatted (a JSON request through the proxy: ~5.8k instructions fewer,
    `bench/proxy_stages.sh`). Ids stay unique across
    instances, workers, processes and replicas as fresh random ones were: two owners
    would need the same 50 bits and the same millisecond and counter value (and one
    owner makes 2^24 ids before its counter comes round again, never in one
    millisecond). Uniqueness, not secrecy: the counter shows how many ids came before.

    The state lives on the instance (`tests/test_no_globals.py`); call it for an id.
    """

    __slots__ = ("__weakref__", "_bits", "_counter", "_high", "_high_text")

    def __init__(self) -> None:
        self._bits = ""
        self._counter: Iterator[int] = itertools.count()
        self._high = -1
        self._high_text = ""
        self._draw()
        # A forked child must not repeat its parent's ids (`serve --workers` spawns instead,
        # but an embedding application may fork): it draws its own bits. Held weakly.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _redraw(ref))

    def _draw(self) -> None:
        bits = int.from_bytes(os.urandom(7)) >> 6  # 50 bits
        # rand_a (12 bits) after the version nibble; the variant, then rand_b's first 38 bits.
        self._bits = f"7{bits >> 38:03x}-{0x8000 | (bits >> 24 & 0x3FFF):04x}-{bits & 0xFFFFFF:06x}"
        self._counter = itertools.count(int.from_bytes(os.urandom(3)))

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        high = ms >> 16
        if high != self._high:  # the first group (the millisecond's top 32 bits): every 65.5 s
            self._high = high
            self._high_text = f"{high & 0xFFFFFFFF:08x}-"
        n = next(self._counter)
        # No format spec per id: the millisecond's low 16 bits and the counter from tables.
        return (
            f"{self._high_text}{_HEX1[ms >> 12 & 0xF]}{_HEX3[ms & 0xFFF]}-{self._bits}"
            f"{_HEX3[n >> 12 & 0xFFF]}{_HEX3[n & 0xFFF]}"
        )


def _redraw(ref: weakref.ref[RequestIds]) -> None:
    ids = ref()
    if ids is not None:
        ids._draw()


@dataclass(slots=True)
class CapturedContent:
    request: bytes = b""
    response: bytes = b""
    truncated: bool = False


@dataclass(slots=True, frozen=True)
class Estimate:
    """Tokens meterproxy counted for an answer without usage, and their price (`meterproxy.estimate`)."""

    input_tokens: int
    output_tokens: int
    #: How they were counted: ``tiktoken:o200k_base``, ``heuristic:utf8_bytes/4``...
    method: str
    cost_usd: Decimal | None
    priced_model: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "method": self.method,
            "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
            "priced_model": self.priced_model,
        }


@dataclass(slots=True)
class EstimateSource:
    """The texts an estimate is counted from; held only until the row is written, never stored."""

    request: bytes
    response: bytes
    #: The answer was longer than what was kept of it.
    truncated: bool = False
    #: How ``response`` (and ``request``) are framed: the answer's content type
    #: (``text/event-stream``, ``application/json``, Bedrock's
    #: ``application/vnd.amazon.eventstream``), or ``WS_MESSAGES`` for a WebSocket
    #: session's messages. Empty: SSE when the row is ``streamed``, else JSON.
    content_type: str = ""


#: `EstimateSource.content_type` of a WebSocket response: both sides' JSON messages, each
#: framed as one SSE ``data:`` event (`meterproxy.estimate.ws_frame`).
WS_MESSAGES = "application/x-meterproxy-ws-messages"


@dataclass(slots=True)
class RequestRecord:
    """One proxied (or imported) request, as stored. Field names are the API's names."""

    id: str = field(default_factory=new_request_id)
    ts: datetime = field(default_factory=utcnow)
    source: str = "proxy"
    upstream: str = ""
    provider: str = ""
    endpoint: str = ""
    method: str = "POST"
    requested_model: str | None = None
    model: str | None = None
    status: int | None = None
    streamed: bool = False
    usage: Usage | None = None
    # "reported": the provider sent usage; "missing": it did not; "invalid": it sent
    # something we could not trust (flagged, tokens not counted).
    usage_source: str = "missing"
    cost_usd: Decimal | None = None
    # The model id the price came from (after alias/snapshot matching), None if unpriced.
    priced_model: str | None = None
    # Cost as the provider itself reported it (OpenRouter `usage.cost`), for comparison.
    provider_cost_usd: Decimal | None = None
    #: Where ``cost_usd`` came from (None while unpriced), see `COST_SOURCES`.
    cost_source: str | None = None
    service_tier: str | None = None
    duration_ms: float | None = None
    ttfb_ms: float | None = None
    upstream_ms: float | None = None
    user: str | None = None
    session: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    key_fingerprint: str | None = None
    #: The provider's own id for this request (Anthropic ``request-id``, OpenAI
    #: ``x-request-id``; an import's ``requestId``): the key that finds one request
    #: recorded twice, once proxied and once imported from the agent's own log.
    provider_request_id: str | None = None
    error: str | None = None
    client_disconnected: bool = False
    usage_injected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: Known before forwarding, for budgets that reserve a worst case; never stored:
    #: the size of the client's body, the output limit it asked for and how many answers
    #: (each up to that limit) it asked the model to generate.
    request_bytes: int = 0
    max_output_tokens: int | None = None
    output_choices: int = 1
    #: Only with ``store_content``: the client's request body and the answer's (decoded)
    #: bytes, each capped; stored apart from the row by `meterproxy.content`.
    content: CapturedContent | None = None
    #: Only with ``estimate_usage``, for an answer that may come without usage: what to count.
    #: Set by the proxy; consumed (and dropped) on the writer thread, which fills ``estimate``.
    estimate_source: EstimateSource | None = None
    estimate: Estimate | None = None

    # Convenience accessors so sinks need not care whether usage is None.
    @property
    def tokens(self) -> Usage:
        return self.usage if self.usage is not None else Usage()

    @property
    def priced(self) -> bool:
        return self.cost_usd is not None

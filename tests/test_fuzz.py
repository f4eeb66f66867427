"""Bad input never crashes a parser: property tests and a volume fuzz run.

Hypothesis drives the SSE decoder and every provider parser through the
`ResponseTap` (the way the proxy drives them) with arbitrary bytes, arbitrary
chunk splits and arbitrary JSON in usage fields. The properties:

- no exception ever escapes `ResponseTap.feed`/`finish`/`result`;
- in pass-through mode the bytes forwarded are exactly the bytes fed;
- the SSE decoder gives the same events however the stream is split, and the
  raw bytes of its events plus its tail are the input (what a rewriting
  caller relies on to lose nothing);
- a usage frame with any untrustworthy count (negative, fractional, a string,
  a bool, null-in-a-list, nested junk, absurdly large) is flagged
  ``usage_source="invalid"`` and carries no tokens; a valid one is counted exactly.

``METERPROXY_FUZZ_EXAMPLES`` scales the volume run (CI default: a few thousand
inputs in well under a minute).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterproxy.providers import ProviderRegistry
from meterproxy.providers.base import MAX_TOKENS, RequestInfo
from meterproxy.sse import SSEDecoder
from meterproxy.tap import ResponseTap

PROVIDERS = ProviderRegistry.builtin()

VOLUME = int(os.environ.get("METERPROXY_FUZZ_EXAMPLES", "1500"))
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BULK = settings(max_examples=VOLUME, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PATHS = {
    "openai_chat": "/v1/chat/completions",
    "openai_responses": "/v1/responses",
    "anthropic": "/v1/messages",
    "gemini": "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
}


def _parser(kind: str, injected: bool = False) -> Any:
    path = PATHS[kind]
    provider = PROVIDERS.detect(path)
    assert provider is not None
    return provider.new_parser(path, RequestInfo(stream=True), injected)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


# SSE-ish bytes: mostly protocol-shaped lines, with arbitrary bytes mixed in.
_line = st.one_of(
    st.builds(lambda b: b"data: " + b, st.binary(max_size=60)),
    st.builds(lambda b: b"event: " + b, st.binary(max_size=20)),
    st.sampled_from([b"", b":", b": ping", b"data", b"data:", b"id: 1", b"retry: 10", b"data: [DONE]"]),
    st.binary(max_size=40),
)
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])
sse_bytes = st.lists(st.tuples(_line, _eol), max_size=30).map(lambda ls: b"".join(a + b for a, b in ls))
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


def _decode(pieces: list[bytes]) -> tuple[list[tuple[str | None, bytes, bytes]], bytes]:
    decoder = SSEDecoder()
    events = []
    for piece in pieces:
        events += decoder.feed(piece)
    final, tail = decoder.finish()
    events += final
    return [(e.event, e.data, e.raw) for e in events], tail


@FAST
@given(sse_bytes, cuts)
def test_sse_decoder_split_invariant_and_lossless(data: bytes, cut: list[int]) -> None:
    whole, whole_tail = _decode([data])
    split, split_tail = _decode(_split(data, cut))
    assert [(e, d) for e, d, _ in split] == [(e, d) for e, d, _ in whole]
    assert b"".join(r for _, _, r in split) + split_tail == data
    assert b"".join(r for _, _, r in whole) + whole_tail == data


@BULK
@given(st.sampled_from(sorted(PATHS)), st.booleans(), st.one_of(sse_bytes, st.binary(max_size=400)), cuts)
def test_tap_never_raises_and_passes_bytes_through(kind: str, sse: bool, data: bytes, cut: list[int]) -> None:
    tap = ResponseTap(_parser(kind), sse=sse)
    out = b"".join(tap.feed(piece) for piece in _split(data, cut))
    out += tap.finish()
    assert out == data
    result = tap.result()
    assert result.usage_source in ("reported", "missing", "invalid")
    if result.usage is not None:
        assert all(0 <= v <= 2 * MAX_TOKENS for v in result.usage.as_dict().values())


@FAST
@given(st.binary(max_size=300), cuts)
def test_tap_gzip_garbage_passes_through(data: bytes, cut: list[int]) -> None:
    for body in (data, gzip.compress(data)[: len(data) // 2 + 10]):
        tap = ResponseTap(_parser("openai_chat"), sse=False, content_encoding="gzip")
        out = b"".join(tap.feed(p) for p in _split(body, cut)) + tap.finish()
        assert out == body
        tap.result()


@FAST
@given(sse_bytes, cuts)
def test_rewriting_tap_never_raises_and_loses_nothing_without_usage(data: bytes, cut: list[int]) -> None:
    tap = ResponseTap(_parser("openai_chat", injected=True), sse=True, rewrite=True)
    out = b"".join(tap.feed(p) for p in _split(data, cut)) + tap.finish()
    tap.result()
    if b"usage" not in data:
        assert out == data


# -- usage fields with arbitrary JSON ------------------------------------------------


def _is_valid(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    if isinstance(v, float) and (v != v or not v.is_integer()):
        return False
    return 0 <= v <= MAX_TOKENS


valid_count = st.one_of(st.none(), st.integers(min_value=0, max_value=10**9))
junk = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=MAX_TOKENS + 1),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.5, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not _is_valid(f)),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _frame(kind: str, a: Any, b: Any) -> tuple[bytes, bool]:
    """An SSE answer for ``kind`` whose usage has input=a, output=b; True when it is SSE."""
    if kind == "openai_chat":
        usage = {"prompt_tokens": a, "completion_tokens": b}
        chunk = {"model": "m", "choices": [], "usage": usage}
        return b"data: " + _dumps(chunk) + b"\n\ndata: [DONE]\n\n", True
    if kind == "openai_responses":
        resp = {"model": "m", "usage": {"input_tokens": a, "output_tokens": b}}
        event = {"type": "response.completed", "response": resp}
        return b"event: response.completed\ndata: " + _dumps(event) + b"\n\n", True
    if kind == "anthropic":
        start = {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": a}}}
        delta = {"type": "message_delta", "usage": {"output_tokens": b}}
        return (
            b"event: message_start\ndata: " + _dumps(start) + b"\n\n"
            b"event: message_delta\ndata: " + _dumps(delta) + b"\n\n"
        ), True
    meta = {"promptTokenCount": a, "candidatesTokenCount": b, "totalTokenCount": 1}
    # As Gemini's last stream chunk: the candidate says why it finished (without it, a lower bound).
    last = {"candidates": [{"finishReason": "STOP", "index": 0}], "modelVersion": "m", "usageMetadata": meta}
    return b"data: " + _dumps(last) + b"\n\n", True


def _dumps(obj: Any) -> bytes:
    # allow_nan: upstreams can send NaN/Infinity (not JSON, but Python's json writes them).
    return json.dumps(obj, allow_nan=True).encode()


@BULK
@given(
    st.sampled_from(sorted(PATHS)),
    st.one_of(valid_count, junk),
    st.one_of(valid_count, junk),
    cuts,
)
def test_untrustworthy_usage_is_flagged_never_counted(kind: str, a: Any, b: Any, cut: list[int]) -> None:
    body, sse = _frame(kind, a, b)
    tap = ResponseTap(_parser(kind), sse=sse)
    out = b"".join(tap.feed(p) for p in _split(body, cut)) + tap.finish()
    assert out == body
    result = tap.result()
    # NaN and Infinity are not JSON: the whole frame is unreadable.
    parsable = all(not (isinstance(v, float) and not math.isfinite(v)) for v in (a, b))
    if _is_valid(a) and _is_valid(b):
        assert result.usage_source == "reported", result
        assert result.usage is not None
        assert result.usage.input_tokens == int(a or 0)
        assert result.usage.output_tokens == int(b or 0)
    elif parsable:
        assert result.usage_source == "invalid", (a, b, result)
        assert result.usage is None
    else:
        # NaN/Infinity make the frame invalid JSON: an unreadable usage frame, flagged the same.
        assert result.usage_source == "invalid" and result.usage is None, (a, b, result)

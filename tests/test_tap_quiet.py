"""The tap's quiet-event skip (`ResponseTap._quiet_prefix`) changes nothing but the cost.

Every OpenAI-style stream fixture, in pass-through and in rewrite mode, fed whole,
byte by byte, event by event and at random cuts, gives the client exactly the same
bytes and the record exactly the same result as the same tap with the skip turned
off (a parser without ``quiet``, so every event goes through the decoder).
"""

from __future__ import annotations

import itertools
import random

import pytest

from meterproxy.providers.anthropic import AnthropicParser
from meterproxy.providers.base import ParseResult
from meterproxy.providers.openai import OpenAIParser
from meterproxy.tap import ResponseTap
from meterproxy.testing import FIXTURES_DIR, load_fixture


def _streams(provider: str) -> list[str]:
    """Every SSE fixture of ``provider`` (OpenAI's: every compatible server's chat stream)."""
    return sorted(
        p.stem
        for p in FIXTURES_DIR.glob("*.toml")
        if load_fixture(p.stem).meta.get("provider") == provider
        and "event-stream" in load_fixture(p.stem).content_type
        and "responses" not in p.stem
    )


STREAMS = _streams("openai")
RESPONSES_STREAMS = sorted(
    p.stem
    for p in FIXTURES_DIR.glob("openai_responses*.toml")
    if "event-stream" in load_fixture(p.stem).content_type
)
ANTHROPIC_STREAMS = _streams("anthropic")


class _NoQuiet:
    """Mixed in before a parser: the same parser without `quiet`, every event reaches `on_event`."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> object:
        if name == "quiet":
            raise AttributeError(name)
        return super().__getattribute__(name)


class _Loud(_NoQuiet, OpenAIParser):
    __slots__ = ()


class _LoudAnthropic(_NoQuiet, AnthropicParser):
    __slots__ = ()


def _run(
    parser: OpenAIParser | AnthropicParser, chunks: list[bytes], injected: bool
) -> tuple[bytes, ParseResult]:
    tap = ResponseTap(parser, sse=True, rewrite=injected)
    out = b"".join(tap.feed(c) for c in chunks) + tap.finish()
    return out, tap.result()


def _chunkings(body: bytes) -> list[list[bytes]]:
    rng = random.Random(len(body))
    events = [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]
    events[-1:] = [events[-1] + body[len(b"".join(events)) :]] if events else [body]
    cuts = [sorted(rng.sample(range(1, len(body)), min(8, len(body) - 1))) for _ in range(20)]
    splits = [[body[a:b] for a, b in itertools.pairwise([0, *c, len(body)])] for c in cuts]
    # Streams cut short too (a partial answer is recorded differently from a finished one).
    cut_short = [[body[:end]] for end in (len(body) // 3, len(body) // 2, len(body) - 20)]
    return [[body], [body[i : i + 1] for i in range(len(body))], events, *splits, *cut_short]


def _head(model: bytes = b"m") -> bytes:
    return b'data: {"model":"%s","choices":[{"delta":{"role":"assistant"}}],"usage":null}\n\n' % model


def _delta(text: bytes, usage: bytes = b',"usage":null') -> bytes:
    return b'data: {"model":"m","choices":[{"delta":{"content":"%s"}}]%s}\n\n' % (text, usage)


_USAGE = b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
#: Shapes beside the fixtures' (what compatible servers write): the null not last in its chunk,
#: two nulls in one chunk, comments, event names, stray blank lines, spaced JSON, quotes in content.
SHAPES = {
    "openai": _head() + b"".join(_delta(b"t%d" % i) for i in range(40)) + _USAGE + b"data: [DONE]\n\n",
    "null-first": _head()
    + b'data: {"usage":null,"model":"m","choices":[{"delta":{"content":"a"}}]}\n\n' * 3
    + _USAGE,
    "null-middle": _head()
    + b'data: {"model":"m","usage":null,"choices":[{"delta":{"content":"a"}}],"x":1}\n\n' * 3
    + _USAGE,
    "two-nulls": _head()
    + b'data: {"model":"m","x":{"a":1,"usage":null},"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
    * 3
    + _USAGE,
    "comments": _head() + (b": keep-alive\n\n" + _delta(b"c")) * 5 + _USAGE,
    "event-names": _head() + (b"event: chunk\n" + _delta(b"e")) * 5 + _USAGE,
    "blank-lines": _head() + (_delta(b"b") + b"\n") * 5 + _USAGE,
    "spaced": _head() + _delta(b"s", b', "usage": null') * 3 + _delta(b"s") * 3 + _USAGE,
    "quoted-content": _head()
    + _delta(b'say \\"usage\\":null and \\"error\\"') * 3
    + _delta(b"x", b"") * 2
    + b"data: [DONE]\n\n",
    "no-nulls": _head() + b"".join(_delta(b"n", b"") for _ in range(5)) + _USAGE,
}


@pytest.mark.parametrize("endpoint", ["", "chat"])
@pytest.mark.parametrize("injected", [False, True], ids=["pass-through", "rewrite"])
@pytest.mark.parametrize("name", STREAMS + sorted(SHAPES))
def test_skipping_quiet_events_changes_no_byte_and_no_result(
    name: str, injected: bool, endpoint: str
) -> None:
    body = SHAPES[name] if name in SHAPES else load_fixture(name).body
    assert STREAMS
    for chunks in _chunkings(body):
        out, result = _run(OpenAIParser(injected, responses=False, endpoint=endpoint), chunks, injected)
        loud_out, loud = _run(_Loud(injected, responses=False, endpoint=endpoint), chunks, injected)
        assert out == loud_out
        assert result == loud


def test_quiet_takes_content_deltas_once_the_model_is_known() -> None:
    parser = OpenAIParser(injected=True, responses=False)
    delta = b'data: {"model":"m","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    stripped = delta.replace(b',"usage":null', b"")
    assert parser.quiet(delta) == (0, b"")  # the model is not known yet
    tap = ResponseTap(parser, sse=True, rewrite=True)
    assert tap.feed(delta) == stripped
    assert parser.quiet(delta * 3) == (len(delta) * 3, stripped * 3)
    usage = b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    assert parser.quiet(delta * 2 + usage + delta) == (len(delta) * 2, stripped * 2)  # up to the usage
    # A comment before it: taken too (no usage in it), its bytes as they came.
    assert parser.quiet(b": ping\n\n" + delta) == (len(delta) + 8, b": ping\n\n" + stripped)
    # Anything the one replace cannot strip exactly (here a null not closing its chunk, after a
    # comment) is left to the events one by one.
    mid = b'data: {"model":"m","usage":null,"choices":[]}\n\n'
    assert parser.quiet(b": ping\n\n" + mid) == (0, b"")
    assert tap.feed(delta * 3 + usage + b"data: [DONE]\n\n") == stripped * 3 + b"data: [DONE]\n\n"
    tap.finish()
    result = tap.result()
    assert result.usage is not None and result.usage.output_tokens == 2


def _event(name: bytes | None, data: bytes) -> bytes:
    return (b"event: " + name + b"\n" if name else b"") + b"data: " + data + b"\n\n"


_START = _event(
    b"message_start",
    b'{"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":5,"output_tokens":1}}}',
)
_TEXT = _event(b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":{"text":"hi"}}')
_DELTA = _event(b"message_delta", b'{"type":"message_delta","delta":{},"usage":{"output_tokens":7}}')
_STOP = _event(b"message_stop", b'{"type":"message_stop"}')
#: Anthropic shapes beside the fixtures': names without the space, nameless events (with and
#: without usage), an error mid-stream, the stop words inside text, comments and blank lines.
ANTHROPIC_SHAPES = {
    "plain": _START + _TEXT * 30 + _DELTA + _STOP,
    "no-space": _START.replace(b"event: ", b"event:")
    + _TEXT * 5
    + _DELTA.replace(b"event: ", b"event:")
    + _STOP,
    "nameless": _event(None, _START.split(b"data: ")[1][:-2])
    + _event(None, b'{"type":"content_block_delta","delta":{"text":"a"}}') * 5
    + _event(None, b'{"type":"message_delta","usage":{"output_tokens":3}}'),
    "error-mid-stream": _START
    + _TEXT * 3
    + _event(b"error", b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    + _TEXT,
    "error-no-space": _START + _TEXT + b'event:error\ndata: {"type":"error","error":{"message":"x"}}\n\n',
    "words-in-text": _START
    + _event(b"content_block_delta", b'{"delta":{"text":"message_delta usage event: error"}}') * 3
    + _DELTA,
    "comments-blank-lines": _START + (b": ping\n\n" + _TEXT + b"\n") * 4 + _DELTA + _STOP,
    "usage-twice": _START + _TEXT * 2 + _DELTA + _TEXT + _DELTA.replace(b"7", b"9") + _STOP,
}


@pytest.mark.parametrize("name", ANTHROPIC_STREAMS + sorted(ANTHROPIC_SHAPES))
def test_anthropic_quiet_events_change_no_byte_and_no_result(name: str) -> None:
    body = ANTHROPIC_SHAPES[name] if name in ANTHROPIC_SHAPES else load_fixture(name).body
    assert ANTHROPIC_STREAMS
    for chunks in _chunkings(body):
        out, result = _run(AnthropicParser(), chunks, False)
        loud_out, loud = _run(_LoudAnthropic(), chunks, False)
        assert out == loud_out == b"".join(chunks)
        assert result == loud


def test_anthropic_quiet_takes_content_and_stops_at_what_on_event_reads() -> None:
    parser = AnthropicParser()
    assert parser.quiet(_TEXT * 3 + _STOP) == (len(_TEXT * 3 + _STOP), _TEXT * 3 + _STOP)
    assert parser.quiet(_TEXT * 2 + _DELTA + _TEXT) == (len(_TEXT) * 2, _TEXT * 2)
    assert parser.quiet(_START + _TEXT) == (0, b"")


def _named(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


_R_CREATED = _named(
    b"response.created",
    b'{"type":"response.created","response":{"model":"o3","status":"in_progress","error":null,"usage":null}}',
)
_R_DELTA = _named(b"response.output_text.delta", b'{"type":"response.output_text.delta","delta":"hi"}')
_R_DONE = _named(
    b"response.completed",
    b'{"type":"response.completed","response":{"model":"o3","usage":{"input_tokens":3,"output_tokens":4}}}',
)
#: Responses shapes beside the recorded ones: nameless events (one malformed: noted), named errors
#: with and without the space, the stop names inside text, comments and blank lines, ids first.
RESPONSES_SHAPES = {
    "plain": _R_CREATED + _R_DELTA * 30 + _R_DONE,
    "nameless": _R_CREATED
    + _R_DELTA * 2
    + b'data: {"type":"response.output_text.delta","delta":"x"}\n\n'
    + b"data: {not json\n\n"
    + _R_DELTA
    + _R_DONE,
    "error": _R_CREATED + _R_DELTA * 2 + _named(b"error", b'{"type":"error","message":"boom"}') + _R_DELTA,
    "error-no-space": _R_CREATED + _R_DELTA + b'event:error\ndata: {"type":"error","message":"x"}\n\n',
    "names-in-text": _R_CREATED
    + _named(b"response.output_text.delta", b'{"delta":"response.completed event: error"}') * 3
    + _R_DONE,
    "comments-blank-lines": _R_CREATED + (b": ping\n\n" + _R_DELTA + b"\n") * 3 + _R_DONE,
    "ids-first": _R_CREATED + (b"id: 7\n" + _R_DELTA) * 3 + _R_DONE,
    "no-space-names": _R_CREATED + _R_DELTA.replace(b"event: ", b"event:") * 3 + _R_DONE,
    "failed": _R_CREATED
    + _R_DELTA
    + _named(b"response.failed", b'{"type":"response.failed","response":{"error":{"message":"e"}}}'),
}


@pytest.mark.parametrize("name", RESPONSES_STREAMS + sorted(RESPONSES_SHAPES))
def test_responses_quiet_events_change_no_byte_and_no_result(name: str) -> None:
    body = RESPONSES_SHAPES[name] if name in RESPONSES_SHAPES else load_fixture(name).body
    assert RESPONSES_STREAMS
    for chunks in _chunkings(body):
        out, result = _run(OpenAIParser(False, responses=True, endpoint="responses"), chunks, False)
        loud_out, loud = _run(_Loud(False, responses=True, endpoint="responses"), chunks, False)
        assert out == loud_out == b"".join(chunks)
        assert result == loud


def test_responses_quiet_takes_deltas_and_stops_at_what_is_read() -> None:
    parser = OpenAIParser(False, responses=True, endpoint="responses")
    assert parser.quiet(_R_DELTA * 3) == (len(_R_DELTA) * 3, _R_DELTA * 3)
    assert parser.quiet(_R_DELTA * 2 + _R_DONE + _R_DELTA) == (len(_R_DELTA) * 2, _R_DELTA * 2)
    assert parser.quiet(b'data: {"type":"x"}\n\n' + _R_DELTA) == (0, b"")  # nameless: decoded

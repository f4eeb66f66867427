"""The SSE decoder against every split position of real provider streams."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproxy.sse import SSEDecoder, SSEEvent
from meterproxy.testing import FIXTURES_DIR, load_fixture

SSE_FIXTURES = sorted(
    p.stem for p in FIXTURES_DIR.glob("*.toml") if "event-stream" in load_fixture(p.stem).content_type
)


def decode(chunks: list[bytes]) -> tuple[list[SSEEvent], bytes]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    tail_events, tail = decoder.finish()
    return events + tail_events, tail


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_every_split_position_gives_the_same_events(name: str) -> None:
    body = load_fixture(name).body
    whole, _whole_tail = decode([body])
    assert whole, "fixture has events"
    for i in range(len(body) + 1):
        events, tail = decode([body[:i], body[i:]])
        assert [(e.event, e.data) for e in events] == [(e.event, e.data) for e in whole], i
        # Raw bytes of the events plus the tail rebuild the stream exactly.
        assert b"".join(e.raw for e in events) + tail == body, i


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_byte_by_byte(name: str) -> None:
    body = load_fixture(name).body
    events, _tail = decode([body[i : i + 1] for i in range(len(body))])
    assert [(e.event, e.data) for e in events] == [(e.event, e.data) for e in decode([body])[0]]


def test_line_endings_comments_multiline_and_leading_blank_lines() -> None:
    stream = b"\r\n\n: keep-alive\r\nevent: a\rdata: one\r\ndata:two\n\ndata: [DONE]\r\n\r\n"
    for i in range(len(stream) + 1):
        events, tail = decode([stream[:i], stream[i:]])
        assert [(e.event, e.data) for e in events] == [("a", b"one\ntwo"), (None, b"[DONE]")]
        assert tail == b""


def test_utf8_split_inside_a_character() -> None:
    payload = '{"text":"héllo ✓ 日本"}'.encode()
    stream = b"data: " + payload + b"\n\n"
    for i in range(len(stream) + 1):
        events, _ = decode([stream[:i], stream[i:]])
        assert events[0].text == payload.decode()


def test_stream_ending_without_blank_line_still_yields_last_event() -> None:
    events, _tail = decode([b"data: {}\n\ndata: last"])
    assert [e.data for e in events] == [b"{}", b"last"]


def test_event_name_alone_is_not_an_event_and_comment_tail_is_returned() -> None:
    events, tail = decode([b"event: ping\n\n: bye\n"])
    assert events == []
    # No event was dispatched, so every byte comes back as tail (nothing lost).
    assert tail == b"event: ping\n\n: bye\n"


def test_oversized_event_is_dropped_but_reported() -> None:
    from meterproxy import sse

    decoder = SSEDecoder()
    big = b"data: " + b"x" * (sse.MAX_EVENT_BYTES + 10)
    decoder.feed(big)
    assert decoder.oversized == 1
    assert decoder.dropped_raw == big
    events = decoder.feed(b"\n\ndata: ok\n\n")
    assert [e.data for e in events] == [b"ok"]


_LINES = [
    b"data: x",
    b"data:y",
    b'data: {"usage":null}',
    b"event: e",
    b": keep-alive",
    b"",
    b"id: 1",
    b"data",
]


@given(
    lines=st.lists(st.sampled_from(_LINES), max_size=30),
    endings=st.lists(st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"]), min_size=30, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    lf_only=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_fast_path_matches_the_line_scanner(
    lines: list[bytes], endings: list[bytes], cuts: list[int], lf_only: bool
) -> None:
    """Whole-event splitting (the fast path) gives exactly what line-by-line scanning gives."""
    if lf_only:  # the fast path's case; mixed endings check that it stands aside
        endings = [b"\n"] * len(endings)
    stream = b"".join(line + endings[i] for i, line in enumerate(lines))
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]

    class LineOnly(SSEDecoder):
        __slots__ = ()

        def _blocks(self, buf: bytes, pos: int, events: list[SSEEvent]) -> int:
            return pos

    def run(decoder: SSEDecoder) -> tuple[list[tuple[str | None, bytes, bytes]], bytes]:
        events = [e for c in chunks for e in decoder.feed(c)]
        more, tail = decoder.finish()
        return [(e.event, e.data, e.raw) for e in events + more], tail

    assert run(SSEDecoder()) == run(LineOnly())

"""Microseconds of `OpenAIParser.quiet` on an instant stream's whole run and on one paced event,
and of the tap on a 200-delta Anthropic stream and a 200-delta Responses stream (each in one
read, and one event per read).

An instant stream (an answer the upstream had ready) reaches the tap in one or two reads, so
`quiet` sees the whole run of content deltas at once: its cost is a few scans of ~48 KB for 200
events (bytes.find, count, replace), not per-event Python. One paced event is the other end.
Compare two checkouts with the same interpreter::

    PYTHONPATH=<checkout> python bench/quiet_bulk.py
"""

from __future__ import annotations

import timeit

from upstream import _stream_events  # the bench upstream's own bytes (bench/ is the script's dir)

from meterproxy.providers.anthropic import AnthropicParser
from meterproxy.providers.openai import OpenAIParser
from meterproxy.tap import ResponseTap
from meterproxy.testing import load_fixture


def main() -> None:
    events = _stream_events(200, True)
    run = b"".join(events[1:-2])  # past the first chunk (the model is known): deltas and the finish
    one = events[5]
    parser = OpenAIParser(True, responses=False, endpoint="chat")  # usage was injected
    parser._seen_model = True
    taken, out = parser.quiet(run)
    assert taken == len(run) and out == run.replace(b',"usage":null', b"")
    n = 3000
    bulk = min(timeit.repeat(lambda: parser.quiet(run), number=n, repeat=5)) / n * 1e6
    single = min(timeit.repeat(lambda: parser.quiet(one), number=n * 20, repeat=5)) / n / 20 * 1e6
    print(f"quiet: 200-event run ({len(run)} bytes) {bulk:.1f} us; one event {single:.2f} us")
    anthropic()
    responses()


def anthropic() -> None:
    """The recorded Anthropic stream with its content deltas made 200, through a whole tap."""
    body = load_fixture("anthropic_messages_stream").body
    head, _, rest = body.partition(b"event: content_block_delta")
    tail = b"event: content_block_stop" + rest.split(b"event: content_block_stop", 1)[1]
    delta = (
        b"event: content_block_delta\ndata: "
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" token"}}\n\n'
    )

    def tap(pieces: list[bytes]) -> None:
        t = ResponseTap(AnthropicParser(), sse=True)
        for piece in pieces:
            t.feed(piece)
        t.finish()
        assert t.result().usage is not None

    n = 300
    whole = [head + delta * 200 + tail]
    apart = [head] + [delta] * 200 + [tail]
    one_read = min(timeit.repeat(lambda: tap(whole), number=n, repeat=5)) / n * 1e6
    per_read = min(timeit.repeat(lambda: tap(apart), number=n, repeat=5)) / n * 1e6
    print(
        f"anthropic tap, 200 deltas: in one read {one_read:.0f} us ({one_read / 200:.2f} us an event); "
        f"one event per read {per_read:.0f} us ({per_read / 200:.2f} us an event)"
    )


def responses() -> None:
    """The recorded Responses stream (Codex CLI's API) with its text deltas made 200, through a tap."""
    body = load_fixture("openai_responses_stream").body
    start = body.index(b"event: response.output_text.delta")
    end = body.index(b"\n\n", start) + 2
    delta = body[start:end]

    def tap(pieces: list[bytes]) -> None:
        t = ResponseTap(OpenAIParser(False, responses=True, endpoint="responses"), sse=True)
        for piece in pieces:
            t.feed(piece)
        t.finish()
        assert t.result().usage is not None

    n = 300
    whole = [body[:start] + delta * 200 + body[end:]]
    apart = [body[:start]] + [delta] * 200 + [body[end:]]
    one_read = min(timeit.repeat(lambda: tap(whole), number=n, repeat=5)) / n * 1e6
    per_read = min(timeit.repeat(lambda: tap(apart), number=n, repeat=5)) / n * 1e6
    print(
        f"responses tap, 200 deltas: in one read {one_read:.0f} us ({one_read / 200:.2f} us an event); "
        f"one event per read {per_read:.0f} us ({per_read / 200:.2f} us an event)"
    )


if __name__ == "__main__":
    main()

"""Microseconds of `OpenAIParser.quiet` on an instant stream's whole run and on one paced event.

An instant stream (an answer the upstream had ready) reaches the tap in one or two reads, so
`quiet` sees the whole run of content deltas at once: its cost is a few scans of ~48 KB for 200
events (bytes.find, count, replace), not per-event Python. One paced event is the other end.
Compare two checkouts with the same interpreter::

    PYTHONPATH=<checkout> python bench/quiet_bulk.py
"""

from __future__ import annotations

import timeit

from upstream import _stream_events  # the bench upstream's own bytes (bench/ is the script's dir)

from meterproxy.providers.openai import OpenAIParser


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


if __name__ == "__main__":
    main()

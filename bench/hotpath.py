"""CPU cost of meterproxy's own stages, per request and per SSE event (no network).

The end-to-end matrix (`run.py`) says how much the proxy adds; this says where
meterproxy's own code spends it, stage by stage, with the same objects the
proxy builds: request inspection and usage injection, the `RequestRecord`,
pricing, the row conversion the writer does, and the tap over a whole
200-chunk OpenAI stream (pass-through, and rewrite mode where the proxy added
``include_usage``). Each figure is the best of several rounds of CPU time
(``time.process_time``), so other load on the machine inflates it less.

The SSE lines compare three ways through the tap, so each lever's effect is
re-measured on every run: content deltas taken in bulk (`OpenAIParser.quiet`:
whole events that carry no usage skip the decoder), every event decoded with the
decoder's whole-event fast path, and every event through the line-by-line
scanner (the decoder before its fast path existed).

Run ``python bench/hotpath.py``; prints and saves ``results/hotpath-latest.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upstream import _stream_events  # type: ignore[import-not-found]

from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.providers.openai import OpenAIParser, OpenAIProvider
from meterproxy.sse import SSEDecoder, SSEEvent
from meterproxy.store.schema import record_to_row
from meterproxy.tap import ResponseTap
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage

__all__ = ["main"]

PATH = "/v1/chat/completions"
BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"stream":true,"user":"u1"}'
)


class _LineOnly(SSEDecoder):
    """The decoder without its fast path: every line scanned on its own."""

    __slots__ = ()

    def _blocks(self, buf: bytes, pos: int, events: list[SSEEvent]) -> int:
        return pos


def best_us(fn: Callable[[], object], n: int, rounds: int = 7) -> float:
    """Best-of-``rounds`` CPU microseconds per call of ``fn`` (called ``n`` times per round)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, time.process_time() - t0)
    return round(best / n * 1e6, 2)


class _NoQuiet(OpenAIParser):
    """The parser without `quiet`: every event through the decoder (before the bulk skip)."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        if name == "quiet":
            raise AttributeError(name)
        return super().__getattribute__(name)


def _tap_stream(
    chunks: list[bytes], injected: bool, decoder: type[SSEDecoder], quiet: bool = True
) -> Callable[[], object]:
    def run() -> object:
        parser = OpenAIParser(injected, responses=False) if quiet else _NoQuiet(injected, responses=False)
        tap = ResponseTap(parser, sse=True, rewrite=injected)
        tap._decoder = decoder()
        for c in chunks:
            tap.feed(c)
        tap.finish()
        return tap.result()

    return run


def main() -> None:
    prov = OpenAIProvider()
    info = prov.inspect_request(PATH, BODY)
    book = PriceBook.default()
    price = price_record_with(book)
    record = make_record(usage=Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=200))
    record.cost_usd = None

    def new_record() -> RequestRecord:
        return RequestRecord(
            upstream="openai", provider="openai", endpoint="chat", method="POST", usage_source="missing"
        )

    per_request: dict[str, float] = {
        "inspect_request (orjson parse of the body)": best_us(
            lambda: prov.inspect_request(PATH, BODY), 20000
        ),
        "prepare_request (inject include_usage)": best_us(
            lambda: prov.prepare_request(PATH, BODY, info), 20000
        ),
        "RequestRecord() (id, timestamp)": best_us(new_record, 20000),
        "price the record (PriceBook)": best_us(lambda: price(record), 5000),
        "record_to_row (writer thread)": best_us(lambda: record_to_row(record), 20000),
        "JSON answer through the tap": best_us(
            lambda: _json_tap(prov, info),
            5000,
        ),
    }
    per_event: dict[str, Any] = {}
    for injected in (False, True):
        events = _stream_events(200, injected)
        body = b"".join(events)
        for chunking, chunks in (
            ("one event per read", events),
            ("whole stream in one read", [body]),
            ("1400-byte reads", [body[i : i + 1400] for i in range(0, len(body), 1400)]),
        ):
            mode = "rewrite" if injected else "pass-through"
            for name, decoder, quiet in (
                ("quiet deltas in bulk", SSEDecoder, True),
                ("every event decoded, fast path", SSEDecoder, False),
                ("every event decoded, line scanner", _LineOnly, False),
            ):
                us = best_us(_tap_stream(chunks, injected, decoder, quiet), 100) / len(events)
                per_event[f"{mode}, {chunking}, {name}"] = round(us, 2)
    result = {"per_request_us": per_request, "per_sse_event_us": per_event}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / "hotpath-latest.json").write_text(json.dumps({"stamp": stamp, **result}, indent=1))
    print(json.dumps(result, indent=1))


def _json_tap(prov: OpenAIProvider, info: Any) -> object:
    tap = ResponseTap(prov.new_parser(PATH, info, False), sse=False)
    tap.feed(_JSON)
    tap.finish()
    return tap.result()


_JSON = (
    b'{"id":"c","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}'
)

if __name__ == "__main__":
    main()

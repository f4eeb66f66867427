"""Per-request cost of pricing: the proxy's pricing function, cold (resolving) and warm (cached).

Pricing runs once per finished request (`Meter.request_finished`), on the event loop. With the
base layer a name is resolved by genai-prices' match rules (a scan of up to 923 OpenRouter
rules), so `PriceBook.lookup` caches the resolution per (price list, name). This measures:

- **warm**: what a request pays in steady state (cache hit, entry pick, one formula);
- **cold**: the same with the cache emptied before every call (what every request would pay
  without the cache);

over a mix of names real clients send (`tests/data/client_model_names.txt`), each through the
price list of its upstream, as the proxy does. Best of several rounds of CPU time.

Run ``python bench/pricing_bench.py``; prints µs per request and saves
``results/pricing-latest.json``. On a checkout without the layered book (before issue 15) it
measures that code's only path (no cache existed), for the before/after line in README.md.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage

ROOT = Path(__file__).resolve().parent.parent
NAMES = [
    tuple(line.split(None, 1))
    for line in (ROOT / "tests" / "data" / "client_model_names.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
ROUNDS = 5


def _records() -> list[RequestRecord]:
    out = []
    for plist, model in NAMES:
        r = make_record(model=model.strip(), upstream=plist, provider="openai")
        r.ts = datetime(2026, 11, 20, 12, tzinfo=UTC)
        r.usage = Usage(input_tokens=1290, cache_read_tokens=1152, output_tokens=212, reasoning_tokens=192)
        r.usage_source = "reported"
        out.append(r)
    return out


def _per_request_us(book: PriceBook, records: list[RequestRecord], cold: bool) -> float:
    price = price_record_with(book)
    cache = getattr(book, "_cache", None)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for r in records:
            if cold and cache is not None:
                cache.clear()
            price(r)
        best = min(best, time.process_time() - start)
    return best / len(records) * 1e6


def main() -> None:
    book = PriceBook.default()
    records = _records()
    price_record_with(book)(records[0])  # load lazily-built state outside the timing
    priced = 0
    for r in records:
        price_record_with(book)(r)
        priced += r.cost_usd is not None
    result = {
        "names": len(records),
        "priced": priced,
        "cached": hasattr(book, "_cache"),
        "warm_us_per_request": round(_per_request_us(book, records, cold=False), 2),
        "cold_us_per_request": round(_per_request_us(book, records, cold=True), 2),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "pricing-latest.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

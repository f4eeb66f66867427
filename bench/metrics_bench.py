"""What the Prometheus metrics cost: the meter sink per request, and one scrape.

The sink (`Metrics.request_finished`) runs on the event loop once per request;
a scrape renders every series on the event loop too. Both are measured here
with the cardinality bounded labels allow at their defaults: every model of
the price table plus 20 unknown ones and ``other``, several upstreams, all
status classes and token types. Times are CPU seconds of this process
(``time.process_time``), so other load on the machine does not inflate them.

    python bench/metrics_bench.py [--records 200000] [--multiprocess]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meterproxy.pricing import PriceBook
from meterproxy.testing import make_record
from meterproxy.usage import Usage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--multiprocess", action="store_true", help="prometheus_client multi-process mode")
    parser.add_argument("--uniform", action="store_true", help="every request alike, as in run.py")
    args = parser.parse_args()
    if args.multiprocess:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-bench-")
    from prometheus_client import CollectorRegistry, values

    values.ValueClass = values.get_value_class()
    from meterproxy.metrics import Metrics

    book = PriceBook.default()
    metrics = Metrics(CollectorRegistry(), book=book)
    rng = random.Random(1)
    models = [*book.models(), *(f"unknown-model-{i}" for i in range(40))]
    upstreams = ["openai", "anthropic", "gemini", "groq", "vllm", "openrouter"]
    statuses = [200, 200, 200, 200, 200, 400, 429, 500, 502, None]
    records = []
    for i in range(2_000):
        model = models[0 if args.uniform else i % len(models)]
        record = make_record(
            model=model,
            upstream=upstreams[0] if args.uniform else rng.choice(upstreams),
            usage=Usage(
                input_tokens=rng.randint(10, 5000),
                cache_read_tokens=rng.randint(0, 10),
                cache_write_tokens=rng.randint(0, 10),
                output_tokens=rng.randint(1, 900),
                reasoning_tokens=rng.randint(0, 1),
            ),
        )
        record.status = 200 if args.uniform else rng.choice(statuses)
        record.cost_usd = None if model.startswith("unknown") else Decimal("0.000123")
        record.duration_ms, record.ttfb_ms, record.upstream_ms = 800.0, 150.0, 798.5
        records.append(record)

    n = args.records
    started = time.process_time()
    for i in range(n):
        metrics.request_finished(records[i % len(records)])
    per_record_us = (time.process_time() - started) / n * 1e6

    scrape_ms = []
    size = 0
    for _ in range(20):
        t = time.process_time()
        body, _ = metrics.render("")
        scrape_ms.append((time.process_time() - t) * 1000)
        size = len(body)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    mode = "multi-process" if args.multiprocess else "single-process"
    mode += ", uniform requests" if args.uniform else ""
    print(f"mode: {mode}; python {sys.version.split()[0]}")
    print(f"sink: {per_record_us:.1f} us per request ({n} requests)")
    print(
        f"scrape: median {statistics.median(scrape_ms):.1f} ms, max {max(scrape_ms):.1f} ms;"
        f" {series} samples, {size / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()

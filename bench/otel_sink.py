"""The OpenTelemetry sink's cost on the event loop, per request: build a record's row, encode its batch.

What `meterproxy.otel.OtelSink` does on the loop for each finished request is `record_fields`,
and once per batch (every 0.5 s) one ``orjson.dumps`` of the whole batch. This times exactly
that, in-process, on records shaped like real ones: the minimum over ``--repeats`` runs of
``--batch`` records (the minimum is the cost itself; anything above it is the machine's
other load). Run it against two trees to compare designs:

    PYTHONPATH=/path/to/tree python bench/otel_sink.py [--batch 200] [--repeats 200]

Prints one JSON line: microseconds per record (row, encode, both) and encoded bytes per record.
"""

from __future__ import annotations

import argparse
import json
import time
from decimal import Decimal

import orjson

from meterproxy.otel import record_fields
from meterproxy.testing import make_record
from meterproxy.usage import Usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=200, help="records per batch (0.5 s at 3,000 req/s: 1500)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    records = []
    for i in range(args.batch):
        r = make_record(
            model="gpt-4o-mini", usage=Usage(input_tokens=1200 + i, cache_read_tokens=1024, output_tokens=87)
        )
        r.cost_usd = Decimal("0.0002321") + i
        r.duration_ms, r.user, r.session = 412.5, "alice", f"s-{i % 7}"
        r.key_fingerprint, r.status = "fp_0a1b2c3d", 200
        records.append(r)
    best_row = best_encode = float("inf")
    size = 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rows = [record_fields(r) for r in records]
        t1 = time.perf_counter()
        line = orjson.dumps(rows) + b"\n"
        t2 = time.perf_counter()
        best_row, best_encode = min(best_row, t1 - t0), min(best_encode, t2 - t1)
        size = len(line)
    n = args.batch
    print(
        json.dumps(
            {
                "row_us": round(best_row * 1e6 / n, 3),
                "encode_us": round(best_encode * 1e6 / n, 3),
                "total_us": round((best_row + best_encode) * 1e6 / n, 3),
                "bytes_per_record": round(size / n, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

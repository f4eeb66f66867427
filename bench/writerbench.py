"""The SQLite writer on its own: sustained rows/s, and what a stalled disk does to the loop.

1. **Throughput**: N priced records (a real `RequestRecord` each, as the proxy
   builds them) are submitted from an asyncio loop as fast as it can; the
   writer thread batches whatever has queued into one transaction. Reports
   rows/s from first submit to the last commit, and the loop-side cost of one
   ``submit`` call in microseconds.
2. **Stalled disk**: the writer thread is held inside a write transaction for
   ``--stall`` seconds (a ``call`` that sleeps, which is what a disk that does
   not answer an fsync looks like to the writer) while the loop keeps
   submitting records at a steady rate. Reports the worst event-loop lag (a
   10 ms ticker) and the worst ``submit`` time during the stall (responses
   would wait on these), and how long the rows waited (they are what waits).

Run ``python bench/run.py --writer`` (or ``python bench/writerbench.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

__all__ = ["main", "stall", "throughput"]

from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage


def _records(n: int) -> list[RequestRecord]:
    out = []
    for i in range(n):
        r = make_record(usage=Usage(input_tokens=100 + i % 50, output_tokens=20, cache_read_tokens=10))
        r.cost_usd = Decimal("0.0000315")
        r.priced_model = "gpt-4o-mini"
        r.duration_ms, r.ttfb_ms, r.upstream_ms = 12.5, 3.25, 11.0
        r.tags = {"team": "bench"}
        r.user = "bench-user"
        out.append(r)
    return out


async def throughput(n: int, db: str) -> dict[str, Any]:
    records = _records(n)
    writer = StoreWriter(db, queue_max=n + 1)
    writer.start()
    t0 = time.perf_counter()
    for i, r in enumerate(records):
        writer.submit(r)
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the loop breathe, as a proxy would
    submitted = time.perf_counter()
    while writer.written < n:
        await asyncio.sleep(0.001)
    done = time.perf_counter()
    writer.close()
    return {
        "rows": n,
        "rows_per_s": round(n / (done - t0)),
        "submit_us_per_record": round((submitted - t0) / n * 1e6, 2),
        "seconds": round(done - t0, 3),
        "dropped": writer.dropped,
    }


async def stall(db: str, stall_s: float, rate: int) -> dict[str, Any]:
    writer = StoreWriter(db, queue_max=1_000_000)
    writer.start()
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append((loop.time() - t - 0.01) * 1000)

    tick = asyncio.create_task(ticker())
    blocked = writer.call(lambda conn: time.sleep(stall_s))
    records = _records(int(rate * stall_s))
    worst_submit = 0.0
    t0 = time.perf_counter()
    for i, r in enumerate(records):
        s = time.perf_counter()
        writer.submit(r)
        worst_submit = max(worst_submit, time.perf_counter() - s)
        # a steady arrival rate across the stall
        target = t0 + (i + 1) / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    while not blocked.done():
        await asyncio.sleep(0.005)
    while writer.written < len(records):
        await asyncio.sleep(0.005)
    rows_done = time.perf_counter()
    stop = True
    await tick
    writer.close()
    return {
        "stall_s": stall_s,
        "records_during_stall": len(records),
        "worst_loop_lag_ms": round(max(lags), 2),
        "worst_submit_us": round(worst_submit * 1e6, 1),
        "rows_committed_after_s": round(rows_done - t0, 3),
        "dropped": writer.dropped,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--stall", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=5_000, help="records/s submitted during the stall")
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if a != "--writer"])
    import gc

    import uvloop

    # As `meterproxy serve` does once the app has started (meterproxy/runtime.py): without it a
    # full collection walks every module this process imported (~30-40 ms here, measured), which
    # the proxy never pays; the records created below are still collected as they would be there.
    gc.freeze()
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        result = {
            "throughput": uvloop.run(throughput(args.rows, str(Path(tmp) / "t.db"))),
            "stall": uvloop.run(stall(str(Path(tmp) / "s.db"), args.stall, args.rate)),
        }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    for name in (f"writer-{stamp}.json", "writer-latest.json"):
        (out / name).write_text(json.dumps({"stamp": stamp, **result}, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

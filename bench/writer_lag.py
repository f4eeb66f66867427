"""How long the store writer thread makes the event loop wait for the GIL.

The loop and the writer thread share one GIL. A loop task ticks every 1 ms
while records are submitted at a steady ``--rate`` (default 4,000/s, a busy
proxy worker) for ``--records``; the lag of each tick past its 1 ms is the
time the loop could not run. ``--no-writer`` submits nothing, for the floor
that the machine itself gives. Prints one JSON line: lag p50/p99/p99.9/max in
milliseconds. Pin it to one core as the proxy is (``taskset -c 1``), and run
old and new code alternately (``PYTHONPATH=<tree>``): the VM is noisy.

    taskset -c 1 python bench/writer_lag.py
    taskset -c 1 python bench/writer_lag.py --no-writer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record


async def run(rate: int, n: int, writer_on: bool) -> dict[str, float | int | bool]:
    writer = StoreWriter(os.path.join(tempfile.mkdtemp(), "lag.db"))
    writer.start()
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t - 0.001) * 1000)

    tick = asyncio.create_task(ticker())
    records = [make_record() for _ in range(n)]
    t0 = time.perf_counter()
    for i, record in enumerate(records):
        if writer_on:
            writer.submit(record)
        delay = t0 + (i + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    stop = True
    await tick
    writer.close()
    lags.sort()

    def q(p: float) -> float:
        return round(lags[min(len(lags) - 1, int(len(lags) * p))], 3)

    return {"writer": writer_on, "rate": rate, "ticks": len(lags), "p50_ms": q(0.5), "p99_ms": q(0.99),
            "p999_ms": q(0.999), "max_ms": round(lags[-1], 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=4000)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--no-writer", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args.rate, args.records, not args.no_writer))))


if __name__ == "__main__":
    main()

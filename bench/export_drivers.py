"""Does apsw earn its place? The SQLite export's child process with each driver, same database, same bytes.

The child (``store/export_child.py``) formats every line in SQLite; apsw brings
its own, newer SQLite (3.54), the standard ``sqlite3`` module uses the
system's (3.40 on Debian 12). This times the whole export of ``--rows`` rows
(built by `store_bench.build` if the file is missing) with each driver,
alternately, and reports the child's CPU seconds per run (the figure that
travels on a shared machine) and the wall time, and checks both outputs are
byte-identical.

    python bench/export_drivers.py --rows 1000000 --db /tmp/meterproxy-export-1m.db --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_bench import build

from meterproxy.store.export_process import ExportProcess
from meterproxy.store.queries import RequestFilter


async def one(db: str, fmt: str, driver: str) -> tuple[float, float, str, int]:
    k0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    digest, size = hashlib.sha256(), 0
    proc = await ExportProcess.start(db, RequestFilter(), fmt, driver=driver)
    try:
        while chunk := await proc.read():
            digest.update(chunk)
            size += len(chunk)
    finally:
        await proc.close()
    k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)
    return cpu, time.perf_counter() - t0, digest.hexdigest(), size


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--db", default="/tmp/meterproxy-export-1m.db")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(args.db):
        print(json.dumps(build(args.db, args.rows, 30, datetime(2026, 11, 24, tzinfo=UTC))), file=sys.stderr)
    out: dict[str, dict[str, object]] = {}
    for fmt in ("csv", "jsonl"):
        cpu: dict[str, list[float]] = {"sqlite3": [], "apsw": []}
        wall: dict[str, list[float]] = {"sqlite3": [], "apsw": []}
        digests: set[str] = set()
        for _ in range(args.runs):
            for driver in ("sqlite3", "apsw"):
                c, w, d, size = await one(args.db, fmt, driver)
                cpu[driver].append(c)
                wall[driver].append(w)
                digests.add(d)
        out[fmt] = {
            "bytes": size,
            "same_bytes": len(digests) == 1,
            **{f"{d}_child_cpu_s": round(statistics.median(v), 2) for d, v in cpu.items()},
            **{f"{d}_wall_s": round(statistics.median(v), 2) for d, v in wall.items()},
            "load": os.getloadavg()[0],
        }
        print(json.dumps({fmt: out[fmt]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

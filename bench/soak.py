"""Memory soak: meterproxy's RSS over a long run (``python bench/run.py --memory 200000``).

The same fake upstream and load generator as the matrix, pinned the same way.
The load runs in rounds of 10,000 requests (alternating JSON and 20-chunk
streams at concurrency 64, so both paths and the store writer are exercised);
after each round the proxy's RSS (every worker) is read from ``/proc``. Flat
means: after the first two rounds (warm-up: imports, pools, SQLite page
cache, allocator arenas) the RSS grows by less than a few MB over the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from run import BENCH, Direct, MeterProxy, free_port, rss_mb, save

__all__ = ["soak"]

ROUND = 10_000


def soak(total: int, *, proxy_cores: str, load_cores: str, workers: int) -> dict[str, Any]:
    up_port = free_port()
    upstream = Direct(up_port)
    upstream._spawn([sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], load_cores)
    proxy = MeterProxy(free_port(), up_port, proxy_cores, workers)
    proxy.start()
    series: list[dict[str, Any]] = []
    done = errors = 0
    t0 = time.monotonic()
    try:
        pids = [p for p in proxy.pids() if rss_mb([p])]
        series.append({"requests": 0, "rss_mb": rss_mb(pids)})
        i = 0
        while done < total:
            n = min(ROUND, total - done)
            cmd = ["taskset", "-c", load_cores, sys.executable, str(BENCH / "loadgen.py")]
            cmd += ["--port", str(proxy.port), "--path", proxy.path, "--concurrency", "64"]
            cmd += ["--duration", "600", "--warmup", "0", "--max-requests", str(n)]
            if i % 2:
                cmd += ["--stream", "--chunks", "20"]
            out = json.loads(subprocess.run(cmd, capture_output=True, check=True, timeout=700).stdout)
            done += int(out["completed_total"])
            errors += int(out["errors"])
            series.append({"requests": done, "rss_mb": rss_mb(pids), "rps": out["rps"]})
            print(f"{done:>8} requests  rss {series[-1]['rss_mb']} MB  {out['rps']} req/s", flush=True)
            i += 1
        time.sleep(1.0)
        rows = proxy.rows()
    finally:
        proxy.stop()
        upstream.stop()
    per_worker_peak = max(max(s["rss_mb"]) for s in series if s["rss_mb"])
    warm = series[min(2, len(series) - 1)]["rss_mb"]
    growth = round(sum(series[-1]["rss_mb"]) - sum(warm), 1)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = {
        "stamp": stamp,
        "command": f"python bench/run.py --memory {total}" + (f" --workers {workers}" if workers > 1 else ""),
        "requests": done,
        "errors": errors,
        "rows_recorded": rows,
        "seconds": round(time.monotonic() - t0, 1),
        "peak_rss_mb_per_worker": per_worker_peak,
        "growth_after_warmup_mb": growth,
        "series": series,
    }
    path = save(result, "memory")
    print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=1))
    print(f"saved {path}")
    return result

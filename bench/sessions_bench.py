"""The page's session list at the issue's scale: ``GET /api/sessions`` over 30 days of 80,000 requests.

1. **Build** (once; reused while the file exists): `meterproxy.demo.write_demo`
   with 80,000 requests over 38 days and 7,400 sessions (13 model names on 4
   providers, 6 users, errors, budget blocks, unpriced models, imports), written
   by the store's own writer and rolled up, as ``meterproxy demo`` does.
2. **Serve**: the real application (`create_app`) on 127.0.0.1, the client in
   the same process (HTTP over loopback included in every time).
3. **Measure** (median and worst of ``--repeat`` runs after one warm-up) the
   requests the page makes for a 30-day range: the sessions card
   (``limit=1``), the table's first page by last seen and by cost, a filtered
   page (``user=ali*``, prefix), a session's detail, the most expensive
   requests (``/api/requests?sort=cost``), and ``/api/summary``; then the same
   session list again with ``If-None-Match`` (the 30 s refresh of an unchanged range).
   Each case records wall time and this process's CPU time (server, query
   thread and client together): on a shared machine the wall time grows with
   the load average (recorded), the CPU time does not.

Results go to ``bench/results/sessions-<stamp>.json`` and ``sessions-latest.json``.

    python bench/sessions_bench.py                      # builds /tmp/meterproxy-sessions-80k.db once
    python bench/sessions_bench.py --repeat 21
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meterproxy.app import create_app
from meterproxy.demo import DemoShape, write_demo
from meterproxy.settings import load_settings
from meterproxy.timestamps import format_ts

__all__ = ["main", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"


async def _timed(
    session: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    repeat: int,
    headers: dict[str, str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    body: Any = None
    times: list[float] = []
    cpu: list[float] = []
    for i in range(repeat + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        async with session.get(url, params=params, headers=headers or {}) as resp:
            status = resp.status
            body = await resp.read()
        if i:  # the first run warms the page cache
            times.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - cpu_start) * 1000)
    stats = {
        "status": status,
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        # CPU of this process (server, query thread and client): the figure a shared machine cannot inflate.
        "cpu_median_ms": round(statistics.median(cpu), 1),
        "runs": repeat,
        "bytes": len(body),
    }
    return (json.loads(body) if body else None), stats


async def measure(db: str, repeat: int) -> dict[str, Any]:
    settings = load_settings(None, cli={"db": db, "retention_days": 0, "rollup_interval": 3600}, env={})
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    now = datetime.now(UTC)
    rng = {"since": format_ts(now - timedelta(days=30)), "until": format_ts(now + timedelta(hours=1))}
    out: dict[str, Any] = {"range": rng}
    try:
        async with aiohttp.ClientSession() as session:
            cases = {
                "sessions_card_limit_1": ("/api/sessions", {**rng, "limit": "1"}),
                "sessions_page_last_seen": ("/api/sessions", {**rng, "limit": "10"}),
                "sessions_page_by_cost": ("/api/sessions", {**rng, "limit": "10", "sort": "cost"}),
                "sessions_user_prefix": ("/api/sessions", {**rng, "limit": "10", "user": "ali*"}),
                "requests_most_expensive": ("/api/requests", {**rng, "limit": "20", "sort": "cost"}),
                "summary": ("/api/summary", rng),
            }
            for name, (path, params) in cases.items():
                body, out[name] = await _timed(session, base + path, params, repeat)
                if path == "/api/sessions":
                    out[name]["total_sessions"] = body["total"]
                if name == "sessions_page_by_cost":
                    top = body["sessions"][0]["session"]
            _, out["session_detail_100"] = await _timed(
                session, f"{base}/api/sessions/{top}", {**rng, "limit": "100"}, repeat
            )
            async with session.get(base + "/api/sessions", params={**rng, "limit": "10"}) as resp:
                etag = resp.headers["ETag"]
            _, out["sessions_page_304"] = await _timed(
                session, base + "/api/sessions", {**rng, "limit": "10"}, repeat, {"If-None-Match": etag}
            )
    finally:
        await runner.cleanup()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", default="/tmp/meterproxy-sessions-80k.db")
    parser.add_argument("--rows", type=int, default=80_000)
    parser.add_argument("--days", type=int, default=38)
    parser.add_argument("--sessions", type=int, default=7_400)
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()
    build_s = None
    if not os.path.exists(args.db):
        start = time.perf_counter()
        write_demo(args.db, DemoShape(args.rows, args.days, args.sessions, seed=18))
        build_s = round(time.perf_counter() - start, 1)
    results = {
        "bench": "sessions",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "db": args.db,
        "rows": args.rows,
        "days": args.days,
        "sessions": args.sessions,
        "build_s": build_s,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "cases": asyncio.run(measure(args.db, args.repeat)),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2)
    (RESULTS / f"sessions-{stamp}.json").write_text(text)
    (RESULTS / "sessions-latest.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

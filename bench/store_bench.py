"""The read side at scale: a month's summary and a 30-day CSV export on a 10-million-row database.

1. **Build** (once; reused while the file exists): ``--rows`` requests spread
   evenly over ``--days`` days ending at ``--end``, in the real schema (the app's
   own migrations), generated inside SQLite by one recursive CTE per million rows
   (no Python per row): 12 models on 4 providers (one unpriced), 50 users each
   with its own key, sessions of 40 requests, tags, 1 % errors, exact
   ``cost_usd``/``cost_pico`` pairs. Then the rollups are built with the same
   `roll_up` the proxy runs, and timed.
2. **Serve**: the real application (`create_app`) on 127.0.0.1, the benchmark's
   aiohttp client in the same process (HTTP over loopback included in every time).
3. **Measure** (median and worst of ``--repeat`` runs after one warm-up):
   ``GET /api/summary`` for the last full calendar month grouped by model (the
   response also carries the unpriced-models list, a second query), the same for
   an unaligned 30-day window ending now-ish (raw partial hours + hourly + daily
   rollups), and ``GET /api/export`` of that month as CSV (``--repeat``/5 runs,
   at least 2) and JSON Lines (2 runs), read to the last byte, with the process's
   RSS before and after; then the CSV export without HTTP (the child process's
   pipe read and dropped). Each export records the CPU seconds of this process
   (server and client) and of the export's child process, and the load average:
   the machine is shared, so CPU per row is the figure that travels.
4. **Check**: the month's summary totals equal ``SUM()`` over the raw rows.

Results go to ``bench/results/store-<stamp>.json`` and ``store-latest.json``.

    python bench/store_bench.py                       # build 10M rows in /tmp (~7 min, once)
    python bench/store_bench.py                       # then measure, in a fresh process
    python bench/store_bench.py --rows 1000000 --db /tmp/store-1m.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sqlite3
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
from meterproxy.settings import load_settings
from meterproxy.store.backend import apply_migrations
from meterproxy.store.export_process import ExportProcess
from meterproxy.store.queries import RequestFilter
from meterproxy.store.rollups import roll_up
from meterproxy.store.sqlite import connect_sqlite

__all__ = ["build", "main", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 1_000_000

# model, provider, upstream, input and output price in picodollars per token (None: unpriced)
MODELS = [
    ("gpt-4o", "openai", "openai", 2_500_000, 10_000_000),
    ("gpt-4o-mini", "openai", "openai", 150_000, 600_000),
    ("o4-mini", "openai", "openai", 1_100_000, 4_400_000),
    ("gpt-4.1", "openai", "openai", 2_000_000, 8_000_000),
    ("claude-sonnet-4-5", "anthropic", "anthropic", 3_000_000, 15_000_000),
    ("claude-haiku-4-5", "anthropic", "anthropic", 1_000_000, 5_000_000),
    ("claude-opus-4-1", "anthropic", "anthropic", 15_000_000, 75_000_000),
    ("gemini-2.5-flash", "gemini", "gemini", 300_000, 2_500_000),
    ("gemini-2.5-pro", "gemini", "gemini", 1_250_000, 10_000_000),
    ("llama-3.3-70b-versatile", "openai", "groq", 590_000, 790_000),
    ("deepseek-chat", "openai", "deepseek", 270_000, 1_100_000),
    ("my-finetune-v3", "openai", "vllm", None, None),
]

_INSERT = """
WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?),
g AS (
    -- A Lehmer hash of x, not random(): SQLite re-evaluates random() at every reference.
    SELECT x, ((x + 1) * 48271 % 2147483647) * 16807 % 2147483647 AS r, ? + x * ? AS t FROM c
),
h AS (
    SELECT g.x, g.t, g.r, m.*, (g.r / 12) % 50 AS u,
           100 + (g.r / 600) % 6000 AS inp, (g.r / 7) % 400 AS cached,
           5 + (g.r / 11) % 900 AS outp
    FROM g JOIN bench_models m ON m.i = g.r % 12
)
INSERT INTO requests (id, ts, source, upstream, provider, endpoint, method, requested_model, model,
    priced_model, status, streamed, input_tokens, cache_read_tokens, cache_write_tokens, output_tokens,
    reasoning_tokens, cost_usd, cost_pico, usage_source, duration_ms, ttfb_ms, upstream_ms, user, session,
    tags, key_fingerprint, error)
SELECT printf('b%012d', x),
       strftime('%Y-%m-%dT%H:%M:%S', t / 1000000, 'unixepoch') || printf('.%06dZ', t % 1000000),
       'proxy', upstream, provider, 'chat', 'POST', model, model,
       CASE WHEN in_pp IS NULL THEN NULL ELSE model END,
       CASE WHEN r % 100 = 7 THEN 429 ELSE 200 END, r % 3 = 0,
       inp, min(cached, inp), 0, outp, CASE WHEN model LIKE 'o4%' THEN outp / 2 ELSE 0 END,
       CASE WHEN in_pp IS NULL THEN NULL
            ELSE printf('%d.%012d', (inp * in_pp + outp * out_pp) / 1000000000000,
                                    (inp * in_pp + outp * out_pp) % 1000000000000) END,
       inp * in_pp + outp * out_pp,
       'reported', 200.0 + r % 5000, 50.0 + r % 700, 190.0 + r % 4900,
       'user' || u, 'sess-' || (x / 40),
       CASE r % 4 WHEN 0 THEN '{}' WHEN 1 THEN '{"team":"search"}' WHEN 2 THEN '{"team":"ads"}'
            ELSE '{"env":"prod","team":"infra"}' END,
       printf('%016x', u * 2654435761), CASE WHEN r % 100 = 7 THEN 'rate_limited' END
FROM h
"""


def build(db: str, rows: int, days: int, end: datetime) -> dict[str, Any]:
    store = connect_sqlite(db)
    apply_migrations(store)
    conn = store.raw  # the generator below is SQLite's own SQL
    conn.row_factory = None
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    conn.execute(
        "CREATE TEMP TABLE bench_models (i INTEGER PRIMARY KEY, model, provider, upstream, in_pp, out_pp)"
    )
    conn.executemany(
        "INSERT INTO bench_models VALUES (?, ?, ?, ?, ?, ?)", [(i, *m) for i, m in enumerate(MODELS)]
    )
    start_us = int((end - timedelta(days=days)).timestamp() * 1_000_000)
    step_us = days * 86_400_000_000 // rows
    t0 = time.perf_counter()
    for lo in range(0, rows, CHUNK):
        conn.execute("BEGIN")
        conn.execute(_INSERT, [lo, min(lo + CHUNK, rows), start_us, step_us])
        conn.execute("COMMIT")
        print(f"  {min(lo + CHUNK, rows):>11,} rows  {time.perf_counter() - t0:6.1f} s", file=sys.stderr)
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        with store.transaction():
            n = roll_up(store, batch=CHUNK)
        if not n:
            break
    rollup_s = time.perf_counter() - t0
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sizes = {
        t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("requests", "rollup_hour", "rollup_day")
    }
    conn.close()
    return {"insert_s": round(insert_s, 1), "rollup_s": round(rollup_s, 1), "table_rows": sizes}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _timed_json(session: aiohttp.ClientSession, url: str, params: dict[str, str], repeat: int) -> Any:
    times = []
    body: Any = None
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        async with session.get(url, params=params) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        if i:  # the first run warms the page cache
            times.append((time.perf_counter() - t0) * 1000)
    return body, {
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "runs": repeat,
    }


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _runs_summary(
    walls: list[float], parent: list[float], child: list[float], lines: int, size: int
) -> dict[str, Any]:
    rows = max(1, lines)
    return {
        "median_ms": round(statistics.median(walls) * 1000, 1),
        "max_ms": round(max(walls) * 1000, 1),
        "runs": len(walls),
        "rows": lines,
        "mb": round(size / 1e6, 1),
        # CPU of this process (server, and the client: same process) and of the export's child
        # process, per run: what the export costs whatever else the machine runs.
        "cpu_s_this_process": round(statistics.median(parent), 2),
        "cpu_s_child_process": round(statistics.median(child), 2),
        "cpu_us_per_row": round((statistics.median(parent) + statistics.median(child)) / rows * 1e6, 2),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


async def _timed_export(
    session: aiohttp.ClientSession, url: str, params: dict[str, str], runs: int
) -> dict[str, Any]:
    """``GET /api/export`` read to the last byte ``runs`` times (after one warm-up)."""
    walls, parent, child = [], [], []
    size = lines = 0
    for i in range(runs + 1):
        c0, k0, t0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
        size = lines = 0
        async with session.get(url, params=params) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(1 << 20):
                size += len(chunk)
                lines += chunk.count(b"\n")
        if i:  # the first run warms the page cache
            walls.append(time.perf_counter() - t0)
            parent.append(_cpu(resource.RUSAGE_SELF) - c0)
            child.append(_cpu(resource.RUSAGE_CHILDREN) - k0)
    # CSV has a header line; JSON Lines has none.
    return _runs_summary(walls, parent, child, lines - (params["format"] == "csv"), size)


async def _direct_export(db: str, month: tuple[str, str], runs: int) -> dict[str, Any]:
    """The export path without HTTP: the child process's bytes read from its pipe and dropped."""
    walls, parent, child = [], [], []
    size = lines = 0
    for i in range(runs + 1):
        c0, k0, t0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
        size = lines = 0
        proc = await ExportProcess.start(db, RequestFilter(since=month[0], until=month[1]), "csv")
        try:
            while chunk := await proc.read():
                size += len(chunk)
                lines += chunk.count(b"\n")
        finally:
            await proc.close()
        if i:
            walls.append(time.perf_counter() - t0)
            parent.append(_cpu(resource.RUSAGE_SELF) - c0)
            child.append(_cpu(resource.RUSAGE_CHILDREN) - k0)
    return _runs_summary(walls, parent, child, lines, size)


async def measure(db: str, repeat: int, month: tuple[str, str], window: tuple[str, str]) -> dict[str, Any]:
    settings = load_settings(None, cli={"db": db, "retention_days": 0, "rollup_interval": 3600}, env={})
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            body, out["summary_month_by_model"] = await _timed_json(
                session,
                f"{base}/api/summary",
                {"since": month[0], "until": month[1], "group_by": "model"},
                repeat,
            )
            out["summary_month_by_model"].update(
                range=list(month), requests=body["totals"]["requests"], groups=len(body["groups"])
            )
            month_totals = body["totals"]
            body, out["summary_30d_unaligned_by_model"] = await _timed_json(
                session,
                f"{base}/api/summary",
                {"since": window[0], "until": window[1], "group_by": "model"},
                repeat,
            )
            out["summary_30d_unaligned_by_model"].update(
                range=list(window), requests=body["totals"]["requests"]
            )
            body, out["summary_month_by_day_and_user"] = await _timed_json(
                session,
                f"{base}/api/summary",
                {"since": month[0], "until": month[1], "group_by": "day,user"},
                repeat,
            )
            out["summary_month_by_day_and_user"].update(groups=len(body["groups"]))

            # The figure is for 1.5 million rows: the first 1,500,000 of the month.
            ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            (until_15m,) = ro.execute(
                "SELECT ts FROM requests WHERE ts >= ? ORDER BY ts LIMIT 1 OFFSET 1500000", [month[0]]
            ).fetchone()
            ro.close()
            out["export_csv_1_5m_rows"] = await _timed_export(
                session,
                f"{base}/api/export",
                {"format": "csv", "since": month[0], "until": until_15m},
                max(3, repeat // 5),
            )
            out["export_csv_1_5m_rows"].update(range=[month[0], until_15m])
            rss_before = _rss_mb()
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            for fmt, runs in (("csv", max(2, repeat // 5)), ("jsonl", 2)):
                out[f"export_{fmt}_month"] = await _timed_export(
                    session, f"{base}/api/export", {"format": fmt, "since": month[0], "until": month[1]}, runs
                )
            out["export_csv_month"].update(
                rss_mb_before=round(rss_before, 1),
                rss_mb_after=round(_rss_mb(), 1),
                peak_rss_mb_before=round(peak_before, 1),
                peak_rss_mb_after=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            )
    finally:
        await runner.cleanup()
    out["export_csv_month_no_http"] = await _direct_export(db, month, max(2, repeat // 5))

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    row = conn.execute(
        "SELECT count(*), sum(input_tokens), sum(output_tokens), sum(cost_pico) FROM requests "
        "WHERE ts >= ? AND ts < ?",
        [month[0], month[1]],
    ).fetchone()
    conn.close()
    from decimal import Decimal

    out["check_month_totals_equal_sql"] = (
        month_totals["requests"] == row[0]
        and month_totals["input_tokens"] == row[1]
        and month_totals["output_tokens"] == row[2]
        and Decimal(str(month_totals["cost_usd"])) == Decimal(row[3]).scaleb(-12)
    )
    return out


def _child_sqlite() -> str:
    """The SQLite the export's child process uses: apsw's when installed, else the standard one."""
    try:
        import apsw
    except ImportError:
        return f"sqlite3 {sqlite3.sqlite_version}"
    return f"apsw {apsw.sqlite_lib_version()}"


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--days", type=int, default=182)
    p.add_argument("--end", default="2026-11-24T00:00:00+00:00", help="ts of the newest generated row")
    p.add_argument("--db", default="/tmp/meterproxy-store-bench-10m.db")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args(argv)

    end = datetime.fromisoformat(args.end)
    result: dict[str, Any] = {
        "bench": "store",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "sqlite_export_child": _child_sqlite(),
        },
        "rows": args.rows,
        "days": args.days,
    }
    if args.rebuild:
        for suffix in ("", "-wal", "-shm"):
            Path(args.db + suffix).unlink(missing_ok=True)
    sidecar = Path(args.db + ".build.json")
    if not Path(args.db).exists():
        print(f"building {args.rows:,} rows over {args.days} days in {args.db}", file=sys.stderr)
        sidecar.write_text(json.dumps(build(args.db, args.rows, args.days, end)))
        print("built; measure in a fresh process: run again without --rebuild", file=sys.stderr)
        return 0
    if sidecar.exists():
        result["build"] = json.loads(sidecar.read_text())
    result["db_mb"] = round(Path(args.db).stat().st_size / 1e6)
    month_end = end.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month_start = (month_end - timedelta(days=1)).replace(day=1)
    window_end = end - timedelta(hours=5, minutes=13, seconds=7)
    window = (_iso(window_end - timedelta(days=30)), _iso(window_end))
    result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    result["results"] = asyncio.run(
        measure(args.db, args.repeat, (_iso(month_start), _iso(month_end)), window)
    )
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for name in (f"store-{stamp}.json", "store-latest.json"):
        (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The PostgreSQL store's export path (`SlicedExport`) over generated rows: CPU and memory of this process.

Creates a database on the server (``--pg``, an admin URL), applies the app's
migrations, generates ``--rows`` requests one second apart inside PostgreSQL
(``generate_series``: no Python per row), then runs the export path the API
runs on PostgreSQL (`time_slices` + `SlicedExport`, two threads, pooled
read-only connections) for CSV and JSON Lines ``--repeat`` times, reading every
chunk. Prints wall time, this process's CPU seconds, the CPU seconds of the
server processes that ran the export (``server_cpu_s``: from ``/proc`` of the
read pool's backends, so the server must run on this machine; unlike wall time
it barely moves when other work shares the cores) and peak RSS per run; the
database is dropped at the end. No HTTP: what the proxy's process spends.

    python bench/pg_export_bench.py --rows 300000
    python bench/pg_export_bench.py --slice-hours 6      # the slicing used before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meterproxy.store import backend
from meterproxy.store.export import SlicedExport, time_slices
from meterproxy.store.postgres import READ_POOL_APPLICATION
from meterproxy.store.queries import RequestFilter, read_connection

_FILL = """
INSERT INTO requests (id, ts, source, upstream, provider, endpoint, method, requested_model, model,
    priced_model, status, streamed, input_tokens, output_tokens, cost_usd, cost_pico, usage_source,
    duration_ms, ttfb_ms, upstream_ms, "user", session, tags, key_fingerprint)
SELECT 'b' || lpad(x::text, 12, '0'),
       to_char(timestamp '2026-10-01' + x * interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       'proxy', 'openai', 'openai', 'chat', 'POST', 'gpt-4o', 'gpt-4o', 'gpt-4o', 200, (x %% 3 = 0)::int,
       100 + x %% 6000, x %% 900, '0.000761980000', 761980000, 'reported',
       200.0 + x %% 5000, 50.0 + x %% 700, 190.0 + x %% 4900, 'user' || (x %% 50), 'sess-' || (x / 40),
       '{"team":"ads"}', 'abc'
FROM generate_series(1, %s) AS x
"""


def _backend_cpu(admin: str, database: str) -> dict[int, float]:
    """CPU seconds so far of each read-pool backend serving ``database`` (by pid, from /proc)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        pids = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                (database, READ_POOL_APPLICATION),
            )
        ]
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--slice-hours", type=int, default=1)
    args = p.parse_args(argv)

    name = f"meterproxy_export_bench_{secrets.token_hex(4)}"
    url = args.pg.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    out: dict[str, object] = {"rows": args.rows, "slice_hours": args.slice_hours, "runs": []}
    try:
        conn = backend.connect(url)
        backend.apply_migrations(conn)
        conn.close()
        with psycopg.connect(url, autocommit=True) as fill:
            fill.execute(_FILL, [args.rows])
            fill.execute("ANALYZE requests")
        width = timedelta(hours=args.slice_hours)
        readers = backend.Readers(url)
        for fmt in ("csv", "jsonl"):
            for _ in range(args.repeat):
                conn = read_connection(url)
                slices = time_slices(conn, None, None, width)
                conn.close()
                s0 = _backend_cpu(args.pg, name)
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                export = SlicedExport(readers.connection, RequestFilter(), fmt, slices, workers=2)
                size = lines = 0
                try:
                    while (chunk := export.next_chunk()) is not None:
                        size += len(chunk)
                        lines += chunk.count(b"\n")
                finally:
                    export.close()
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                s1 = _backend_cpu(args.pg, name)
                run = {
                    "format": fmt,
                    "wall_s": round(time.perf_counter() - t0, 2),
                    "cpu_s_this_process": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                    "server_cpu_s": round(sum(v - s0.get(pid, 0.0) for pid, v in s1.items()), 2),
                    "peak_rss_mb": round(r1.ru_maxrss / 1024),
                    "rows": lines,
                    "mb": round(size / 1e6, 1),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                }
                out["runs"].append(run)  # type: ignore[attr-defined]
                print(json.dumps(run), flush=True)
        readers.close()
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

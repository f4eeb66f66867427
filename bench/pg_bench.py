"""PostgreSQL vs SQLite store: rows/s ingested by the real writer, and summary latency.

1. **Ingest**: ``--rows`` records (default 200,000; 12 models, 50 users,
   sessions, tags, exact costs) submitted to the real `StoreWriter` as fast as
   the queue takes them (``batch_max`` 5,000, the proxy's default), timed from
   the first submit to the last commit; once with one writer, and on PostgreSQL
   also with ``--writers`` writers at once (as that many replicas would, every
   insert batch taking the rowid-order lock).
2. **Roll up**: the rollup pass the proxy's maintenance runs, timed.
3. **Summaries** (median and worst of ``--repeat`` after one warm-up), through
   the real read path (the app's `Readers` + `summarize`): totals, by model, by
   user and day, by ``tag:team``; before the rollup (raw rows) and after it.
4. **Check**: on both stores the totals equal the records' own sums.

PostgreSQL runs in a database created for the run (``meterproxy_bench_<random>``)
on ``--pg`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``) and dropped
after; SQLite in a temp file. Results go to ``bench/results/pg-<stamp>.json`` and
``pg-latest.json``.

    python bench/pg_bench.py                      # 200k rows, about a minute
    python bench/pg_bench.py --rows 50000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from meterproxy.store import backend
from meterproxy.store.copy import open_target
from meterproxy.store.queries import RequestFilter
from meterproxy.store.rollups import roll_up
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.store.writer import StoreWriter
from meterproxy.usage import RequestRecord, Usage

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = [f"model-{i}" for i in range(12)]
QUERIES: dict[str, list[str]] = {
    "totals": [],
    "by_model": ["model"],
    "by_user_day": ["user", "day"],
    "by_tag_team": ["tag:team"],
}


def make_records(n: int, seed: int = 7) -> list[RequestRecord]:
    rng = random.Random(seed)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        out.append(
            RequestRecord(
                ts=start + timedelta(seconds=i * 30 * 86400 // n),
                upstream="openai",
                provider="openai",
                endpoint="chat",
                requested_model=(model := rng.choice(MODELS)),
                model=model,
                status=200,
                usage=Usage(input_tokens=rng.randrange(1, 8000), output_tokens=rng.randrange(1, 800)),
                usage_source="reported",
                cost_usd=Decimal(rng.randrange(1, 10**9)).scaleb(-12),
                user=f"user{rng.randrange(50)}",
                session=f"s{i // 40}",
                tags={"team": rng.choice(["search", "ads", "ml", "infra"])},
            )
        )
    return out


def ingest(db: str, records: list[RequestRecord], writers: int) -> float:
    """Seconds from the first submit to the last commit, ``writers`` StoreWriters in parallel."""
    pool = [StoreWriter(db, queue_max=len(records) + 1) for _ in range(writers)]
    for w in pool:
        w.start()
    shares = [records[i::writers] for i in range(writers)]
    started = time.perf_counter()
    threads = [
        threading.Thread(target=lambda w=w, s=s: [w.submit(r) for r in s])
        for w, s in zip(pool, shares, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in pool:
        assert w.close(timeout=600)
    elapsed = time.perf_counter() - started
    assert sum(w.written for w in pool) == len(records)
    return elapsed


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(runs), 2), "max_ms": round(max(runs), 2)}


def summaries(readers: backend.Readers, repeat: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, group_by in QUERIES.items():

        def run(group_by: list[str] = group_by) -> None:
            conn = readers.connection()
            try:
                summarize(conn, SummaryQuery(RequestFilter(), group_by))
            finally:
                conn.close()

        out[name] = timed(run, repeat)
    return out


def rollup(db: str) -> float:
    conn = backend.connect(db)
    started = time.perf_counter()
    try:
        while True:
            with conn.transaction():
                n = roll_up(conn, 20_000)
            if not n:
                break
    finally:
        conn.close()
    return time.perf_counter() - started


def totals(db: str) -> dict[str, int]:
    conn = backend.read_connection(db)
    try:
        return summarize(conn, SummaryQuery(RequestFilter(), [])).totals
    finally:
        conn.close()


def run_store(db: str, records: list[RequestRecord], repeat: int, writers: int) -> dict[str, Any]:
    open_target(db).close()  # schema first, so migration time is not ingest time
    seconds = ingest(db, records, writers)
    with backend.Readers(db) as readers:  # the app's read side: pooled on PostgreSQL
        result: dict[str, Any] = {
            "writers": writers,
            "ingest_s": round(seconds, 2),
            "rows_per_s": round(len(records) / seconds),
            "summary_raw": summaries(readers, repeat),
        }
        result["rollup_s"] = round(rollup(db), 2)
        result["summary_rolled_up"] = summaries(readers, repeat)
    got = totals(db)
    assert got["requests"] == len(records), got
    assert got["cost_pico"] == sum(int(r.cost_usd.scaleb(12)) for r in records if r.cost_usd), got
    return result


def pg_database(admin: str) -> tuple[str, Callable[[], None]]:
    name = f"meterproxy_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    url = admin.rsplit("/", 1)[0] + "/" + name
    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--writers", type=int, default=3, help="concurrent writers on PostgreSQL (replicas)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    records = make_records(args.rows)
    report: dict[str, Any] = {
        "rows": args.rows,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "started": datetime.now(UTC).isoformat(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        print(f"sqlite: {args.rows} rows ...", flush=True)
        report["sqlite"] = run_store(str(Path(tmp) / "bench.db"), records, args.repeat, 1)
    for writers in (1, args.writers):
        url, drop = pg_database(args.pg)
        try:
            with psycopg.connect(args.pg) as conn:
                report["postgres_version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            print(f"postgresql: {args.rows} rows, {writers} writer(s) ...", flush=True)
            report[f"postgresql_{writers}w"] = run_store(url, records, args.repeat, writers)
        finally:
            drop()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2)
    (RESULTS / f"pg-{stamp}.json").write_text(text + "\n")
    (RESULTS / "pg-latest.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

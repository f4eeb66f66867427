"""PostgreSQL summary latency after rollups, two versions of meterproxy side by side, under the same load.

`pg_bench.py` runs take minutes and the shared machine's load moves several-fold
between them, so comparing one version's run with another's compares loads. This
builds one database per version (``--root`` is each version's checkout: its own
`pg_bench.make_records`, writer, migrations and rollup), then times the rolled-up
summaries (`pg_bench.QUERIES`, through each version's real read path) in
alternating rounds, so both see the same load.

    python bench/pg_summary_ab.py --old /tmp/meterproxy-before --new . --rows 200000 --rounds 6

Each (version, phase) runs in a process of its own (``--phase build|time``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path


def phase(root: str, what: str, url: str, rows: int, repeat: int) -> None:
    sys.path[:0] = [root, str(Path(root) / "bench")]
    import pg_bench  # type: ignore[import-not-found]

    from meterproxy.store import backend
    from meterproxy.store.copy import open_target
    from meterproxy.store.queries import RequestFilter
    from meterproxy.store.summary import SummaryQuery, summarize

    if what == "build":
        open_target(url).close()
        pg_bench.ingest(url, pg_bench.make_records(rows), 1)
        pg_bench.rollup(url)
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            # Both databases with fresh statistics: whether autovacuum got to one yet is luck.
            conn.execute("ANALYZE")
        return
    out = {}
    for name, group_by in pg_bench.QUERIES.items():
        if name == "by_tag_team":  # raw rows only, whatever the version
            continue

        def run(group_by: list[str] = group_by) -> None:
            conn = backend.read_connection(url)
            try:
                summarize(conn, SummaryQuery(RequestFilter(), group_by))
            finally:
                conn.close()

        run()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1000)
        out[name] = statistics.median(times)
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True)
    p.add_argument("--new", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--phase", choices=["build", "time"])
    p.add_argument("--root")
    p.add_argument("--url")
    args = p.parse_args()
    if args.phase:
        phase(args.root, args.phase, args.url, args.rows, args.repeat)
        return 0

    import psycopg

    urls = {}
    for label in ("old", "new"):
        name = f"meterproxy_ab_{label}_{secrets.token_hex(3)}"
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        urls[label] = args.pg.rsplit("/", 1)[0] + "/" + name
    roots = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}

    def run(label: str, what: str) -> str:
        cmd = [sys.executable, __file__, "--old", args.old, "--phase", what, "--root", roots[label]]
        cmd += ["--url", urls[label], "--rows", str(args.rows), "--repeat", str(args.repeat)]
        env = {**os.environ, "PYTHONPATH": roots[label]}
        return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout

    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    try:
        for label in ("old", "new"):
            run(label, "build")
        for _ in range(args.rounds):
            for label in ("old", "new"):
                results[label].append(json.loads(run(label, "time")))
    finally:
        for url in urls.values():
            name = url.rsplit("/", 1)[1]
            with psycopg.connect(args.pg, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    summary = {
        label: {q: round(statistics.median(r[q] for r in runs), 1) for q in runs[0]}
        for label, runs in results.items()
    }
    print(
        json.dumps({"rows": args.rows, "rounds": args.rounds, "median_ms": summary, "load": os.getloadavg()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

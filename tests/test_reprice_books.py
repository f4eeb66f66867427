"""After ``meterproxy reprice`` the books agree: rollups, /api/summary and reports show the new totals.

Rows are priced with a wrong table and stored by the real writer into a real SQLite
file; half are folded into the hourly/daily rollups (the state a long-running server
is always in), then ``meterproxy reprice`` runs beside the live app with the right
tables. /api/summary (which reads rollups below the watermark and raw rows above it)
must equal the sum of the repriced rows to the picodollar, per model too. An imported
row whose cost came from the agent's own log keeps it unless ``--source-costs``.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner

from meterproxy.app_state import WRITER
from meterproxy.cli import main
from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.store.maintenance import run_pass
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage
from tests.conftest import ProxyFactory
from tests.helpers.api import submit, summary
from tests.helpers.stores import WRONG

T0 = datetime(2026, 6, 1, 9, tzinfo=UTC)


def _records(book: PriceBook, n: int, start: datetime) -> list[RequestRecord]:
    price = price_record_with(book)
    out = []
    for i in range(n):
        model = ("gpt-4o-mini", "gpt-4.1-nano", "no-such-model")[i % 3]
        r = make_record(
            model=model, ts=start + timedelta(minutes=7 * i), usage=Usage(1000 + i, 0, 0, 0, 17 * i)
        )
        price(r)
        out.append(r)
    return out


def _sql(db: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


async def test_summary_equals_the_repriced_rows_to_the_picodollar(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    wrong_file = tmp_path / "wrong.toml"
    wrong_file.write_text(WRONG)
    wrong = PriceBook.load(overrides=[wrong_file])
    proxy = await make_proxy(rollup_interval=3600)
    await submit(proxy, _records(wrong, 30, T0))
    rolled, _ = await run_pass(proxy.app[WRITER], 0)  # these 30 are now in the rollups
    assert rolled == 30
    await submit(proxy, _records(wrong, 20, T0 + timedelta(days=1)))  # above the watermark

    imported = make_record(model="gpt-4o-mini", ts=T0 + timedelta(hours=2), usage=Usage(5000, 0, 0, 0, 100))
    imported.upstream, imported.source = "zeroclaw", "zeroclaw"
    imported.cost_usd = Decimal("0.123")  # the agent's own figure
    imported.extra["cost_from"] = "source"
    await submit(proxy, [imported])
    await run_pass(proxy.app[WRITER], 0)

    before = await summary(proxy)
    result = CliRunner().invoke(main, ["reprice", "--since", "2026-01-01", "--db", str(proxy.db)])
    assert result.exit_code == 0, result.output
    assert "changed 17 rows" in result.output  # the gpt-4o-mini rows: every third of 50
    assert "kept 1 imported rows' own costs" in result.output

    [(pico_sum, unpriced)] = _sql(
        proxy.db,
        "SELECT SUM(cost_pico), "
        "SUM(CASE WHEN cost_pico IS NULL AND usage_source = 'reported' THEN 1 ELSE 0 END) FROM requests",
    )
    after = await summary(proxy)
    assert after["totals"]["cost_usd"] == Decimal(int(str(pico_sum))).scaleb(-12)
    assert after["totals"]["cost_usd"] != before["totals"]["cost_usd"]
    assert after["totals"]["unpriced_requests"] == unpriced
    by_model = await summary(proxy, group_by="model")
    per_model = dict(_sql(proxy.db, "SELECT model, SUM(cost_pico) FROM requests GROUP BY model"))
    for g in by_model["groups"]:
        assert g["cost_usd"] == Decimal(int(str(per_model[g["key"]["model"]] or 0))).scaleb(-12)

    [(text, extra)] = _sql(proxy.db, f"SELECT cost_usd, extra FROM requests WHERE id = '{imported.id}'")
    assert Decimal(str(text)) == Decimal("0.123") and json.loads(str(extra))["cost_from"] == "source"
    # Asked to, reprice replaces the agent's figure with ours; the summary follows again.
    result = CliRunner().invoke(
        main, ["reprice", "--since", "2026-01-01", "--db", str(proxy.db), "--source-costs"]
    )
    assert result.exit_code == 0, result.output
    [(text, extra)] = _sql(proxy.db, f"SELECT cost_usd, extra FROM requests WHERE id = '{imported.id}'")
    assert Decimal(str(text)) == (Decimal(5000) * Decimal("0.15") + 100 * Decimal("0.6")) / 10**6
    assert extra is None or "cost_from" not in json.loads(str(extra))
    [(pico_sum,)] = _sql(proxy.db, "SELECT SUM(cost_pico) FROM requests")
    assert (await summary(proxy))["totals"]["cost_usd"] == Decimal(int(str(pico_sum))).scaleb(-12)

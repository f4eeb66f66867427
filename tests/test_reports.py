"""``meterproxy report`` and ``meterproxy status`` against a real proxy's database and API.

Known records go through the real meter (priced, then written by the store
writer); expected figures are sums over those records computed here, so the
report's grouping, time zones, totals and formatting are what is tested.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from meterproxy.app_state import METER
from meterproxy.cli import main
from meterproxy.pricing import PriceBook
from meterproxy.reports import compact, money
from meterproxy.savings import cache_savings
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage

DAY = datetime(2026, 11, 10, tzinfo=UTC)


def known_records() -> list[RequestRecord]:
    spec = [
        # (hours after DAY, model, provider, input, cache_read, output, session, source)
        (1, "gpt-4o", "openai", 120_000, 100_000, 2_000, "s1", "proxy"),
        (2, "gpt-4o-mini", "openai", 5_000, 0, 700, "s1", "proxy"),
        (23.5, "claude-sonnet-4-20250514", "anthropic", 40_000, 30_000, 1_500, "s2", "proxy"),
        (26, "gpt-4o", "openai", 1_000, 0, 50, "s2", "claude-code"),
        (49, "gpt-4o-mini", "openai", 2_500_000, 0, 3_400_000, None, "proxy"),
        (50, "mystery-model", "openai", 10, 0, 10, None, "proxy"),  # unpriced
    ]
    out = []
    for hours, model, provider, inp, read, output, session, source in spec:
        usage = Usage(input_tokens=inp, cache_read_tokens=read, output_tokens=output)
        record = make_record(model=model, provider=provider, upstream=provider, usage=usage, ts=DAY)
        record.ts = DAY + timedelta(hours=hours)
        record.session, record.source = session, source
        out.append(record)
    return out


async def seeded(make_proxy: Any) -> tuple[Any, list[RequestRecord]]:
    proxy = await make_proxy()
    records = known_records()
    for record in records:
        proxy.app[METER].request_finished(record)
    await proxy.rows(len(records))
    return proxy, records


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def expected_by(records: list[RequestRecord], key: Any) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = defaultdict(lambda: {"requests": 0, "cost": Decimal(0), "input": 0})
    for r in records:
        row = out[key(r)]
        row["requests"] += 1
        row["cost"] += r.cost_usd or 0
        row["input"] += r.tokens.input_tokens
    return out


async def test_daily_json_matches_records_in_utc_and_in_a_zone(make_proxy: Any) -> None:
    proxy, records = await seeded(make_proxy)
    for tz in ("UTC", "America/Los_Angeles"):
        doc = json.loads(
            await asyncio.to_thread(cli, "report", "daily", "--json", "--db", str(proxy.db), "--tz", tz)
        )
        want = expected_by(records, lambda r, tz=tz: r.ts.astimezone(ZoneInfo(tz)).date().isoformat())
        got = {row["day"]: row for row in doc["rows"]}
        assert set(got) == set(want)
        for day, row in got.items():
            assert row["requests"] == want[day]["requests"]
            assert Decimal(row["cost_usd"]) == want[day]["cost"]
            assert row["input_tokens"] == want[day]["input"]
        assert Decimal(doc["totals"]["cost_usd"]) == sum(r.cost_usd or 0 for r in records)
        assert doc["totals"]["unpriced_requests"] == 1
        assert list(doc["totals"]) == [
            "requests",
            "input_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "unpriced_requests",
            "cost_usd",
            "estimated_requests",  # apart from cost_usd: tests/test_estimate.py
            "estimated_cost_usd",
            "partial_requests",  # where costs came from: tests/test_cost_source.py
            "provider_cost_requests",
        ]


async def test_report_filters_and_second_dimension(make_proxy: Any) -> None:
    proxy, records = await seeded(make_proxy)
    db = str(proxy.db)
    since_until = ("--since", "2026-11-11", "--until", "2026-11-11")
    out = await asyncio.to_thread(cli, "report", "model", *since_until, "--csv", "--db", db)
    rows = list(csv.DictReader(io.StringIO(out)))
    day2 = [r for r in records if r.ts.date().isoformat() == "2026-11-11"]
    assert {r["model"] for r in rows} == {r.model for r in day2}
    assert sum(Decimal(r["cost_usd"]) for r in rows) == sum(r.cost_usd or 0 for r in day2)
    out = await asyncio.to_thread(cli, "report", "session", "--source", "claude-code", "--json", "--db", db)
    doc = json.loads(out)
    assert [row["session"] for row in doc["rows"]] == ["s2"] and doc["totals"]["requests"] == 1
    out = await asyncio.to_thread(cli, "report", "daily", "--group-by", "provider", "--json", "--db", db)
    pairs = {(row["day"], row["provider"]): row["requests"] for row in json.loads(out)["rows"]}
    want = expected_by(records, lambda r: (r.ts.date().isoformat(), r.provider))
    assert pairs == {k: v["requests"] for k, v in want.items()}


async def test_table_is_aligned_compact_and_has_savings(make_proxy: Any) -> None:
    proxy, records = await seeded(make_proxy)
    out = await asyncio.to_thread(cli, "report", "daily", "--db", str(proxy.db))
    lines = out.splitlines()
    table = lines[: lines.index("")]
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    assert "2.5M" in out and "3.4M" in out  # compact units for big token counts
    total_cost = sum(r.cost_usd or 0 for r in records)
    assert table[-1].startswith("Total") and table[-1].endswith(money(total_cost))
    book = PriceBook.default()
    expected = Decimal(0)
    for r in records:
        if r.tokens.cache_read_tokens:
            n = r.tokens.cache_read_tokens
            full = book.price(model=r.model, usage=Usage(input_tokens=n), at=r.ts)
            cached = book.price(model=r.model, usage=Usage(input_tokens=n, cache_read_tokens=n), at=r.ts)
            assert full and cached
            expected += full.cost_usd - cached.cost_usd
    assert expected > 0
    assert f"Cache savings: {money(expected)}" in out
    doc = json.loads(await asyncio.to_thread(cli, "report", "daily", "--json", "--db", str(proxy.db)))
    assert Decimal(doc["cache_savings_usd"]) == expected


async def test_report_through_the_api_with_admin_token(make_proxy: Any) -> None:
    proxy = await make_proxy(admin_token="s3cret")
    records = known_records()
    for record in records:
        proxy.app[METER].request_finished(record)
    await proxy.rows(len(records))
    from_db = await asyncio.to_thread(cli, "report", "daily", "--json", "--db", str(proxy.db))
    from_api = await asyncio.to_thread(
        cli, "report", "daily", "--json", "--url", proxy.url, "--token", "s3cret"
    )
    assert json.loads(from_api) == json.loads(from_db)
    denied = await asyncio.to_thread(
        CliRunner().invoke, main, ["report", "--url", proxy.url, "--token", "wrong"]
    )
    assert denied.exit_code == 1 and "401" in denied.output


async def test_status_line(make_proxy: Any) -> None:
    proxy = await make_proxy()
    now = datetime.now(UTC)
    today = make_record(model="gpt-4o", usage=Usage(input_tokens=400_000, output_tokens=20_000))
    today.session = "agent-7"
    old = make_record(model="gpt-4o", ts=now - timedelta(days=3))
    old.session = "agent-7"
    for record in (today, old):
        proxy.app[METER].request_finished(record)
    await proxy.rows(2)
    assert today.cost_usd and old.cost_usd
    out = await asyncio.to_thread(cli, "status", "--db", str(proxy.db), "--session", "agent-7", "--no-color")
    assert out.strip() == (
        f"today 420K tok · {money(today.cost_usd)} · session {money(today.cost_usd + old.cost_usd)}"
    )
    assert "\x1b[" not in out  # plain when not a terminal and no budgets
    # spend bands the user sets colour today's cost: yellow between the two amounts, red above, green below
    assert today.cost_usd < 5
    banded = await asyncio.to_thread(cli, "status", "--db", str(proxy.db), "--bands", "0.01,5", "--color")
    assert banded.startswith("\x1b[33m")
    over = await asyncio.to_thread(cli, "status", "--db", str(proxy.db), "--bands", "0.001,0.01", "--color")
    assert over.startswith("\x1b[31m")
    calm = await asyncio.to_thread(cli, "status", "--db", str(proxy.db), "--bands", "100,200", "--color")
    assert calm.startswith("\x1b[32m")
    bad = CliRunner().invoke(main, ["status", "--db", str(proxy.db), "--bands", "5"])
    assert bad.exit_code == 2 and "--bands" in bad.output


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (987, "987"), (9_876, "9,876"), (12_345, "12.3K"), (3_400_000, "3.4M"), (123_456_789, "123M")],
)
def test_compact(n: int, text: str) -> None:
    assert compact(n) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0", "$0"),
        ("0.0123", "$0.0123"),
        ("0.000012", "$0.000012"),
        ("0.0000026", "$0.0000026"),  # an embeddings call: never $0.000000
        ("0.000000000001", "$0.000000000001"),
        ("1234.567", "$1,234.57"),
        ("3", "$3.00"),
    ],
)
def test_money(value: str, text: str) -> None:
    assert money(Decimal(value)) == text


def test_cache_savings_ignores_unknown_models() -> None:
    book = PriceBook.default()
    groups = [({"model": "mystery", "day": "2026-11-10"}, {"cache_read_tokens": 10**6})]
    assert cache_savings(book, groups).saved_usd == 0


async def test_status_colored_by_the_worst_budget(make_proxy: Any) -> None:
    pytest.importorskip("meterproxy.budgets.feature")
    budgets = [
        {"name": "team-month", "period": "month", "limit_usd": "1000"},
        {"name": "daily", "period": "day", "limit_usd": "2"},
    ]
    proxy = await make_proxy(budgets=budgets)
    # gpt-4o: 600k input at $2.50/M + 10k output at $10/M = $1.60 -> 80% of the daily budget
    spend = make_record(model="gpt-4o", usage=Usage(input_tokens=600_000, output_tokens=10_000))
    proxy.app[METER].request_finished(spend)
    await proxy.rows(1)
    assert spend.cost_usd == Decimal("1.6")

    def status() -> str:
        return cli("status", "--url", proxy.url, "--color")

    await proxy.settle()  # the budget engine saw the batch: its commit listener ran before the barrier
    out = await asyncio.to_thread(status)
    assert "budget daily 80%" in out and "today 610K tok · $1.60" in out
    assert out.startswith("\x1b[33m")  # yellow: a warning threshold is crossed, not the limit
    plain = await asyncio.to_thread(cli, "status", "--url", proxy.url)
    assert "\x1b[" not in plain  # not a terminal


def test_report_on_a_database_written_only_by_the_importer(tmp_path: Any) -> None:
    """The importer's database lacks the rollup tables the summary engine reads: created on demand."""
    from pathlib import Path

    logs = Path(__file__).parent / "fixtures" / "agent_logs"
    db = str(tmp_path / "imported.db")
    cli("import", "jsonl", str(logs / "zeroclaw_costs.jsonl"), "--format", "zeroclaw", "--db", db)
    doc = json.loads(cli("report", "daily", "--json", "--db", db))
    assert doc["totals"]["requests"] == 4 and [r["day"] for r in doc["rows"]] == ["2026-11-22"]


async def test_status_without_a_proxy_reads_budgets_from_the_database(make_proxy: Any, tmp_path: Any) -> None:
    pytest.importorskip("meterproxy.budgets.feature")
    proxy = await make_proxy()
    spend = make_record(model="gpt-4o", usage=Usage(input_tokens=600_000, output_tokens=10_000))  # $1.60
    proxy.app[METER].request_finished(spend)
    await proxy.rows(1)
    config = tmp_path / "budgets.toml"
    db = str(proxy.db)

    def status(limit: str) -> str:
        config.write_text(f'[[budgets]]\nname = "daily"\nperiod = "day"\nlimit_usd = "{limit}"\n')
        return cli("status", "--db", db, "--config", str(config), "--color")

    assert (
        await asyncio.to_thread(status, "100") == "\x1b[32mtoday 610K tok · $1.60 · budget daily 2%\x1b[0m\n"
    )
    assert (await asyncio.to_thread(status, "1.70")).startswith("\x1b[33m")  # 94%: past the 80% threshold
    over = await asyncio.to_thread(status, "1.50")
    assert over.startswith("\x1b[31m") and "budget daily 107%" in over


def test_model_and_session_reports_on_the_demo_database(tmp_path: Any) -> None:
    """Unpriced models are named, never $0; a model's names are one row; sessions show date, user, models."""
    import sqlite3

    from meterproxy.demo import DemoShape, write_demo

    db = str(tmp_path / "demo.db")
    write_demo(db, DemoShape(requests=700, days=20, sessions=40, seed=3))
    conn = sqlite3.connect(db)
    unpriced = dict(
        conn.execute(
            "SELECT model, count(*) FROM requests "
            "WHERE cost_pico IS NULL AND usage_source = 'reported' GROUP BY model"
        ).fetchall()
    )
    haiku = conn.execute(
        "SELECT count(*), sum(cost_pico) FROM requests "
        "WHERE model IN ('claude-haiku-4-5', 'claude-haiku-4-5-20251001')"
    ).fetchone()
    by_session = conn.execute(
        "SELECT session, min(ts), sum(cost_pico) FROM requests WHERE session IS NOT NULL "
        "GROUP BY session ORDER BY sum(cost_pico) DESC LIMIT 3"
    ).fetchall()
    conn.close()
    assert unpriced  # the demo has models the tables do not know

    doc = json.loads(cli("report", "model", "--json", "--db", db))
    rows = {r["model"]: r for r in doc["rows"]}
    for model, count in unpriced.items():
        assert rows[model]["cost_usd"] is None and rows[model]["unpriced_requests"] == count  # not "0"
    assert {m["model"]: m["unpriced_requests"] for m in doc["unpriced_models"]} == unpriced
    assert "--pricing" in doc["unpriced_note"]
    merged = rows["claude-haiku-4-5"]
    assert merged["requests"] == haiku[0] and Decimal(merged["cost_usd"]) == Decimal(haiku[1]).scaleb(-12)
    assert sorted(merged["names"]) == ["claude-haiku-4-5", "claude-haiku-4-5-20251001"]
    assert "claude-haiku-4-5-20251001" not in rows
    raw = json.loads(cli("report", "model", "--json", "--raw-models", "--db", db))
    assert "claude-haiku-4-5-20251001" in {r["model"] for r in raw["rows"]}

    text = cli("report", "model", "--db", db)
    for model in unpriced:
        line = next(line for line in text.splitlines() if line.startswith(model + " "))
        assert line.endswith("unpriced") and "$0" not in line
    assert "meterproxy serve --pricing FILE" in text

    doc = json.loads(cli("report", "session", "--json", "--limit", "3", "--db", db))
    sessions = [r for r in doc["rows"] if r["session"]]
    assert [r["session"] for r in sessions] == [s for s, _, _ in by_session][: len(sessions)]
    top = sessions[0]
    assert top["first_ts"] == by_session[0][1] and top["users"] and top["models"]
    table = cli("report", "session", "--limit", "3", "--db", db)
    head = table.splitlines()[0]
    assert head.split()[:4] == ["Session", "Date", "User", "Models"]
    assert top["first_ts"][:10] in table and "most expensive of" in table

"""``report --as-model``: the selected traffic priced as another model, equal to a reprice of a copy."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from meterproxy.app_state import WRITER
from meterproxy.cli import main
from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.reprice import reprice
from meterproxy.store import backend
from meterproxy.store.queries import RequestFilter
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage
from meterproxy.whatif import what_if
from tests.helpers.pg import store_on

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
TARGET = "claude-sonnet-4-5"


def _seed(db: Path) -> list[RequestRecord]:
    book = PriceBook.default()
    price = price_record_with(book)
    records = []
    for i in range(30):
        openai_side = i % 3 != 0
        r = make_record(
            model="gpt-4o-mini" if openai_side else "claude-haiku-4-5",
            provider="openai" if openai_side else "anthropic",
            upstream="openai" if openai_side else "anthropic",
            ts=T0 + timedelta(hours=5 * i),
            usage=Usage(
                input_tokens=2000 + 37 * i,
                cache_read_tokens=0 if openai_side else 1500,
                cache_write_tokens=0 if openai_side else (300 if i % 2 else 0),
                output_tokens=100 + 11 * i,
            ),
        )
        price(r)
        assert r.cost_usd is not None
        records.append(r)
    unpriced = make_record(model="my-private-llm", upstream="vllm", provider="openai", ts=T0)
    price(unpriced)
    assert unpriced.cost_usd is None
    records.append(unpriced)
    writer = StoreWriter(db)
    writer.start()
    for r in records:
        assert writer.submit(r)
    assert writer.close(timeout=30)
    return records


def test_as_model_equals_a_reprice_of_a_renamed_copy(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    records = _seed(db)
    out = CliRunner().invoke(
        main, ["report", "--db", str(db), "--as-model", TARGET, "--as-provider", "anthropic", "--json"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    totals = doc["totals"]
    assert totals["requests"] == 31
    assert totals["actual_unpriced_requests"] == 1  # the private model: left out, not a zero
    assert totals["compared_requests"] == 30

    # The same rows, renamed to the target in a copy of the database, then repriced.
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    conn = sqlite3.connect(copy)
    with conn:
        conn.execute(
            "UPDATE requests SET model = ?, requested_model = ?, upstream = 'anthropic', "
            "provider = 'anthropic' WHERE cost_pico IS NOT NULL",
            [TARGET, TARGET],
        )
    conn.close()
    reprice(copy, PriceBook.default(), since="2000-01-01T00:00:00.000000Z")
    conn = sqlite3.connect(copy)
    repriced = conn.execute("SELECT SUM(cost_pico) FROM requests WHERE model = ?", [TARGET]).fetchone()[0]
    conn.close()
    assert Decimal(totals["as_model_cost_usd"]) == Decimal(repriced) / 10**12
    actual = sum((r.cost_usd for r in records if r.cost_usd is not None), Decimal(0))
    assert Decimal(totals["actual_cost_usd"]) == actual
    assert Decimal(totals["difference_usd"]) == Decimal(repriced) / 10**12 - actual

    # Cache savings, by hand: every cached token as plain input, minus the actual cost.
    book = PriceBook.default()
    saved = Decimal(0)
    for r in records:
        u = r.tokens
        if r.cost_usd is None or not (u.cache_read_tokens or u.cache_write_tokens):
            continue
        plain = book.price(
            model=r.model,
            usage=Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens),
            at=r.ts,
            provider=r.upstream,
        )
        assert plain is not None
        saved += plain.cost_usd - r.cost_usd
    assert saved > 0
    assert Decimal(doc["cache_savings"]["saved_usd"]) == saved


def test_as_model_today_prices_and_readable_table(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    _seed(db)
    out = CliRunner().invoke(
        main,
        ["report", "--db", str(db), "--as-model", "gpt-4o", "--as-provider", "openai", "--prices", "today"],
    )
    assert out.exit_code == 0, out.output
    assert "What if this traffic had gone to gpt-4o (openai), priced at today's prices" in out.output
    assert "gpt-4o-mini" in out.output and "Total" in out.output
    assert "1 unpriced as stored" in out.output
    assert "Cache savings as stored:" in out.output


def test_as_model_unknown_target_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    _seed(db)
    out = CliRunner().invoke(main, ["report", "--db", str(db), "--as-model", "no-such-model-xyz"])
    assert out.exit_code == 2
    assert "'no-such-model-xyz' has no price" in out.output
    # An empty name is no model (it used to print the plain report instead), and a database
    # that is not there is said so (it used to be a sqlite3 traceback).
    out = CliRunner().invoke(main, ["report", "--db", str(db), "--as-model", ""])
    assert out.exit_code == 2 and "name the model" in out.output
    missing = tmp_path / "none.db"
    out = CliRunner().invoke(main, ["report", "--db", str(missing), "--as-model", "gpt-4o"])
    assert out.exit_code == 2 and "no database at" in out.output and not missing.exists()


async def test_whatif_api_answers_what_the_report_prints(make_proxy: Any) -> None:
    proxy = await make_proxy()
    await asyncio.to_thread(_seed_into, proxy)
    async with aiohttp.ClientSession() as http:
        url = f"{proxy.url}/api/whatif?as_model={TARGET}&as_provider=anthropic"
        async with http.get(url) as r:
            assert r.status == 200, await r.text()
            doc = json.loads(await r.text(), parse_float=Decimal)
        async with http.get(f"{proxy.url}/api/whatif?as_model=no-such-model-xyz") as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "as_model"
    out = CliRunner().invoke(
        main, ["report", "--db", str(proxy.db), "--as-model", TARGET, "--as-provider", "anthropic", "--json"]
    )
    report = json.loads(out.output)
    assert Decimal(str(doc["totals"]["as_model_cost_usd"])) == Decimal(report["totals"]["as_model_cost_usd"])
    assert Decimal(str(doc["totals"]["actual_cost_usd"])) == Decimal(report["totals"]["actual_cost_usd"])
    assert doc["totals"]["requests"] == report["totals"]["requests"] == 31


def _seed_into(proxy: Any) -> None:
    """The same rows as `_seed`, through the running app's own writer."""
    price = price_record_with(PriceBook.default())
    writer = proxy.app[WRITER]
    tmp = proxy.db.parent / "seed.db"
    for r in _seed(tmp):
        price(r)
        assert writer.submit(r)
    writer.call(lambda conn: None).result(30)


async def test_cache_savings_are_one_figure_in_report_summary_whatif(make_proxy: Any) -> None:
    """Report, /api/summary and /api/whatif (the page's card and panel) give the same net savings."""
    proxy = await make_proxy()
    book = PriceBook.default()
    price = price_record_with(book)
    spec = [
        # (day offset, model, upstream, input, read, write, write_1h)
        (0, "claude-haiku-4-5", "anthropic", 9000, 6000, 2000, 0),
        (0, "claude-haiku-4-5", "anthropic", 4000, 0, 3000, 3000),  # writes only: a negative saving
        (1, "claude-sonnet-4-5", "anthropic", 20_000, 15_000, 4000, 1000),
        (1, "gpt-4o-mini", "openai", 5000, 4096, 0, 0),
        (1, "my-private-llm", "vllm", 5000, 4000, 0, 0),  # unknown: saves nothing, not zero-priced
    ]
    records = []
    for day, model, upstream, inp, read, write, hour in spec:
        r = make_record(
            model=model,
            provider="openai" if upstream != "anthropic" else "anthropic",
            upstream=upstream,
            ts=T0 + timedelta(days=day),
            usage=Usage(
                input_tokens=inp,
                cache_read_tokens=read,
                cache_write_tokens=write,
                cache_write_1h_tokens=hour,
                output_tokens=50,
            ),
        )
        price(r)
        records.append(r)
        assert proxy.app[WRITER].submit(r)
    proxy.app[WRITER].call(lambda conn: None).result(30)

    # By hand, per row: the same tokens as plain input, minus the row's cost as billed.
    expected = Decimal(0)
    reads_only = Decimal(0)
    for r in records:
        u = r.tokens
        plain = Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens)
        no_cache = book.price(model=r.model or "", usage=plain, at=r.ts, provider=r.upstream)
        if no_cache is None:
            continue
        assert r.cost_usd is not None
        expected += no_cache.cost_usd - r.cost_usd
        read_only = Usage(
            input_tokens=u.input_tokens, cache_read_tokens=u.cache_read_tokens, output_tokens=50
        )
        billed_reads = book.price(model=r.model or "", usage=read_only, at=r.ts, provider=r.upstream)
        assert billed_reads is not None
        reads_only += no_cache.cost_usd - billed_reads.cost_usd
    assert 0 < expected < reads_only  # the write premiums are netted out

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/api/summary") as r:
            summary = json.loads(await r.text(), parse_float=Decimal)
        async with http.get(f"{proxy.url}/api/whatif?as_model={TARGET}") as r:
            whatif = json.loads(await r.text(), parse_float=Decimal)
    report = json.loads(
        (
            await asyncio.to_thread(
                CliRunner().invoke, main, ["report", "daily", "--db", str(proxy.db), "--json"]
            )
        ).output
    )
    figures = {
        "summary": Decimal(str(summary["cache_savings_usd"])),
        "whatif": Decimal(str(whatif["cache_savings"]["saved_usd"])),
        "report": Decimal(report["cache_savings_usd"]),
    }
    assert figures == dict.fromkeys(figures, expected)
    assert whatif["cache_savings"]["cache_write_tokens"] == 9000


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with store_on(request.param, tmp_path) as url:
        yield url


def test_as_model_equals_a_reprice_where_prices_depend_on_the_row(engine_db: str) -> None:
    # The rows that make a reprice differ from "tokens x one rate": long prompts (Claude's and
    # Gemini's >200k tiers), service tiers (batch, flex, priority), cache reads and 1-hour cache
    # writes, reasoning, DeepSeek's 2025 off-peak window (dated prices), on both engines. Each
    # target's totals equal a reprice of the same rows renamed to it, to the picodollar.
    book = PriceBook.default()
    price = price_record_with(book)
    records = []
    for i in range(24):
        ts = datetime(2025, 6, 2, tzinfo=UTC) + timedelta(hours=7 * i + (17 if i % 2 else 3))
        r = make_record(
            model="gpt-4o-mini" if i % 3 else "claude-sonnet-4-5",
            provider="openai" if i % 3 else "anthropic",
            upstream="openai" if i % 3 else "anthropic",
            ts=ts,
            usage=Usage(
                input_tokens=(250_000 if i % 4 == 0 else 3_000) + i,
                cache_read_tokens=1_000 if i % 5 == 0 else 0,
                cache_write_tokens=600 if i % 3 == 0 else 0,
                cache_write_1h_tokens=200 if i % 6 == 0 else 0,
                output_tokens=400 + 13 * i,
                reasoning_tokens=100 if i % 3 else 0,
            ),
        )
        r.service_tier = (None, "batch", "flex", "priority")[i % 4]
        price(r)
        assert r.cost_usd is not None, i
        records.append(r)
    writer = StoreWriter(engine_db)
    writer.start()
    for r in records:
        assert writer.submit(r)
    assert writer.close(timeout=30)

    targets = [
        ("claude-sonnet-4-5", "anthropic"),
        ("gemini-2.5-pro", "gemini"),
        ("gpt-5", "openai"),
        ("deepseek-chat", "deepseek"),
    ]
    conn = backend.read_connection(engine_db)
    try:
        results = {t: what_if(conn, RequestFilter(), book, t[0], target_provider=t[1]) for t in targets}
    finally:
        conn.close()
    for (model, provider), result in results.items():
        totals = result.totals
        assert totals.compared == 24 and totals.target_unpriced == 0, model
        conn = backend.connect(engine_db)
        try:
            with conn.transaction():
                conn.execute(
                    "UPDATE requests SET model = $1, requested_model = $1, upstream = $2, provider = $2",
                    [model, provider],
                )
        finally:
            conn.close()
        reprice(engine_db, book, since="2000-01-01T00:00:00.000000Z")
        conn = backend.read_connection(engine_db)
        try:
            repriced = conn.execute("SELECT SUM(cost_pico), COUNT(cost_pico) FROM requests").fetchone()
        finally:
            conn.close()
        assert int(repriced[1]) == 24, model
        assert totals.as_target_pico == int(repriced[0]), model

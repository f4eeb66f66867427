"""Pricing through the running proxy: overrides, unknown models, provider-reported cost, startup check.

Official SDKs talk to a real meterproxy, which forwards to a FakeUpstream
replaying recorded provider bytes; costs are checked against hand-computed
figures (USD per 1M tokens times the fixture's token counts).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import pytest

from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.reprice import reprice
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT

VLLM_PRICING = """
provider = "vllm"
[[models]]
id = "my-llama"
aliases = ["meta-llama/Llama-3.1-8B-Instruct"]
[[models.prices]]
effective_from = 2025-01-01T00:00:00Z
input = 0.02
output = 0.06
"""
CONTRACT = """
provider = "openai"
[[multipliers]]
effective_from = 2025-06-01T00:00:00Z
multiplier = 0.8
note = "negotiated"
"""


async def _stream_chat(base_url: str, model: str) -> str:
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=base_url, api_key="sk-test-0000000000")
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def _api_rows(url: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as client, client.get(f"{url}/api/requests") as resp:
        assert resp.status == 200
        body = json.loads(await resp.text(), parse_float=Decimal)
    rows: list[dict[str, object]] = body["requests"]
    return rows


async def test_self_hosted_model_priced_from_override_file(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    fx = load_fixture("vllm_chat_stream")
    upstream.replay(fx)
    override = tmp_path / "vllm.toml"
    override.write_text(VLLM_PRICING)
    proxy = await make_proxy(pricing=[str(override)])
    assert await _stream_chat(f"{proxy.url}/vllm/v1", fx.expect["model"])
    [row] = await proxy.rows(1)
    assert row["upstream"] == "vllm" and row["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert (row["input_tokens"], row["output_tokens"]) == (17, 8)
    # 17 * $0.02 + 8 * $0.06 per million tokens.
    assert Decimal(row["cost_usd"]) == Decimal("0.00000082")
    assert row["cost_pico"] == 820_000
    assert row["priced_model"] == "my-llama"


async def test_unknown_model_keeps_tokens_and_has_null_cost(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("vllm_chat_stream")
    upstream.replay(fx)
    proxy = await make_proxy()  # no override: the Llama model is in no table
    assert await _stream_chat(f"{proxy.url}/vllm/v1", fx.expect["model"])
    [row] = await proxy.rows(1)
    assert row["usage_source"] == "reported"
    assert (row["input_tokens"], row["output_tokens"]) == (
        fx.expect["input_tokens"],
        fx.expect["output_tokens"],
    )
    assert row["cost_usd"] is None and row["cost_pico"] is None and row["priced_model"] is None
    [api_row] = await _api_rows(proxy.url)
    assert api_row["cost_usd"] is None and api_row["input_tokens"] == 17


async def test_negotiated_multiplier_applies_from_its_date_and_never_reprices_history(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    # Rows recorded before the contract, at list price.
    db = tmp_path / "meter.db"  # the file make_proxy uses
    price = price_record_with(PriceBook.default())
    old = [
        make_record(ts=datetime(2025, 3, d, tzinfo=UTC), usage=Usage(input_tokens=78, output_tokens=9))
        for d in (1, 2)
    ]
    for r in old:
        price(r)
    writer = StoreWriter(db)
    writer.start()
    for r in old:
        writer.submit(r)
    assert writer.close(timeout=30)
    # gpt-4o-mini: 78 * $0.15 + 9 * $0.60 per million = $0.0000171 list.
    assert all(r.cost_usd == Decimal("0.0000171") for r in old)

    contract = tmp_path / "contract.toml"
    contract.write_text(CONTRACT)
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx)
    proxy = await make_proxy(pricing=[str(contract)])
    assert await _stream_chat(f"{proxy.url}/v1", "gpt-4o-mini")
    rows = {r["id"]: r for r in await proxy.rows(3)}
    [new] = [r for rid, r in rows.items() if rid not in {o.id for o in old}]
    assert Decimal(new["cost_usd"]) == Decimal("0.0000171") * Decimal("0.8") == Decimal("0.00001368")
    for r in old:
        assert Decimal(rows[r.id]["cost_usd"]) == Decimal("0.0000171")

    # Repricing everything under the contract leaves the older rows at list price.
    report = reprice(db, PriceBook.load(overrides=[contract]), since="2025-01-01T00:00:00.000000Z")
    assert report.scanned == 3 and report.changed == 0


async def test_openrouter_reported_cost_is_stored_beside_ours_with_the_difference(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    fx = load_fixture("openrouter_chat_stream")
    upstream.replay(fx)
    proxy = await make_proxy()
    base = f"{proxy.url}/openrouter/api/v1"
    assert await _stream_chat(base, "anthropic/claude-sonnet-4.6") == "Hello!"
    [row] = await proxy.rows(1)
    assert row["provider_cost_usd"] == "0.000837"
    # 254 input * $3 + 5 output * $15 per million: OpenRouter's own list (Anthropic's rates, passed through).
    assert Decimal(row["cost_usd"]) == Decimal("0.000837")
    assert row["priced_model"] == "anthropic/claude-sonnet-4.6"
    [api_row] = await _api_rows(proxy.url)
    assert api_row["cost_difference_usd"] == 0

    # With a (hypothetical) 50% contract with OpenRouter, our cost halves and the gap shows.
    discount = tmp_path / "half.toml"
    discount.write_text(
        'provider = "openrouter"\n[[multipliers]]\neffective_from = 2026-01-01T00:00:00Z\nmultiplier = 0.5\n'
    )
    proxy2 = await make_proxy(pricing=[str(discount)])
    assert await _stream_chat(f"{proxy2.url}/openrouter/api/v1", "anthropic/claude-sonnet-4.6")
    await proxy2.rows(2)  # both apps share the test's database file; wait for the second commit
    newest = (await _api_rows(proxy2.url))[0]
    assert newest["cost_usd"] == Decimal("0.0004185")
    assert newest["provider_cost_usd"] == Decimal("0.000837")
    assert newest["cost_difference_usd"] == Decimal("0.0004185")


async def test_startup_logs_each_pricing_problem_and_still_serves(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    suspect = tmp_path / "suspect.toml"
    suspect.write_text(
        'provider = "vllm"\n[[models]]\nid = "odd"\ncolour = "red"\n'
        "[[models.prices]]\neffective_from = 2025-01-01\ninput = -1\noutput = 1\n"
    )
    with caplog.at_level(logging.WARNING, logger="meterproxy.app"):
        proxy = await make_proxy(pricing=[str(suspect)])
        async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/healthz") as resp:
            assert resp.status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    problems = [w for w in warnings if w.startswith("pricing table problem:")]
    assert len(problems) == 2, warnings
    assert any("input is negative (-1)" in p for p in problems)
    assert any("unknown key 'colour'" in p for p in problems)
    assert all(str(suspect) in p for p in problems)


@pytest.mark.parametrize("via", ["flag", "config"])
def test_serve_refuses_an_invalid_pricing_file_with_a_clear_message(tmp_path: Path, via: str) -> None:
    bad = tmp_path / "broken-prices.toml"
    bad.write_text('provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\ninput = 1\noutput = 1\n')
    args = ["serve", "--port", "0", "--db", str(tmp_path / "x.db")]
    if via == "flag":
        args += ["--pricing", str(bad)]
    else:
        config = tmp_path / "meterproxy.toml"
        config.write_text(f"pricing = [{json.dumps(str(bad))}]\n")
        args += ["--config", str(config)]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env.pop("METERPROXY_PRICING", None)
    done = subprocess.run(
        [sys.executable, "-c", "from meterproxy.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert "invalid pricing file" in done.stderr and str(bad) in done.stderr
    assert "effective_from" in done.stderr and "model 'm'" in done.stderr
    assert "Traceback" not in done.stderr

"""``meterproxy prices update``: a newer genai-prices data file, validated, in force from now on.

The newer file is the shipped one with gpt-4o's base price raised (and a model added),
exactly as genai-prices would publish a price change; the running proxy is a real
meterproxy with the official OpenAI SDK as client. Nothing waits with a fixed sleep:
the test waits on the server's price generation counter.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
from click.testing import CliRunner

from meterproxy.app_state import PRICES
from meterproxy.cli import main
from meterproxy.prices_update import installed, load_book
from meterproxy.pricing import DEFAULT_BASE_FILE
from meterproxy.reprice import reprice
from meterproxy.testing import FakeUpstream, Reply, load_fixture
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT

USAGE = Usage(input_tokens=1290, cache_read_tokens=1152, output_tokens=212, reasoning_tokens=192)


def _newer_file(tmp_path: Path, *, truncate: bool = False) -> Path:
    doc: list[dict[str, Any]] = json.loads(DEFAULT_BASE_FILE.read_text())
    for provider in doc:
        if provider["id"] == "openai":
            for model in provider["models"]:
                if model["id"] == "gpt-4o":
                    model["prices"] = {"input_mtok": 3, "cache_read_mtok": 1.5, "output_mtok": 12}
            provider["models"].append(
                {
                    "id": "gpt-9-test",
                    "match": {"equals": "gpt-9-test"},
                    "prices": {"input_mtok": 7, "output_mtok": 9},
                }
            )
        if truncate:
            provider["models"] = provider["models"][:3]
    out = tmp_path / "data.json"
    out.write_text(json.dumps(doc))
    return out


def _update(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["prices", "update", *args])
    return result.exit_code, result.output


def test_update_prints_changes_installs_and_never_rewrites_the_past(tmp_path: Path) -> None:
    prices_dir = tmp_path / "prices"
    before_book = load_book((), prices_dir)
    code, out = _update(str(_newer_file(tmp_path)), "--prices-dir", str(prices_dir), "--dry-run")
    assert code == 0, out
    assert "openai/gpt-4o: input 2.5 -> 3, output 10 -> 12, cache_read 1.25 -> 1.5" in out
    assert "added 1\n  openai/gpt-9-test: input 7, output 9" in out
    assert "dry run: nothing installed" in out and installed(prices_dir) == []

    code, out = _update(str(_newer_file(tmp_path)), "--prices-dir", str(prices_dir))
    assert code == 0, out
    [(path, applied_at)] = installed(prices_dir)
    assert f"installed {path}" in out
    after_book = load_book((), prices_dir)
    past = applied_at - timedelta(microseconds=1)
    later = applied_at + timedelta(seconds=1)
    for model in ("gpt-4o", "gpt-4o-2024-11-20"):
        old = before_book.price(model=model, usage=USAGE, at=past, provider="openai")
        assert old is not None
        # Everything billed before the update keeps its price, in a new book too (so reprice agrees).
        assert after_book.price(model=model, usage=USAGE, at=past, provider="openai") == old
        new = after_book.price(model=model, usage=USAGE, at=later, provider="openai")
        assert new is not None and new.layer == "base" and new.effective_from == applied_at
        assert new.cost_usd == (Decimal(138) * 3 + Decimal(1152) * Decimal("1.5") + Decimal(212) * 12) / 10**6
    assert after_book.price(model="gpt-9-test", usage=USAGE, at=later, provider="openai") is not None
    # Models the update does not change keep their curated history (Sonnet 4's long context).
    big = Usage(input_tokens=300_000, output_tokens=1000)
    assert after_book.price(model="claude-sonnet-4", usage=big, at=later, provider="anthropic") == (
        before_book.price(model="claude-sonnet-4", usage=big, at=later, provider="anthropic")
    )
    show = CliRunner().invoke(
        main, ["prices", "show", "gpt-4o", "--provider", "openai", "--prices-dir", str(prices_dir)]
    )
    assert "in force now: base layer" in show.output and applied_at.isoformat() in show.output


def test_update_refuses_a_truncated_or_unreadable_file(tmp_path: Path) -> None:
    prices_dir = tmp_path / "prices"
    code, out = _update(str(_newer_file(tmp_path, truncate=True)), "--prices-dir", str(prices_dir))
    assert code != 0 and "fewer than half" in out and "not installed" in out
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    code, out = _update(str(bad), "--prices-dir", str(prices_dir))
    assert code != 0 and "expected a genai-prices data file" in out
    code, out = _update(str(tmp_path / "missing.json"), "--prices-dir", str(prices_dir))
    assert code != 0 and "cannot read" in out
    assert installed(prices_dir) == []


async def _ask(base_url: str, model: str) -> None:
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=base_url, api_key="sk-test-0000", max_retries=0)
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


async def test_a_running_proxy_uses_an_update_within_seconds(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    body = json.loads(load_fixture("openai_chat_json").body)  # real shape, answered as gpt-4o
    body["model"] = "gpt-4o-2024-08-06"
    upstream.reply("/v1/chat/completions", Reply(body=json.dumps(body, indent=2).encode()))
    prices_dir = tmp_path / "prices"
    proxy = await make_proxy(prices_dir=str(prices_dir), prices_reload_interval=0.05)
    await _ask(f"{proxy.url}/openai/v1", "gpt-4o")
    [first] = await proxy.rows(1)

    code, out = await asyncio.to_thread(_update, str(_newer_file(tmp_path)), "--prices-dir", str(prices_dir))
    assert code == 0, out
    live = proxy.app[PRICES]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while live.generation == 0:
        assert loop.time() < deadline, "the running proxy did not pick up the update"
        await asyncio.sleep(0.02)
    await _ask(f"{proxy.url}/openai/v1", "gpt-4o")
    rows = await proxy.rows(2)
    second = next(r for r in rows if r["id"] != first["id"])
    assert (
        Decimal(first["cost_usd"])
        == (Decimal(138) * Decimal("2.5") + 1152 * Decimal("1.25") + 212 * 10) / 10**6
    )
    assert Decimal(second["cost_usd"]) == (Decimal(138) * 3 + 1152 * Decimal("1.5") + 212 * 12) / 10**6

    # Reprice with the updated book: the row made before the update keeps its cost.
    report = reprice(proxy.db, load_book((), prices_dir), since="2000-01-01")
    assert report.changed == 0
    again = {r["id"]: r for r in await proxy.rows(2)}
    assert again[first["id"]]["cost_usd"] == first["cost_usd"]
    assert again[second["id"]]["cost_usd"] == second["cost_usd"]


async def test_update_from_a_url(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The same file served over HTTP by a real server on 127.0.0.1 (genai-prices publishes it so)."""
    upstream.reply("/prices/new_data/v2/data.json", Reply(body=_newer_file(tmp_path).read_bytes()))
    prices_dir = tmp_path / "prices"
    url = f"{upstream.url}/prices/new_data/v2/data.json"
    code, out = await asyncio.to_thread(_update, url, "--prices-dir", str(prices_dir))
    assert code == 0, out
    assert out.startswith(f"{url}: ") and "openai/gpt-4o: input 2.5 -> 3" in out
    assert len(installed(prices_dir)) == 1
    upstream.reply("/missing.json", Reply(body=b"not found", status=404))
    code, out = await asyncio.to_thread(
        _update, f"{upstream.url}/missing.json", "--prices-dir", str(prices_dir)
    )
    assert code != 0 and "cannot use" in out and len(installed(prices_dir)) == 1

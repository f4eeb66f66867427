"""Acceptance: a ``reserve`` budget holds against ``meterproxy serve`` when requests ask for several answers.

OpenAI's ``n`` (and ``best_of``) and Gemini's ``candidateCount`` make the model
generate that many answers, each up to ``max_tokens``, and every one is billed.
A worst case that counted one answer let 100 concurrent ``n=4`` requests spend
about four times the limit. Here the proxy runs as a user starts it (a
subprocess with a config file and a SQLite file), the clients are the official
openai SDK, and the fake upstream holds every answer until each of the 100
requests is either in flight at the upstream or refused, so all admissions see
every other request's reservation and none has settled yet.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import openai
from aiohttp import web

from meterproxy.money import from_pico
from meterproxy.pricing import PriceBook
from meterproxy.providers.gemini import GeminiProvider
from meterproxy.providers.openai import OpenAIProvider
from meterproxy.testing import FakeUpstream, Reply
from meterproxy.usage import Usage
from tests.helpers.served import Served

MODEL = "gpt-4o-mini"
PROMPT = "Name three rivers."
MAX_TOKENS = 1_000
N = 4
REQUESTS = 100


def answer(body: dict[str, object], prompt_tokens: int) -> dict[str, object]:
    """A chat completion in api.openai.com's shape, every answer using all of ``max_tokens``."""
    n = int(body.get("n") or 1)  # type: ignore[call-overload]
    return {
        "id": "chatcmpl-acceptance",
        "object": "chat.completion",
        "created": 1764720000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "Nile " * 10, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length",
            }
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n * MAX_TOKENS,
            "total_tokens": prompt_tokens + n * MAX_TOKENS,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_acceptance",
    }


def cost_bound(body_bytes: int) -> Decimal:
    """The most one request can really cost: every body byte a token, four full answers."""
    priced = PriceBook.default().price(
        model=MODEL,
        usage=Usage(input_tokens=body_bytes, output_tokens=N * MAX_TOKENS),
        at=datetime.now(UTC),
        provider="openai",
    )
    assert priced is not None
    return priced.cost_usd


async def test_reserve_budget_counts_every_answer_a_request_asks_for(tmp_path: Path) -> None:
    release = asyncio.Event()
    bodies: list[int] = []

    async def chat(request: web.Request) -> web.Response:
        raw = await request.read()
        bodies.append(len(raw))
        await release.wait()  # hold every admitted request in flight until all 100 are decided
        return web.json_response(answer(json.loads(raw), prompt_tokens=len(raw) // 4))

    # The SDK's body for this request is well under 300 bytes; the limit fits 7.5 worst cases.
    limit = (cost_bound(300) * Decimal("7.5")).quantize(Decimal("1e-9"))
    config = tmp_path / "meterproxy.toml"
    config.write_text(
        f'[[budgets]]\nname = "team"\nlimit_usd = "{limit}"\nperiod = "month"\naction = "reserve"\n'
    )
    db = tmp_path / "meter.db"
    async with FakeUpstream() as upstream:
        upstream.replies["/v1/chat/completions"] = chat
        proxy = Served(str(db), upstream.url, tmp_path, "serve", config=config)
        try:
            await proxy.ready()
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="sk-acceptance", max_retries=0)
            refused = 0

            async def call() -> bool:
                nonlocal refused
                try:
                    await client.chat.completions.create(
                        model=MODEL,
                        n=N,
                        max_tokens=MAX_TOKENS,
                        messages=[{"role": "user", "content": PROMPT}],
                    )
                    return True
                except openai.RateLimitError as exc:
                    assert "team" in exc.message
                    refused += 1
                    return False

            calls = [asyncio.ensure_future(call()) for _ in range(REQUESTS)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while refused + len(bodies) < REQUESTS:
                assert loop.time() < deadline, f"{refused} refused, {len(bodies)} forwarded"
                assert not any(c.done() and c.exception() for c in calls)
                await asyncio.sleep(0.02)
            release.set()
            admitted = sum(await asyncio.gather(*calls))
            assert await proxy.terminate() == 0  # a clean shutdown commits every record
        finally:
            release.set()
            proxy.stop()

    assert max(bodies) <= 300
    with sqlite3.connect(db) as conn:
        spent_pico, rows = conn.execute(
            "SELECT COALESCE(SUM(cost_pico), 0), COUNT(*) FROM requests"
        ).fetchone()
    spent = from_pico(spent_pico) or Decimal(0)
    assert rows == REQUESTS
    assert 1 <= admitted < REQUESTS
    assert spent <= limit, f"{admitted} admitted spent ${spent} of a ${limit} limit"


def test_the_answers_a_request_asks_for_are_read_from_its_body() -> None:
    openai_provider, gemini = OpenAIProvider(), GeminiProvider()
    assert openai_provider.inspect_request("/v1/chat/completions", b'{"model":"m","n":4}').choices == 4
    assert openai_provider.inspect_request("/v1/completions", b'{"model":"m","n":2,"best_of":5}').choices == 5
    assert openai_provider.inspect_request("/v1/chat/completions", b'{"model":"m","n":-3}').choices == 1
    assert openai_provider.inspect_request("/v1/chat/completions", b'{"model":"m","n":true}').choices == 1
    assert openai_provider.inspect_request("/v1/responses", b'{"model":"m"}').choices == 1
    body = b'{"generationConfig":{"candidateCount":3,"maxOutputTokens":100}}'
    info = gemini.inspect_request("/v1beta/models/gemini-2.5-flash:generateContent", body)
    assert (info.choices, info.max_output_tokens) == (3, 100)


async def test_a_request_naming_no_model_is_refused_once_the_reserve_budget_is_spent(tmp_path: Path) -> None:
    # Azure OpenAI: the deployment is in the path, the body names no model, the answer does.
    # With unpriced = "allow" (the default refuses it outright: tests/test_budget_reserve.py).
    answer = {
        "id": "chatcmpl-azure",
        "object": "chat.completion",
        "created": 1764720000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 4_000, "total_tokens": 4_100},
    }
    config = tmp_path / "meterproxy.toml"
    config.write_text(
        '[[budgets]]\nname = "cap"\nlimit_usd = "0.2"\nperiod = "month"\naction = "reserve"\n'
        'unpriced = "allow"\n'
    )
    path = "/openai/deployments/prod/chat/completions"
    async with FakeUpstream() as upstream:
        upstream.reply(path, Reply(body=json.dumps(answer).encode()))
        proxy = Served(
            str(tmp_path / "meter.db"),
            "",
            tmp_path,
            "serve",
            config=config,
            upstreams=[f"azure={upstream.url}"],
        )
        try:
            await proxy.ready()
            client = openai.AsyncAzureOpenAI(
                azure_endpoint=f"{proxy.url}/azure",
                api_key="azure-key",
                api_version="2024-10-21",
                max_retries=0,
            )
            outcomes = []
            for sent in range(1, 13):  # one after the other: each costs $0.04025
                try:
                    await client.chat.completions.create(
                        model="prod", max_tokens=4_000, messages=[{"role": "user", "content": "x"}]
                    )
                    outcomes.append("ok")
                except openai.RateLimitError:
                    outcomes.append("refused")
                await committed(tmp_path / "meter.db", sent)  # its cost counts before the next one
        finally:
            proxy.stop()
    assert outcomes == ["ok"] * 5 + ["refused"] * 7  # the 5th passes $0.20; every later one is refused


async def committed(db: Path, rows: int) -> None:
    """Wait (bounded) until ``rows`` records are in the store."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        with sqlite3.connect(db) as conn:
            if conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] >= rows:
                return
        assert loop.time() < deadline, f"fewer than {rows} rows committed"
        await asyncio.sleep(0.02)

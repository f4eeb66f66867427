"""Acceptance: a ``reserve`` budget holds against ``meterproxy serve`` when requests ask for several answers.

OpenAI's ``n`` (and ``best_of``) and Gemini's ``candidateCount`` make the model
generate that many answers, each up to ``max_tokens``, and every one is billed.
A worst case that counted one answer let 100 concurrent ``n=4`` requests spend
about four times the limit. Here the proxy runs as a user starts it (a
subprocess with a config file and a SQLite file), the clients are the official
openai SDK, and the fake upstream holds every answer until each of the 100
requests is either in flight at the upstream or refused, so all admissions see
every other request's reservation and none has settled yet.

The same holds for each way a user sends a request: the openai SDK streamed and
not, with and without ``max_tokens`` (the worst case then reserves
``budget_reserve_output_tokens``), and the anthropic SDK on ``/anthropic``,
streamed and not; every refusal is the SDK's ``RateLimitError``, and once the
rows are committed ``/api/budgets`` shows the stored spend and nothing held.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from meterproxy.money import from_pico
from meterproxy.pricing import PriceBook
from meterproxy.providers.gemini import GeminiProvider
from meterproxy.providers.openai import OpenAIProvider
from meterproxy.testing import FakeUpstream, Reply
from meterproxy.usage import Usage
from tests.helpers.sdk import SDK_TIMEOUT
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
            client = openai.AsyncOpenAI(
                timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-acceptance", max_retries=0
            )
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
                timeout=SDK_TIMEOUT,
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


# -- #19 item 1 as a user runs it: both SDKs, streamed and not, with and without max_tokens ----------

#: (user, SDK, stream, max_tokens): one reserve budget per variant, scoped by X-Meter-User, all in
#: one ``serve`` at once, so every variant's admissions race every other's on the same store.
VARIANTS = [
    ("oa-json-max", "openai", False, 400),
    ("oa-json-nomax", "openai", False, None),
    ("oa-sse-max", "openai", True, 400),
    ("oa-sse-nomax", "openai", True, None),
    ("an-json-max", "anthropic", False, 400),
    ("an-sse-max", "anthropic", True, 400),  # Anthropic's API requires max_tokens
]
VARIANT_OF = {(sdk, stream, max_tokens): user for user, sdk, stream, max_tokens in VARIANTS}
#: Output tokens an answer uses when the request sets no limit (the worst case then reserves
#: gpt-4o-mini's own output limit, 16,384: pricing/limits/output_tokens.toml).
UNLIMITED_OUTPUT = 3_000


def openai_answer(body: dict[str, Any], prompt_tokens: int) -> tuple[bytes, str]:
    """api.openai.com's bytes for a gpt-4o-mini answer: pretty JSON, or chunks ending in usage."""
    output = int(body.get("max_tokens") or UNLIMITED_OUTPUT)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": output,
        "total_tokens": prompt_tokens + output,
    }
    head = {"id": "chatcmpl-accept", "created": 1764720000, "model": "gpt-4o-mini-2024-07-18"}
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": "Nile", "refusal": None, "annotations": []}
        doc = {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}],
            "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}},
            "service_tier": "default",
            "system_fingerprint": "fp_accept",
        }
        return json.dumps(doc, indent=2).encode() + b"\n", "application/json"
    chunk = {
        **head,
        "object": "chat.completion.chunk",
        "service_tier": "default",
        "system_fingerprint": "fp_a",
    }
    deltas = [{"role": "assistant", "content": "", "refusal": None}, {"content": "Nile"}, {}]
    events = [
        {
            **chunk,
            "choices": [
                {"index": 0, "delta": d, "logprobs": None, "finish_reason": "length" if not d else None}
            ],
        }
        | {"usage": None}
        for d in deltas
    ]
    if (body.get("stream_options") or {}).get("include_usage"):  # the proxy adds it (inject_stream_usage)
        events.append({**chunk, "choices": [], "usage": usage})
    text = "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) + "data: [DONE]\n\n"
    return text.encode(), "text/event-stream; charset=utf-8"


def anthropic_answer(body: dict[str, Any], input_tokens: int) -> tuple[bytes, str]:
    """api.anthropic.com's bytes for a claude-haiku-4-5 answer using all of max_tokens."""
    output = int(body["max_tokens"])
    message = {
        "model": "claude-haiku-4-5-20251001",
        "id": "msg_accept",
        "type": "message",
        "role": "assistant",
    }
    usage = {"input_tokens": input_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    if not body.get("stream"):
        doc = {
            **message,
            "content": [{"type": "text", "text": "Nile"}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": output, "service_tier": "standard"},
        }
        return json.dumps(doc, separators=(",", ":")).encode(), "application/json"
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**usage, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Nile"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                "usage": {"output_tokens": output},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    text = "".join(
        f"event: {name}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n" for name, doc in events
    )
    return text.encode(), "text/event-stream; charset=utf-8"


@pytest.mark.slow
async def test_reserve_budgets_hold_for_both_sdks_streamed_or_not_with_or_without_max_tokens(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()
    forwarded: dict[str, int] = {user: 0 for user, *_ in VARIANTS}

    async def answer_for(request: web.Request, build: Any) -> web.StreamResponse:
        raw = await request.read()
        doc = json.loads(raw)
        # The proxy strips X-Meter-User: the variant is known by its SDK's path and its body.
        sdk = "anthropic" if request.path == "/v1/messages" else "openai"
        forwarded[VARIANT_OF[sdk, bool(doc.get("stream")), doc.get("max_tokens")]] += 1
        await release.wait()  # every admitted request stays in flight until all are decided
        body, content_type = build(doc, len(raw) // 4)  # fewer tokens than body bytes
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    async def chat(request: web.Request) -> web.StreamResponse:
        return await answer_for(request, openai_answer)

    async def messages(request: web.Request) -> web.StreamResponse:
        return await answer_for(request, anthropic_answer)

    # Each limit fits a few worst cases of its variant: the no-max_tokens ones reserve 32,768
    # output tokens each, the others 400, so their limits differ by the same factor.
    limits = {
        user: Decimal("0.05") if sdk == "openai" and max_tokens is None else Decimal("0.0012")
        for user, sdk, _, max_tokens in VARIANTS
    }
    limits["an-json-max"] = limits["an-sse-max"] = Decimal("0.01")
    config = tmp_path / "meterproxy.toml"
    config.write_text(
        "".join(
            f'[[budgets]]\nname = "{user}"\nlimit_usd = "{limits[user]}"\nperiod = "month"\n'
            f'action = "reserve"\nscope = {{ user = "{user}" }}\n'
            for user, *_ in VARIANTS
        )
    )
    db = tmp_path / "meter.db"
    outcomes: dict[str, list[str]] = {user: [] for user, *_ in VARIANTS}
    async with FakeUpstream() as upstream:
        upstream.replies["/v1/chat/completions"] = chat
        upstream.replies["/v1/messages"] = messages
        proxy = Served(str(db), upstream.url, tmp_path, "serve", config=config)
        try:
            await proxy.ready()

            # One client per variant, built before any request: 600 clients built inside the calls
            # (an SSL context each) held the loop for over 100 s on a busy machine before the first
            # request left. The SDKs' pools take 1,000 connections, so 100 calls go at once.
            oa_clients = {
                user: openai.AsyncOpenAI(
                    timeout=SDK_TIMEOUT,
                    base_url=f"{proxy.url}/v1",
                    api_key="sk-accept",
                    max_retries=0,
                    default_headers={"X-Meter-User": user},
                )
                for user, sdk, *_ in VARIANTS
                if sdk == "openai"
            }
            an_clients = {
                user: anthropic.AsyncAnthropic(
                    timeout=SDK_TIMEOUT,
                    base_url=f"{proxy.url}/anthropic",
                    api_key="sk-ant",
                    max_retries=0,
                    default_headers={"X-Meter-User": user},
                )
                for user, sdk, *_ in VARIANTS
                if sdk == "anthropic"
            }

            async def call(user: str, sdk: str, stream: bool, max_tokens: int | None) -> None:
                try:
                    if sdk == "openai":
                        oa = oa_clients[user]
                        limit = openai.omit if max_tokens is None else max_tokens
                        chat: list[openai.types.chat.ChatCompletionMessageParam] = [
                            {"role": "user", "content": PROMPT}
                        ]
                        if stream:
                            chunks = await oa.chat.completions.create(
                                model=MODEL,
                                messages=chat,
                                max_tokens=limit,
                                stream=True,
                            )
                            async for _ in chunks:
                                pass
                        else:
                            await oa.chat.completions.create(model=MODEL, messages=chat, max_tokens=limit)
                    else:
                        an = an_clients[user]
                        assert max_tokens is not None
                        said: list[anthropic.types.MessageParam] = [{"role": "user", "content": PROMPT}]
                        if stream:
                            events = await an.messages.create(
                                model="claude-haiku-4-5", max_tokens=max_tokens, messages=said, stream=True
                            )
                            async for _ in events:
                                pass
                        else:
                            await an.messages.create(
                                model="claude-haiku-4-5", max_tokens=max_tokens, messages=said
                            )
                    outcomes[user].append("ok")
                except openai.RateLimitError as exc:
                    # OpenAI's own "out of credit" error, which clients treat as final.
                    assert sdk == "openai" and exc.code == "insufficient_quota", exc.body
                    refused(exc, user)
                except anthropic.RateLimitError as exc:
                    assert sdk == "anthropic" and isinstance(exc.body, dict), exc.body
                    assert exc.body["type"] == "error" and exc.body["error"]["type"] == "rate_limit_error"
                    refused(exc, user)

            def refused(exc: openai.APIStatusError | anthropic.APIStatusError, user: str) -> None:
                assert exc.status_code == 429 and exc.response.headers["x-should-retry"] == "false"
                assert "cannot cover this request" in str(exc) and f"'{user}'" in str(exc)
                outcomes[user].append("refused")

            calls = [asyncio.ensure_future(call(*v)) for v in VARIANTS for _ in range(REQUESTS)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while sum(o.count("refused") for o in outcomes.values()) + sum(forwarded.values()) < len(calls):
                assert loop.time() < deadline, (outcomes, forwarded)
                assert not any(c.done() and c.exception() for c in calls), [
                    c.exception() for c in calls if c.done()
                ]
                await asyncio.sleep(0.02)
            release.set()
            await asyncio.gather(*calls)
            views = await settled(proxy, len(calls))
            for client in [*oa_clients.values(), *an_clients.values()]:
                await client.close()
        finally:
            release.set()
            proxy.stop()

    with sqlite3.connect(db) as conn:
        spent = {
            user: from_pico(pico) or Decimal(0)
            for user, pico in conn.execute(
                'SELECT "user", COALESCE(SUM(cost_pico), 0) FROM requests GROUP BY "user"'
            )
        }
    for user, *_ in VARIANTS:
        admitted = outcomes[user].count("ok")
        assert admitted == forwarded[user], user
        assert 1 <= admitted < REQUESTS, (user, admitted)
        assert 0 < spent[user] <= limits[user], (user, spent[user], limits[user])
        assert Decimal(views[user]["spend_usd"]) == spent[user], user
        assert Decimal(views[user]["reserved_usd"]) == 0, user


async def settled(proxy: Served, rows: int) -> dict[str, Any]:
    """The budgets' views once every request's row is committed (bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        with sqlite3.connect(proxy.db) as conn:
            committed = conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        if committed >= rows:
            status, text = await proxy.get("/api/budgets")
            assert status == 200, text
            doc = json.loads(text, parse_float=Decimal)
            return {b["name"]: b for b in (doc["budgets"] if isinstance(doc, dict) else doc)}
        assert loop.time() < deadline, f"{committed} of {rows} rows committed"
        await asyncio.sleep(0.05)

"""Reserve budgets: 100 concurrent requests never spend past the limit, on SQLite and on 3 PG replicas.

The fake upstream answers after a pause, so every request is in flight at once:
exactly the situation where a ``block`` budget overshoots by the cost of all
of them. The answer's usage is consistent with the request (fewer input tokens
than the body has bytes, output within ``max_tokens``), as a real provider's
would be. Spend is checked against the rows the proxy stored.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from meterproxy.app_state import METRICS
from meterproxy.budgets.definition import BudgetSpec
from meterproxy.budgets.feature import BUDGETS
from meterproxy.budgets.reserve import ReservationLedger, worst_case
from meterproxy.budgets.spend import SpendTracker
from meterproxy.money import from_pico
from meterproxy.pricing import PriceBook
from meterproxy.store import backend
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import FakeUpstream, Reply, free_port, load_fixture, make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.budgets import query
from tests.helpers.pg import fresh_database, pg_or_skip
from tests.helpers.sdk import SDK_TIMEOUT
from tests.helpers.served import Served
from tests.helpers.waits import WAIT_S

MODEL = "gpt-4o-mini"
PROMPT = "Summarise the causes of the French Revolution in two sentences. " * 3
MAX_TOKENS = 60
ANSWER = {
    "id": "chatcmpl-reserve",
    "object": "chat.completion",
    "created": 1764000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Debt and bread.", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {
        "prompt_tokens": 45,
        "completion_tokens": 55,
        "total_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_reserve",
}


def serve_answer(upstream: FakeUpstream, stall: float) -> None:
    upstream.reply("/v1/chat/completions", Reply(body=json.dumps(ANSWER, indent=2).encode(), stall=stall))


def request_bytes() -> int:
    # What the openai SDK sends (compact JSON): used only to size the limit in the test.
    body = {"messages": [{"role": "user", "content": PROMPT}], "model": MODEL, "max_tokens": MAX_TOKENS}
    return len(json.dumps(body).encode())


def per_request_worst() -> Decimal:
    record = make_record(model=MODEL)
    record.request_bytes = request_bytes()
    record.max_output_tokens = MAX_TOKENS
    pico = worst_case(record, PriceBook.default(), 32_768, datetime.now(UTC))
    assert pico is not None
    return from_pico(pico) or Decimal(0)


async def call(client: openai.AsyncOpenAI) -> bool:
    try:
        await client.chat.completions.create(
            model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
        )
        return True
    except openai.RateLimitError as exc:
        assert "cannot cover this request" in exc.message and "team" in exc.message
        return False


async def test_reserve_budget_never_spends_past_its_limit_under_100_concurrent_requests(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    serve_answer(upstream, stall=0.5)
    worst = per_request_worst()
    limit = (worst * Decimal("7.5")).quantize(Decimal("1e-9"))
    proxy = await make_proxy(
        budgets=[{"name": "team", "limit_usd": str(limit), "period": "month", "action": "reserve"}]
    )
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-reserve", max_retries=0
    )
    results = await asyncio.gather(*(call(client) for _ in range(100)))
    admitted = sum(results)
    rows = await proxy.rows(100)
    spent = from_pico(query(proxy.db, "SELECT COALESCE(SUM(cost_pico), 0) FROM requests")[0][0]) or Decimal(0)

    assert spent <= limit, f"spent {spent} of {limit}"
    assert 7 <= admitted < 100, admitted  # 7 worst cases fit at once; a few more as answers settle
    assert len(upstream.received) == admitted, "a refused request must never reach the upstream"
    refused = [r for r in rows if r["status"] == 429]
    assert len(refused) == 100 - admitted
    assert all(r["error"] == "blocked by budget 'team'" and r["cost_pico"] is None for r in refused)

    # Every reservation is settled once the rows are committed: nothing stays held.
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/budgets/team") as r:
        view = json.loads(await r.text(), parse_float=Decimal)
    assert view["action"] == "reserve" and view["unpriced"] == "refuse"
    assert Decimal(view["reserved_usd"]) == 0
    assert Decimal(view["spend_usd"]) == spent


async def test_a_held_reservation_counts_until_it_expires(tmp_path: Path) -> None:
    """Another process's reservation (a row) blocks headroom; a lapsed one (a crash) does not."""
    db = tmp_path / "m.db"
    writer = StoreWriter(str(db))
    writer.start()
    try:
        now = datetime(2026, 11, 10, 12, tzinfo=UTC)
        spec = BudgetSpec.model_validate(
            {"name": "cap", "limit_usd": "1", "period": "month", "action": "reserve"}
        )
        state = SpendTracker().new_state(spec, "config")
        ledger = ReservationLedger(str(db), PriceBook.default, 1000, lambda: now)

        def hold(rid: str, amount_usd: str, expires: datetime) -> None:
            writer.call(
                lambda conn: conn.execute(
                    "INSERT INTO budget_reservations VALUES ($1, 'cap', $2, $3, $4)",
                    [
                        rid,
                        int(Decimal(amount_usd) * 10**12),
                        now.isoformat(),
                        expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    ],
                )
            ).result(10)

        hold("other-replica", "0.99995", now + timedelta(minutes=1))
        record = make_record(model=MODEL, usage=Usage())
        record.request_bytes, record.max_output_tokens = 200, 100
        refusal = await ledger.admit(record, [state])
        assert refusal is not None and refusal.held_pico == 999_950_000_000

        # The other replica crashed: its hold lapses and the headroom comes back.
        writer.call(lambda conn: conn.execute("DELETE FROM budget_reservations")).result(10)
        hold("crashed", "0.99995", now - timedelta(seconds=1))
        assert await ledger.admit(record, [state]) is None
        ledger.close()
    finally:
        writer.close(timeout=10)


def test_reserve_needs_a_calendar_period() -> None:
    with pytest.raises(ValueError, match="calendar period"):
        BudgetSpec.model_validate(
            {"name": "x", "limit_usd": "1", "period": "rolling:1h", "action": "reserve"}
        )


def test_unpriced_policy_is_checked() -> None:
    base = {"name": "x", "limit_usd": "1", "period": "month"}
    assert BudgetSpec.model_validate({**base, "action": "reserve"}).unpriced_policy == "refuse"
    with pytest.raises(ValueError, match="action 'reserve' only"):
        BudgetSpec.model_validate({**base, "action": "block", "unpriced": "allow"})
    with pytest.raises(ValueError, match="go together"):
        BudgetSpec.model_validate({**base, "action": "reserve", "unpriced": "reserve"})
    with pytest.raises(ValueError, match="go together"):
        BudgetSpec.model_validate({**base, "action": "reserve", "unpriced_reserve_usd": "0.01"})


#: A name the price tables do not know (an Azure deployment, a private alias); the answer
#: names gpt-4o-mini, which is priced, so what the request really costs counts as spend.
DEPLOYMENT = "our-mini-deployment"


async def call_unpriced(client: openai.AsyncOpenAI) -> str:
    try:
        await client.chat.completions.create(
            model=DEPLOYMENT, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
        )
        return "admitted"
    except openai.RateLimitError as exc:
        if "cannot bound this request" in exc.message:
            assert f"'{DEPLOYMENT}' has no price" in exc.message and 'unpriced = "reserve"' in exc.message
            return "unpriced"
        assert "cannot cover this request" in exc.message
        return "limit"


@pytest.mark.parametrize("policy", ["refuse", "reserve", "allow"])
async def test_unpriced_requests_under_a_reserve_budget_follow_its_policy(
    upstream: FakeUpstream, make_proxy: ProxyFactory, policy: str
) -> None:
    """100 concurrent requests for a model without a price, each answered by a priced model."""
    serve_answer(upstream, stall=0.5)
    hold = per_request_worst()  # covers one answer (the answer is well within the request's limits)
    limit = (hold * Decimal("7.5")).quantize(Decimal("1e-9"))
    budget: dict[str, Any] = {"name": "team", "limit_usd": str(limit), "period": "month", "action": "reserve"}
    if policy != "refuse":
        budget["unpriced"] = policy
    if policy == "reserve":
        budget["unpriced_reserve_usd"] = str(hold)
    proxy = await make_proxy(budgets=[budget])
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-reserve", max_retries=0
    )
    results = await asyncio.gather(*(call_unpriced(client) for _ in range(100)))
    await proxy.rows(100)
    spent = from_pico(query(proxy.db, "SELECT COALESCE(SUM(cost_pico), 0) FROM requests")[0][0]) or Decimal(0)
    admitted = results.count("admitted")
    assert len(upstream.received) == admitted, "a refused request must never reach the upstream"
    if policy == "refuse":
        # The default: a hard limit refuses what it cannot bound, and says how to change that.
        assert results.count("unpriced") == 100 and spent == 0
    elif policy == "reserve":
        assert spent <= limit, f"spent {spent} of {limit}"
        assert 7 <= admitted < 100, admitted
    else:
        # "allow" holds nothing: every request in flight at once gets through, past the limit.
        # This is the overshoot the other two policies exist to prevent (documented in README).
        assert spent > limit, f"spent {spent} of {limit} with {admitted} admitted"


@pytest.fixture
async def pg_db() -> AsyncIterator[str]:
    pg_or_skip()
    with fresh_database() as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["priced", "refuse", "reserve"])
async def test_reserve_budget_holds_across_three_postgresql_replicas(
    upstream: FakeUpstream, pg_db: str, tmp_path: Path, policy: str
) -> None:
    """The priced case, and the ``unpriced`` policies that hold the limit, across 3 processes."""
    serve_answer(upstream, stall=0.5)
    worst = per_request_worst()
    limit = (worst * Decimal("7.5")).quantize(Decimal("1e-9"))
    budget = f'[[budgets]]\nname = "team"\nlimit_usd = "{limit}"\nperiod = "month"\naction = "reserve"\n'
    if policy == "reserve":
        budget += f'unpriced = "reserve"\nunpriced_reserve_usd = "{worst}"\n'
    config = tmp_path / "meterproxy.toml"
    config.write_text(budget)
    replicas = [Served(pg_db, upstream.url, tmp_path, f"replica{i}", config=config) for i in range(3)]
    try:
        await asyncio.gather(*(r.ready() for r in replicas))
        clients = [
            openai.AsyncOpenAI(
                timeout=SDK_TIMEOUT, base_url=f"{r.url}/v1", api_key="sk-reserve", max_retries=0
            )
            for r in replicas
        ]
        send = call if policy == "priced" else call_unpriced
        results = await asyncio.gather(*(send(clients[i % 3]) for i in range(100)))
        admitted = sum(1 for r in results if r in (True, "admitted"))
        for r in replicas:
            assert await r.terminate() == 0
        rows: list[Any] = await asyncio.to_thread(_stored, pg_db)
        spent = sum((Decimal(str(r[0])) for r in rows if r[0] is not None), Decimal(0))
        assert len(rows) == 100
        assert len(upstream.received) == admitted, "a refused request must never reach the upstream"
        if policy == "refuse":
            assert results.count("unpriced") == 100 and spent == 0
        else:
            assert spent <= limit, f"spent {spent} of {limit} across replicas"
            assert 7 <= admitted < 100, admitted
    finally:
        for r in replicas:
            r.stop()


def _stored(db: str) -> list[Any]:
    conn = backend.read_connection(db)
    try:
        return list(conn.execute("SELECT cost_usd FROM requests").fetchall())
    finally:
        conn.close()


async def test_budgets_api_shows_a_finished_request_as_spent_not_held_at_once(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    """Read right after each answer, as a script checking its run would: no linger in the view."""
    serve_answer(upstream, stall=0)
    proxy = await make_proxy(
        budgets=[{"name": "team", "limit_usd": "5", "period": "month", "action": "reserve"}]
    )
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-reserve", max_retries=0
    )
    seen = []
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            assert await call(client)
            async with (
                http.get(f"{proxy.url}/api/budgets/team") as one,
                http.get(f"{proxy.url}/api/budgets") as every,
            ):
                listed = json.loads(await every.text(), parse_float=Decimal)["budgets"]
                for view in (json.loads(await one.text(), parse_float=Decimal), *listed):
                    seen.append((Decimal(view["reserved_usd"]), Decimal(view["spend_usd"])))
    each = from_pico(query(proxy.db, "SELECT MIN(cost_pico) FROM requests")[0][0])
    assert each is not None and each > 0
    assert seen == [(Decimal(0), each * (i // 2 + 1)) for i in range(20)]


async def test_the_reserved_gauge_falls_back_to_zero_once_the_requests_settle(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    serve_answer(upstream, stall=0.3)
    limit = (per_request_worst() * Decimal("7.5")).quantize(Decimal("1e-9"))
    proxy = await make_proxy(
        budgets=[{"name": "team", "limit_usd": str(limit), "period": "month", "action": "reserve"}]
    )
    registry = proxy.app[METRICS].registry
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-reserve", max_retries=0
    )
    results = await asyncio.gather(*(call(client) for _ in range(20)))
    assert 7 <= sum(results) < 20
    await proxy.rows(20)
    # Well before the ledger's own 30 s refresh: the commits that settled the holds re-read them.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (held := registry.get_sample_value("meterproxy_budget_reserved_usd", {"budget": "team"})) != 0:
        assert loop.time() < deadline, f"the gauge still shows {held} held"
        await asyncio.sleep(0.02)


async def test_holds_settled_during_a_reread_get_a_reread_of_their_own(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    # The gauge's re-read after commits that settle holds ran one at a time and dropped the
    # commits that came while it read: those holds stayed on the gauge until the 30 s refresh.
    proxy = await make_proxy(
        budgets=[{"name": "team", "limit_usd": "1", "period": "month", "action": "reserve"}]
    )
    engine = proxy.app[BUDGETS]
    reads: list[list[str]] = []
    first_read_may_end = asyncio.Event()
    original = engine.ledger.refresh_held

    async def slow_first(names: list[str]) -> None:
        reads.append(list(names))
        if len(reads) == 1:
            await first_read_may_end.wait()
        await original(names)

    engine.ledger.refresh_held = slow_first  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    engine._holds_settled()  # a commit settled holds (the writer thread's call)
    while not reads:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    engine._holds_settled()  # another, while the first re-read is reading
    first_read_may_end.set()
    while len(reads) < 2:
        assert loop.time() < deadline, "the second commit got no re-read"
        await asyncio.sleep(0.01)
    assert reads == [["team"], ["team"]]


async def test_a_websocket_session_releases_its_reservation(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    # A Realtime session is admitted like one request (one worst case held under the session's
    # id). Its rows are one per response: the first carries the session's id and settles the
    # hold. Before, no row did, and the process kept refreshing the hold for as long as it lived.
    import websockets

    from tests.helpers.ws import realtime_session, ws_upstream, ws_url

    ws_upstream(upstream, "/v1/realtime", realtime_session)
    proxy = await make_proxy(
        budgets=[{"name": "team", "limit_usd": "100", "period": "month", "action": "reserve"}]
    )
    registry = proxy.app[METRICS].registry
    url = f"{ws_url(proxy.url)}/v1/realtime?model=gpt-realtime"
    async with websockets.connect(url, additional_headers={"Authorization": "Bearer sk-rt"}) as ws:
        await ws.recv()  # session.created
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/budgets") as r:
            [budget] = (await r.json())["budgets"]
        assert budget["reserved_usd"] > 0  # the session's worst case, until its first response
        for _ in range(2):
            await ws.send(json.dumps({"type": "response.create"}))
            async for text in ws:
                if json.loads(text)["type"] == "response.done":
                    break
    first, second = await proxy.rows(2)
    session = json.loads(first["extra"])["ws_session"]
    assert first["id"] == session and second["id"] != session
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20  # below the ledger's 30 s refresh, which would release it anyway
    while (held := registry.get_sample_value("meterproxy_budget_reserved_usd", {"budget": "team"})) != 0:
        assert loop.time() < deadline, f"the gauge still shows {held} held after the session ended"
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/budgets") as r:
        [budget] = (await r.json())["budgets"]
    assert budget["reserved_usd"] == 0
    assert Decimal(str(budget["spend_usd"])) == Decimal(first["cost_usd"]) + Decimal(second["cost_usd"])


def test_a_request_without_an_output_limit_reserves_its_models_own() -> None:
    # gpt-5 can answer with 128,000 tokens: reserving budget_reserve_output_tokens (32,768) for
    # it held a quarter of what one answer may cost, and 'hard' limits could be passed 4x.
    from meterproxy.output_limits import load_output_limits, output_limit
    from meterproxy.providers.bedrock import BedrockProvider

    book = PriceBook.default()
    now = datetime.now(UTC)

    def output_reserved(model: str, max_tokens: int | None = None, upstream: str = "openai") -> Decimal:
        record = make_record(model=model, upstream=upstream, provider=upstream)
        record.requested_model, record.request_bytes, record.max_output_tokens = model, 0, max_tokens
        pico = worst_case(record, book, 32_768, now)
        assert pico is not None
        one_token = book.price(model=model, usage=Usage(output_tokens=1), at=now, provider=upstream)
        assert one_token is not None
        prompt = book.price(model=model, usage=Usage(input_tokens=1), at=now, provider=upstream)
        assert prompt is not None
        return (from_pico(pico) - prompt.cost_usd) / one_token.cost_usd

    assert output_reserved("gpt-5-2025-08-07") == 128_000  # a dated snapshot finds its model's limit
    assert output_reserved("gpt-4o-mini") == 16_384
    assert output_reserved("gpt-5", max_tokens=500) == 500  # what the request asks for comes first
    assert output_reserved("gpt-3.5-turbo-instruct") == 32_768  # not in the table: the setting
    assert output_limit(book, None, "openai") is None
    # A Bedrock id finds its vendor's model's limit (Claude Sonnet 4: 64,000), and a Converse
    # request's inferenceConfig.maxTokens is its output limit.
    bedrock_id = "us.anthropic.claude-sonnet-4-20250514-v1:0"
    assert output_reserved(bedrock_id, upstream="bedrock") == 64_000
    converse = {"messages": [], "inferenceConfig": {"maxTokens": 300}}
    info = BedrockProvider().inspect_request(f"/model/{bedrock_id}/converse", json.dumps(converse).encode())
    assert info.max_output_tokens == 300
    for invoke, limit in (
        ({"max_tokens": 200, "anthropic_version": "bedrock-2023-05-31"}, 200),
        ({"prompt": "x", "max_gen_len": 150}, 150),
        ({"inputText": "x", "textGenerationConfig": {"maxTokenCount": 120}}, 120),
        ({"messages": [], "inferenceConfig": {"max_new_tokens": 90}}, 90),
        ({"messages": []}, None),
    ):
        path = f"/model/{bedrock_id}/invoke"
        assert BedrockProvider().inspect_request(path, json.dumps(invoke).encode()).max_output_tokens == limit
    # Every id in the table is a price table id (a typo would silently fall back to the setting).
    for model in load_output_limits():
        assert book.resolve(model) == model, model


async def _no_hold_left(proxy: Any, n_rows: int) -> dict[str, Any]:
    """Once ``n_rows`` are recorded, /api/budgets (which re-reads the holds) shows none held."""
    await proxy.rows(n_rows)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{proxy.url}/api/budgets") as r:
                [budget] = (await r.json())["budgets"]
            if budget["reserved_usd"] == 0:
                return budget
            assert loop.time() < deadline, f"{budget['reserved_usd']} still held"
            await asyncio.sleep(0.05)


async def test_every_way_a_request_can_end_releases_its_reservation(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    # A client that hangs up mid-stream (the upstream never sends usage and the drain gives up),
    # an upstream that answers 500, one that dies mid-answer, one that cannot be reached: each
    # request's record settles its hold (with what it cost: nothing here).
    budget = [{"name": "team", "limit_usd": "100", "period": "month", "action": "reserve"}]
    proxy = await make_proxy(budgets=budget, disconnect_drain_timeout=0.2)
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-reserve", max_retries=0
    )
    ask = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}

    upstream.replay(load_fixture("openai_chat_stream_no_usage"), delay=0.5)
    stream = await client.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
    async for _chunk in stream:
        break
    await stream.close()  # hang up after the first chunk
    await _no_hold_left(proxy, 1)
    [row] = await proxy.rows(1)
    assert row["client_disconnected"] == 1 and row["usage_source"] == "missing"

    upstream.reply("/v1/chat/completions", Reply(body=b'{"error": {"message": "boom"}}', status=500))
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(**ask)
    await _no_hold_left(proxy, 2)

    body = json.dumps(ANSWER).encode()
    upstream.reply("/v1/chat/completions", Reply(body=body, chunk_size=20, cut_after=30))
    with pytest.raises(openai.APIError):
        await client.chat.completions.create(**ask)
    await _no_hold_left(proxy, 3)

    dead = await make_proxy(budgets=budget, upstreams={"openai": f"http://127.0.0.1:{free_port()}"})
    unreachable = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{dead.url}/v1", api_key="sk-reserve", max_retries=0
    )
    with pytest.raises(openai.APIStatusError) as refused:
        await unreachable.chat.completions.create(**ask)
    assert refused.value.status_code == 502
    spent = await _no_hold_left(dead, 1)
    assert spent["spend_usd"] == 0

"""Budgets end to end: the official SDKs through the proxy, spend from the stored rows, 429s.

Every test runs the real app on 127.0.0.1 with its SQLite file in tmp, the fake
upstream replaying recorded provider bytes, and checks spend against the rows
the proxy actually stored (``SUM(cost_pico)``), never against a hard-coded cost.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from meterproxy.app_state import WRITER
from meterproxy.budgets import feature
from meterproxy.budgets.feature import BUDGETS
from meterproxy.money import from_pico
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.budgets import query
from tests.helpers.sdk import SDK_TIMEOUT
from tests.helpers.waits import WAIT_S

TINY = "0.000001"  # any priced request spends more than this


def openai_client(proxy: ProxyHarness, key: str = "sk-test-key-123456789") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)


async def openai_call(proxy: ProxyHarness, headers: dict[str, str] | None = None, **kw: Any) -> None:
    await openai_client(proxy, **kw).chat.completions.create(
        model="o4-mini",
        messages=[{"role": "user", "content": "What is the capital of the UK?"}],
        extra_headers=headers or {},
    )


async def api(proxy: ProxyHarness, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, proxy.url + path, json=body) as response,
    ):
        data = await response.json(content_type=None) if response.status != 204 else None
        return response.status, data


async def budget(proxy: ProxyHarness, name: str) -> dict[str, Any]:
    status, data = await api(proxy, "GET", f"/api/budgets/{name}")
    assert status == 200, data
    return dict(data)


def stored_spend(db: Path, where: str = "1=1", params: list[Any] | None = None) -> Decimal:
    rows = query(db, f"SELECT COALESCE(SUM(cost_pico), 0) FROM requests WHERE {where}", params)
    return from_pico(rows[0][0]) or Decimal(0)


async def test_openai_block_budget_answers_openai_shaped_429(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy(
        budgets=[{"name": "oa-cap", "scope": {"provider": "openai"}, "limit_usd": TINY, "action": "block"}]
    )
    await openai_call(proxy)  # spend was 0: allowed
    await proxy.rows(1)
    view = await budget(proxy, "oa-cap")
    assert Decimal(str(view["spend_usd"])) == stored_spend(proxy.db) > 0
    assert view["state"] == "blocking"

    sent = len(upstream.received)
    with pytest.raises(openai.RateLimitError) as info:
        await openai_call(proxy)
    assert len(upstream.received) == sent, "a blocked request must not reach the upstream"
    err = info.value
    assert err.status_code == 429
    assert "oa-cap" in err.message
    # OpenAI's own final "out of credit" shape: Codex and the SDK stop instead of retrying.
    assert isinstance(err.body, dict) and err.body["code"] == "insufficient_quota"
    assert err.body["type"] == "insufficient_quota"
    assert set(err.body) >= {"message", "type", "param", "code"}
    assert err.response.headers["x-should-retry"] == "false"
    # No retry-after: a client honouring it would sleep until the month ends.
    assert "retry-after" not in err.response.headers
    assert err.response.headers["x-meterproxy-budget-resets"].startswith("20")
    # The blocked request is recorded as such: 429, no cost, the budget named.
    allowed, blocked = await proxy.rows(2)
    assert allowed["status"] == 200 and allowed["cost_pico"] > 0
    assert blocked["status"] == 429 and blocked["cost_pico"] is None
    assert "oa-cap" in blocked["error"] and blocked["requested_model"] == "o4-mini"


async def test_anthropic_block_budget_raises_rate_limit_error(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("anthropic_messages_json"))
    proxy = await make_proxy(
        budgets=[
            {"name": "claude-cap", "scope": {"upstream": "anthropic"}, "limit_usd": TINY, "action": "block"}
        ]
    )
    client = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x", max_retries=0
    )

    async def call() -> None:
        await client.messages.create(
            model="claude-sonnet-4-20250514", max_tokens=1024, messages=[{"role": "user", "content": "Hello"}]
        )

    await call()
    await proxy.rows(1)
    sent = len(upstream.received)
    with pytest.raises(anthropic.RateLimitError) as info:
        await call()
    assert len(upstream.received) == sent
    assert info.value.status_code == 429
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert "claude-cap" in body["error"]["message"]


async def test_gemini_block_budget_raises_client_error_429(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    from google import genai
    from google.genai import errors, types

    for version in ("v1beta", "v1"):  # the SDK's API version varies by release
        upstream.replay(
            load_fixture("gemini_generate_json"), path=f"/{version}/models/gemini-2.5-flash:generateContent"
        )
    proxy = await make_proxy(
        budgets=[
            {
                "name": "flash-cap",
                "scope": {"model": "gemini-2.5-flash"},
                "limit_usd": TINY,
                "action": "block",
            }
        ]
    )
    client = genai.Client(
        api_key="AIzaTestKey", http_options=types.HttpOptions(base_url=f"{proxy.url}/gemini/")
    )

    async def call() -> None:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="sum of primes")

    await call()
    await proxy.rows(1)
    sent = len(upstream.received)
    with pytest.raises(errors.ClientError) as info:
        await call()
    assert len(upstream.received) == sent
    assert info.value.code == 429
    assert info.value.status == "RESOURCE_EXHAUSTED"
    assert "flash-cap" in (info.value.message or "")


async def test_alert_budget_never_blocks(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy(budgets=[{"name": "watch", "limit_usd": TINY}])
    for _ in range(3):
        await openai_call(proxy)
    rows = await proxy.rows(3)
    view = await budget(proxy, "watch")
    assert view["state"] == "exceeded"
    assert Decimal(str(view["spend_usd"])) == stored_spend(proxy.db)
    assert len(rows) == 3


async def test_block_budget_is_scoped(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    """A spent block budget for user bob stops bob, not alice."""
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy(
        budgets=[{"name": "bob", "scope": {"user": "bob"}, "limit_usd": TINY, "action": "block"}]
    )
    await openai_call(proxy, {"X-Meter-User": "bob"})
    await proxy.rows(1)
    with pytest.raises(openai.RateLimitError):
        await openai_call(proxy, {"X-Meter-User": "bob"})
    await openai_call(proxy, {"X-Meter-User": "alice"})
    await openai_call(proxy)
    rows = await proxy.rows(4)
    assert [(r["user"], r["status"]) for r in rows] == [
        ("bob", 200),
        ("bob", 429),
        ("alice", 200),
        (None, 200),
    ]


async def test_every_scope_kind_counts_exactly_its_rows(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    upstream.replay(load_fixture("anthropic_messages_json"))
    big = "1000"
    budgets = [
        {"name": "global", "limit_usd": big},
        {"name": "up-openai", "scope": {"upstream": "openai"}, "limit_usd": big},
        {"name": "prov-anthropic", "scope": {"provider": "anthropic"}, "limit_usd": big},
        {"name": "model-o4", "scope": {"model": "o4-mini"}, "limit_usd": big},
        {"name": "user-carol", "scope": {"user": "carol"}, "limit_usd": big},
        {"name": "tag-search", "scope": {"tags": {"team": "search"}}, "limit_usd": big},
        {
            "name": "combo",
            "scope": {"provider": "openai", "user": "carol", "tags": {"team": "search", "env": "prod"}},
            "limit_usd": big,
        },
    ]
    proxy = await make_proxy(budgets=budgets)
    await openai_call(proxy, {"X-Meter-User": "carol", "X-Meter-Tags": "team=search,env=prod"})
    await openai_call(proxy, {"X-Meter-User": "carol", "X-Meter-Tags": "team=search"})
    await openai_call(proxy, {"X-Meter-User": "dave"}, key="sk-other-key-987654321")
    claude = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x", max_retries=0
    )
    await claude.messages.create(
        model="claude-sonnet-4-20250514",
        max_tokens=10,
        messages=[{"role": "user", "content": "Hello"}],
        extra_headers={"X-Meter-Tags": "team=search"},
    )
    rows = await proxy.rows(4)
    assert all(r["cost_pico"] for r in rows), "every fixture must be priced for this test to mean anything"
    dave_key = next(r["key_fingerprint"] for r in rows if r["user"] == "dave")
    status, _ = await api(
        proxy, "POST", "/api/budgets", {"name": "key-dave", "scope": {"key": dave_key}, "limit_usd": big}
    )
    assert status == 201

    db = proxy.db
    expected = {
        "global": stored_spend(db),
        "up-openai": stored_spend(db, "upstream = 'openai'"),
        "prov-anthropic": stored_spend(db, "provider = 'anthropic'"),
        "model-o4": stored_spend(db, "requested_model = 'o4-mini'"),
        "user-carol": stored_spend(db, "user = 'carol'"),
        "tag-search": stored_spend(db, "json_extract(tags, '$.team') = 'search'"),
        "combo": stored_spend(db, "tags = ?", ['{"env":"prod","team":"search"}']),
        "key-dave": stored_spend(db, "key_fingerprint = ?", [dave_key]),
    }
    # Each scope selects a non-empty strict subset (so the assertions can fail).
    assert all(0 < v < expected["global"] for k, v in expected.items() if k != "global")
    _, listing = await api(proxy, "GET", "/api/budgets")
    got = {b["name"]: Decimal(str(b["spend_usd"])) for b in listing["budgets"]}
    assert got == expected


async def test_streamed_requests_count(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    upstream.replay(load_fixture("openai_chat_stream_usage"))
    proxy = await make_proxy(budgets=[{"name": "streams", "limit_usd": "5"}])
    stream = await openai_client(proxy).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is the capital of the UK?"}],
        stream=True,
    )
    _ = [c async for c in stream]
    rows = await proxy.rows(1)
    assert rows[0]["streamed"] == 1 and rows[0]["cost_pico"] > 0
    view = await budget(proxy, "streams")
    assert Decimal(str(view["spend_usd"])) == stored_spend(proxy.db)


async def test_spend_survives_restart(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    settings = {"budgets": [{"name": "month", "limit_usd": "100"}]}
    first = await make_proxy(**settings)
    await openai_call(first)
    await openai_call(first)
    await first.rows(2)
    before = (await budget(first, "month"))["spend_usd"]
    await first.server.close()
    second = await make_proxy(**settings)
    after = await budget(second, "month")
    assert Decimal(str(after["spend_usd"])) == Decimal(str(before)) == stored_spend(second.db) > 0


async def test_budget_api_crud(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(budgets=[{"name": "from-config", "limit_usd": "5"}])
    status, created = await api(
        proxy,
        "POST",
        "/api/budgets",
        {"name": "team", "scope": {"tags": {"team": "a"}}, "period": "week", "limit_usd": 12.5},
    )
    assert status == 201, created
    assert created["source"] == "api" and created["limit_usd"] == 12.5 and created["state"] == "ok"
    assert created["thresholds"] == [50, 80, 100]
    assert (await api(proxy, "POST", "/api/budgets", {"name": "team", "limit_usd": 1}))[0] == 409
    status, err = await api(proxy, "POST", "/api/budgets", {"name": "bad", "limit_usd": -1})
    assert status == 400 and "limit_usd" in err["error"]["message"]
    status, err = await api(
        proxy, "POST", "/api/budgets", {"name": "bad", "limit_usd": 1, "period": "fortnight"}
    )
    assert status == 400

    status, patched = await api(proxy, "PATCH", "/api/budgets/team", {"limit_usd": 20, "action": "block"})
    assert status == 200 and patched["limit_usd"] == 20 and patched["action"] == "block"
    assert patched["scope"] == {"tags": {"team": "a"}} and patched["period"] == "week"
    status, put = await api(proxy, "PUT", "/api/budgets/team", {"limit_usd": 3})
    assert status == 200 and put["period"] == "month" and put["scope"] == {}

    assert (await api(proxy, "DELETE", "/api/budgets/from-config"))[0] == 409
    assert (await api(proxy, "PATCH", "/api/budgets/from-config", {"limit_usd": 1}))[0] == 409
    _, listing = await api(proxy, "GET", "/api/budgets")
    assert [b["name"] for b in listing["budgets"]] == ["from-config", "team"]
    assert (await api(proxy, "DELETE", "/api/budgets/team"))[0] == 204
    assert (await api(proxy, "GET", "/api/budgets/team"))[0] == 404
    # Stored in the database, so a restart keeps API budgets.
    assert query(proxy.db, "SELECT name FROM budgets") == []


async def test_api_budgets_survive_restart(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    first = await make_proxy()
    assert (await api(first, "POST", "/api/budgets", {"name": "kept", "limit_usd": "7.25"}))[0] == 201
    await first.server.close()
    second = await make_proxy()
    view = await budget(second, "kept")
    assert view["limit_usd"] == 7.25 and view["source"] == "api"


async def test_metrics_gauges(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    from meterproxy.app_state import METRICS

    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy(budgets=[{"name": "gauged", "limit_usd": "2.5"}])
    if METRICS not in proxy.app:
        pytest.skip("metrics feature not enabled in this build")
    await openai_call(proxy)
    await proxy.rows(1)
    registry = proxy.app[METRICS].registry
    assert registry.get_sample_value("meterproxy_budget_limit_usd", {"budget": "gauged"}) == 2.5
    spend = registry.get_sample_value("meterproxy_budget_spend_usd", {"budget": "gauged"})
    assert spend == pytest.approx(float(stored_spend(proxy.db))) and spend > 0


async def test_a_budget_created_while_a_table_sync_reads_is_kept(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic sync (budgets another process added to the table) must not drop one the API
    just created: a sync whose read of the table predated the create removed it again, and GET
    answered 404 until the next tick (``budget_check_interval``, 10 s by default). Seen under load
    in test_cli_against_database_and_running_proxy."""
    proxy = await make_proxy(budget_check_interval=3600)  # no tick of its own: the test runs the sync
    engine = proxy.app[BUDGETS]
    read, created = threading.Event(), threading.Event()
    real = feature.load_api_budgets

    def read_before_the_create(conn: Any) -> Any:
        specs = real(conn)
        read.set()
        if threading.current_thread().name != "meterproxy-writer":
            # Read apart from the writer, the sync can be overtaken: let the create land first.
            created.wait(30)
        return specs

    monkeypatch.setattr(feature, "load_api_budgets", read_before_the_create)
    sync = asyncio.create_task(engine.sync_table())
    try:
        assert await asyncio.to_thread(read.wait, 30)
        assert (await api(proxy, "POST", "/api/budgets", {"name": "fresh", "limit_usd": 2}))[0] == 201
    finally:
        created.set()
    await sync
    assert (await api(proxy, "GET", "/api/budgets/fresh"))[0] == 200
    assert [s.spec.name for s in engine.tracker.states()] == ["fresh"]


async def test_a_resync_does_not_undo_an_update_made_while_it_runs(make_proxy: ProxyFactory) -> None:
    """The periodic resync re-reads every budget's spend, one writer call each. It took the
    definitions when it started, so one updated through the API before its turn came was
    loaded back with the old definition (until the next table sync, 10 s later)."""
    proxy = await make_proxy(budget_check_interval=3600, budget_resync_interval=3600)
    for name in ("a", "b"):
        assert (await api(proxy, "POST", "/api/budgets", {"name": name, "limit_usd": 1}))[0] == 201
    engine, writer = proxy.app[BUDGETS], proxy.app[WRITER]
    entered, release = threading.Event(), threading.Event()

    def busy(conn: Any) -> None:
        entered.set()
        release.wait(30)

    writer.call(busy)
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        resync = asyncio.create_task(engine.resync())  # its load of "a" waits behind the busy call
        update = asyncio.create_task(api(proxy, "PATCH", "/api/budgets/b", {"limit_usd": 7}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while writer.depth < 2:  # the load of "a", then the update of "b"
            assert loop.time() < deadline, "the resync and the update never reached the writer"
            await asyncio.sleep(0.01)
    finally:
        release.set()
    await resync
    assert (await update)[0] == 200
    assert (await budget(proxy, "b"))["limit_usd"] == 7

"""Three ``meterproxy serve`` processes on one PostgreSQL database behave as one proxy.

A platform team's deployment in miniature: three replicas (real processes, own
ports), one fresh database on the real PostgreSQL server, the official OpenAI
and Anthropic SDKs spreading concurrent traffic over all three, one
FakeUpstream replaying real wire bytes. Then:

- every request is stored exactly once (no loss, no double), and the totals
  every replica's API reports are the same and are exactly the sum of the
  per-request figures the price tables give;
- each replica exports its own counters (they add up to the traffic; each saw
  its share), as Prometheus expects when it sums over instances;
- a budget crossed while all three are busy alerts once per threshold (one
  webhook each, not one per replica);
- a ``block`` budget stops all three at exactly its limit when traffic is slower
  than ``replica_poll_interval`` (each replica reads the others' spend from the
  store), and its spend gauge reads the same on every replica.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest
from aiohttp import web

from meterproxy.pricing import PriceBook
from meterproxy.store import backend
from meterproxy.testing import FakeUpstream, load_fixture
from meterproxy.usage import Usage
from tests.helpers.pg import fresh_database, pg_or_skip
from tests.helpers.sdk import SDK_TIMEOUT
from tests.helpers.served import Served, metric_sum

pytestmark = pytest.mark.slow

REQUESTS = 150
CONCURRENCY = 24


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


@pytest.fixture
async def pg_db() -> AsyncIterator[str]:
    pg_or_skip()
    with fresh_database() as url:
        yield url


async def start_replicas(n: int, db: str, upstream: FakeUpstream, tmp_path: Path, **kw: Path) -> list[Served]:
    replicas = [Served(db, upstream.url, tmp_path, f"replica{i}", **kw) for i in range(n)]
    try:
        await asyncio.gather(*(r.ready() for r in replicas))
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return replicas


def price(expect: dict[str, int], model: str) -> Decimal:
    usage = Usage(
        **{
            k: int(expect.get(k, 0))
            for k in (
                "input_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "output_tokens",
                "reasoning_tokens",
            )
        }
    )
    result = PriceBook.default().price(model=model, usage=usage, at=datetime.now(UTC))
    assert result is not None
    return result.cost_usd


def stored(db: str) -> list[dict[str, object]]:
    conn = backend.read_connection(db)
    try:
        return [
            dict(r) for r in conn.execute("SELECT session, provider, cost_usd, input_tokens FROM requests")
        ]
    finally:
        conn.close()


async def wait_rows(db: str, n: int, timeout: float = 60.0) -> list[dict[str, object]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = await asyncio.to_thread(stored, db)
        if len(rows) >= n or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_three_replicas_share_one_database_exactly(
    upstream: FakeUpstream, pg_db: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    chat = load_fixture("openai_chat_stream_usage")
    message = load_fixture("anthropic_messages_json")
    upstream.replay(chat)
    upstream.replay(message, path="/v1/messages")
    n_openai, n_anthropic = REQUESTS // 2, REQUESTS - REQUESTS // 2
    cost_openai = price(chat.expect, str(chat.expect["model"]))
    cost_anthropic = price(message.expect, str(message.expect["model"]))
    # An alert budget over the Anthropic traffic, crossed four times while all three replicas
    # are busy: every crossing is seen by several replicas at once, and must alert once.
    receiver = await stack.enter_async_context(Receiver())
    config = tmp_path / "meterproxy.toml"
    config.write_text(
        f'replica_poll_interval = 0.1\n[webhooks.hook]\nurl = "{receiver.url}"\n'
        f'[[budgets]]\nname = "claude"\nlimit_usd = "{cost_anthropic * n_anthropic}"\n'
        f'scope = {{provider = "anthropic"}}\nthresholds = [25, 50, 75, 100]\n'
    )
    replicas = await start_replicas(3, pg_db, upstream, tmp_path, config=config)
    try:
        oai = [
            openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{r.url}/v1", api_key="sk-test-123456789")
            for r in replicas
        ]
        ant = [
            anthropic.AsyncAnthropic(
                timeout=SDK_TIMEOUT, base_url=f"{r.url}/anthropic", api_key="sk-ant-test"
            )
            for r in replicas
        ]
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            headers = {"X-Meter-Session": f"req-{i}", "X-Meter-User": f"user{i % 4}"}
            async with gate:
                if i % 2:
                    stream = await oai[i % 3].chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                        extra_headers=headers,
                    )
                    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                else:
                    reply = await ant[i % 3].messages.create(
                        model="claude-sonnet-4-5",
                        max_tokens=64,
                        messages=[{"role": "user", "content": "hi"}],
                        extra_headers=headers,
                    )
                    assert reply.usage.output_tokens == message.expect["output_tokens"]

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        rows = await wait_rows(pg_db, REQUESTS)

        # Exactly once each: no request lost, none stored twice by two replicas.
        counts = Counter(str(r["session"]) for r in rows)
        assert len(rows) == REQUESTS
        assert set(counts) == {f"req-{i}" for i in range(REQUESTS)}
        assert set(counts.values()) == {1}

        # Exact totals, the same from every replica's API.
        summaries = [json.loads((await r.get("/api/summary"))[1], parse_float=Decimal) for r in replicas]
        assert summaries[0] == summaries[1] == summaries[2]
        totals = summaries[0]["totals"]
        assert totals["requests"] == REQUESTS
        assert totals["input_tokens"] == (
            n_openai * chat.expect["input_tokens"] + n_anthropic * message.expect["input_tokens"]
        )
        assert Decimal(totals["cost_usd"]) == n_openai * cost_openai + n_anthropic * cost_anthropic
        assert sum(Decimal(str(r["cost_usd"])) for r in rows) == Decimal(totals["cost_usd"])

        # Each replica counts its own traffic; Prometheus' sum over instances is the whole.
        per_replica = [
            metric_sum((await r.get("/metrics"))[1], "meterproxy_requests_total") for r in replicas
        ]
        assert sum(per_replica) == REQUESTS
        assert all(count == REQUESTS / 3 for count in per_replica)

        # Four crossings, four events, each delivered once across the three replicas.
        await until(
            lambda: asyncio.to_thread(lambda: outbox_states(pg_db) == ["delivered"] * 4),
            "four webhooks delivered",
        )
        thresholds = sorted(str(body["threshold"]) for _, body in receiver.deliveries)
        assert thresholds == ["100", "25", "50", "75"], receiver.deliveries
        assert len({wid for wid, _ in receiver.deliveries}) == 4

        # A clean stop of every replica: exit 0, nothing lost.
        assert [await r.terminate() for r in replicas] == [0, 0, 0]
    finally:
        for r in replicas:
            r.stop()


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every delivery."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, object]]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Receiver:
        app = web.Application()

        async def hook(request: web.Request) -> web.Response:
            self.deliveries.append((request.headers["webhook-id"], await request.json()))
            return web.Response(status=204)

        app.router.add_post("/hook", hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def outbox_states(db: str) -> list[str]:
    conn = backend.read_connection(db)
    try:
        return [r[0] for r in conn.execute("SELECT state FROM webhook_outbox")]
    finally:
        conn.close()


async def test_a_block_budget_holds_across_replicas_and_each_webhook_arrives_once(
    upstream: FakeUpstream, pg_db: str, tmp_path: Path
) -> None:
    message = load_fixture("anthropic_messages_json")
    upstream.replay(message, path="/v1/messages")
    cost = price(message.expect, str(message.expect["model"]))
    allowed = 10
    async with Receiver() as receiver:
        config = tmp_path / "meterproxy.toml"
        config.write_text(
            f"replica_poll_interval = 0.1\nbudget_check_interval = 0.5\n"
            f'[webhooks.hook]\nurl = "{receiver.url}"\n'
            f'[[budgets]]\nname = "team"\nlimit_usd = "{cost * allowed}"\nperiod = "month"\n'
            f'action = "block"\nthresholds = [50, 100]\n'
        )
        replicas = await start_replicas(3, pg_db, upstream, tmp_path, config=config)
        try:
            clients = [
                anthropic.AsyncAnthropic(
                    timeout=SDK_TIMEOUT, base_url=f"{r.url}/anthropic", api_key="sk-ant-x", max_retries=0
                )
                for r in replicas
            ]

            async def spend_everywhere(expected: Decimal) -> bool:
                views = [
                    json.loads((await r.get("/api/budgets/team"))[1], parse_float=Decimal) for r in replicas
                ]
                return all(Decimal(v["spend_usd"]) == expected for v in views)

            answered, blocked_by = 0, []
            for i in range(allowed + 5):
                try:
                    await clients[i % 3].messages.create(
                        model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                    )
                    answered += 1
                except anthropic.RateLimitError as exc:
                    assert "team" in str(exc)
                    blocked_by.append(i % 3)
                # Each replica knows every other's spend before the next request goes out.
                await until(
                    lambda n=answered: spend_everywhere(n * cost), f"spend {answered} x {cost} everywhere"
                )
            # Exactly the limit's worth got through, then every replica refused.
            assert answered == allowed
            assert sorted(set(blocked_by)) == [0, 1, 2]
            # Blocked requests never reached a provider: whether or not they are recorded, they cost nothing.
            rows = [r for r in await asyncio.to_thread(stored, pg_db) if r["cost_usd"] is not None]
            assert len(rows) == allowed
            assert sum(Decimal(str(r["cost_usd"])) for r in rows) == cost * allowed

            # 50 % and 100 %: one event each, delivered once (not once per replica).
            await until(
                lambda: asyncio.to_thread(lambda: outbox_states(pg_db) == ["delivered"] * 2),
                "both webhooks delivered",
            )
            kinds = sorted(str(body["type"]) for _, body in receiver.deliveries)
            assert kinds == ["budget.exceeded", "budget.threshold_crossed"], receiver.deliveries
            assert len({wid for wid, _ in receiver.deliveries}) == 2

            # The spend gauge comes from the shared store: the same on every replica.
            gauges = [
                metric_sum((await r.get("/metrics"))[1], "meterproxy_budget_spend_usd", budget="team")
                for r in replicas
            ]
            assert gauges == [float(cost * allowed)] * 3
        finally:
            for r in replicas:
                r.stop()

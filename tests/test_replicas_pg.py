"""Three ``meterproxy serve`` processes on one PostgreSQL database behave as one proxy.

A platform team's deployment in miniature: three replicas (real processes, own
ports), one fresh database on the real PostgreSQL server, the official OpenAI
and Anthropic SDKs spreading concurrent traffic over all three, one
FakeUpstream replaying real wire bytes. Then:

- every request is stored exactly once (no loss, no double), and the totals
  every replica's API reports are the same and are exactly the sum of the
  per-request figures the price tables give;
- each replica exports its own counters (they add up to the traffic; each saw
  its share), as Prometheus expects when it sums over instances.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest

from meterproxy.pricing import PriceBook
from meterproxy.store import backend
from meterproxy.testing import FakeUpstream, load_fixture
from meterproxy.usage import Usage
from tests.pg import fresh_database, pg_or_skip
from tests.replicas import Replica, metric_sum

pytestmark = pytest.mark.slow

REQUESTS = 150
CONCURRENCY = 24


@pytest.fixture
async def pg_db() -> AsyncIterator[str]:
    pg_or_skip()
    with fresh_database() as url:
        yield url


async def start_replicas(
    n: int, db: str, upstream: FakeUpstream, tmp_path: Path, **kw: Path
) -> list[Replica]:
    replicas = [Replica(db, upstream.url, tmp_path, f"replica{i}", **kw) for i in range(n)]
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
    upstream: FakeUpstream, pg_db: str, tmp_path: Path
) -> None:
    chat = load_fixture("openai_chat_stream_usage")
    message = load_fixture("anthropic_messages_json")
    upstream.replay(chat)
    upstream.replay(message, path="/v1/messages")
    replicas = await start_replicas(3, pg_db, upstream, tmp_path)
    try:
        oai = [openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="sk-test-123456789") for r in replicas]
        ant = [
            anthropic.AsyncAnthropic(base_url=f"{r.url}/anthropic", api_key="sk-ant-test") for r in replicas
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
        n_openai, n_anthropic = REQUESTS // 2, REQUESTS - REQUESTS // 2
        cost_openai = price(chat.expect, str(chat.expect["model"]))
        cost_anthropic = price(message.expect, str(message.expect["model"]))
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

        # A clean stop of every replica: exit 0, nothing lost.
        assert [await r.terminate() for r in replicas] == [0, 0, 0]
    finally:
        for r in replicas:
            r.stop()

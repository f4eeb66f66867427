"""A finished request counts against in-process block budgets at once (issue 14.5).

The README's bound for a block budget is "overshoot by at most the cost of the
requests in flight". Spend used to move only when the store writer committed,
so in the default ``batch`` mode sequential requests could slip past the limit
while their records waited for a commit (10-16 admitted where 7 fit). Here the
writer is held busy (a real call that blocks its thread until released) so
that no record commits during the test: the limit must still hold exactly, in
both durability modes that do not wait for the commit per request (strict waits
per request, bounded, so it is shown with the writer free).
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from meterproxy.app_state import WRITER
from meterproxy.money import from_pico
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.budgets import query
from tests.helpers.sdk import SDK_TIMEOUT


async def _cost_of_one(make_proxy: ProxyFactory, tmp_path: Path) -> Decimal:
    probe = await make_proxy(db=str(tmp_path / "probe.db"))
    await _call(probe)
    await probe.server.close()
    [(pico,)] = query(tmp_path / "probe.db", "SELECT cost_pico FROM requests")
    cost = from_pico(pico)
    assert cost is not None and cost > 0
    return cost


async def _call(proxy: ProxyHarness) -> int:
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-123456789", max_retries=0
    )
    try:
        await client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "hi"}])
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


@pytest.mark.parametrize("durability", ["batch", "strict"])
async def test_sequential_requests_stop_exactly_at_the_limit(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path, durability: str
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    cost = await _cost_of_one(make_proxy, tmp_path)
    limit = cost * Decimal("6.5")  # 7 requests reach it; the 8th must be refused
    cap = {"name": "cap", "scope": {"provider": "openai"}, "limit_usd": str(limit), "action": "block"}
    proxy = await make_proxy(durability=durability, budgets=[cap])
    writer = proxy.app[WRITER]
    release = threading.Event()
    held = None
    if durability == "batch":
        # Hold the writer thread: nothing commits until the end of the test.
        started = threading.Event()

        def hold(conn: object) -> None:
            started.set()
            release.wait(30)

        held = writer.call(hold)
        assert await asyncio.to_thread(started.wait, 10)
    try:
        statuses = [await _call(proxy) for _ in range(10)]
    finally:
        release.set()
    if held is not None:
        await asyncio.wrap_future(held)
    assert statuses == [200] * 7 + [429] * 3, statuses
    rows = await proxy.rows(10)
    assert [r["status"] for r in rows] == statuses

"""Where each cost came from: every row says computed, partial or provider; summaries count each kind.

Through the real proxy with the official SDKs and real captured bytes: a normal answer is
``computed``; a stream cut by an ``event: error`` after ``message_start`` is ``partial`` (a lower
bound); an OpenRouter answer for a model no table prices keeps OpenRouter's own ``usage.cost`` as
its cost, labelled ``provider``, instead of no cost at all. ``/api/summary`` counts each kind, the
same before and after the rows are rolled up.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from meterproxy.app_state import WRITER
from meterproxy.store.rollups import roll_up
from meterproxy.testing import FakeUpstream, Reply, load_fixture
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT

PRIVATE = "acme/private-model-9000"


async def summary(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/summary") as r:
        assert r.status == 200, await r.text()
        return dict(json.loads(await r.text(), parse_float=Decimal))


async def test_each_row_says_where_its_cost_came_from(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy()
    # 1. computed: a complete answer priced from the tables.
    upstream.replay(load_fixture("openai_chat_json"))
    oa = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-cost-source", max_retries=0
    )
    await oa.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "hi"}])

    # 2. partial: Anthropic's stream cut by an error event after message_start.
    cut = load_fixture("anthropic_stream_error_event")
    upstream.replay(cut)
    an = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x", max_retries=0
    )
    with pytest.raises(anthropic.APIError):
        async with an.messages.stream(
            model="claude-sonnet-4-20250514", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for _ in stream:
                pass

    # 3. provider: OpenRouter's own cost for a model no price table knows.
    fx = load_fixture("openrouter_chat_stream")
    body = fx.body.replace(b"anthropic/claude-4.6-sonnet-20260217", PRIVATE.encode())
    upstream.reply(str(fx.meta["path"]), Reply(body=body, content_type=fx.content_type))
    ors = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/openrouter/api/v1", api_key="sk-or-x", max_retries=0
    )
    stream = await ors.chat.completions.create(
        model=PRIVATE, messages=[{"role": "user", "content": "Hello"}], stream=True
    )
    _ = [c async for c in stream]

    rows = {r["model"]: r for r in await proxy.rows(3)}
    computed, partial, provided = rows["o4-mini-2025-04-16"], rows[cut.expect["model"]], rows[PRIVATE]
    assert computed["cost_source"] == "computed" and computed["cost_pico"] > 0
    assert partial["usage_source"] == "partial"
    assert partial["cost_source"] == "partial" and partial["cost_pico"] > 0
    assert provided["cost_source"] == "provider"
    assert provided["priced_model"] is None
    assert Decimal(provided["cost_usd"]) == Decimal(provided["provider_cost_usd"]) == Decimal("0.000837")

    # The API says it per row, and the summary counts each kind (raw rows, then rolled up).
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/api/requests") as r:
        by_model = {x["model"]: x for x in (await r.json())["requests"]}
    assert by_model[PRIVATE]["cost_source"] == "provider"
    assert by_model[cut.expect["model"]]["cost_source"] == "partial"
    before = (await summary(proxy.url))["totals"]
    assert before["partial_requests"] == 1 and before["provider_cost_requests"] == 1
    assert before["estimated_requests"] == 0
    total = sum(Decimal(x["cost_usd"]) for x in rows.values())
    assert before["cost_usd"] == total

    proxy.app[WRITER].call(lambda db: roll_up(db)).result(30)
    after = (await summary(proxy.url))["totals"]
    for name in ("partial_requests", "provider_cost_requests", "estimated_requests", "cost_usd", "requests"):
        assert after[name] == before[name], name

    # `meterproxy report` counts them too: in --json, in --csv per row, in the table's sentence
    # (before, only /api/summary did; a report reader could not tell a lower bound from a bill).
    import asyncio
    import csv
    import io

    from click.testing import CliRunner

    from meterproxy.cli import main

    def report(*args: str) -> str:
        out = CliRunner().invoke(main, ["report", "model", "--db", str(proxy.db), *args])
        assert out.exit_code == 0, out.output
        return out.output

    totals = json.loads(await asyncio.to_thread(report, "--json"))["totals"]
    assert totals["partial_requests"] == 1 and totals["provider_cost_requests"] == 1
    rows_csv = list(csv.DictReader(io.StringIO(await asyncio.to_thread(report, "--csv"), newline="")))
    assert sum(int(r["partial_requests"]) for r in rows_csv) == 1
    assert sum(int(r["provider_cost_requests"]) for r in rows_csv) == 1
    table = await asyncio.to_thread(report)
    assert "Of the priced requests: 1 from streams cut before their final usage (lower bounds); " in table
    assert "1 at the provider's own figure" in table

"""``GET /api/requests``: shape, filters, keyset pagination, admin token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aiohttp

from meterproxy.app_state import WRITER
from meterproxy.testing import make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory


async def seed(proxy_app, records) -> None:  # type: ignore[no-untyped-def]
    writer = proxy_app[WRITER]
    for record in records:
        writer.submit(record)


async def test_shape_filters_and_pagination(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    base = datetime(2026, 11, 1, tzinfo=UTC)
    records = [
        make_record(
            ts=base + timedelta(minutes=i),
            session="a" if i % 2 else "b",
            user=f"u{i % 3}",
            tags={"team": "x"},
            usage=Usage(input_tokens=10 + i, output_tokens=i),
            cost_usd=Decimal("0.000123") * i,
        )
        for i in range(25)
    ]
    await seed(proxy.app, records)
    await proxy.rows(25)
    async with aiohttp.ClientSession() as client:
        seen: list[dict[str, object]] = []
        cursor = None
        while True:
            params = {"limit": "10", "session": "a"}
            if cursor:
                params["cursor"] = cursor
            async with client.get(f"{proxy.url}/api/requests", params=params) as resp:
                assert resp.status == 200
                page = await resp.json()
            seen.extend(page["requests"])
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(seen) == 12  # odd i in 0..24
        assert [r["ts"] for r in seen] == sorted((r["ts"] for r in seen), reverse=True)
        first = seen[0]
        assert first["session"] == "a" and first["tags"] == {"team": "x"}
        assert first["input_tokens"] == 10 + 23 and first["cost_usd"] == float(Decimal("0.000123") * 23)
        assert isinstance(first["streamed"], bool)

        async with client.get(
            f"{proxy.url}/api/requests",
            params={"since": "2026-11-01T00:10:00Z", "until": "2026-11-01T00:20:00", "user": "u1"},
        ) as resp:
            rows = (await resp.json())["requests"]
        assert {r["input_tokens"] - 10 for r in rows} == {i for i in range(10, 20) if i % 3 == 1}

        for bad in ({"since": "yesterday"}, {"limit": "0"}, {"cursor": "!!"}):
            async with client.get(f"{proxy.url}/api/requests", params=bad) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["param"] in bad


async def test_admin_token_guards_the_api_but_not_the_proxy(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(admin_token="s3cret")
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/api/requests") as resp:
            assert resp.status == 401
        async with client.get(f"{proxy.url}/api/requests", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with client.get(
            f"{proxy.url}/api/requests", headers={"Authorization": "Bearer s3cret"}
        ) as resp:
            assert resp.status == 200
        async with client.get(f"{proxy.url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"

"""HTTP and store helpers for tests that drive the in-process app (`tests.conftest.ProxyHarness`)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import aiohttp

from meterproxy.api.models import SummaryResponse
from meterproxy.app_state import WRITER
from meterproxy.usage import RequestRecord
from tests.conftest import ProxyHarness

__all__ = ["get_json", "get_text", "submit", "summary"]


async def get_json(proxy: ProxyHarness, path: str, **params: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}{path}", params=params) as resp,
    ):
        return resp.status, json.loads(await resp.text(), parse_float=Decimal)


async def get_text(proxy: ProxyHarness, path: str, **params: Any) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}{path}", params=params) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


async def summary(proxy: ProxyHarness, **params: Any) -> dict[str, Any]:
    status, body = await get_json(proxy, "/api/summary", **params)
    assert status == 200, body
    SummaryResponse.model_validate(body)
    return dict(body)


async def submit(proxy: ProxyHarness, records: list[RequestRecord]) -> None:
    writer = proxy.app[WRITER]
    for record in records:
        assert writer.submit(record)
    # The commit barrier, not a row count: a background retention pass may delete old rows
    # between two commits, so the count could never reach "before + len(records)".
    await proxy.settle()

"""What the dashboard's browser tests share: their mark, their session-loop fixtures, page helpers.

The browser tests run in pytest-asyncio's session loop, where the one shared
Chromium lives (`tests.helpers.browser`); `PAGE_TESTS` is their ``pytestmark``.
Every async fixture they use must run in that loop too, so `upstream` and
`make_proxy` here are session-loop twins of the suite's own (the same code,
``tests/conftest.py``'s `running_upstream` and `proxy_factory`). A module takes
them with ``upstream, make_proxy = dashboard.upstream, dashboard.make_proxy``
(an assignment, so the fixtures' parameter names do not shadow an import).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from meterproxy.testing import FakeUpstream
from tests.conftest import ProxyFactory, proxy_factory, running_upstream
from tests.helpers.browser import CHROMIUM, SESSION_LOOP

__all__ = [
    "ARTIFACTS",
    "PAGE_TESTS",
    "api_json",
    "by_priced_model",
    "make_proxy",
    "ready",
    "shown",
    "upstream",
]

# Screenshots are test artifacts: tmp/artifacts/ in the checkout (ignored by git), or $METERPROXY_ARTIFACTS.
ARTIFACTS = Path(
    os.environ.get("METERPROXY_ARTIFACTS") or Path(__file__).resolve().parents[2] / "tmp" / "artifacts"
)

#: Slow, only where Debian's chromium is installed, in the session loop.
PAGE_TESTS = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run does it)"
    ),
    SESSION_LOOP,
]


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with running_upstream() as up:
        yield up


@pytest_asyncio.fixture(loop_scope="session")
async def make_proxy(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    async with proxy_factory(upstream, tmp_path) as factory:
        yield factory


async def ready(page: Any) -> None:
    await page.wait_for_function("document.body.dataset.state === 'ready'")


async def api_json(proxy: Any, path: str, token: str | None = None, **params: str) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(proxy.url + path, params=params, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(loads=json.loads)


def by_priced_model(summary: dict[str, Any]) -> list[tuple[str, Decimal]]:
    """The API's model groups merged under the price-table id each name prices as, by cost."""
    merged: dict[str, Decimal] = {}
    for g in summary["groups"]:
        raw = g["key"]["model"]
        name = summary["priced_models"].get(raw) or raw
        merged[name] = merged.get(name, Decimal(0)) + Decimal(str(g["cost_usd"]))
    return sorted(merged.items(), key=lambda kv: -kv[1])


async def shown(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text()).strip()

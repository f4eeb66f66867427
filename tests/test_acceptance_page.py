"""Acceptance: the page on `meterproxy demo` data under `meterproxy serve`, at phone and desktop width.

What a user does: ``meterproxy demo PATH`` then ``meterproxy serve --db PATH``
(both as subprocesses), then opens the page in Debian's Chromium at 360 px (the
narrowest phone the README names) and at 1440 px. For every range button the
page must not scroll sideways, every control of the header must be on screen,
and each card, the sessions table and the most expensive requests must show
the API's figures for the range the page says it used; the session dialog must
fit the screen and close; nothing may throw.
"""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from meterproxy.reports import compact, money
from tests.helpers import dashboard
from tests.helpers.served import Served
from tests.helpers.userdirs import isolate_user_dirs

pytestmark = dashboard.PAGE_TESTS  # slow, only where Debian's chromium is installed, in the session loop

RANGES = ["today", "7d", "30d", "month"]
READY = "document.body.dataset.state === 'ready'"
# Elements whose right edge passes the window, outside the boxes meant to scroll inside themselves.
OFF_SCREEN = """() => [...document.querySelectorAll('body *')].filter(e => {
  if (e.closest('.table-wrap, dialog:not([open]), [hidden]')) return false;
  const r = e.getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.right > innerWidth + 0.5;
}).map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.className} ${e.textContent.trim().slice(0, 20)}`)"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def demo_serve(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``meterproxy demo`` served by ``meterproxy serve``, once for the module (the tests only read)."""
    tmp_path = tmp_path_factory.mktemp("demo-serve")
    db = tmp_path / "demo.db"
    with pytest.MonkeyPatch.context() as mp:  # set up before the tests' own isolation
        isolate_user_dirs(mp, tmp_path)
        made = subprocess.run(
            [sys.executable, "-m", "meterproxy", "demo", str(db)], capture_output=True, text=True, timeout=120
        )
        assert made.returncode == 0, made.stderr
        proxy = Served(str(db), "http://127.0.0.1:9", tmp_path, "serve")
    try:
        await proxy.ready()
        yield proxy
    finally:
        proxy.stop()


async def api(proxy: Served, path: str, **params: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + path, params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def texts(page: Any, selector: str) -> list[str]:
    return [
        str(t).strip()
        for t in await page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")
    ]


async def check_range(page: Any, proxy: Served, width: int, name: str) -> None:
    assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth"), f"{name} at {width}px"
    assert await page.evaluate(OFF_SCREEN) == [], f"{name} at {width}px"
    window = {
        "since": await page.evaluate("document.body.dataset.since"),
        "until": await page.evaluate("document.body.dataset.until"),
    }
    totals = (await api(proxy, "/api/summary", **window))["totals"]
    sessions = await api(proxy, "/api/sessions", sort="last_seen", order="desc", limit="10", **window)
    assert await dashboard.shown(page, "#card-cost .value") == money(Decimal(str(totals["cost_usd"])))
    assert await dashboard.shown(page, "#card-tokens .value") == compact(
        totals["input_tokens"] + totals["output_tokens"]
    )
    assert await dashboard.shown(page, "#card-requests .value") == f"{totals['requests']:,}"
    assert await dashboard.shown(page, "#card-sessions .value") == f"{sessions['total']:,}"
    shown_sessions = await page.eval_on_selector_all(
        "#sessions tbody tr[data-session]", "els => els.map(e => e.dataset.session)"
    )
    assert shown_sessions == [s["session"] for s in sessions["sessions"]]
    costs = await texts(page, "#sessions tbody td[data-label=Cost]")
    assert costs == [money(Decimal(str(s["cost_usd"]))) for s in sessions["sessions"]]


@pytest.mark.parametrize("width", [360, 1440])
async def test_demo_page_matches_the_api_at_every_range(demo_serve: Served, browser: Any, width: int) -> None:
    context = await browser.new_context(timezone_id="UTC", viewport={"width": width, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(demo_serve.url + "/")
    await page.wait_for_function(READY)
    for name in RANGES:
        await page.click(f"#ranges [data-range='{name}']")
        await page.wait_for_function(
            f"document.querySelector(\"#ranges [data-range='{name}']\").ariaPressed === 'true'"
        )
        await page.wait_for_function(READY)
        await check_range(page, demo_serve, width, name)

    # The month's most expensive requests, as the server sorts them.
    await page.click("#most-expensive")
    await page.wait_for_function(
        "document.querySelector('#most-expensive').getAttribute('aria-pressed') === 'true'"
    )
    await page.wait_for_function(READY)
    window = {
        "since": await page.evaluate("document.body.dataset.since"),
        "until": await page.evaluate("document.body.dataset.until"),
    }
    top = await api(demo_serve, "/api/requests", sort="cost", order="desc", limit="20", **window)
    ids = await page.eval_on_selector_all("#requests tbody tr[data-id]", "els => els.map(e => e.dataset.id)")
    assert ids == [str(r["id"]) for r in top["requests"]]
    costs = await texts(page, "#requests tbody td[data-label=Cost]")
    assert costs == [money(Decimal(str(r["cost_usd"]))) for r in top["requests"]]
    assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")

    # The session dialog: every cell and the close button on screen, and it closes.
    await page.click("#sessions tbody tr[data-session] >> nth=0")
    await page.wait_for_selector("#detail[open] tbody tr")
    rights = await page.eval_on_selector_all(
        "#detail tbody td", "els => els.map(e => e.getBoundingClientRect().right)"
    )
    assert rights and max(rights) <= width
    close = await page.locator("#detail button.close").bounding_box()
    assert close is not None and close["x"] >= 0 and close["x"] + close["width"] <= width
    await page.click("#detail button.close")
    await page.wait_for_selector("#detail:not([open])", state="attached")
    assert errors == []
    await context.close()

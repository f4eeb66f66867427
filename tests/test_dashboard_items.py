"""Issue 18, item by item, on the demo database, at phone (390 px) and desktop (1440 px) widths.

The database is what ``meterproxy demo`` writes (several providers, users,
sessions, errors, a budget block, unpriced models, imports, budgets) plus one
long session with failures, served by a real proxy; every figure read from
the page is compared with the API's answer for the same range. Screenshots of
both widths go to the artifacts directory (see ``tests.helpers.dashboard.ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from meterproxy.demo import DemoShape, write_demo
from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.reports import money
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import Usage
from tests.helpers import dashboard
from tests.helpers.dashboard import ARTIFACTS, api_json, by_priced_model, ready, shown

pytestmark = dashboard.PAGE_TESTS  # slow, only where Debian's chromium is installed, in the session loop
upstream, make_proxy = dashboard.upstream, dashboard.make_proxy  # their session-loop twins

WIDTHS = [390, 1440]
LONG = "sess-long"


def _long_session(now: datetime) -> list[Any]:
    """130 requests in one session, among them an upstream error, a timeout and a budget block."""
    out = []
    for i in range(130):
        r = make_record(
            model="claude-haiku-4-5-20251001" if i % 2 else "gpt-4o-mini",
            provider="anthropic" if i % 2 else "openai",
            upstream="anthropic" if i % 2 else "openai",
            usage=Usage(input_tokens=2_000 + i, cache_read_tokens=500, output_tokens=100),
            ts=now - timedelta(minutes=5 + i),
        )
        r.session, r.user, r.tags = LONG, "alice", {"team": "platform"}
        if i == 3:
            r.status, r.error, r.usage, r.usage_source = 500, "upstream error", None, "none"
        if i == 4:
            r.status, r.error, r.usage, r.usage_source = None, "upstream timeout after 120 s", None, "none"
        if i == 5:
            r.status, r.error, r.usage, r.usage_source = 429, "blocked by budget 'team-cap'", None, "none"
        if i == 6:
            r.usage_source = "partial"  # a stream cut before its final usage: a priced lower bound
        out.append(r)
    return out


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo database, written once for the module (each test serves its own copy)."""
    db = tmp_path_factory.mktemp("demo") / "meter.db"
    now = datetime.now(UTC)
    write_demo(db, DemoShape(requests=900, days=38, sessions=60, seed=7), now)
    writer = StoreWriter(str(db))
    writer.start()
    price = price_record_with(PriceBook.default())
    for r in _long_session(now):
        price(r)
        writer.submit(r)
    writer.close()
    return db


@pytest_asyncio.fixture(loop_scope="session")
async def demo_proxy(make_proxy: Any, tmp_path: Path, demo_db: Path) -> Any:
    # A copy per test: some tests add budgets. SQLite's backup API copies a consistent database.
    with closing(sqlite3.connect(demo_db)) as source, closing(sqlite3.connect(tmp_path / "meter.db")) as copy:
        source.backup(copy)  # to the path make_proxy serves
    return await make_proxy()


async def open_page(browser: Any, proxy: Any, width: int, query: str = "?range=30d") -> Any:
    context = await browser.new_context(
        timezone_id="UTC", viewport={"width": width, "height": 900}, accept_downloads=True
    )
    page = await context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    await page.goto(proxy.url + "/" + query)
    await ready(page)
    return page


async def page_range(page: Any) -> dict[str, str]:
    return {
        "since": await page.evaluate("document.body.dataset.since"),
        "until": await page.evaluate("document.body.dataset.until"),
    }


async def shot(page: Any, name: str, width: int) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"items-{name}-{width}.png"), full_page=True)


NO_PAGE_SCROLL = "document.documentElement.scrollWidth <= window.innerWidth"


@pytest.mark.parametrize("width", [360, *WIDTHS, 1920])
async def test_1_layout_fits_the_width(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width)
    assert await page.evaluate(NO_PAGE_SCROLL), await page.evaluate("document.documentElement.scrollWidth")
    header = await page.evaluate("document.querySelector('header').getBoundingClientRect().height")
    assert header <= 60
    # every range button is on screen, none scrolled out of the header
    ends = await page.eval_on_selector_all(
        "#ranges button", "els => els.map(e => e.getBoundingClientRect().right)"
    )
    assert max(ends) <= width
    # burn-chart axis text is drawn at its real size, not scaled down with the chart
    sizes = await page.eval_on_selector_all(
        "#burn svg text.axis", "els => els.map(e => e.getBoundingClientRect().height)"
    )
    assert sizes and min(sizes) >= 9
    # every cost in the requests table is on screen (reflowed on a phone, in the card on a desktop)
    rights = await page.eval_on_selector_all(
        "#requests tbody td[data-label=Cost]", "els => els.map(e => e.getBoundingClientRect().right)"
    )
    assert rights and max(rights) <= width
    await shot(page, "overview", width)
    # the session dialog shows every column of a request, cost included, within the screen
    await open_long_session(page)
    await page.wait_for_selector("#detail[open] #session-requests")
    labels = await page.eval_on_selector_all(
        "#session-requests tbody tr:first-child td",
        "els => els.filter(e => e.getBoundingClientRect().right <= innerWidth + 1).map(e => e.dataset.label)",
    )
    assert labels == [
        "Time",
        "Model",
        "Outcome",
        "Input",
        "Cache read",
        "Cache write",
        "Output",
        "Cost",
        "Tags",
    ]
    await page.screenshot(path=str(ARTIFACTS / f"items-session-dialog-{width}.png"))
    assert page.js_errors == []


async def open_long_session(page: Any) -> None:
    await page.click("#sessions th[data-sort=requests] button")
    await page.wait_for_selector("#sessions th[data-sort=requests][data-active=desc]")
    await ready(page)
    await page.click(f"#sessions tbody tr[data-session='{LONG}']")


@pytest.mark.parametrize("width", WIDTHS)
async def test_2_unpriced_spend_is_named(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width)
    summary = await api_json(demo_proxy, "/api/summary", **await page_range(page))
    want = [(m["model"], m["unpriced_requests"]) for m in summary["unpriced_models"]]
    assert want, "the demo has unpriced models"
    rows = await page.eval_on_selector_all(
        "#unpriced tbody tr", "els => els.map(e => [e.dataset.model, e.children[2].textContent])"
    )
    assert [(m, int(n.replace(",", ""))) for m, n in rows] == want
    assert "--pricing" in await shown(page, "#unpriced-panel")
    total = summary["totals"]["unpriced_requests"]
    assert f"+ {total:,} unpriced requests" in await shown(page, "#card-cost .sub")
    # the cost share names them too, with a count instead of $0
    unpriced = await page.eval_on_selector_all(
        "#distribution .share.unpriced", "els => els.map(e => e.dataset.label)"
    )
    assert set(unpriced) == {m for m, _ in want}
    assert "$0" not in " ".join(
        await page.eval_on_selector_all(
            "#distribution .share.unpriced .share-value", "els => els.map(e => e.textContent)"
        )
    )


@pytest.mark.parametrize("width", WIDTHS)
async def test_3_most_expensive_requests_sorted_by_the_server(
    demo_proxy: Any, browser: Any, width: int
) -> None:
    page = await open_page(browser, demo_proxy, width)
    await page.click("#most-expensive")
    await page.wait_for_selector("#most-expensive[aria-pressed=true]")
    await ready(page)
    rng = await page_range(page)
    want = await api_json(demo_proxy, "/api/requests", sort="cost", limit="20", **rng)
    ids = await page.eval_on_selector_all("#requests tbody tr", "els => els.map(e => e.dataset.id)")
    assert ids == [r["id"] for r in want["requests"]]
    costs = await page.eval_on_selector_all(
        "#requests tbody td[data-label=Cost]", "els => els.map(e => e.textContent)"
    )
    assert costs == [money(Decimal(str(r["cost_usd"]))) for r in want["requests"]]
    everything = await api_json(demo_proxy, "/api/requests", limit="1000", **rng)
    top = max(Decimal(str(r["cost_usd"])) for r in everything["requests"] if r["cost_usd"] is not None)
    assert costs[0] == money(top)  # the range's most expensive, not one page's
    assert f"of {want['total']:,}" in await shown(page, "#requests-pager span")
    # sessions sort by cost on the server too
    await page.click("#sessions th[data-sort=cost] button")
    await page.wait_for_selector("#sessions th[data-sort=cost][aria-sort=descending]")
    await ready(page)
    top_sessions = await api_json(demo_proxy, "/api/sessions", sort="cost", limit="10", **rng)
    shown_ids = await page.eval_on_selector_all(
        "#sessions tbody tr", "els => els.map(e => e.dataset.session)"
    )
    assert shown_ids == [s["session"] for s in top_sessions["sessions"]]


@pytest.mark.parametrize("width", WIDTHS)
async def test_4_and_5_session_dialog_pages_and_outcomes(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width)
    await open_long_session(page)
    await page.wait_for_selector("#detail[open] #session-requests")
    rng = await page_range(page)
    detail = await api_json(demo_proxy, f"/api/sessions/{LONG}", limit="100", **rng)
    assert await shown(page, "#session-pager span") == f"1–100 of {detail['totals']['requests']}"
    summary = await shown(page, ".session-summary")
    t = detail["totals"]
    assert (
        money(Decimal(str(t["cost_usd"]))) in summary and "cache read" in summary and "User: alice" in summary
    )
    subtotals = await page.eval_on_selector_all(
        "#session-models tbody tr",
        "els => els.map(e => [e.children[0].textContent, e.children[5].textContent])",
    )
    assert subtotals == [[m["model"], money(Decimal(str(m["cost_usd"])))] for m in detail["models"]]
    heads = await page.eval_on_selector_all(
        "#session-requests thead th", "els => els.map(e => [e.textContent, getComputedStyle(e).textAlign])"
    )
    if width > 640:  # on a phone the header gives way to labelled lines
        assert dict(heads)["Cost"] == "right" and dict(heads)["Input"] == "right"
    outcomes = await page.eval_on_selector_all(
        "#session-requests tbody td[data-label=Outcome]", "els => els.map(e => e.textContent)"
    )
    by_id = {r["id"]: r for r in detail["requests"]}
    ids = await page.eval_on_selector_all("#session-requests tbody tr", "els => els.map(e => e.dataset.id)")
    for rid, text in zip(ids, outcomes, strict=True):
        r = by_id[rid]
        if r["error"] and r["error"].startswith("blocked by budget"):
            assert text == "blocked by budget team-cap"
        elif r["status"] == 500:
            assert text == "error 500"
        elif r["error"]:
            assert text == "error: timeout"
        elif r["usage_source"] == "partial":
            assert text == "partial usage"
        else:
            assert text == "ok 200"
    assert {"blocked by budget team-cap", "error 500", "error: timeout", "partial usage"} <= set(outcomes)
    partial = next(r for r in detail["requests"] if r["usage_source"] == "partial")
    cost = await page.eval_on_selector(
        f"#session-requests tr[data-id='{partial['id']}'] td[data-label=Cost]", "e => e.textContent"
    )
    assert cost == "≥ " + money(Decimal(str(partial["cost_usd"])))
    assert "unpriced model" not in outcomes
    await page.click("#session-pager button:last-child")
    await page.wait_for_function(
        "document.querySelector('#session-pager span').textContent === "
        f"'101–{t['requests']} of {t['requests']}'"
    )
    page2 = await api_json(demo_proxy, f"/api/sessions/{LONG}", limit="100", offset="100", **rng)
    ids2 = await page.eval_on_selector_all("#session-requests tbody tr", "els => els.map(e => e.dataset.id)")
    assert ids2 == [r["id"] for r in page2["requests"]]
    assert page.js_errors == []


def _luminance(rgb: str) -> float:
    parts = [int(x) / 255 for x in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in parts]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


@pytest.mark.parametrize("width", WIDTHS)
async def test_6_keyboard_tables_for_charts_and_contrast(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width)
    # a row takes focus and opens with Enter
    await page.focus("#requests tbody tr:first-child")
    assert await page.evaluate("document.activeElement.dataset.id") is not None
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#detail[open]")
    await page.keyboard.press("Escape")
    await page.wait_for_function("!document.querySelector('#detail').open")
    # sortable headers are buttons, with aria-sort
    await page.focus("#sessions th[data-sort=cost] button")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#sessions th[data-sort=cost][aria-sort=descending]")
    # the burn chart's numbers as a table: its totals column adds up to the range's cost
    rng = await page_range(page)
    summary = await api_json(demo_proxy, "/api/summary", **rng)
    await page.click("#burn details.as-table summary")
    cells = await page.eval_on_selector_all(
        "#burn details.as-table tbody tr", "els => els.map(e => e.lastElementChild.textContent)"
    )
    bars = await page.eval_on_selector_all("#burn rect", "els => els.map(e => Number(e.dataset.value))")
    assert abs(sum(bars) - float(summary["totals"]["cost_usd"])) < 1e-6 and cells
    # the pressed range button's text contrast is at least 4.5:1
    fg, bg = await page.eval_on_selector(
        "#ranges [aria-pressed=true]", "e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]"
    )
    light, dark = sorted([_luminance(fg), _luminance(bg)], reverse=True)
    assert (light + 0.05) / (dark + 0.05) >= 4.5


@pytest.mark.parametrize("width", WIDTHS)
async def test_7_one_model_one_row_and_burn_adds_up(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width)
    rng = await page_range(page)
    by_model = await api_json(demo_proxy, "/api/summary", group_by="model", **rng)
    labels = await page.eval_on_selector_all(
        "#distribution .share:not(.unpriced)", "els => els.map(e => e.dataset.label)"
    )
    merged = [name for name, cost in by_priced_model(by_model) if cost]
    assert labels == ([*merged[:9], "other"] if len(merged) > 10 else merged)
    assert "claude-haiku-4-5-20251001" not in labels and "claude-haiku-4-5" in labels
    # raw names are one click away
    await page.check("#raw-names")
    await page.wait_for_function(
        "[...document.querySelectorAll('#distribution .share')]"
        ".some(e => e.dataset.label.endsWith('-20251001'))"
    )
    await ready(page)
    # burn chart: at most 8 series plus "other", adding up to the total
    series = await page.eval_on_selector_all(
        "#burn rect", "els => [...new Set(els.map(e => e.dataset.series))]"
    )
    assert len(series) <= 9
    bars = await page.eval_on_selector_all("#burn rect", "els => els.map(e => Number(e.dataset.value))")
    summary = await api_json(demo_proxy, "/api/summary", **rng)
    assert abs(sum(bars) - float(summary["totals"]["cost_usd"])) < 1e-6


@pytest.mark.parametrize("width", WIDTHS)
async def test_8_prefix_filters_apply_to_the_whole_page(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width)
    users = await page.eval_on_selector_all("#list-user option", "els => els.map(e => e.value)")
    assert "alice" in users  # suggestions come from the data
    await page.click("#filters-box summary")
    await page.fill("#filters [name=user]", "ali")
    await page.fill("#filters [name=model]", "gpt-4o")
    await page.click("#filters button[type=submit]")
    await page.wait_for_function("JSON.parse(document.body.dataset.filters).user === 'ali*'")
    await ready(page)
    rng = await page_range(page)
    want = await api_json(demo_proxy, "/api/summary", user="ali*", model="gpt-4o*", **rng)
    assert want["totals"]["requests"] > 0
    assert await shown(page, "#card-requests .value") == f"{want['totals']['requests']:,}"
    assert await shown(page, "#card-cost .value") == money(Decimal(str(want["totals"]["cost_usd"])))
    bars = await page.eval_on_selector_all("#burn rect", "els => els.map(e => Number(e.dataset.value))")
    assert abs(sum(bars) - float(want["totals"]["cost_usd"])) < 1e-6
    sessions = await api_json(demo_proxy, "/api/sessions", user="ali*", model="gpt-4o*", limit="1", **rng)
    assert await shown(page, "#card-sessions .value") == f"{sessions['total']:,}"
    models = await page.eval_on_selector_all(
        "#requests tbody td[data-label=Model]", "els => els.map(e => e.textContent)"
    )
    assert models and all(m.startswith("gpt-4o") for m in models)
    assert "user=ali" in page.url and "model=gpt-4o" in page.url
    await shot(page, "filtered", width)


@pytest.mark.parametrize("width", WIDTHS)
async def test_9_budgets_coloured_by_projection(demo_proxy: Any, browser: Any, width: int) -> None:
    # a weekly budget between this week's spend and its projection: under the limit, heading over it
    async with aiohttp.ClientSession() as s:
        spec = {"name": "week-watch", "period": "week", "limit_usd": "100000", "projected": True}
        async with s.post(demo_proxy.url + "/api/budgets", json=spec) as resp:
            assert resp.status == 201, await resp.text()
            view = await resp.json()
        if view.get("projected_spend_usd") and Decimal(str(view["projected_spend_usd"])) > Decimal(
            str(view["spend_usd"])
        ):
            limit = (Decimal(str(view["projected_spend_usd"])) + Decimal(str(view["spend_usd"]))) / 2
            async with s.patch(
                demo_proxy.url + "/api/budgets/week-watch",
                json={"limit_usd": str(limit.quantize(Decimal("0.01")))},
            ) as resp:
                assert resp.status == 200, await resp.text()
    page = await open_page(browser, demo_proxy, width)
    budgets = (await api_json(demo_proxy, "/api/budgets"))["budgets"]
    assert budgets
    for b in budgets:
        row = page.locator(f"#budgets .budget[data-name='{b['name']}']")
        text = str(await row.inner_text())
        over = b.get("projected_spend_usd") is not None and Decimal(str(b["projected_spend_usd"])) > Decimal(
            str(b["limit_usd"])
        )
        want = (
            b["state"] if b["state"] in ("exceeded", "blocking") else "projected-over" if over else b["state"]
        )
        assert await row.get_attribute("data-level") == want
        assert "{" not in text  # scope in words, not JSON
        assert ("blocks requests" if b["action"] == "block" else "alerts only") in text
        spend, limit = Decimal(str(b["spend_usd"])), Decimal(str(b["limit_usd"]))
        assert f"{money(spend)} of {money(limit)}" in text
    assert "user alice" in await shown(page, "#budgets .budget[data-name='alice-day']")
    await shot(page, "budgets", width)


@pytest.mark.parametrize("width", WIDTHS)
async def test_10_url_dates_caveat_export_and_refresh(demo_proxy: Any, browser: Any, width: int) -> None:
    page = await open_page(browser, demo_proxy, width, "?range=7d&refresh=1")
    await page.click("#ranges [data-range='30d']")
    await page.wait_for_function("location.search.includes('range=30d')")
    await ready(page)
    await page.reload()
    await ready(page)
    assert await page.get_attribute("#ranges [data-range='30d']", "aria-pressed") == "true"
    since = datetime.fromisoformat((await page_range(page))["since"].replace("Z", "+00:00"))
    text = await shown(page, "#range-text")
    assert f"{since.day} {since.strftime('%b')} {since.year}" in text and "now" in text
    # export: the CSV holds the range's rows
    async with page.expect_download() as info:
        await page.click("#export-csv")
    download = await info.value
    body = Path(await download.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(body)))
    summary = await api_json(demo_proxy, "/api/summary", **await page_range(page))
    assert len(rows) == summary["totals"]["requests"]
    # a refresh with nothing new is answered 304 (no JSON sent again)
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if "/api/summary" in r.url else None)
    await page.wait_for_function("document.body.dataset.state === 'loading'")
    await ready(page)
    assert 304 in statuses
    # a previous period with almost nothing in it gets a caveat next to the percentage
    await page.click("#ranges [data-range='custom']")
    first = (datetime.now(UTC) - timedelta(days=37)).date()
    await page.fill("#from", first.isoformat())
    await page.fill("#to", (first + timedelta(days=2)).isoformat())
    await page.click("#custom button[type=submit]")
    await page.wait_for_function("location.search.includes('range=custom')")
    await ready(page)
    prev = {
        "since": await page.evaluate("document.body.dataset.prevSince"),
        "until": await page.evaluate("document.body.dataset.prevUntil"),
    }
    before = await api_json(demo_proxy, "/api/summary", **prev)
    if before["totals"]["requests"] < 20:
        assert "only" in await shown(page, "#card-cost .delta") or before["totals"]["requests"] == 0
    assert json.loads(await page.evaluate("document.body.dataset.filters")) == {}
    assert page.js_errors == []


async def test_10_a_refresh_slower_than_its_interval_still_completes(demo_proxy: Any, browser: Any) -> None:
    # Every auto-refresh tick used to start a new load that dropped the one in flight: with
    # answers slower than the interval (a busy server, ?refresh=1) the page stayed "loading" for
    # good. Now a tick waits for the load in flight; summaries here take 2.5 s, the interval 1 s.
    page = await open_page(browser, demo_proxy, 390, "?range=7d&refresh=1")
    before = await shown(page, "#updated")

    async def slow(route: Any) -> None:
        await asyncio.sleep(2.5)
        await route.continue_()

    await page.route("**/api/summary*", slow)
    await page.wait_for_function("document.body.dataset.state === 'loading'")
    await ready(page)
    await page.wait_for_function("document.body.dataset.state === 'loading'")  # the next tick came
    await ready(page)  # and finished too
    assert await shown(page, "#updated") != before
    assert page.js_errors == []

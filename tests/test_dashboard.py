"""The analytics page in a real browser (Debian's Chromium driven by Playwright).

A real proxy serves the page and the API over a real SQLite file holding known
records (priced by the meter, written by the store writer). The tests read
the figures the page shows and compare them with what the API answers for the
same range (the page writes the range it used on ``<body data-since data-until>``),
click through ranges, filters, sorting, pagination and details, and save
screenshots to ``tmp/artifacts/``.
"""

from __future__ import annotations

import os
import pwd
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meterproxy.app_state import METER, WRITER
from meterproxy.budgets.outlook import outlook
from meterproxy.reports import compact, money
from meterproxy.testing import make_record
from meterproxy.timestamps import format_ts
from meterproxy.usage import RequestRecord, Usage
from tests.helpers import dashboard
from tests.helpers.dashboard import ARTIFACTS, api_json, by_priced_model, ready, shown
from tests.helpers.sdk import SDK_TIMEOUT

TIMEOUT_MS = 20_000

# Every test here runs in the session's event loop, with the session's one Chromium and the
# session-loop twins of the suite's async fixtures (tests.helpers.dashboard).
pytestmark = dashboard.PAGE_TESTS
upstream, make_proxy = dashboard.upstream, dashboard.make_proxy


async def new_page(browser: Any) -> Any:
    context = await browser.new_context(timezone_id="UTC", viewport={"width": 1360, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    return page


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def seed_records() -> list[RequestRecord]:
    now = datetime.now(UTC).replace(microsecond=0)
    spec = [
        # (age, model, provider, input, cache_read, output, reasoning, session, user, source)
        (timedelta(minutes=20), "gpt-4o", "openai", 180_000, 120_000, 4_000, 0, "sess-a", "ana", "proxy"),
        (timedelta(hours=2), "gpt-4o-mini", "openai", 40_000, 0, 9_000, 0, "sess-a", "ana", "proxy"),
        (
            timedelta(hours=5),
            "claude-sonnet-4-20250514",
            "anthropic",
            90_000,
            60_000,
            3_000,
            0,
            "sess-b",
            "bo",
            "proxy",
        ),
        (timedelta(days=1, hours=3), "o3-mini", "openai", 12_000, 0, 30_000, 22_000, "sess-c", "bo", "proxy"),
        (timedelta(days=2), "gemini-2.5-flash", "gemini", 500_000, 0, 20_000, 0, None, None, "proxy"),
        (
            timedelta(days=3),
            "claude-opus-4-1-20250805",
            "anthropic",
            20_000,
            15_000,
            2_500,
            0,
            "cc-1",
            None,
            "claude-code",
        ),
        (timedelta(days=10), "gpt-4o", "openai", 1_000_000, 0, 50_000, 0, "sess-old", "ana", "proxy"),
        (timedelta(days=12), "mystery-model", "openai", 100, 0, 10, 0, "sess-old", "ana", "proxy"),
    ]
    # enough small requests in one session to need a second page of requests
    for i in range(24):
        spec.append(
            (
                timedelta(hours=6, minutes=i),
                "gpt-4o-mini",
                "openai",
                1_000 + i,
                0,
                200,
                0,
                "sess-bulk",
                "cy",
                "proxy",
            )
        )
    out = []
    for age, model, provider, inp, read, output, reasoning, session, user, source in spec:
        usage = Usage(
            input_tokens=inp, cache_read_tokens=read, output_tokens=output, reasoning_tokens=reasoning
        )
        r = make_record(model=model, provider=provider, upstream=provider, usage=usage, ts=now - age)
        r.session, r.user, r.source = session, user, source
        r.duration_ms, r.ttfb_ms = 1234.5, 210.0
        out.append(r)
    return out


async def seeded_proxy(make_proxy: Any, **settings: Any) -> Any:
    proxy = await make_proxy(**settings)
    records = seed_records()
    for r in records:
        proxy.app[METER].request_finished(r)
    await proxy.rows(len(records))
    return proxy


async def check_cards(page: Any, proxy: Any, token: str | None = None, source: str = "") -> dict[str, Any]:
    since = await page.evaluate("document.body.dataset.since")
    until = await page.evaluate("document.body.dataset.until")
    params = {"since": since, "until": until}
    if source:
        params["source"] = source
    summary = await api_json(proxy, "/api/summary", token, **params)
    sessions = await api_json(proxy, "/api/sessions", token, limit="1", **params)
    t = summary["totals"]
    assert await shown(page, "#card-cost .value") == money(Decimal(str(t["cost_usd"])))
    # the change against the previous range, from the API's figures for the range the page names
    prev_range = {
        "since": await page.evaluate("document.body.dataset.prevSince"),
        "until": await page.evaluate("document.body.dataset.prevUntil"),
    }
    assert prev_range["until"] <= since
    if source:
        prev_range["source"] = source
    before = Decimal(str((await api_json(proxy, "/api/summary", token, **prev_range))["totals"]["cost_usd"]))
    now = Decimal(str(t["cost_usd"]))
    delta = await shown(page, "#card-cost .delta")
    if before:
        assert f"{abs(100 * (now - before) / before):.1f}% vs" in delta
    else:
        assert delta.startswith("new vs" if now else "no change vs")
    assert await shown(page, "#card-tokens .value") == compact(t["input_tokens"] + t["output_tokens"])
    assert await shown(page, "#card-requests .value") == f"{t['requests']:,}"
    assert await shown(page, "#card-sessions .value") == f"{sessions['total']:,}"
    return summary


async def test_page_shows_the_api_figures_and_clicks_through(make_proxy: Any, browser: Any) -> None:
    proxy = await seeded_proxy(make_proxy)
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    summary = await check_cards(page, proxy)
    assert summary["totals"]["requests"] == 30  # 7 days: the two old rows are outside
    # the burn chart draws the timeseries: its bars add up to the range's cost
    bars = await page.eval_on_selector_all("#burn rect", "els => els.map(e => Number(e.dataset.value))")
    assert abs(sum(bars) - float(summary["totals"]["cost_usd"])) < 1e-9
    # token bar and cache hit ratio
    t = summary["totals"]
    ratio = f"{100 * t['cache_read_tokens'] / t['input_tokens']:.1f}%"
    assert ratio in await shown(page, "#cache-ratio")
    assert compact(t["cache_read_tokens"]) in await shown(page, "#tokenbar .legend [data-kind=cache_read]")
    # distribution: one bar per model with its share
    since, until = summary["since"], summary["until"]
    by_model = await api_json(proxy, "/api/summary", group_by="model", since=since, until=until)
    labels = await page.eval_on_selector_all("#distribution .share", "els => els.map(e => e.dataset.label)")
    assert labels == [name for name, cost in by_priced_model(by_model) if cost]
    await shot(page, "7days")

    # per hour, stacked by provider: still the same total, one series per provider
    await page.select_option("#bucket", "hour")
    await page.wait_for_function("document.body.dataset.bucket === 'hour'")
    await page.select_option("#stack", "provider")
    await page.wait_for_function("document.querySelector('#burn rect').dataset.series !== undefined")
    await ready(page)
    names = await page.eval_on_selector_all(
        "#burn rect", "els => [...new Set(els.map(e => e.dataset.series))]"
    )
    assert sorted(names) == ["anthropic", "gemini", "openai"]
    bars = await page.eval_on_selector_all("#burn rect", "els => els.map(e => Number(e.dataset.value))")
    assert abs(sum(bars) - float(summary["totals"]["cost_usd"])) < 1e-9
    buckets = await page.eval_on_selector_all("#burn rect", "els => els.map(e => e.dataset.bucket)")
    assert any(not b.startswith(b[:10] + "T00:00") for b in buckets)  # hours, not days
    await shot(page, "7days-hourly-by-provider")
    await page.select_option("#bucket", "")
    await page.select_option("#stack", "model")
    await ready(page)

    await page.click("#ranges [data-range='30d']")
    await ready(page)
    summary30 = await check_cards(page, proxy)
    assert summary30["totals"]["requests"] == 32 and summary30["totals"]["unpriced_requests"] == 1
    assert "1 unpriced" in await shown(page, "#card-requests .sub")
    await shot(page, "30days")

    await page.click("#ranges [data-range='today']")
    await ready(page)
    await check_cards(page, proxy)
    assert await page.evaluate("document.body.dataset.bucket") == "hour"

    # custom range: the last three days, inclusive
    await page.click("#ranges [data-range='custom']")
    today = datetime.now(UTC).date()
    await page.fill("#from", (today - timedelta(days=2)).isoformat())
    await page.fill("#to", today.isoformat())
    await page.click("#custom button[type=submit]")
    await ready(page)
    assert await page.evaluate("document.body.dataset.since") == f"{today - timedelta(days=2)}T00:00:00.000Z"
    await check_cards(page, proxy)

    # source filter
    await page.click("#ranges [data-range='30d']")
    await ready(page)
    await page.click("#filters-box summary")
    await page.select_option("#filters [name=source]", "claude-code")
    await page.wait_for_function("JSON.parse(document.body.dataset.filters || '{}').source === 'claude-code'")
    await ready(page)
    only_cc = await check_cards(page, proxy, source="claude-code")
    assert only_cc["totals"]["requests"] == 1
    await page.click("#clear-filters")
    await page.wait_for_function("document.body.dataset.filters === '{}'")
    await ready(page)
    assert page.js_errors == []


async def test_tables_sort_filter_paginate_and_detail(make_proxy: Any, browser: Any) -> None:
    proxy = await seeded_proxy(make_proxy)
    page = await new_page(browser)
    await page.goto(proxy.url + "/dashboard")
    await ready(page)
    since = await page.evaluate("document.body.dataset.since")
    until = await page.evaluate("document.body.dataset.until")

    # sessions sorted by cost, as the API sorts them
    await page.click("#sessions th[data-sort=cost] button")
    await page.wait_for_selector("#sessions th[data-sort=cost][data-active=desc]")
    await ready(page)
    want = await api_json(proxy, "/api/sessions", sort="cost", since=since, until=until, limit="10")
    ids = await page.eval_on_selector_all("#sessions tbody td:first-child", "els => els.map(e => e.title)")
    assert ids == [s["session"] for s in want["sessions"]]
    costs = await page.eval_on_selector_all(
        "#sessions tbody td:last-child", "els => els.map(e => e.textContent)"
    )
    assert costs == [money(Decimal(str(s["cost_usd"]))) for s in want["sessions"]]

    # requests: 20 a page, older page via the cursor
    assert await page.locator("#requests tbody tr").count() == 20
    await page.click("#requests-pager [data-dir='1']")
    await page.wait_for_function("document.querySelector('#requests-pager span').textContent === 'page 2'")
    await ready(page)
    assert await page.locator("#requests tbody tr").count() == 30 - 20
    await page.click("#requests-pager [data-dir='-1']")
    await page.wait_for_function("document.querySelector('#requests-pager span').textContent === 'page 1'")

    # filter by model: a prefix typed in the filter box applies to the whole page
    await page.click("#filters-box summary")
    await page.fill("#filters [name=model]", "gpt-4o-m")
    await page.click("#filters button[type=submit]")
    cells = "[...document.querySelectorAll('#requests tbody tr td:nth-child(2)')]"
    await page.wait_for_function(f"{cells}.every(td => td.textContent === 'gpt-4o-mini')")
    await ready(page)
    filtered = await api_json(proxy, "/api/summary", model="gpt-4o-m*", since=since, until=until)
    assert await shown(page, "#card-requests .value") == f"{filtered['totals']['requests']:,}"
    # server-side sort by tokens, ascending after two clicks: the whole range's order, not one page's
    await page.click("#requests th[data-key=tokens] button")
    await page.wait_for_selector("#requests th[data-key=tokens][data-active=desc]")
    await ready(page)
    await page.click("#requests th[data-key=tokens] button")
    await page.wait_for_selector("#requests th[data-key=tokens][data-active=asc]")
    await ready(page)
    shown_ids = await page.eval_on_selector_all("#requests tbody tr", "els => els.map(e => e.dataset.id)")
    page1 = await api_json(
        proxy,
        "/api/requests",
        model="gpt-4o-m*",
        since=since,
        until=until,
        limit="20",
        sort="tokens",
        order="asc",
    )
    assert shown_ids == [r["id"] for r in page1["requests"]] and len(shown_ids) == 20
    everything = await api_json(
        proxy, "/api/requests", model="gpt-4o-mini", since=since, until=until, limit="1000"
    )
    lowest = sorted(r["input_tokens"] + r["output_tokens"] for r in everything["requests"])[:20]
    assert [r["input_tokens"] + r["output_tokens"] for r in page1["requests"]] == lowest
    await shot(page, "requests-filtered")

    # a request's detail: tokens, cost, latency; never prompt text
    await page.click("#requests tbody tr:first-child")
    await page.wait_for_selector("#detail[open]")
    rid = await page.get_attribute("#requests tbody tr:first-child", "data-id")
    assert rid is not None
    rows = await api_json(proxy, "/api/requests", model="gpt-4o-mini", limit="1000")
    row = next(r for r in rows["requests"] if r["id"] == rid)
    detail = await shown(page, "#detail-body")
    assert money(Decimal(str(row["cost_usd"]))) in detail and "1.23 s" in detail and "210 ms" in detail
    assert f"{row['input_tokens']:,}" in detail and "not stored" in detail
    await shot(page, "request-detail")
    await page.click("#detail .close")

    # a session's detail
    await page.click("#sessions tbody tr:first-child")
    await page.wait_for_selector("#detail[open] table")
    assert ids[0] in await shown(page, "#detail-body h2")
    await shot(page, "session-detail")
    assert page.js_errors == []


async def test_empty_database_explains_how_to_start(make_proxy: Any, browser: Any) -> None:
    proxy = await make_proxy()
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    assert await page.is_visible("#onboarding") and not await page.is_visible("#content")
    snippet = await shown(page, "#setup-snippet")
    assert f"OPENAI_BASE_URL={proxy.url}/v1" in snippet
    await shot(page, "empty")


async def test_admin_token_prompt(make_proxy: Any, browser: Any) -> None:
    proxy = await seeded_proxy(make_proxy, admin_token="t0ps3cret")
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/api/summary") as resp:
        assert resp.status == 401  # the data stays behind the token
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await page.wait_for_selector("#login[open]")
    await shot(page, "login")
    await page.fill("#token", "wrong")
    await page.click("#login-form button")
    await page.wait_for_function(
        "document.querySelector('#login-error').textContent.includes('not accepted')"
    )
    await page.fill("#token", "t0ps3cret")
    await page.click("#login-form button")
    await ready(page)
    await check_cards(page, proxy, token="t0ps3cret")
    # a reload keeps the token for the session
    await page.reload()
    await ready(page)
    assert not await page.is_visible("#login")


async def test_auto_refresh_shows_new_requests(make_proxy: Any, browser: Any) -> None:
    proxy = await seeded_proxy(make_proxy)
    page = await new_page(browser)
    await page.goto(proxy.url + "/?refresh=1")
    await ready(page)
    before = await shown(page, "#card-requests .value")
    record = make_record(model="gpt-4o", usage=Usage(input_tokens=5_000_000, output_tokens=1))
    proxy.app[METER].request_finished(record)
    await proxy.rows(33)
    want = f"{int(before.replace(',', '')) + 1:,}"
    await page.wait_for_function(f"document.querySelector('#card-requests .value').textContent === '{want}'")
    await ready(page)
    await check_cards(page, proxy)


async def test_error_state_offers_retry(make_proxy: Any, browser: Any) -> None:
    proxy = await seeded_proxy(make_proxy)
    page = await new_page(browser)
    failing = True

    async def maybe_fail(route: Any) -> None:
        if failing:
            await route.fulfill(
                status=503,
                content_type="application/json",
                body='{"error": {"message": "store unavailable"}}',
            )
        else:
            await route.continue_()

    await page.route("**/api/sessions*", maybe_fail)
    await page.goto(proxy.url + "/")
    await page.wait_for_selector("#status.error")
    assert "store unavailable" in await shown(page, "#status")
    await shot(page, "error")
    failing = False
    await page.click("#status button")
    await ready(page)
    await check_cards(page, proxy)


async def test_budgets_progress_bars(make_proxy: Any, browser: Any) -> None:
    pytest.importorskip("meterproxy.budgets.feature")
    budgets = [
        {"name": "team-month", "period": "month", "limit_usd": "50"},
        {"name": "today-cap", "period": "day", "limit_usd": "0.40", "projected": True},
    ]
    proxy = await seeded_proxy(make_proxy, budgets=budgets)
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    want = (await api_json(proxy, "/api/budgets"))["budgets"]
    assert await page.is_visible("#budgets-panel")
    for b in want:
        row = page.locator(f"#budgets .budget[data-name='{b['name']}']")
        text = str(await row.inner_text())
        spend, limit = Decimal(str(b["spend_usd"])), Decimal(str(b["limit_usd"]))
        assert f"{money(spend)} of {money(limit)} ({Decimal(str(b['percent'])):.0f}%)" in text
        # The bar's colour is the budget's outlook: its state, or "projected-over" when the month's or
        # day's projection passes the limit (which depends on the hour the test runs at).
        assert outlook(b) in str(await row.get_attribute("class")).split() and "all requests" in text
    await shot(page, "budgets")


async def test_reserve_budget_shows_what_requests_in_flight_hold(make_proxy: Any, browser: Any) -> None:
    budgets = [{"name": "hard-cap", "period": "month", "limit_usd": "5", "action": "reserve"}]
    proxy = await seeded_proxy(make_proxy, budgets=budgets)
    # A request in flight on another replica holds $1.25 of the budget (a row in the shared store).
    expires = format_ts(datetime.now(UTC) + timedelta(minutes=1))
    hold = "INSERT INTO budget_reservations VALUES ('in-flight-1', 'hard-cap', 1250000000000, $1, $2)"
    proxy.app[WRITER].call(lambda conn: conn.execute(hold, [expires, expires])).result(10)
    [view] = (await api_json(proxy, "/api/budgets"))["budgets"]
    assert Decimal(str(view["reserved_usd"])) == Decimal("1.25")
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    row = page.locator("#budgets .budget[data-name='hard-cap']")
    text = str(await row.inner_text())
    assert f"+ {money(Decimal('1.25'))} reserved in flight" in text
    assert "reserves each request's worst case" in text
    assert await row.locator(".track .reserved").count() == 1
    await shot(page, "budget-reserve")


async def test_what_if_panel_shows_the_apis_figures_at_phone_and_desktop_width(
    make_proxy: Any, browser: Any
) -> None:
    proxy = await seeded_proxy(make_proxy)
    for width in (390, 1440):
        context = await browser.new_context(timezone_id="UTC", viewport={"width": width, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        await page.goto(proxy.url + "/")
        await ready(page)
        await page.fill("#whatif-form [name=as_model]", "claude-haiku-4-5")
        async with page.expect_response(lambda r: "/api/whatif" in r.url) as info:
            await page.click("#whatif-form button[type=submit]")
        response = await info.value
        assert response.status == 200
        await page.wait_for_selector("#whatif:not([hidden])")
        # The same query the page made, asked of the API directly: the page shows its figures.
        query = dict(__import__("urllib.parse").parse.parse_qsl(response.url.split("?", 1)[1]))
        want = await api_json(proxy, "/api/whatif", **query)
        total = str(await page.locator("#whatif tfoot").inner_text())
        totals = want["totals"]
        assert money(Decimal(str(totals["actual_cost_usd"]))) in total
        assert money(Decimal(str(totals["as_model_cost_usd"]))) in total
        assert len(want["models"]) == await page.locator("#whatif tbody tr").count()
        note = str(await page.locator("#whatif-note").inner_text())
        assert f"compared {totals['compared_requests']} requests" in note
        assert "Caching saved" in note
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.locator("#whatif-panel").screenshot(path=str(ARTIFACTS / f"dashboard-whatif-{width}.png"))
        # A model with no price: a clear message, no table.
        await page.fill("#whatif-form [name=as_model]", "no-such-model-xyz")
        await page.click("#whatif-form button[type=submit]")
        await page.wait_for_selector("#whatif[hidden]", state="attached")
        assert "has no price" in str(await page.locator("#whatif-note").inner_text())
        await context.close()


async def test_sdk_traffic_through_the_proxy_shows_on_the_page(
    make_proxy: Any, upstream: Any, browser: Any
) -> None:
    """End to end: the official SDKs call through the proxy, then the page shows those requests."""
    import anthropic
    import openai

    from meterproxy.testing import load_fixture

    proxy = await make_proxy()
    oa = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-dash")
    upstream.replay(load_fixture("openai_chat_stream_usage"))
    stream = await oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"X-Meter-Session": "e2e", "X-Meter-User": "dana"},
    )
    _ = [c async for c in stream]
    upstream.replay(load_fixture("anthropic_messages_json"))
    an = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-test"
    )
    await an.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Meter-Session": "e2e"},
    )
    stored = await proxy.rows(2)
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    await check_cards(page, proxy)
    assert await shown(page, "#card-requests .value") == "2"
    total = sum(Decimal(r["cost_usd"]) for r in stored)
    assert await shown(page, "#card-cost .value") == money(total)
    models = await page.eval_on_selector_all(
        "#requests tbody td:nth-child(2)", "els => els.map(e => e.textContent)"
    )
    assert sorted(models) == sorted(r["model"] for r in stored)
    session = await page.eval_on_selector_all(
        "#sessions tbody td:first-child", "els => els.map(e => e.title)"
    )
    assert session == ["e2e"]
    await shot(page, "sdk-traffic")
    assert page.js_errors == []


def _chromium_traces(home: Path) -> list[str]:
    """Files Chromium keeps under a home directory (config, caches, certificate store)."""
    roots = [home / ".config" / "chromium", home / ".cache", home / ".pki"]
    return sorted(str(p) for root in roots if root.exists() for p in root.rglob("*") if "chrom" in str(p))


async def test_the_browser_writes_to_the_test_home_not_the_real_one(
    browser: Any, chromium_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The suite's Chromium keeps its crash reports and caches in the session's temp dir (issue 14.12).

    (Compared by where it writes, not by the real home staying unchanged: other
    processes on a shared machine may run Chromium there at the same time.)
    """
    assert chromium_home.is_relative_to(tmp_path_factory.getbasetemp())
    assert chromium_home != Path(pwd.getpwuid(os.getuid()).pw_dir)
    page = await new_page(browser)
    await page.goto("about:blank")
    crash_reports = chromium_home / ".config" / "chromium" / "Crash Reports"
    assert crash_reports.is_dir(), _chromium_traces(chromium_home)


async def test_what_if_note_counts_estimates_even_when_none_is_priced_both_ways(
    make_proxy: Any, browser: Any
) -> None:
    # As `report --as-model` prints it: estimated requests get their sentence whenever there are
    # any (before, only when some could be priced both ways, so these two went unmentioned).
    from meterproxy.usage import Estimate

    proxy = await seeded_proxy(make_proxy)
    for _ in range(2):
        r = make_record(model="our-private-llm", ts=datetime.now(UTC) - timedelta(minutes=5))
        r.usage, r.usage_source = None, "missing"
        r.estimate = Estimate(120, 40, "heuristic:utf8_bytes/4", None, None)
        proxy.app[METER].request_finished(r)
    await proxy.rows(len(seed_records()) + 2)
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    await page.fill("#whatif-form [name=as_model]", "claude-haiku-4-5")
    async with page.expect_response(lambda r: "/api/whatif" in r.url) as info:
        await page.click("#whatif-form button[type=submit]")
    query = dict(__import__("urllib.parse").parse.parse_qsl((await info.value).url.split("?", 1)[1]))
    want = await api_json(proxy, "/api/whatif", **query)
    assert want["estimated"]["requests"] == 2 and want["estimated"]["compared_requests"] == 0
    await page.wait_for_selector("#whatif:not([hidden])")
    note = str(await page.locator("#whatif-note").inner_text())
    assert "Estimated (not in the totals): 2 requests without usage, none priced both ways." in note


async def test_cost_card_says_how_many_costs_are_lower_bounds_or_the_providers_own(
    make_proxy: Any, browser: Any
) -> None:
    # The counts /api/summary gives (partial_requests, provider_cost_requests), beside the total.
    proxy = await make_proxy()
    now = datetime.now(UTC) - timedelta(minutes=5)
    cut = make_record(model="gpt-4o-mini", ts=now, usage=Usage(input_tokens=900, output_tokens=40))
    cut.usage_source = "partial"  # a stream cut before its final usage: priced as a lower bound
    routed = make_record(model="acme/private-9000", upstream="openrouter", provider="openai", ts=now)
    routed.provider_cost_usd = Decimal("0.0042")  # OpenRouter's usage.cost, for a model no table prices
    for r in (cut, routed):
        proxy.app[METER].request_finished(r)
    rows = await proxy.rows(2)
    assert sorted(r["cost_source"] for r in rows) == ["partial", "provider"]
    page = await new_page(browser)
    await page.goto(proxy.url + "/")
    await ready(page)
    sub = str(await page.locator("#card-cost .sub").inner_text())
    assert "1 from cut streams (lower bounds)" in sub and "1 at the provider's own figure" in sub

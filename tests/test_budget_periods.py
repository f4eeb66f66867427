"""Budget periods (calendar in a timezone, rolling windows), rollover, retries and the CLI.

Spend is checked against rows stored before the proxy starts, with timestamps on
either side of a period boundary, so a wrong boundary (UTC instead of the
budget's timezone, an off-by-one window) changes the numbers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestServer
from click.testing import CliRunner

from meterproxy.app import create_app
from meterproxy.budgets.definition import BudgetSpec, Period, parse_duration, period_bounds
from meterproxy.budgets.feature import BUDGET_CLOCK
from meterproxy.budgets.webhooks import RetryPolicy
from meterproxy.cli import main
from meterproxy.settings import SettingsError, load_settings
from meterproxy.testing import FakeUpstream, make_record
from meterproxy.timestamps import format_ts
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.budgets import SECRET, Receiver, api_get, insert_records, query, wait_for

NY = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_calendar_periods_in_a_timezone_across_dst() -> None:
    # 2026-03-08 is the US spring-forward day: that local day is 23 hours long.
    day = Period.parse("day")
    start, end = period_bounds(day, NY, utc(2026, 3, 8, 12))
    assert (start, end) == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))
    # 03:30 UTC on the 8th is still the 7th in New York.
    assert period_bounds(day, NY, utc(2026, 3, 8, 3, 30))[0] == utc(2026, 3, 7, 5)
    week_start, week_end = period_bounds(Period.parse("week"), NY, utc(2026, 3, 11, 12))  # a Wednesday
    assert week_start == utc(2026, 3, 9, 4) and week_end == utc(2026, 3, 16, 4)
    assert week_start.astimezone(NY).weekday() == 0
    month = period_bounds(Period.parse("month"), NY, utc(2026, 3, 31, 23))
    assert month == (utc(2026, 3, 1, 5), utc(2026, 4, 1, 4))
    assert period_bounds(Period.parse("month"), NY, utc(2026, 4, 1, 3))[0] == utc(2026, 3, 1, 5)
    december = period_bounds(Period.parse("month"), ZoneInfo("UTC"), utc(2026, 12, 15))
    assert december == (utc(2026, 12, 1), utc(2027, 1, 1))


def test_rolling_windows_and_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("7d") == timedelta(days=7)
    now = utc(2026, 5, 1, 12)
    assert period_bounds(Period.parse("rolling:24h"), NY, now) == (now - timedelta(hours=24), now)
    for bad in ("rolling:", "rolling:0m", "rolling:abc", "fortnight", "rolling:5x"):
        with pytest.raises(ValueError):
            Period.parse(bad)


def test_spec_validation_messages() -> None:
    spec = BudgetSpec.model_validate({"name": "a", "limit_usd": "1.5", "thresholds": [100, 50, 50]})
    assert spec.thresholds == [50, 100] and spec.action == "alert" and spec.period == "month"
    for bad in (
        {"name": "a", "limit_usd": 0},
        {"name": "a b", "limit_usd": 1},
        {"name": "a", "limit_usd": 1, "timezone": "Mars/Olympus"},
        {"name": "a", "limit_usd": 1, "thresholds": [0]},
        {"name": "a", "limit_usd": 1, "scope": {"team": "x"}},
    ):
        with pytest.raises(ValueError):
            BudgetSpec.model_validate(bad)
    with pytest.raises(SettingsError, match="same name"):
        load_settings(None, cli={"budgets": [{"name": "x", "limit_usd": 1}] * 2}, env={})
    with pytest.raises(SettingsError, match="budget_timezone"):
        load_settings(None, cli={"budget_timezone": "Nowhere/Land"}, env={})


def test_retry_delays_grow_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_s=2, max_s=60, give_up_after_s=3600)
    for attempt, ceiling in ((1, 2), (2, 4), (3, 8), (5, 32), (6, 60), (30, 60)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


async def test_calendar_day_in_budget_timezone(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    tz = ZoneInfo("Asia/Kolkata")  # UTC+05:30: its midnight is never UTC's
    now = datetime.now(UTC)
    midnight = datetime.combine(now.astimezone(tz).date(), datetime.min.time(), tz).astimezone(UTC)
    rows = [
        make_record(ts=midnight - timedelta(seconds=1), cost_usd=Decimal("1")),  # yesterday, locally
        make_record(ts=midnight + timedelta(milliseconds=1), cost_usd=Decimal("2")),
        make_record(ts=now - timedelta(milliseconds=1), cost_usd=Decimal("4")),
    ]
    insert_records(tmp_path / "meter.db", rows)
    proxy = await make_proxy(
        budget_timezone="Asia/Kolkata",
        budgets=[
            {"name": "kolkata-day", "period": "day", "limit_usd": "100"},
            {"name": "utc-month", "period": "month", "timezone": "UTC", "limit_usd": "100"},
        ],
    )
    view = await api_get(proxy, "/api/budgets/kolkata-day")
    assert Decimal(str(view["spend_usd"])) == Decimal("6")
    assert view["timezone"] == "Asia/Kolkata"
    assert datetime.fromisoformat(view["period_start"]) == midnight
    assert datetime.fromisoformat(view["period_end"]) == midnight + timedelta(days=1)
    month = await api_get(proxy, "/api/budgets/utc-month")
    month_start = datetime.fromisoformat(month["period_start"])
    expected = sum((r.cost_usd or Decimal(0) for r in rows if r.ts >= month_start), Decimal(0))
    assert Decimal(str(month["spend_usd"])) == expected


async def test_rolling_window_counts_only_the_window(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    insert_records(
        tmp_path / "meter.db",
        [
            make_record(ts=now - timedelta(hours=2), cost_usd=Decimal("1")),
            make_record(ts=now - timedelta(minutes=30), cost_usd=Decimal("2")),
            make_record(ts=now - timedelta(seconds=2), cost_usd=Decimal("4")),
        ],
    )
    proxy = await make_proxy(
        budgets=[
            {"name": "last-hour", "period": "rolling:1h", "limit_usd": "100"},
            {"name": "last-10s", "period": "rolling:10s", "limit_usd": "100"},
            {"name": "last-3h", "period": "rolling:3h", "limit_usd": "100"},
        ]
    )
    _, listing = await proxy_budgets(proxy)
    spend = {b["name"]: Decimal(str(b["spend_usd"])) for b in listing}
    assert spend == {"last-hour": Decimal(6), "last-10s": Decimal(4), "last-3h": Decimal(7)}
    assert all(b["timezone"] is None and b["projected_spend_usd"] is None for b in listing)


async def proxy_budgets(proxy: ProxyHarness) -> tuple[int, list[dict[str, Any]]]:
    data = await api_get(proxy, "/api/budgets")
    return 200, data["budgets"]


async def test_rollover_resets_spend_and_sends_reset(
    upstream: FakeUpstream,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
) -> None:
    """A new calendar period: spend starts from zero, alerts re-arm, budget.reset goes out."""
    db = tmp_path / "meter.db"
    now = datetime.now(UTC)
    insert_records(db, [make_record(ts=now - timedelta(seconds=1), cost_usd=Decimal("6"))])
    clock = {"now": now}
    async with Receiver() as receiver:
        settings = load_settings(
            None,
            cli={
                "db": str(db),
                "upstreams": {"openai": upstream.url},
                "webhooks": {"hook": {"url": receiver.url, "secret": SECRET}},
                "budget_check_interval": 0.05,
                "budgets": [
                    {
                        "name": "daily",
                        "period": "day",
                        "limit_usd": "10",
                        "thresholds": [50],
                        "notify_reset": True,
                    }
                ],
            },
            env={},
        )
        app = create_app(settings)
        app[BUDGET_CLOCK] = lambda: clock["now"]
        server = await aiohttp_server(app)
        proxy = ProxyHarness(server, app, db)
        await wait_for(lambda: len(receiver.accepted) == 1, what="the 50 % event")
        assert (await api_get(proxy, "/api/budgets/daily"))["state"] == "warning"

        clock["now"] = now + timedelta(days=1)
        await wait_for(lambda: len(receiver.accepted) == 2, what="the reset event")
        view = await api_get(proxy, "/api/budgets/daily")
    first, reset = (d.event for d in receiver.accepted)
    assert first["type"] == "budget.threshold_crossed"
    assert reset["type"] == "budget.reset" and reset["threshold"] is None
    assert reset["period_start"] == first["period_end"]
    assert Decimal(str(view["spend_usd"])) == 0 and view["state"] == "ok"
    assert query(db, "SELECT type FROM budget_events ORDER BY created_at") == [
        ("budget.threshold_crossed",),
        ("budget.reset",),
    ]


async def test_undeliverable_webhook_is_marked_failed(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async with Receiver(accept=False) as receiver:
        insert_records(tmp_path / "meter.db", [make_record(cost_usd=Decimal("2"))])
        proxy = await make_proxy(
            webhooks={"down": {"url": receiver.url, "secret": SECRET}},
            webhook_retry_base=0.05,
            webhook_retry_max=0.1,
            webhook_give_up_after=0.5,
            budgets=[{"name": "b", "limit_usd": "3", "thresholds": [50]}],
        )

        async def failed() -> Any:
            data = await api_get(proxy, "/api/webhooks/deliveries?state=failed")
            return data["deliveries"]

        [delivery] = await wait_for(failed, what="the delivery to give up")
    assert delivery["attempts"] >= 2 and delivery["next_attempt_at"] is None
    assert all(a["status"] == 503 for a in delivery["attempt_log"])
    attempts = len(receiver.attempts)
    assert attempts == delivery["attempts"]


async def test_a_delivery_older_than_the_window_still_gets_one_retry(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An event that waited out ``webhook_give_up_after`` in the outbox (the proxy was down) is
    not failed on its first attempt: one retry first (``MIN_ATTEMPTS``). The test above only
    reached this case when a busy machine made its first attempt late; here it always does."""
    db = tmp_path / "meter.db"
    insert_records(db, [])  # the schema
    old = format_ts(datetime.now(UTC) - timedelta(hours=2))
    async with Receiver(accept=False) as receiver:
        conn = sqlite3.connect(db)
        conn.execute(
            "INSERT INTO budget_events (id, budget, type, period_start, threshold, created_at, payload) "
            "VALUES ('evt_old', 'b', 'budget.threshold_crossed', ?, '50', ?, '{\"id\": \"evt_old\"}')",
            [old, old],
        )
        conn.execute(
            "INSERT INTO webhook_outbox (event_id, endpoint, url, created_at, next_attempt_at) "
            "VALUES ('evt_old', 'down', ?, ?, ?)",
            [receiver.url, old, old],
        )
        conn.commit()
        conn.close()
        proxy = await make_proxy(
            webhooks={"down": {"url": receiver.url, "secret": SECRET}},
            webhook_retry_base=0.05,
            webhook_retry_max=0.1,
            webhook_give_up_after=3600,
        )

        async def failed() -> Any:
            data = await api_get(proxy, "/api/webhooks/deliveries?state=failed")
            return data["deliveries"]

        [delivery] = await wait_for(failed, what="the delivery to give up")
    assert delivery["attempts"] == 2 == len(receiver.attempts)
    assert [a["status"] for a in delivery["attempt_log"]] == [503, 503]


def run_cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


async def test_cli_against_database_and_running_proxy(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    db = tmp_path / "meter.db"
    insert_records(db, [make_record(user="eve", cost_usd=Decimal("1.25"))])
    added = run_cli(
        "budgets", "add", "eve", "--limit", "5", "--user", "eve", "--tag", "team=x", "--db", str(db)
    )
    assert added.exit_code == 0, added.output
    listed = run_cli("budgets", "list", "--db", str(db), "--json")
    [view] = json.loads(listed.output)
    assert view["name"] == "eve" and view["limit_usd"] == 5 and view["spend_usd"] == 0  # tag not on the row
    assert run_cli("budgets", "add", "eve", "--limit", "5", "--db", str(db)).exit_code != 0

    proxy = await make_proxy(budget_check_interval=0.05)
    # A budget the running proxy did not have at start: added to its database by the CLI.
    assert run_cli("budgets", "add", "late", "--limit", "2", "--db", str(db)).exit_code == 0

    async def has_late() -> bool:
        return "late" in [b["name"] for b in (await proxy_budgets(proxy))[1]]

    await wait_for(has_late, what="the proxy to pick up the CLI's budget")
    late = await api_get(proxy, "/api/budgets/late")
    assert Decimal(str(late["spend_usd"])) == Decimal("1.25")

    # --url: through the running proxy's API (run in a thread: the CLI is synchronous).
    result = await asyncio.to_thread(
        run_cli, "budgets", "add", "api-made", "--limit", "3", "--action", "block", "--url", proxy.url
    )
    assert result.exit_code == 0, result.output
    assert (await api_get(proxy, "/api/budgets/api-made"))["action"] == "block"
    text = (await asyncio.to_thread(run_cli, "budgets", "list", "--url", proxy.url)).output
    assert "api-made" in text and "late" in text and "on track" in text
    late_line = next(line for line in text.splitlines() if line.startswith("late "))
    assert "$1.25" in late_line and "$2.00" in late_line and "all requests" in late_line  # cents, words
    assert "block" in next(line for line in text.splitlines() if line.startswith("api-made"))
    assert (await asyncio.to_thread(run_cli, "budgets", "rm", "api-made", "--url", proxy.url)).exit_code == 0
    assert run_cli("budgets", "rm", "eve", "--db", str(db)).exit_code == 0
    assert run_cli("budgets", "rm", "eve", "--db", str(db)).exit_code == 1
    assert query(db, "SELECT name FROM budgets ORDER BY name") == [("late",)]


def test_rolling_threshold_rearms_after_spend_falls_below() -> None:
    from meterproxy.budgets.alerts import AlertDetector
    from meterproxy.budgets.spend import SpendTracker

    emitted: list[dict[str, Any]] = []
    tracker = SpendTracker("UTC")
    detector = AlertDetector(tracker, emitted.extend)
    spec = BudgetSpec.model_validate(
        {"name": "r", "period": "rolling:1h", "limit_usd": "10", "thresholds": [50]}
    )
    t0 = utc(2026, 5, 1, 12)
    state = tracker.new_state(spec, "config")
    state.advance(t0)
    tracker.install(state, [])

    def spend(at: datetime, usd: str) -> None:
        tracker.records_committed(
            [make_record(ts=at, cost_usd=Decimal(usd))], lambda s, r: detector.record_added(s, r, at)
        )

    spend(t0, "6")
    spend(t0 + timedelta(minutes=1), "1")  # still above 50 %: no second event
    assert [e["threshold"] for e in emitted] == [50]
    detector.check_all(t0 + timedelta(minutes=61, seconds=1))  # both aged out: re-armed
    assert tracker.snapshot("r", t0 + timedelta(minutes=62))
    spend(t0 + timedelta(minutes=62), "5")
    assert [e["threshold"] for e in emitted] == [50, 50]
    assert emitted[0]["key_period_start"] != emitted[1]["key_period_start"]
    assert Decimal(str(emitted[1]["spend_usd"])) == Decimal(5)

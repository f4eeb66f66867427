"""Budget alerts as webhooks: a real receiver on 127.0.0.1, restarts, outages, signatures.

The receiver is a real aiohttp server; the proxy is restarted by closing its
app (its cleanup runs: tasks cancelled, writer flushed) and starting a new one
on the same SQLite file, exactly what a deploy does.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from meterproxy.app_state import WRITER
from meterproxy.budgets.feature import BUDGETS
from meterproxy.budgets.webhooks import sign
from meterproxy.money import from_pico
from meterproxy.settings import SettingsError, load_settings
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.budgets import SECRET, Receiver, api_get, insert_records, query, wait_for
from tests.helpers.sdk import SDK_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent


async def call(proxy: ProxyHarness, user: str = "alice") -> float:
    """One OpenAI SDK request through the proxy; returns the loop time it finished."""
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-123456789", max_retries=0
    )
    await client.chat.completions.create(
        model="o4-mini",
        messages=[{"role": "user", "content": "What is the capital of the UK?"}],
        extra_headers={"X-Meter-User": user},
    )
    return asyncio.get_running_loop().time()


async def one_request_cost(upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path) -> Decimal:
    """What one request of the fixture costs, measured through a throwaway proxy."""
    probe_db = tmp_path / "probe.db"
    probe = await make_proxy(db=str(probe_db))
    await call(probe)
    await probe.server.close()  # flushes the writer
    [(pico,)] = query(probe_db, "SELECT cost_pico FROM requests")
    cost = from_pico(pico)
    assert cost is not None and cost > 0
    return cost


def hook_settings(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "webhooks": {"hook": {"url": receiver.url, "secret": SECRET}},
        "webhook_retry_base": 0.05,
        "webhook_retry_max": 0.2,
        "budget_check_interval": 0.2,
        **extra,
    }


async def test_threshold_crossings_arrive_signed_once_each(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    cost = await one_request_cost(upstream, make_proxy, tmp_path)
    async with Receiver() as receiver:
        # One request is 2/3 of the limit (crosses 50 %), the second crosses 80 and 100 %.
        proxy = await make_proxy(
            budgets=[{"name": "team", "limit_usd": str(cost * 3 / 2), "scope": {"user": "alice"}}],
            **hook_settings(receiver),
        )
        loop = asyncio.get_running_loop()
        done1 = await call(proxy)
        await wait_for(lambda: len(receiver.accepted) >= 1, what="the 50 % event")
        latency1 = loop.time() - done1
        done2 = await call(proxy)
        await wait_for(lambda: len(receiver.accepted) >= 3, what="the 80 and 100 % events")
        latency2 = loop.time() - done2
        print(f"webhook latency after the crossing request: {latency1:.3f}s, {latency2:.3f}s")
        rows = await proxy.rows(2)

        events = [d.event for d in receiver.accepted]
        assert sorted((e["type"], e["threshold"]) for e in events) == [
            ("budget.exceeded", 100),
            ("budget.threshold_crossed", 50),
            ("budget.threshold_crossed", 80),
        ]
        assert all(receiver.verified(d) for d in receiver.accepted)
        assert not receiver.verified(receiver.accepted[0], secret="whsec_" + "A" * 32)
        assert len({d.headers["webhook-id"] for d in receiver.accepted}) == 3
        for d in receiver.accepted:
            assert d.headers["webhook-id"] == d.event["id"]
        by_threshold = {e["threshold"]: e for e in events}
        first, second = by_threshold[50], by_threshold[100]
        assert first["request"]["id"] == rows[0]["id"] and second["request"]["id"] == rows[1]["id"]
        assert first["request"]["user"] == "alice"
        assert Decimal(str(first["request"]["cost_usd"])) == cost
        assert Decimal(str(first["spend_usd"])) == cost
        assert Decimal(str(second["spend_usd"])) == 2 * cost
        assert first["budget"]["name"] == "team" and first["budget"]["scope"] == {"user": "alice"}
        assert first["period_start"] < first["timestamp"] < first["period_end"]
        assert set(first) >= {"percent", "limit_usd", "projection", "timestamp"}

        # A third request crosses nothing new: no more deliveries, no more events.
        await call(proxy)
        await proxy.rows(3)
        await asyncio.wrap_future(proxy_writer(proxy).call(lambda conn: None))
        assert query(proxy.db, "SELECT COUNT(*) FROM budget_events") == [(3,)]


def proxy_writer(proxy: ProxyHarness) -> Any:
    from meterproxy.app_state import WRITER

    return proxy.app[WRITER]


async def settle(proxy: ProxyHarness) -> None:
    """Wait until events raised so far are in the database (two writer round trips)."""
    for _ in range(2):
        await asyncio.wrap_future(proxy_writer(proxy).call(lambda conn: None))
        await asyncio.sleep(0)


async def delivered(proxy: ProxyHarness, n: int) -> None:
    """Wait until the proxy has recorded ``n`` deliveries as delivered.

    The receiver lists an attempt before it answers, so its list runs ahead of the outbox:
    a proxy stopped in between cancels the attempt, and the next one sends it again (at least
    once, as documented). A test that restarts, or reads the delivery log, waits for this.
    """
    sql = "SELECT COUNT(*) FROM webhook_outbox WHERE state = 'delivered'"
    await wait_for(lambda: query(proxy.db, sql) == [(n,)], what=f"{n} deliveries recorded")


async def test_outbox_survives_outage_and_restart_exactly_once(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    cost = await one_request_cost(upstream, make_proxy, tmp_path)
    async with Receiver(accept=False) as receiver:
        settings = hook_settings(
            receiver, budgets=[{"name": "outage", "limit_usd": str(cost * 3 / 2), "scope": {"user": "alice"}}]
        )
        first = await make_proxy(**settings)
        await call(first)  # crosses 50 %
        await wait_for(lambda: len(receiver.attempts) >= 3, what="failed attempts")
        await first.server.close()  # restart while the receiver is still down
        failed_before = len(receiver.attempts)

        second = await make_proxy(**settings)
        await settle(second)
        assert query(second.db, "SELECT COUNT(*) FROM budget_events") == [(1,)], "no repeat after restart"
        await wait_for(lambda: len(receiver.attempts) > failed_before, what="retries after restart")
        receiver.accept = True
        await call(second)  # crosses 80 and 100 %
        await wait_for(lambda: len(receiver.accepted) >= 3, what="all three events")
        await delivered(second, 3)

        deliveries = await api_get(second, "/api/webhooks/deliveries")
        await second.server.close()
        third = await make_proxy(**settings)  # and once more: nothing is raised or sent again
        await settle(third)
        accepted_ids = [d.headers["webhook-id"] for d in receiver.accepted]
        await third.server.close()

    assert len(accepted_ids) == len(set(accepted_ids)) == 3
    assert all(receiver.verified(d) for d in receiver.accepted)
    assert query(third.db, "SELECT COUNT(*) FROM budget_events") == [(3,)]
    assert query(third.db, "SELECT state, COUNT(*) FROM webhook_outbox GROUP BY state") == [("delivered", 3)]
    # The 50 % event went through failed attempts before and after the restart.
    fifty = next(d for d in deliveries["deliveries"] if d["attempts"] > 1)
    assert fifty["state"] == "delivered" and fifty["endpoint"] == "hook"
    assert [a["status"] for a in fifty["attempt_log"]][:3] == [503, 503, 503]
    assert fifty["attempt_log"][-1]["status"] == 204
    assert SECRET not in str(deliveries) and SECRET.removeprefix("whsec_") not in str(deliveries)


async def test_crossing_while_down_is_raised_at_start(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    db = tmp_path / "meter.db"
    now = datetime.now(UTC)
    old = [make_record(ts=now - timedelta(seconds=5), user="zed", cost_usd=Decimal("0.9")) for _ in range(2)]
    insert_records(db, old)  # e.g. written by another worker or `meterproxy import` while we were down
    async with Receiver() as receiver:
        settings = hook_settings(
            receiver,
            budgets=[{"name": "zed", "limit_usd": "1", "scope": {"user": "zed"}, "period": "rolling:1h"}],
        )
        proxy = await make_proxy(**settings)
        await wait_for(lambda: len(receiver.accepted) >= 3, what="events raised at start")
        events = sorted((d.event for d in receiver.accepted), key=lambda e: e["threshold"])
        assert [e["threshold"] for e in events] == [50, 80, 100]
        assert all(e["request"] is None for e in events)
        assert Decimal(str(events[0]["spend_usd"])) == Decimal("1.8")
        assert events[-1]["type"] == "budget.exceeded"
        await delivered(proxy, 3)
        await proxy.server.close()
        again = await make_proxy(**settings)
        await settle(again)
        assert query(again.db, "SELECT COUNT(*) FROM budget_events") == [(3,)]
        assert len(receiver.attempts) == 3


async def test_slack_format_adds_text(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    insert_records(tmp_path / "meter.db", [make_record(cost_usd=Decimal("2"))])
    async with Receiver() as receiver:
        await make_proxy(
            webhooks={"slack": {"url": receiver.url, "format": "slack"}},
            budgets=[{"name": "slacked", "limit_usd": "3", "thresholds": [50]}],
        )
        await wait_for(lambda: receiver.accepted, what="the slack delivery")
    [delivery] = receiver.accepted
    event = delivery.event
    assert "slacked" in event["text"] and "50" in event["text"]
    assert event["type"] == "budget.threshold_crossed"
    assert "webhook-signature" not in delivery.headers  # no secret configured: unsigned


async def test_budgets_alert_only_their_endpoints(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    insert_records(tmp_path / "meter.db", [make_record(cost_usd=Decimal("2"))])
    async with Receiver() as a, Receiver() as b:
        proxy = await make_proxy(
            webhooks={"a": {"url": a.url, "secret": SECRET}, "b": {"url": b.url, "secret": SECRET}},
            budgets=[
                {"name": "to-a", "limit_usd": "3", "thresholds": [50], "webhooks": ["a"]},
                {"name": "to-all", "limit_usd": "3", "thresholds": [50]},
            ],
        )
        await wait_for(lambda: len(a.accepted) == 2 and len(b.accepted) == 1, what="routed deliveries")
        await settle(proxy)
    assert sorted(d.event["budget"]["name"] for d in a.accepted) == ["to-a", "to-all"]
    assert [d.event["budget"]["name"] for d in b.accepted] == ["to-all"]


async def test_projected_overrun(upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """Early in the day (a timezone where it is 01:xx now) a fifth of the limit projects an overrun."""
    now = datetime.now(UTC)
    offset = next(h for h in range(-12, 15) if (now + timedelta(hours=h)).hour == 1)
    tz = f"Etc/GMT{'-' if offset >= 0 else '+'}{abs(offset)}"  # POSIX sign: Etc/GMT-3 is UTC+3
    insert_records(tmp_path / "meter.db", [make_record(ts=now - timedelta(seconds=1), cost_usd=Decimal("1"))])
    async with Receiver() as receiver:
        proxy = await make_proxy(
            webhooks={"hook": {"url": receiver.url, "secret": SECRET}},
            budgets=[{"name": "burn", "limit_usd": "5", "period": "day", "timezone": tz, "projected": True}],
        )
        await wait_for(lambda: receiver.accepted, what="the projection event")
        view = await api_get(proxy, "/api/budgets/burn")
    [delivery] = receiver.accepted
    event = delivery.event
    assert event["type"] == "budget.projected_overrun"
    projected = Decimal(str(event["projection"]["projected_spend_usd"]))
    # 1 USD in 1-2 hours projects 12-24 USD over the day.
    assert Decimal(12) <= projected <= Decimal(24) + Decimal("0.001")
    assert view["percent"] == 20 and view["state"] == "ok"
    assert view["projected_exceed_at"] is not None and view["projected_exceed_at"] < view["period_end"]


# A secret without the whsec_ prefix is still base64 (Standard Webhooks), decoded the same way.
PLAIN_SECRET = "c2lnbmluZy1rZXktd2l0aG91dC1hLXByZWZpeA"


def test_readme_verification_snippet_accepts_real_signature() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Budgets and webhooks", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    verify = namespace["verify_meterproxy"]
    body = b'{"id":"evt_1","type":"budget.exceeded"}'
    ts = int(time.time())
    for secret in (SECRET, PLAIN_SECRET):
        headers = {"webhook-id": "evt_1", "webhook-timestamp": str(ts)}
        headers["webhook-signature"] = sign(secret, "evt_1", ts, body)
        assert verify(secret, headers, body)
        assert not verify(secret, headers, body + b" ")
        assert not verify(secret, {**headers, "webhook-timestamp": str(ts - 3600)}, body)


def test_readme_budget_config_is_valid(tmp_path: Path) -> None:
    import tomllib

    from meterproxy.settings import load_settings

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Budgets and webhooks", 1)[1].split("\n## ", 1)[0]
    text = re.findall(r"```toml\n(.*?)```", section, re.S)[0]
    config = tmp_path / "config.toml"
    config.write_text(text)
    settings = load_settings(config, env={})
    assert [b.name for b in settings.budgets] == ["search-team", "everything"]
    assert set(settings.webhooks) == {"ops", "slack"}
    assert tomllib.loads(text)["budgets"][0]["scope"] == {"tags": {"team": "search"}}


@pytest.mark.parametrize("secret", [SECRET, PLAIN_SECRET, SECRET.removeprefix("whsec_")])
def test_the_reference_library_verifies_our_signatures(secret: str) -> None:
    """``standardwebhooks`` (the spec's reference) base64-decodes every secret, prefixed or not."""
    body = b'{"id":"evt_1","type":"budget.exceeded","budget":{"name":"b"}}'
    ts = int(time.time())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, "evt_1", ts, body),
    }
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


@pytest.mark.parametrize("secret", ["plain-text-secret", "has spaces", "whsec_!!!!", "whsec_"])
def test_a_secret_the_reference_library_cannot_use_is_refused_at_start(secret: str) -> None:
    with pytest.raises(SettingsError, match="webhook secret"):
        load_settings(
            None, cli={"webhooks": {"hook": {"url": "http://127.0.0.1:9/x", "secret": secret}}}, env={}
        )


async def test_clean_shutdown_mid_attempt_releases_the_claim(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A delivery in flight when the proxy stops is due again at once, not after its lease.

    The claim (a lease of ``webhook_timeout`` + 60 s) exists for a process that
    dies mid-attempt; one that stops cleanly gives it back, so the next process
    retries immediately (this made the restart test above flaky under load).
    """
    db = tmp_path / "meter.db"
    insert_records(db, [make_record(user="hang", cost_usd=Decimal("0.6"))])
    arrived, stopped = asyncio.Event(), asyncio.Event()

    receiver = Receiver()

    async def hang_first(request: Any) -> Any:
        if not arrived.is_set():
            arrived.set()
            await stopped.wait()  # no answer before the proxy has stopped (its attempt is cancelled)
        return await Receiver._handle(receiver, request)

    receiver._handle = hang_first  # type: ignore[method-assign]
    async with receiver:
        settings = hook_settings(
            receiver,
            budgets=[{"name": "h", "limit_usd": "1", "scope": {"user": "hang"}, "period": "rolling:1h"}],
            webhook_timeout=30,
        )
        first = await make_proxy(**settings)
        await wait_for(arrived.is_set, what="the first attempt to reach the receiver")
        await first.server.close()
        stopped.set()
        [(next_at,)] = query(db, "SELECT next_attempt_at FROM webhook_outbox")
        due = datetime.fromisoformat(next_at.replace("Z", "+00:00"))
        assert due <= datetime.now(UTC), f"claim kept until {next_at}: the next process would wait for it"

        second = await make_proxy(**settings)
        await wait_for(lambda: len(receiver.accepted) >= 1, what="the delivery after the restart")
        # Accepted is not yet recorded: wait for the outbox row itself.
        delivered = [("delivered",)]
        await wait_for(lambda: query(db, "SELECT state FROM webhook_outbox") == delivered, what="delivered")
        await second.server.close()
    assert query(db, "SELECT state FROM webhook_outbox") == [("delivered",)]


async def test_an_answer_read_before_a_clean_stop_is_still_recorded(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The stop cancels an attempt whose answer is in but whose write waits in the writer's queue.

    That write still runs: the answer is known and the claim no longer ours to give back, so a
    write dropped here left the row pending under its lease (``webhook_timeout`` + 60 s before
    a retry) and an endpoint that had answered 2xx was sent the event again (the restart tests
    above failed so under load).
    """
    db = tmp_path / "meter.db"
    insert_records(db, [make_record(user="w", cost_usd=Decimal("0.6"))])
    entered, release = threading.Event(), threading.Event()
    proxies: list[ProxyHarness] = []
    receiver = Receiver()

    def block_writer(conn: Any) -> None:
        entered.set()
        release.wait(30)

    async def answer_behind_a_busy_writer(request: Any) -> Any:
        # Busy the writer before answering, so the proxy's record of this answer queues behind it.
        await wait_for(lambda: proxies, what="the proxy")
        proxies[0].app[WRITER].call(block_writer)
        assert await asyncio.to_thread(entered.wait, 30)
        return await Receiver._handle(receiver, request)

    receiver._handle = answer_behind_a_busy_writer  # type: ignore[method-assign]
    async with receiver:
        settings = hook_settings(
            receiver, budgets=[{"name": "w", "limit_usd": "1", "thresholds": [50], "scope": {"user": "w"}}]
        )
        proxies.append(await make_proxy(**settings))
        deliverer = proxies[0].app[BUDGETS].deliverer
        try:
            await wait_for(lambda: receiver.accepted, what="the delivery")
            # The claim is dropped as the record is queued: the answer is read, its write waits.
            await wait_for(lambda: not deliverer._claims, what="the answer's write to be queued")
            deliverer.stop()  # what a clean shutdown does first: in-flight attempts are cancelled
            await wait_for(lambda: not deliverer._tasks, what="the attempt to be cancelled")
        finally:
            release.set()
        await proxies[0].settle()
    assert query(db, "SELECT state, attempts, last_status FROM webhook_outbox") == [("delivered", 1, 204)]

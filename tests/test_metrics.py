"""Prometheus metrics: the meter sink against its own registry, and ``/metrics`` on the real app.

Unit tests feed `RequestRecord`s to `Metrics.request_finished` and read the
injected registry with ``get_sample_value``; the app tests send traffic with the
official SDK through the proxy (fake upstream replaying real bytes) and compare
the scraped values with the rows in SQLite.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from meterproxy.app_state import METRICS
from meterproxy.meter import price_record_with
from meterproxy.metrics import (
    METRIC_NAMES,
    TOKEN_TYPES,
    BoundedLabel,
    Metrics,
    publish_budget,
    status_class,
    unmetered_reason,
)
from meterproxy.pricing import PriceBook
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.sdk import SDK_TIMEOUT


def new_metrics(**kwargs: object) -> Metrics:
    return Metrics(CollectorRegistry(), book=PriceBook.default(), **kwargs)  # type: ignore[arg-type]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_a_priced_request_counts_tokens_cost_and_timings() -> None:
    m = new_metrics()
    usage = Usage(
        input_tokens=1000,
        cache_read_tokens=600,
        cache_write_tokens=100,
        output_tokens=300,
        reasoning_tokens=40,
    )
    record = make_record(model="gpt-4o-mini", usage=usage, cost_usd=Decimal("0.000123456789"))
    record.duration_ms, record.ttfb_ms, record.upstream_ms = 1500.0, 200.0, 1450.0
    m.request_finished(record)
    m.request_finished(record)

    base = {"upstream": "openai", "provider": "openai", "model": "gpt-4o-mini"}
    assert value(m, "meterproxy_requests_total", **base, status_class="2xx") == 2
    expected = dict(zip(TOKEN_TYPES, (1000, 600, 100, 300, 40), strict=True))
    for kind, count in expected.items():
        assert value(m, "meterproxy_tokens_total", **base, type=kind) == 2 * count, kind
    assert value(m, "meterproxy_cost_usd_total", **base) == pytest.approx(2 * 0.000123456789, rel=1e-12)
    assert value(m, "meterproxy_unpriced_requests_total", model="gpt-4o-mini") == 0
    assert value(m, "meterproxy_unmetered_requests_total", upstream="openai", reason="missing") == 0
    assert value(m, "meterproxy_request_duration_seconds_count", upstream="openai") == 2
    assert value(m, "meterproxy_request_duration_seconds_sum", upstream="openai") == pytest.approx(3.0)
    assert value(m, "meterproxy_request_duration_seconds_bucket", upstream="openai", le="1.0") == 0
    assert value(m, "meterproxy_request_duration_seconds_bucket", upstream="openai", le="2.5") == 2
    assert value(m, "meterproxy_time_to_first_byte_seconds_sum", upstream="openai") == pytest.approx(0.4)
    assert value(m, "meterproxy_upstream_duration_seconds_sum", upstream="openai") == pytest.approx(2.9)
    assert value(m, "meterproxy_proxy_overhead_seconds_sum", upstream="openai") == pytest.approx(0.1)


def test_unpriced_and_unmetered_requests_are_counted_apart() -> None:
    m = new_metrics()
    unknown = make_record(model="my-private-llama", usage=Usage(input_tokens=50, output_tokens=7))
    m.request_finished(unknown)  # cost_usd None: reported usage, unknown price
    missing = make_record(model="gpt-4o")
    missing.usage, missing.usage_source = None, "missing"
    m.request_finished(missing)
    assert value(m, "meterproxy_unpriced_requests_total", model="my-private-llama") == 1
    assert value(m, "meterproxy_unpriced_tokens_total", model="my-private-llama", type="input") == 50
    assert value(m, "meterproxy_unpriced_tokens_total", model="my-private-llama", type="output") == 7
    # An unpriced request still counts its tokens, like the stored row, but no cost.
    labels = {"upstream": "openai", "provider": "openai", "model": "my-private-llama"}
    assert value(m, "meterproxy_tokens_total", **labels, type="input") == 50
    assert m.registry.get_sample_value("meterproxy_cost_usd_total", labels) is None
    assert value(m, "meterproxy_unmetered_requests_total", upstream="openai", reason="missing") == 1
    assert value(m, "meterproxy_unpriced_requests_total", model="gpt-4o") == 0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"usage_source": "reported"}, None),
        ({"usage_source": "none"}, "not_applicable"),
        ({"usage_source": "none", "status": 429, "extra": {"budget": "cap"}}, "blocked"),
        ({"usage_source": "partial"}, "partial"),
        ({"usage_source": "invalid"}, "invalid"),
        ({"usage_source": "missing", "client_disconnected": True}, "client_disconnected"),
        ({"usage_source": "missing", "status": None, "error": "upstream unreachable"}, "upstream_error"),
        ({"usage_source": "missing", "status": 200, "error": "upstream broke off"}, "upstream_error"),
        ({"usage_source": "missing", "status": 429}, "error_status"),
        ({"usage_source": "missing", "status": 200}, "missing"),
    ],
)
def test_unmetered_reason(fields: dict[str, object], reason: str | None) -> None:
    record = make_record()
    for name, field_value in fields.items():
        setattr(record, name, field_value)
    assert unmetered_reason(record) == reason


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 201, 302, 404, 429, 500, 503, None, 0)] == [
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
        "none",
        "none",
    ]


def test_model_label_is_bounded_but_known_models_pass() -> None:
    m = new_metrics(max_unknown_models=2)
    book = PriceBook.default()
    known = [name for name in book.models() if "/" not in name][:30]
    for name in ["unknown-a", "unknown-b", "unknown-c", "unknown-d", *known, "unknown-a"]:
        m.request_finished(make_record(model=name, provider="", usage=Usage(input_tokens=1)))
    models = {
        s.labels["model"]
        for fam in m.registry.collect()
        if fam.name == "meterproxy_requests"
        for s in fam.samples
        if s.name == "meterproxy_requests_total"
    }
    assert models == {"unknown-a", "unknown-b", "other", *known}
    labels = {"upstream": "openai", "provider": "", "status_class": "2xx"}
    assert value(m, "meterproxy_requests_total", **labels, model="other") == 2
    assert value(m, "meterproxy_requests_total", **labels, model="unknown-a") == 2


def test_a_model_priced_on_its_upstreams_list_keeps_its_label() -> None:
    """Groq's models are on Groq's list, not on the wire protocol's (openai): priced means known."""
    m = new_metrics(max_unknown_models=0)
    for model in ("llama-3.3-70b-versatile", "not-on-any-list"):
        record = make_record(model=model, upstream="groq", provider="openai", usage=Usage(input_tokens=1000))
        price_record_with(PriceBook.default())(record)
        m.request_finished(record)
    labels = {"upstream": "groq", "provider": "openai", "status_class": "2xx"}
    assert value(m, "meterproxy_requests_total", **labels, model="llama-3.3-70b-versatile") == 1
    assert value(m, "meterproxy_requests_total", **labels, model="other") == 1


def test_bounded_label() -> None:
    label = BoundedLabel(2)
    assert [label(v) for v in ("x", "y", "z", "x", "w", "y")] == ["x", "y", "other", "x", "other", "y"]


def test_user_session_key_and_tags_are_not_labels_by_default() -> None:
    m = new_metrics()
    m.request_finished(make_record(user="alice", session="s1", key_fingerprint="fp", tags={"team": "search"}))
    for fam in m.registry.collect():
        for sample in fam.samples:
            assert not {"user", "session", "key", "key_fingerprint", "tags", "tag_team"} & set(sample.labels)
            assert "alice" not in sample.labels.values()


def test_opt_in_tag_labels_with_bounded_values() -> None:
    m = new_metrics(tag_labels=["team", "env-name"], max_tag_values=2)
    for team in ("search", "ads", "infra", "search"):
        m.request_finished(make_record(tags={"team": team, "env-name": "prod"}))
    m.request_finished(make_record(tags={}))
    base = {"upstream": "openai", "provider": "openai", "model": "gpt-4o-mini", "status_class": "2xx"}
    assert value(m, "meterproxy_requests_total", **base, tag_team="search", tag_env_name="prod") == 2
    assert value(m, "meterproxy_requests_total", **base, tag_team="ads", tag_env_name="prod") == 1
    # The third distinct team came after the bound: "other". Later still, no tag: "" is bounded too.
    assert value(m, "meterproxy_requests_total", **base, tag_team="other", tag_env_name="prod") == 1
    assert value(m, "meterproxy_requests_total", **base, tag_team="other", tag_env_name="") == 1


def test_budget_gauges() -> None:
    m = new_metrics()
    m.set_budget("team-search", Decimal("12.50"), Decimal("100"))
    assert value(m, "meterproxy_budget_spend_usd", budget="team-search") == 12.5
    assert value(m, "meterproxy_budget_limit_usd", budget="team-search") == 100
    m.remove_budget("team-search")
    m.remove_budget("never-published")
    assert m.registry.get_sample_value("meterproxy_budget_spend_usd", {"budget": "team-search"}) is None


def test_every_contract_name_is_registered() -> None:
    m = new_metrics()
    families = {fam.name for fam in m.registry.collect()}
    for name in METRIC_NAMES:
        assert name.removesuffix("_total") in families, name


# -- the real app -------------------------------------------------------------


async def scrape(proxy: ProxyHarness, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}/metrics", headers=headers or {}) as resp,
    ):
        return resp.status, await resp.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def total(text: str, name: str, **match: str) -> float:
    return sum(
        v for (n, labels), v in samples(text).items() if n == name and set(match.items()) <= set(labels)
    )


async def test_metrics_endpoint_agrees_with_the_database(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    chat, stream = load_fixture("openai_chat_json"), load_fixture("openai_chat_stream_usage")
    upstream.replay(chat)
    proxy = await make_proxy()
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-x")
    for _ in range(3):
        await client.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": "x"}])
    upstream.replay(stream)
    async for _chunk in await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    ):
        pass
    # A path the proxy forwards but does not meter (no reply configured: the fake answers 404).
    with pytest.raises(openai.NotFoundError):
        await client.models.list()

    # The meter calls every sink in one go, so once the rows are stored they are also counted.
    rows = await proxy.rows(5)
    status, text = await scrape(proxy)
    assert status == 200
    assert total(text, "meterproxy_requests_total") == len(rows) == 5
    assert total(text, "meterproxy_requests_total", status_class="4xx") == 1
    for kind in TOKEN_TYPES:
        assert total(text, "meterproxy_tokens_total", type=kind) == sum(r[f"{kind}_tokens"] for r in rows)
    db_cost = sum(Decimal(r["cost_usd"]) for r in rows if r["cost_usd"] is not None)
    assert db_cost > 0
    assert round(Decimal(total(text, "meterproxy_cost_usd_total")), 9) == round(db_cost, 9)
    assert total(text, "meterproxy_unmetered_requests_total", reason="not_applicable") == 1
    assert total(text, "meterproxy_request_duration_seconds_count") == 5
    assert total(text, "meterproxy_writer_written_records_total") == 5
    assert total(text, "meterproxy_store_up") == 1
    assert total(text, "meterproxy_in_flight_requests") == 0
    assert total(text, "meterproxy_writer_queue_depth") == 0
    # Scraping again never makes a counter go back.
    _, again = await scrape(proxy)
    assert total(again, "meterproxy_writer_written_records_total") == 5
    assert "# TYPE meterproxy_budget_spend_usd gauge" in text


async def test_metrics_token_is_opt_in(make_proxy: ProxyFactory) -> None:
    open_proxy = await make_proxy(admin_token="s3cret")
    assert (await scrape(open_proxy))[0] == 200

    guarded = await make_proxy(admin_token="s3cret", metrics_require_token=True)
    assert (await scrape(guarded))[0] == 401
    assert (await scrape(guarded, {"Authorization": "Bearer wrong"}))[0] == 401
    status, text = await scrape(guarded, {"Authorization": "Bearer s3cret"})
    assert status == 200 and "meterproxy_requests_total" in text


async def test_publish_budget_reaches_the_scrape(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    publish_budget(proxy.app, "monthly", Decimal("3.25"), Decimal("50"))
    _, text = await scrape(proxy)
    assert total(text, "meterproxy_budget_spend_usd", budget="monthly") == 3.25
    assert total(text, "meterproxy_budget_limit_usd", budget="monthly") == 50


async def test_tag_labels_setting_from_env_string(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(metrics_tag_labels="team, env")
    assert proxy.app[METRICS].tag_keys == ["team", "env"]


def test_readme_documents_every_metric() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Metrics and Grafana", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in METRIC_NAMES if f"| `{name}` |" not in section]
    assert not missing, f"README's metric table lacks {missing}"

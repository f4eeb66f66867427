"""The summary API against a real app and a real SQLite file: exact totals, grouping, rollups, retention.

Records go in two ways: through the proxy with the official SDKs (mixed
providers, real wire bytes), or straight to the app's own store writer with
`make_record` when a test needs chosen timestamps. Expected figures are
computed here from the records themselves (or by SQL over the raw table) and
compared with the API's, before and after the rollup pass and after retention
has deleted raw rows, so every path through `summarize` is checked against
the same truth.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import sqlite3
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import anthropic
import openai
import pytest

from meterproxy.api.models import TimeseriesResponse, UnpricedModelsResponse
from meterproxy.app_state import WRITER
from meterproxy.money import to_pico
from meterproxy.store.maintenance import run_pass
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from meterproxy.usage import RequestRecord, Usage
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.api import get_json, get_text, submit, summary
from tests.helpers.sdk import SDK_TIMEOUT

TOKEN_FIELDS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)


def sql_totals(proxy: ProxyHarness) -> dict[str, Any]:
    conn = sqlite3.connect(proxy.db)
    try:
        row = conn.execute(
            "SELECT count(*), sum(input_tokens), sum(cache_read_tokens), sum(cache_write_tokens), "
            "sum(output_tokens), sum(reasoning_tokens), sum(cost_pico), "
            "sum(cost_pico IS NULL AND usage_source = 'reported') FROM requests"
        ).fetchone()
    finally:
        conn.close()
    names = ("requests", *TOKEN_FIELDS, "cost_pico", "unpriced_requests")
    return dict(zip(names, row, strict=True))


async def roll_up(
    proxy: ProxyHarness, retention_days: int = 0, now: datetime | None = None
) -> tuple[int, int]:
    return await run_pass(proxy.app[WRITER], retention_days, now=now)


# -- mixed providers through the SDKs ----------------------------------------------------------


async def send_mixed_traffic(upstream: FakeUpstream, proxy: ProxyHarness) -> None:
    from google import genai
    from google.genai import types

    upstream.replay(load_fixture("openai_chat_stream_usage"))
    upstream.replay(load_fixture("anthropic_messages_json"), path="/v1/messages")
    gemini = load_fixture("gemini_generate_json")
    for version in ("v1beta", "v1"):
        upstream.replay(gemini, path=f"/{version}/models/gemini-2.5-flash:generateContent")
    upstream.replay(load_fixture("vllm_chat_stream"), path="/v1/chat/completions")  # /vllm/v1/...

    oai = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-1")
    for user in ("alice", "bob"):
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Meter-User": user, "X-Meter-Session": "s1", "X-Meter-Tags": "team=search"},
        )
        _ = [c async for c in stream]
    ant = anthropic.AsyncAnthropic(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-test"
    )
    await ant.messages.create(
        model="claude-sonnet-4-20250514",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Meter-User": "alice", "X-Meter-Session": "s2"},
    )
    client = genai.Client(api_key="AIzaTest", http_options=types.HttpOptions(base_url=f"{proxy.url}/gemini/"))
    await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    local = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/vllm/v1", api_key="none")
    stream = await local.chat.completions.create(
        model="meta-llama/Llama-3.1-8B-Instruct",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"X-Meter-Tags": "team=infra"},
    )
    _ = [c async for c in stream]


def parse_export_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_mixed_providers_summary_export_and_sql_agree(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(rollup_interval=3600)
    await send_mixed_traffic(upstream, proxy)
    rows = await proxy.rows(5)
    assert {r["provider"] for r in rows} == {"openai", "anthropic", "gemini"}
    unpriced = [r for r in rows if r["cost_pico"] is None]
    assert [r["model"] for r in unpriced] == ["meta-llama/Llama-3.1-8B-Instruct"]
    expected = sql_totals(proxy)
    assert expected["cost_pico"] > 0

    csv_rows = parse_export_csv(await get_text(proxy, "/api/export", format="csv"))
    jsonl_rows = [
        json.loads(line, parse_float=Decimal)
        for line in (await get_text(proxy, "/api/export", format="jsonl")).splitlines()
    ]
    assert [r["id"] for r in csv_rows] == [r["id"] for r in jsonl_rows] == [r["id"] for r in rows]

    for phase in ("raw", "rolled up"):
        body = await summary(proxy)
        totals = body["totals"]
        assert totals["requests"] == expected["requests"] == len(csv_rows) == len(jsonl_rows)
        for field in TOKEN_FIELDS:
            assert totals[field] == expected[field], (phase, field)
            assert sum(int(r[field]) for r in csv_rows) == expected[field]
            assert sum(r[field] for r in jsonl_rows) == expected[field]
        cost = Decimal(expected["cost_pico"]).scaleb(-12)
        assert totals["cost_usd"] == cost, phase
        assert sum(Decimal(r["cost_usd"]) for r in csv_rows if r["cost_usd"]) == cost
        assert sum(r["cost_usd"] for r in jsonl_rows if r["cost_usd"] is not None) == cost
        assert totals["unpriced_requests"] == expected["unpriced_requests"] == 1
        assert [
            {k: m[k] for k in ("model", "provider", "unpriced_requests")} for m in body["unpriced_models"]
        ] == [{"model": "meta-llama/Llama-3.1-8B-Instruct", "provider": "openai", "unpriced_requests": 1}]
        assert body["unpriced_models"][0]["input_tokens"] > 0  # its tokens, named next to the gap in cost
        by_provider = await summary(proxy, group_by="provider")
        assert sum(g["cost_usd"] for g in by_provider["groups"]) == cost
        assert {g["key"]["provider"]: g["requests"] for g in by_provider["groups"]} == {
            "openai": 3,
            "anthropic": 1,
            "gemini": 1,
        }
        if phase == "raw":
            rolled, _ = await roll_up(proxy)
            assert rolled == 5

    status, body = await get_json(proxy, "/api/models/unpriced")
    assert status == 200
    UnpricedModelsResponse.model_validate(body)
    assert [m["model"] for m in body["models"]] == ["meta-llama/Llama-3.1-8B-Instruct"]

    by_tag = await summary(proxy, group_by="tag:team")
    assert {g["key"]["tag:team"]: g["requests"] for g in by_tag["groups"]} == {
        "search": 2,
        "infra": 1,
        None: 2,
    }
    alice = await summary(proxy, user="alice", group_by="session")
    assert {g["key"]["session"]: g["requests"] for g in alice["groups"]} == {"s1": 1, "s2": 1}


async def test_a_finished_request_shows_in_summary_within_the_flush(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy(rollup_interval=3600)
    before = await summary(proxy)
    assert before["totals"]["requests"] == 0
    client = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-test-1")
    await client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "hi"}])
    await proxy.rows(1)  # committed: the summary must show it now, without a rollup pass
    body = await summary(proxy)
    assert body["totals"]["requests"] == 1
    assert body["totals"]["output_tokens"] == load_fixture("openai_chat_json").expect["output_tokens"]


# -- chosen timestamps: grouping, filters, time zones, rollup/raw agreement ---------------------

MODELS = [
    ("gpt-4o", "openai"),
    ("claude-sonnet-4-5", "anthropic"),
    ("gemini-2.5-flash", "gemini"),
    ("mystery", "openai"),
]
START = datetime(2026, 3, 27, 0, 0, tzinfo=UTC)  # spans the Europe/Paris DST change (March 29)


def random_records(
    n: int, seed: int, start: datetime = START, span: timedelta = timedelta(days=6)
) -> list[RequestRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        model, provider = rng.choice(MODELS)
        usage = Usage(
            input_tokens=rng.randint(0, 5000),
            cache_read_tokens=rng.randint(0, 50),
            output_tokens=rng.randint(0, 900),
            reasoning_tokens=rng.randint(0, 10),
        )
        cost = None if model == "mystery" else Decimal(rng.randint(1, 10**9)).scaleb(-12)
        record = make_record(
            model=model,
            provider=provider,
            upstream=provider,
            ts=start + timedelta(seconds=rng.randint(0, int(span.total_seconds()) - 1), microseconds=i),
            usage=usage,
            cost_usd=cost,
            user=rng.choice(["alice", "bob", None]),
            session=rng.choice(["s1", "s2", "s3", None]),
            tags=rng.choice([{}, {"team": "search"}, {"team": "ads", "env": "prod"}]),
        )
        record.status = rng.choice([200, 200, 200, 429])
        records.append(record)
    return records


def bucket_of(ts: datetime, kind: str, tz: ZoneInfo) -> str:
    local = ts.astimezone(tz)
    if kind == "hour":
        return local.replace(minute=0, second=0, microsecond=0).isoformat()
    if kind == "day":
        return local.date().isoformat()
    if kind == "week":
        return (local.date() - timedelta(days=local.weekday())).isoformat()
    return local.strftime("%Y-%m")


def key_of(record: RequestRecord, dim: str, tz: ZoneInfo) -> str | None:
    if dim in ("hour", "day", "week", "month"):
        return bucket_of(record.ts, dim, tz)
    if dim.startswith("tag:"):
        return record.tags.get(dim[4:]) or None
    value = {"key": record.key_fingerprint}.get(dim, getattr(record, dim, None))
    return value or None


def expected_groups(
    records: list[RequestRecord], group_by: list[str], tz: ZoneInfo, keep: Any = lambda r: True
) -> dict[tuple[Any, ...], tuple[int, int, Decimal]]:
    out: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, Decimal(0)])
    for r in records:
        if not keep(r):
            continue
        g = out[tuple(key_of(r, d, tz) for d in group_by)]
        g[0] += 1
        g[1] += r.tokens.input_tokens
        g[2] += Decimal(to_pico(r.cost_usd)).scaleb(-12) if r.cost_usd is not None else 0
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def got_groups(body: dict[str, Any]) -> dict[tuple[Any, ...], tuple[int, int, Decimal]]:
    return {
        tuple(g["key"][d] for d in body["group_by"]): (g["requests"], g["input_tokens"], g["cost_usd"])
        for g in body["groups"]
    }


def ts_param(dt: datetime) -> str:
    return dt.isoformat()


QUERIES: list[tuple[dict[str, str], Any]] = [
    ({"group_by": "model"}, lambda r: True),
    ({"group_by": "day", "tz": "Europe/Paris"}, lambda r: True),
    ({"group_by": "hour,provider", "tz": "America/New_York"}, lambda r: True),
    ({"group_by": "week,model"}, lambda r: True),
    ({"group_by": "month", "tz": "Asia/Kolkata"}, lambda r: True),
    ({"group_by": "user,model", "model": "gpt-4o"}, lambda r: r.model == "gpt-4o"),
    ({"group_by": "session", "tag": "team:ads"}, lambda r: r.tags.get("team") == "ads"),
    ({"group_by": "tag:env,day"}, lambda r: True),
    (
        {"group_by": "day", "user": "alice", "provider": "anthropic"},
        lambda r: r.user == "alice" and r.provider == "anthropic",
    ),
]


@pytest.mark.parametrize("rolled", ["raw", "half", "all"])
async def test_grouping_filters_and_time_zones_match_the_records(
    make_proxy: ProxyFactory, rolled: str
) -> None:
    proxy = await make_proxy(rollup_interval=3600)
    records = random_records(600, seed=4)
    if rolled == "half":  # some rows in the rollups, the rest above the watermark
        await submit(proxy, records[:300])
        await roll_up(proxy)
        await submit(proxy, records[300:])
    else:
        await submit(proxy, records)
        if rolled == "all":
            await roll_up(proxy)
    # Bounds that cut hours and days, so raw edges, hourly and daily rollups all take part.
    since = START + timedelta(days=1, hours=3, minutes=17, seconds=5)
    until = START + timedelta(days=4, hours=20, minutes=41)
    for params, keep in QUERIES:
        for bounds in ({}, {"since": ts_param(since), "until": ts_param(until)}):
            tz = ZoneInfo(params.get("tz", "UTC"))
            body = await summary(proxy, **params, **bounds)

            def in_range(r: RequestRecord, keep: Any = keep, bounds: dict[str, str] = bounds) -> bool:
                return bool(keep(r)) and (not bounds or since <= r.ts < until)

            want = expected_groups(records, body["group_by"], tz, in_range)
            assert got_groups(body) == want, (params, bounds)
            assert body["totals"]["requests"] == sum(v[0] for v in want.values())
            assert body["totals"]["cost_usd"] == sum((v[2] for v in want.values()), Decimal(0))


async def test_timeseries_fills_every_bucket_and_splits(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(rollup_interval=3600)
    records = random_records(200, seed=9, span=timedelta(hours=30))
    await submit(proxy, records)
    await roll_up(proxy)
    since, until = START, START + timedelta(hours=48)
    status, body = await get_json(
        proxy, "/api/timeseries", bucket="hour", split="model", since=ts_param(since), until=ts_param(until)
    )
    assert status == 200, body
    TimeseriesResponse.model_validate(body)
    assert {tuple(s["key"].values()) for s in body["series"]} == {(m,) for m, _ in MODELS}
    for series in body["series"]:
        assert len(series["points"]) == 48  # the empty last 18 hours are zeros, not gaps
        model = series["key"]["model"]
        mine = [r for r in records if r.model == model]
        assert sum(p["requests"] for p in series["points"]) == series["totals"]["requests"] == len(mine)
        by_hour = defaultdict(int)
        for r in mine:
            by_hour[r.ts.replace(minute=0, second=0, microsecond=0).isoformat()] += 1
        assert {p["t"]: p["requests"] for p in series["points"] if p["requests"]} == by_hour
    status, body = await get_json(
        proxy, "/api/timeseries", bucket="day", tz="Europe/Paris", since="2026-03-27", until="2026-03-30"
    )
    assert status == 200, body
    # UTC midnight is 01:00 in Paris, so the range touches four local days; DST starts on the 29th.
    assert [p["t"] for p in body["series"][0]["points"]] == [
        "2026-03-27T00:00:00+01:00",
        "2026-03-28T00:00:00+01:00",
        "2026-03-29T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
    ]


# -- retention -------------------------------------------------------------------------------------


async def test_retention_deletes_raw_rows_and_leaves_totals_unchanged(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(rollup_interval=3600, retention_days=180)
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    records = random_records(500, seed=7, start=now - timedelta(days=400), span=timedelta(days=399))
    await submit(proxy, records)
    queries = [
        {},
        {"group_by": "model"},
        {"group_by": "month"},
        {"group_by": "day,provider", "since": ts_param(now - timedelta(days=300)), "until": ts_param(now)},
        {"group_by": "user", "model": "gpt-4o"},
    ]
    before = [await summary(proxy, **q) for q in queries]
    rolled, deleted = await roll_up(proxy, retention_days=180, now=now)
    assert rolled == 500
    old = sum(r.ts < now - timedelta(days=180) for r in records)
    assert old > 100 and deleted >= old - 1  # the newest row is always kept
    remaining = await proxy.rows()
    assert len(remaining) == 500 - deleted
    cutoff = (now - timedelta(days=180)).strftime("%Y-%m-%dT%H")
    assert sum(r["ts"] < cutoff for r in remaining) <= 1
    after = [await summary(proxy, **q) for q in queries]
    for q, b, a in zip(queries, before, after, strict=True):
        assert a["totals"] == b["totals"], q
        assert a["groups"] == b["groups"], q
    # The coarse tables stay their full table summed over user and key (kept by triggers).
    conn = sqlite3.connect(proxy.db)
    dims = "bucket, model, provider, upstream, source"
    sums = "sum(requests), sum(input_tokens), sum(cost_pico), sum(unpriced_requests)"
    for full in ("rollup_day", "rollup_hour"):
        fine = conn.execute(f"SELECT {dims}, {sums} FROM {full} GROUP BY {dims} ORDER BY {dims}").fetchall()
        coarse = conn.execute(
            f"SELECT {dims}, {sums} FROM {full}_model GROUP BY {dims} ORDER BY {dims}"
        ).fetchall()
        assert fine == coarse and len(coarse) > 100
    conn.close()
    # Session figures come from raw rows only, and say so.
    by_session = await summary(proxy, group_by="session")
    assert by_session["notes"] and "retention" in by_session["notes"][0]
    assert by_session["totals"]["requests"] == len(remaining)
    # A second pass finds nothing more to do; new traffic still counts once.
    assert await roll_up(proxy, retention_days=180, now=now) == (0, 0)
    fresh = random_records(5, seed=8, start=now - timedelta(hours=2), span=timedelta(hours=1))
    await submit(proxy, fresh)
    total = await summary(proxy)
    assert total["totals"]["requests"] == 505


async def test_background_pass_rolls_up_and_applies_retention(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(rollup_interval=0.05, retention_days=30)
    now = datetime.now(UTC)
    old = random_records(50, seed=11, start=now - timedelta(days=90), span=timedelta(days=10))
    recent = random_records(50, seed=12, start=now - timedelta(days=2), span=timedelta(days=1))
    expected = expected_groups(old + recent, ["model"], ZoneInfo("UTC"))
    # Wait on the writer's commits, not on a row count: retention may delete old rows
    # before all 100 are visible at once (the race made this test fail under load).
    committed: list[int] = []
    proxy.app[WRITER].on_commit(lambda batch: committed.append(len(batch)))
    for record in old + recent:
        assert proxy.app[WRITER].submit(record)
    await proxy.settle()  # the store's commit barrier: every record above is committed
    assert sum(committed) == 100
    # Retention runs on its own interval, outside the writer's record commits: polled, bounded.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(await proxy.rows()) > 51:  # all old rows but (at most) the newest rowid go
        assert loop.time() < deadline, "retention never ran"
        await asyncio.sleep(0.05)
    conn = sqlite3.connect(proxy.db)
    watermark = conn.execute("SELECT watermark FROM rollup_state").fetchone()[0]
    top = conn.execute("SELECT max(rowid) FROM requests").fetchone()[0]
    conn.close()
    assert watermark == top
    body = await summary(proxy, group_by="model")
    assert got_groups(body) == expected

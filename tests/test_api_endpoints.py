"""The JSON API's contract: 400s that name the parameter, sessions paging, export format, OpenAPI coverage.

All against the real app on a real port with a real SQLite file; records are
written through the app's own store writer.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from meterproxy.api.models import ErrorResponse, SessionDetail, SessionsResponse
from meterproxy.api.openapi import build_spec
from meterproxy.app_state import API_DOCS
from meterproxy.store.export import EXPORT_COLUMNS
from meterproxy.testing import make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.api import get_json, get_text, submit
from tests.helpers.processes import export_children
from tests.helpers.waits import WAIT_S

T0 = datetime(2026, 6, 1, 9, 30, tzinfo=UTC)

BAD = [
    ("/api/summary", {"group_by": "colour"}, "group_by"),
    ("/api/summary", {"group_by": "model,user,provider"}, "group_by"),
    ("/api/summary", {"group_by": "day,hour"}, "group_by"),
    ("/api/summary", {"group_by": "model,model"}, "group_by"),
    ("/api/summary", {"group_by": "tag:"}, "group_by"),
    ("/api/summary", {"since": "yesterday"}, "since"),
    ("/api/summary", {"until": "2026-13-01"}, "until"),
    ("/api/summary", {"since": "2026-02-01", "until": "2026-01-01"}, "until"),
    ("/api/summary", {"tz": "Mars/Olympus_Mons"}, "tz"),
    ("/api/summary", {"tz": "../../etc/passwd"}, "tz"),
    ("/api/summary", {"limit": "0"}, "limit"),
    ("/api/summary", {"tag": "novalue"}, "tag"),
    ("/api/summary", {"tag": 'a"b:1'}, "tag"),
    ("/api/summary", {"group_by": 'tag:a"b'}, "group_by"),
    ("/api/export", {"tag": 'x"y:1'}, "tag"),
    ("/api/summary", {"groupby": "model"}, "groupby"),
    ("/api/models/unpriced", {"group_by": "model"}, "group_by"),
    ("/api/timeseries", {}, "bucket"),
    ("/api/timeseries", {"bucket": "minute"}, "bucket"),
    ("/api/timeseries", {"bucket": "hour", "split": "day"}, "split"),
    ("/api/timeseries", {"bucket": "hour", "split": "model,user"}, "split"),
    ("/api/timeseries", {"bucket": "hour", "since": "2020-01-01", "until": "2026-01-01"}, "since"),
    ("/api/sessions", {"sort": "colour"}, "sort"),
    ("/api/sessions", {"order": "up"}, "order"),
    ("/api/sessions", {"limit": "abc"}, "limit"),
    ("/api/sessions", {"offset": "-1"}, "offset"),
    ("/api/sessions/s1", {"cursor": "bogus!"}, "cursor"),
    ("/api/sessions/s1", {"model": "x"}, "model"),
    ("/api/export", {"format": "xlsx"}, "format"),
    ("/api/export", {"since": "soon"}, "since"),
]


@pytest.mark.parametrize(("path", "params", "param"), BAD)
async def test_bad_parameters_get_a_400_naming_them(
    proxy: ProxyHarness, path: str, params: dict[str, str], param: str
) -> None:
    status, body = await get_json(proxy, path, **params)
    assert status == 400, body
    ErrorResponse.model_validate(body)
    assert body["error"]["code"] == "bad_parameter"
    assert body["error"]["param"] == param
    assert param in body["error"]["message"]


async def session_records(proxy: ProxyHarness) -> list[Any]:
    records = []
    for i, (session, n) in enumerate([("a", 3), ("b", 1), ("c", 5), ("d", 2), ("e", 4)]):
        for j in range(n):
            records.append(
                make_record(
                    ts=T0 + timedelta(minutes=10 * i + j),
                    session=session,
                    user=f"u{j % 2}",
                    usage=Usage(input_tokens=10 * (i + 1), output_tokens=1),
                    cost_usd=Decimal(i + 1).scaleb(-6),
                )
            )
    records.append(make_record(ts=T0, session=None))
    await submit(proxy, records)
    return records


async def test_sessions_are_sorted_and_paginated(proxy: ProxyHarness) -> None:
    await session_records(proxy)
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        status, body = await get_json(proxy, "/api/sessions", sort="requests", limit="2", offset=str(offset))
        assert status == 200, body
        SessionsResponse.model_validate(body)
        assert body["total"] == 5
        seen += [s["session"] for s in body["sessions"]]
        offset = body["next_offset"]
    assert seen == ["c", "e", "a", "d", "b"]
    status, body = await get_json(proxy, "/api/sessions", sort="cost", order="asc")
    assert [s["session"] for s in body["sessions"]] == ["b", "a", "d", "c", "e"] or [
        s["session"] for s in body["sessions"]
    ] == sorted(body["sessions"], key=lambda s: s["cost_usd"])
    c = next(s for s in body["sessions"] if s["session"] == "c")
    assert c["requests"] == 5 and c["cost_usd"] == Decimal("0.000015") and c["users"] == ["u0", "u1"]
    status, body = await get_json(proxy, "/api/sessions", sort="last_seen")
    assert [s["session"] for s in body["sessions"]] == ["e", "d", "c", "b", "a"]


async def test_session_detail_pages_its_requests(proxy: ProxyHarness) -> None:
    await session_records(proxy)
    ids: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, body = await get_json(proxy, "/api/sessions/c", **params)
        assert status == 200, body
        SessionDetail.model_validate(body)
        assert body["totals"]["requests"] == 5 and body["totals"]["input_tokens"] == 150
        ids += [r["id"] for r in body["requests"]]
        if not (cursor := body["next_cursor"]):
            break
    assert len(ids) == len(set(ids)) == 5
    status, body = await get_json(proxy, "/api/sessions/nope")
    assert status == 404 and body["error"]["param"] == "id"


async def test_export_streams_stable_columns_and_filters(proxy: ProxyHarness) -> None:
    records = await session_records(proxy)
    records[0].tags = {}
    text = await get_text(proxy, "/api/export", format="csv", session="c")
    assert text.splitlines()[0] == ",".join(EXPORT_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 5 and {r["session"] for r in rows} == {"c"}
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    assert "cost_pico" not in rows[0] and "extra" not in rows[0]
    assert rows[0]["streamed"] == "false" and json.loads(rows[0]["tags"]) == {}
    lines = (
        await get_text(proxy, "/api/export", format="jsonl", since=T0.isoformat(), until="2026-06-01T09:31Z")
    ).splitlines()
    assert [json.loads(x)["ts"][:16] for x in lines] == ["2026-06-01T09:30", "2026-06-01T09:30"]
    assert list(json.loads(lines[0])) == EXPORT_COLUMNS
    empty = await get_text(proxy, "/api/export", format="csv", user="nobody")
    assert empty == ",".join(EXPORT_COLUMNS) + "\r\n"


async def test_tricky_text_survives_csv_and_jsonl(proxy: ProxyHarness) -> None:
    weird = 'a "quoted", comma\nnew line é'
    await submit(proxy, [make_record(user=weird, tags={"k": 'v"1,2'}, ts=T0)])
    [row] = list(csv.DictReader(io.StringIO(await get_text(proxy, "/api/export"))))
    assert row["user"] == weird and json.loads(row["tags"]) == {"k": 'v"1,2'}
    [line] = (await get_text(proxy, "/api/export", format="jsonl")).splitlines()
    assert json.loads(line)["user"] == weird


async def test_every_api_route_is_in_the_openapi_document(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    status, spec = await get_json(proxy, "/api/openapi.json")
    assert status == 200
    built = build_spec(proxy.app[API_DOCS])
    assert spec["openapi"].startswith("3.1") and spec == json.loads(json.dumps(built), parse_float=Decimal)
    validate(json.loads(json.dumps(built)))  # a valid OpenAPI 3.1 document
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in proxy.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method != "HEAD"
    }
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    missing = routes - documented
    assert not missing, (
        f"{sorted(missing)} not in /api/openapi.json: add them with meterproxy.api.openapi.document()"
    )
    for ops in spec["paths"].values():
        for op in ops.values():
            ref = op["responses"]["200"]["content"].get("application/json", {}).get("schema", {}).get("$ref")
            if ref:
                assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"]


async def test_budget_endpoints_are_documented_with_the_budget_spec_model(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    _, spec = await get_json(proxy, "/api/openapi.json")
    post = spec["paths"]["/api/budgets"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BudgetSpec"
    }
    budget_spec = spec["components"]["schemas"]["BudgetSpec"]
    assert {"name", "limit_usd", "period", "action", "thresholds"} <= set(budget_spec["properties"])
    assert {"alert", "block"} <= set(budget_spec["properties"]["action"]["enum"])
    listed = spec["paths"]["/api/budgets"]["get"]["responses"]["200"]["content"]["application/json"]
    assert listed["schema"] == {"$ref": "#/components/schemas/BudgetsResponse"}
    # The budgets feature documented its routes on its own app: the core document has none of them.
    assert not any(path.startswith("/api/budgets") for path in build_spec()["paths"])


async def test_admin_token_protects_the_api(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(admin_token="s3cret")
    async with aiohttp.ClientSession() as session:
        for path in ("/api/summary", "/api/export", "/api/openapi.json", "/api/sessions"):
            async with session.get(proxy.url + path) as resp:
                assert resp.status == 401
        async with session.get(
            proxy.url + "/api/summary", headers={"Authorization": "Bearer s3cret"}
        ) as resp:
            assert resp.status == 200


async def test_export_across_many_slices_is_complete_and_ordered(proxy: ProxyHarness) -> None:
    # 5 days = 20+ six-hour slices, formatted by two worker threads; ties on ts included.
    records = [
        make_record(
            ts=T0 + timedelta(minutes=37 * (i // 2)), user=f"u{i % 3}", cost_usd=Decimal(i).scaleb(-9)
        )
        for i in range(400)
    ]
    await submit(proxy, records)
    rows = list(csv.DictReader(io.StringIO(await get_text(proxy, "/api/export", format="csv"))))
    conn = sqlite3.connect(proxy.db)
    want = [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY ts, id")]
    conn.close()
    assert [r["id"] for r in rows] == want and len(want) == 400
    since, until = (
        (T0 + timedelta(days=1, minutes=5)).isoformat(),
        (T0 + timedelta(days=3, hours=1)).isoformat(),
    )
    lines = (
        await get_text(proxy, "/api/export", format="jsonl", since=since, until=until, user="u1")
    ).splitlines()
    expected = sorted(
        (r for r in records if r.user == "u1" and since <= r.ts.isoformat() < until),
        key=lambda r: (r.ts, r.id),
    )
    assert [json.loads(x)["id"] for x in lines] == [r.id for r in expected]


async def test_a_client_leaving_mid_export_stops_the_workers(proxy: ProxyHarness) -> None:
    records = [make_record(ts=T0 + timedelta(minutes=5 * i), user="x" * 2000) for i in range(3000)]
    await submit(proxy, records)
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/api/export") as resp:
        assert resp.status == 200
        await resp.content.read(1024)  # then hang up with most of the export unread
        assert export_children(), "the export (6 MB) cannot have finished into the pipe"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while export_children() or any(t.name.startswith("meterproxy-export") for t in threading.enumerate()):
        assert loop.time() < deadline, "export process or threads still running after the client left"
        await asyncio.sleep(0.05)

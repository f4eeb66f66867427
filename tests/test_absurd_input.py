"""Client- and upstream-chosen values are bounded before they are stored (issue 14.11).

- ``X-Meter-User`` and ``X-Meter-Session`` (and a body's ``user``) are capped like
  tags (`attribution.MAX_VALUE_LEN`), instead of storing 8 KB per row.
- A usage no model could produce (just under the old 10^12-per-count cut-off,
  which priced one request at $749,999) is flagged ``usage_source="invalid"``,
  not priced, with a note naming the bound (`plausibility.MAX_REQUEST_TOKENS`).
- ``/api/models/unpriced`` is paged: 20,000 client-chosen model names no longer
  come back as one 3 MB answer.
"""

from __future__ import annotations

import json

import aiohttp

from meterproxy.app_state import METER
from meterproxy.attribution import MAX_VALUE_LEN
from meterproxy.plausibility import MAX_REQUEST_TOKENS
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from meterproxy.testing_raw import RawConnection, RawUpstream, respond
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.faults import CHAT, post, proxy_for, row_for, session_id


async def test_user_and_session_headers_are_capped(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy()
    long_user, long_session = "u" * 8000, "s" * 8000
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "user": "b" * 8000}).encode()
    async with aiohttp.ClientSession() as client:
        for headers in ({"X-Meter-User": long_user, "X-Meter-Session": long_session}, {}):
            async with client.post(f"{proxy.url}/v1/chat/completions", data=body, headers=headers) as r:
                assert r.status == 200
    rows = await proxy.rows(2)
    assert rows[0]["user"] == long_user[:MAX_VALUE_LEN] and rows[0]["session"] == long_session[:MAX_VALUE_LEN]
    assert rows[1]["user"] == "b" * MAX_VALUE_LEN  # the body's "user" field, capped the same way


ABSURD = 999_999_999_999  # one below the per-count cut-off


async def test_usage_beyond_any_context_window_is_flagged_not_priced(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {"prompt_tokens": ABSURD, "completion_tokens": 5, "total_tokens": ABSURD + 5},
    }

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, json.dumps(answer).encode()))

    async with RawUpstream(script) as raw:
        proxy = await proxy_for(make_proxy, raw, upstream)
        sid = session_id()
        status, body, err, _ = await post(proxy, "/raw/v1/chat/completions", CHAT, session=sid)
    assert err is None and status == 200 and json.loads(body) == answer  # the client gets it as sent
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "invalid"
    assert row["cost_usd"] is None and not row["input_tokens"]
    assert str(MAX_REQUEST_TOKENS) in row["extra"]


async def test_plausible_large_usage_is_still_priced(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    record = make_record(model="gpt-4o-mini", usage=Usage(input_tokens=1_000_000, output_tokens=100_000))
    proxy.app[METER].request_finished(record)
    (row,) = await proxy.rows(1)
    assert row["usage_source"] == "reported" and row["cost_usd"] is not None


async def test_unpriced_models_are_paged(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    for i in range(250):
        proxy.app[METER].request_finished(make_record(model=f"client-chosen-{i:04d}"))
    await proxy.rows(250)
    seen: list[str] = []
    url = f"{proxy.url}/api/models/unpriced?limit=100"
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/api/models/unpriced") as r:
            assert r.status == 200
            doc = await r.json()
            assert len(doc["models"]) <= 100  # a default page, not everything
        pages = 0
        while url:
            async with client.get(url) as r:
                assert r.status == 200
                doc = await r.json()
            pages += 1
            assert len(doc["models"]) <= 100
            seen += [m["model"] for m in doc["models"]]
            nxt = doc["next_offset"]
            url = f"{proxy.url}/api/models/unpriced?limit=100&offset={nxt}" if nxt is not None else ""
        async with client.get(f"{proxy.url}/api/models/unpriced?limit=100000") as r:
            assert r.status == 400
    assert pages == 3 and sorted(seen) == [f"client-chosen-{i:04d}" for i in range(250)]

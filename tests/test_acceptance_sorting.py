"""Acceptance: every sort the page offers answers the same on SQLite and on PostgreSQL.

The page's Sessions and Requests tables send ``sort``/``order`` to the API. On
PostgreSQL, ``/api/sessions?sort=tokens`` answered 500 (``ORDER BY
input_tokens + output_tokens`` named the row columns, not the group's sums,
which PostgreSQL refuses in a ``GROUP BY`` query), so clicking "Tokens" broke
the page there. The records go through the meter and the store writer; the
expected orders are computed here from the records themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from meterproxy.app_state import METER
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage
from tests.conftest import ProxyFactory
from tests.helpers.pg import fresh_database, pg_or_skip


def records() -> list[RequestRecord]:
    now = datetime.now(UTC).replace(microsecond=0)
    out = []
    # session i: i+1 requests; tokens and cost rise with i but not in the same order as time
    for i, session in enumerate(["s-a", "s-b", "s-c", "s-d", "s-e"]):
        for j in range(i + 1):
            r = make_record(
                model="gpt-4o-mini",
                usage=Usage(input_tokens=1_000 * ((i * 3) % 5 + 1) + j, output_tokens=100 * (5 - i)),
                ts=now - timedelta(minutes=10 * ((i * 2) % 5) + j),
            )
            r.session, r.duration_ms = session, 100.0 * ((i + j) % 4)
            out.append(r)
    failed = make_record(model="gpt-4o-mini", usage=None, ts=now - timedelta(minutes=1))
    failed.status, failed.error, failed.usage_source, failed.session = 500, "upstream error", "none", "s-a"
    out.append(failed)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    with ExitStack() as stack:
        if request.param == "postgresql":
            pg_or_skip()
            yield {"db": stack.enter_context(fresh_database())}
        else:
            yield {}


async def get(url: str, **params: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url, params=params) as r:
        assert r.status == 200, f"{params}: {r.status} {await r.text()}"
        return json.loads(await r.text(), parse_float=Decimal)


async def test_every_session_and_request_sort_answers_on_both_engines(
    make_proxy: ProxyFactory, database: dict[str, Any]
) -> None:
    proxy = await make_proxy(**database)
    recs = records()
    for r in recs:
        proxy.app[METER].request_finished(r)
    await proxy.settle()  # the store's commit barrier: every record above is committed
    assert (await get(proxy.url + "/api/summary"))["totals"]["requests"] == len(recs)

    by_session: dict[str, list[RequestRecord]] = {}
    for r in recs:
        by_session.setdefault(r.session or "", []).append(r)
    keys = {
        "tokens": lambda rs: sum(r.tokens.input_tokens + r.tokens.output_tokens for r in rs),
        "requests": len,
        "cost": lambda rs: sum((r.cost_usd or Decimal(0)) for r in rs),
        "last_seen": lambda rs: max(r.ts for r in rs),
        "first_seen": lambda rs: min(r.ts for r in rs),
    }
    for sort, key in keys.items():
        for order in ("asc", "desc"):
            answer = await get(proxy.url + "/api/sessions", sort=sort, order=order, limit="10")
            got = [s["session"] for s in answer["sessions"]]
            figures = [key(by_session[s]) for s in got]
            assert figures == sorted(figures, reverse=order == "desc"), (sort, order, got)
            assert sorted(got) == sorted(by_session), (sort, order)

    for sort in ("time", "cost", "tokens", "latency"):
        for order in ("asc", "desc"):
            answer = await get(proxy.url + "/api/requests", sort=sort, order=order, limit="50")
            assert len(answer["requests"]) == len(recs), (sort, order)

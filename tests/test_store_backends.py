"""The store on both backends: the same records give the same answers on SQLite and PostgreSQL.

Each test runs the real app twice, once on a SQLite file and once on a fresh
PostgreSQL database (the real server on 127.0.0.1), feeds both the same
records through the meter (so pricing, the writer, migrations and the read
pool all take part), and compares every API answer between them. Totals are
also checked against figures computed here from the records themselves, so
"both equal" can't mean "both wrong". Rollups (and retention, which deletes
rolled-up raw rows) run between the checks, so both the raw and the rolled-up
read paths are compared.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from meterproxy.app_state import METER, READERS, WRITER
from meterproxy.store import backend
from meterproxy.store.maintenance import run_pass
from meterproxy.store.postgres import READ_POOL_APPLICATION
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage
from tests.conftest import ProxyFactory, ProxyHarness
from tests.helpers.pg import PG_ADMIN, fresh_database, pg_or_skip
from tests.helpers.waits import WAIT_S

START = datetime(2026, 10, 1, tzinfo=UTC)
MODELS = [("gpt-4o-mini", "openai"), ("gpt-4o", "openai"), ("claude-sonnet-4-5", "anthropic")]


def make_records(n: int, seed: int) -> list[RequestRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        model, provider = rng.choice(MODELS)
        record = make_record(
            model=model,
            provider=provider,
            upstream=provider,
            ts=START + timedelta(seconds=rng.randrange(0, 6 * 86400)),
            usage=Usage(
                input_tokens=rng.randrange(1, 20_000),
                output_tokens=rng.randrange(0, 4_000),
                cache_read_tokens=rng.choice([0, 0, rng.randrange(1, 9_000)]),
            ),
            user=rng.choice(["ana", "bo", "user", None]),
            session=f"s{rng.randrange(12)}",
            tags={"team": rng.choice(["core", "ml", "o'brien"]), "n": str(i % 3)},
        )
        record.status = rng.choice([200, 200, 200, 429])
        records.append(record)
    return records


class Pair:
    """The same app on SQLite and on PostgreSQL."""

    def __init__(self, sqlite: ProxyHarness, pg: ProxyHarness, pg_url: str) -> None:
        self.sqlite, self.pg, self.pg_url = sqlite, pg, pg_url
        self.both = (sqlite, pg)

    async def feed(self, records: list[RequestRecord]) -> None:
        for proxy in (self.sqlite, self.pg):
            for record in records:
                proxy.app[METER].request_finished(copy.deepcopy(record))
            await proxy.settle()

    async def get_both(self, path: str, **params: Any) -> Any:
        a, b = await asyncio.gather(get_json(self.sqlite, path, params), get_json(self.pg, path, params))
        assert a == b, f"{path} {params}: SQLite and PostgreSQL disagree"
        return a

    async def maintain(self, retention_days: int = 0, now: datetime | None = None) -> None:
        results = [await run_pass(p.app[WRITER], retention_days, now=now) for p in (self.sqlite, self.pg)]
        assert results[0] == results[1]


async def get_json(proxy: ProxyHarness, path: str, params: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + path, params=params) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        if resp.content_type == "application/json":
            return json.loads(text, parse_float=Decimal)
        return text


@pytest.fixture
async def pair(make_proxy: ProxyFactory, tmp_path: Path) -> AsyncIterator[Pair]:
    pg_or_skip()
    with fresh_database() as url:
        sqlite = await make_proxy(db=str(tmp_path / "pair.db"), rollup_interval=3600)
        pg = await make_proxy(db=url, rollup_interval=3600)
        yield Pair(sqlite, pg, url)
        # The apps close (and release their pool connections) before the database is dropped.
        for proxy in (sqlite, pg):
            await proxy.server.close()


def pico(value: Any) -> int:
    return int(Decimal(str(value)).scaleb(12))


async def test_requests_list_pages_and_filters_match(pair: Pair) -> None:
    records = make_records(300, seed=1)
    await pair.feed(records)
    # Walk every page of the keyset pagination on both; the union is every record once.
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 37, **({"cursor": cursor} if cursor else {})}
        page = await pair.get_both("/api/requests", **params)
        seen += [r["id"] for r in page["requests"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(r.id for r in records)
    assert len(seen) == len(set(seen))
    since, until = (START + timedelta(days=1, hours=5)).isoformat(), (START + timedelta(days=3)).isoformat()
    for params in (
        {"model": "gpt-4o"},
        {"user": "user"},  # a reserved word in PostgreSQL, as a value
        {"session": "s3", "provider": "openai"},
        {"tag": "team:o'brien"},
        {"tag": ["team:ml", "n:1"]},
        {"since": since, "until": until},
    ):
        query = {k: v for k, v in params.items() if not isinstance(v, list)}
        multi = [(k, x) for k, v in params.items() if isinstance(v, list) for x in v]
        async with aiohttp.ClientSession() as session:
            bodies = []
            for proxy in (pair.sqlite, pair.pg):
                url = proxy.url + "/api/requests"
                async with session.get(url, params=[*query.items(), *multi, ("limit", "1000")]) as resp:
                    assert resp.status == 200, await resp.text()
                    bodies.append(json.loads(await resp.text(), parse_float=Decimal))
        assert bodies[0] == bodies[1], params
        assert bodies[0]["requests"], f"{params} matched nothing: the test would prove little"


async def test_summaries_match_and_are_exact_before_and_after_rollups(pair: Pair) -> None:
    records = make_records(400, seed=2)
    await pair.feed(records[:250])
    queries: list[dict[str, Any]] = [
        {},
        {"group_by": "model"},
        {"group_by": "user,day"},
        {"group_by": "tag:team"},
        {"group_by": "hour", "since": (START + timedelta(hours=7, minutes=3)).isoformat()},
        {"group_by": "month", "tz": "America/New_York"},
        {"group_by": "session"},
    ]
    answers = [await pair.get_both("/api/summary", **q) for q in queries]
    await pair.maintain()  # everything so far into the rollups
    await pair.feed(records[250:])  # and some rows above the watermark
    for q in queries:
        await pair.get_both("/api/summary", **q)
    total = await pair.get_both("/api/summary")
    assert total["totals"]["requests"] == len(records)
    assert total["totals"]["input_tokens"] == sum(r.tokens.input_tokens for r in records)
    # Costs priced by the meter in each app; the sum of exact per-request picodollars.
    assert answers[0]["totals"]["requests"] == 250
    stored = await pair.get_both("/api/requests", limit=1000)
    expected_pico = sum(pico(r["cost_usd"]) for r in stored["requests"] if r["cost_usd"] is not None)
    assert pico(total["totals"]["cost_usd"]) == expected_pico
    for bucket in ("hour", "day"):
        await pair.get_both(
            "/api/timeseries",
            bucket=bucket,
            split="model",
            since=START.isoformat(),
            until=(START + timedelta(days=7)).isoformat(),
        )
    await pair.get_both("/api/sessions", limit=100)
    await pair.get_both("/api/sessions/s4")
    await pair.get_both("/api/models/unpriced")
    # The page's server-side sorts and prefix filters: the same portable SQL, the same answers.
    for sort in ("cost", "tokens", "latency"):
        await pair.get_both("/api/requests", sort=sort, limit=25, offset=10)
    await pair.get_both("/api/requests", sort="cost", order="asc", model="gpt-4o*", limit=20)
    for sort in ("cost", "tokens", "requests", "first_seen", "last_seen"):
        await pair.get_both("/api/sessions", sort=sort, limit=5, offset=1)
    prefixed = await pair.get_both("/api/sessions", user="an*", limit=20)
    assert prefixed["total"] > 0 and all(s["users"] == ["ana"] for s in prefixed["sessions"])
    await pair.get_both("/api/summary", model="claude*", group_by="model")
    await pair.get_both("/api/sessions/s4", limit=2, offset=1)


async def test_exports_match(pair: Pair) -> None:
    await pair.feed(make_records(120, seed=3))
    csv_text = await pair.get_both("/api/export", format="csv")
    assert csv_text.count("\n") == 121
    # JSON Lines: the same bytes too (keys in the same order, costs with the same digits).
    text = await pair.get_both("/api/export", format="jsonl", model="gpt-4o-mini")
    lines = [json.loads(line, parse_float=Decimal) for line in text.split("\n")[:-1]]
    assert lines and all(o["model"] == "gpt-4o-mini" for o in lines)


async def test_retention_deletes_only_rolled_up_rows_on_both(pair: Pair) -> None:
    records = make_records(200, seed=4)
    await pair.feed(records)
    before = await pair.get_both("/api/summary", group_by="day")
    now = START + timedelta(days=8)
    await pair.maintain(retention_days=5, now=now)  # cuts raw rows older than START+3d
    after = await pair.get_both("/api/summary", group_by="day")
    assert after["totals"] == before["totals"]
    kept = await pair.get_both("/api/requests", limit=1000)
    assert 0 < len(kept["requests"]) < len(records)


async def test_migrations_apply_once_and_rowid_follows_commit_order(pair: Pair) -> None:
    conn = backend.connect(pair.pg_url)
    try:
        names = [r[0] for r in conn.execute("SELECT migration_set || ':' || name FROM meterproxy_migrations")]
        assert len(names) == len(set(names))
        assert "meterproxy.core:m001_requests" in names
        assert backend.apply_migrations(conn) == []  # a second replica starting finds nothing to do
    finally:
        conn.close()


async def test_postgres_connections_dropped_by_the_server_are_replaced(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A PostgreSQL restart or failover drops every connection: writes and reads carry on after it."""
    pg_or_skip()

    with fresh_database() as url:
        proxy = await make_proxy(db=url)
        writer = proxy.app[WRITER]
        first = make_records(5, seed=8)
        for record in first:
            proxy.app[METER].request_finished(record)
        await proxy.settle()
        assert writer.written == 5
        assert len((await get_json(proxy, "/api/requests", {}))["requests"]) == 5
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
        assert killed is not None and killed[0] >= 2  # the writer's and the read pool's
        later = make_records(7, seed=9)
        for record in later:
            proxy.app[METER].request_finished(record)
        await proxy.settle()  # the barrier runs once the writer reconnected and wrote the rest
        assert writer.written == 12
        assert writer.health().ok
        body = await get_json(proxy, "/api/requests", {"limit": 100})
        assert {r["id"] for r in body["requests"]} == {r.id for r in first + later}
        await proxy.server.close()


async def test_each_app_owns_its_read_pool_and_closes_it_at_shutdown(make_proxy: ProxyFactory) -> None:
    """Two apps on one database in one process (replicas, as tests run them) never share a read
    pool: stopping one closes its own and leaves the other answering; stopping both leaves none."""
    pg_or_skip()

    def readers_open(name: str) -> int:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                (name, READ_POOL_APPLICATION),
            ).fetchone()
        return int(row[0]) if row else 0

    async def until(check: Callable[[int], bool], name: str) -> int:
        # The server lists a backend until it has exited, a moment after its client hung up.
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not check(count := readers_open(name)):
            assert asyncio.get_running_loop().time() < deadline, f"{count} read connections open"
            await asyncio.sleep(0.05)
        return count

    with fresh_database() as url:
        name = url.rsplit("/", 1)[1]
        a, b = await make_proxy(db=url), await make_proxy(db=url)
        assert a.app[READERS] is not b.app[READERS]
        for proxy in (a, b):
            assert (await get_json(proxy, "/api/requests", {}))["requests"] == []
        await until(lambda n: n >= 2, name)  # one pool each (min_size 1)
        await a.server.close()
        assert (await get_json(b, "/api/summary", {}))["totals"]["requests"] == 0
        await b.server.close()
        await until(lambda n: n == 0, name)


async def test_concurrent_writers_and_rollup_passes_on_postgres_count_every_row_once() -> None:
    """Three writers (three replicas) insert and roll up at the same time: rollups == raw rows.

    Rollups fold rows above a rowid watermark; with several writers that is exact only
    because rowids follow commit order and roll-up transactions serialize (a loser is
    retried). Any row skipped or folded twice shows as a difference below. (Small batches,
    roll-ups in between: with the rowid-order lock removed this failed about one run in six.)
    """
    pg_or_skip()
    from meterproxy.store.rollups import roll_up
    from meterproxy.store.writer import StoreWriter

    with fresh_database() as url:
        writers = [StoreWriter(url) for _ in range(3)]
        for w in writers:
            w.start()
        try:
            records = make_records(3000, seed=11)
            for i, record in enumerate(records):
                record.cost_usd = Decimal(i + 1).scaleb(-9)
            passes = []
            for i in range(0, len(records), 12):
                for n, record in enumerate(records[i : i + 12]):
                    assert writers[n % 3].submit(record)
                passes += [asyncio.wrap_future(w.call(lambda c: roll_up(c, 500))) for w in writers]
            await asyncio.gather(*passes)
            await asyncio.gather(*(asyncio.wrap_future(w.call(lambda c: None)) for w in writers))
            assert sum(w.written for w in writers) == len(records)
            while sum(await asyncio.gather(*(asyncio.wrap_future(w.call(roll_up)) for w in writers))):
                pass
        finally:
            for w in writers:
                assert w.close()
        conn = backend.read_connection(url)
        try:
            raw = conn.execute("SELECT count(*), sum(cost_pico), sum(input_tokens) FROM requests").fetchone()
            for table in ("rollup_hour", "rollup_day"):
                rolled = conn.execute(
                    f"SELECT sum(requests), sum(cost_pico), sum(input_tokens) FROM {table}"
                ).fetchone()
                assert (
                    tuple(rolled)
                    == tuple(raw)
                    == (
                        len(records),
                        sum(int(r.cost_usd.scaleb(12)) for r in records if r.cost_usd),
                        sum(r.tokens.input_tokens for r in records),
                    )
                ), table
        finally:
            conn.close()

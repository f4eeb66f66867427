"""A realistic demo database: every state the page and the reports can show, in one command.

`demo_records` generates requests the way a small team's month looks: several
providers and upstreams (OpenAI, Anthropic, Gemini, OpenRouter), one model
under several names (``claude-haiku-4-5`` and its dated snapshot,
``anthropic/claude-sonnet-4`` through a router), sessions of agent work with
users and tags, cheap embeddings calls (costs under a cent), models the price
tables do not know (unpriced), upstream errors (429, 500, timeouts), requests
blocked by a budget, and Claude Code imports carrying their project. Working
hours weigh more than nights, and the last days more than the first, so the
burn chart and the period-over-period change have something to say.

Records are priced by the same `price_record_with` the proxy uses and written
by the store's own `StoreWriter`, then rolled up with `roll_up`, so the demo
database is exactly what a running proxy would have stored. `write_demo`
also adds four budgets (one projected to overrun, one blocking). The generator
is seeded: the same arguments give the same rows (ids and all).

Used by ``meterproxy demo``, the page's browser tests (a small one) and
``bench/sessions_bench.py`` (80,000 rows over 38 days).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterproxy.budgets.definition import BudgetSpec
from meterproxy.budgets.store import save_budget
from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.store.rollups import roll_up
from meterproxy.store.writer import StoreWriter
from meterproxy.usage import RequestRecord, Usage

__all__ = ["DEMO_BUDGETS", "DemoShape", "demo_records", "write_demo"]


@dataclass(frozen=True, slots=True)
class _Model:
    name: str
    provider: str
    upstream: str
    weight: float
    input: tuple[int, int]  # token range
    output: tuple[int, int]
    cache: float = 0.0  # share of input read from cache
    endpoint: str = "chat"


_MODELS = [
    _Model("claude-sonnet-4-5", "anthropic", "anthropic", 16, (8_000, 60_000), (300, 4_000), 0.7, "messages"),
    _Model("claude-haiku-4-5", "anthropic", "anthropic", 10, (2_000, 20_000), (100, 1_500), 0.5, "messages"),
    _Model(
        "claude-haiku-4-5-20251001",
        "anthropic",
        "anthropic",
        6,
        (2_000, 20_000),
        (100, 1_500),
        0.5,
        "messages",
    ),
    _Model(
        "claude-opus-4-1-20250805",
        "anthropic",
        "anthropic",
        2,
        (10_000, 80_000),
        (500, 5_000),
        0.6,
        "messages",
    ),
    _Model("anthropic/claude-sonnet-4", "openai", "openrouter", 5, (5_000, 40_000), (200, 3_000), 0.3),
    _Model("gpt-4o-2024-08-06", "openai", "openai", 9, (1_000, 30_000), (200, 2_500), 0.3),
    _Model("gpt-4o", "openai", "openai", 5, (1_000, 30_000), (200, 2_500), 0.3),
    _Model("gpt-4o-mini", "openai", "openai", 14, (500, 8_000), (50, 800), 0.2),
    _Model("o3-mini", "openai", "openai", 4, (2_000, 12_000), (1_000, 9_000), 0.1),
    _Model("text-embedding-3-small", "openai", "openai", 9, (20, 600), (0, 0), 0.0, "embeddings"),
    _Model("gemini-2.5-flash", "gemini", "gemini", 8, (3_000, 90_000), (100, 2_000), 0.2, "generateContent"),
    _Model("acme-llama-70b-internal", "openai", "vllm", 3, (1_000, 10_000), (100, 1_500)),
    _Model("mistral-medium-preview", "openai", "openrouter", 2, (1_000, 10_000), (100, 1_500)),
]
_USERS = ["alice", "bob", "carol", "dave", "erin", "frank"]
_PROJECTS = ["billing-api", "web-app", "data-pipeline"]
_TEAMS = {
    "alice": "platform",
    "bob": "platform",
    "carol": "product",
    "dave": "product",
    "erin": "data",
    "frank": "data",
}

#: The demo's budgets: one fine, one warned, one projected to overrun, one blocking.
DEMO_BUDGETS = [
    {"name": "team-month", "period": "month", "limit_usd": "4000", "action": "alert", "projected": True},
    {"name": "alice-day", "period": "day", "limit_usd": "40", "scope": {"user": "alice"}, "action": "alert"},
    {
        "name": "opus-week",
        "period": "week",
        "limit_usd": "60",
        "scope": {"model": "claude-opus-4-1-20250805"},
        "action": "alert",
        "projected": True,
    },
    {
        "name": "data-team-day",
        "period": "day",
        "limit_usd": "5",
        "scope": {"tags": {"team": "data"}},
        "action": "block",
    },
]


@dataclass(frozen=True, slots=True)
class DemoShape:
    requests: int = 6_000
    days: int = 38
    sessions: int = 600
    seed: int = 18


def _moment(rng: random.Random, now: datetime, days: int) -> datetime:
    """A past moment, working hours and recent days weighing more."""
    while True:
        age = rng.random() ** 1.3 * days  # more recent, more often
        at = now - timedelta(days=age)
        hour = at.hour
        if 8 <= hour < 19 or rng.random() < 0.25:
            return at.replace(microsecond=rng.randrange(1_000_000))


def demo_records(shape: DemoShape = DemoShape(), now: datetime | None = None) -> Iterator[RequestRecord]:
    """`shape.requests` records over the `shape.days` days before `now` (see module docstring)."""
    rng = random.Random(shape.seed)
    now = now or datetime.now(UTC)
    weights = [m.weight for m in _MODELS]
    sessions = [f"sess-{i:05d}-{rng.randrange(16**6):06x}" for i in range(shape.sessions)]
    session_user = {s: rng.choice(_USERS) for s in sessions}
    keys = {u: f"fp_{u}_{rng.randrange(16**8):08x}" for u in _USERS}
    for i in range(shape.requests):
        model = rng.choices(_MODELS, weights)[0]
        ts = _moment(rng, now, shape.days)
        imported = model.provider == "anthropic" and rng.random() < 0.18
        session = rng.choice(sessions) if rng.random() < 0.85 else None
        user = session_user[session] if session else rng.choice([*_USERS, None])
        inp = rng.randint(*model.input)
        cached = int(inp * model.cache * rng.random())
        written = int((inp - cached) * 0.3) if model.provider == "anthropic" and rng.random() < 0.2 else 0
        out = rng.randint(*model.output)
        reasoning = int(out * 0.7) if model.name.startswith("o3") else 0
        record = RequestRecord(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            ts=ts,
            source="claude-code" if imported else "proxy",
            upstream="" if imported else model.upstream,
            provider=model.provider,
            endpoint=model.endpoint,
            requested_model=model.name,
            model=model.name,
            status=200,
            streamed=model.endpoint != "embeddings" and rng.random() < 0.7,
            usage=Usage(
                input_tokens=inp,
                cache_read_tokens=cached,
                cache_write_tokens=written,
                output_tokens=out,
                reasoning_tokens=reasoning,
            ),
            usage_source="reported",
            duration_ms=round(rng.uniform(150, 900) + out * rng.uniform(4, 14), 1),
            ttfb_ms=round(rng.uniform(120, 900), 1),
            user=user,
            session=session,
            key_fingerprint=None if imported else keys.get(user or ""),
        )
        record.upstream_ms = record.duration_ms
        if imported:
            record.tags = {"project": rng.choice(_PROJECTS)}
        elif user:
            record.tags = {"team": _TEAMS[user]}
        _failures(rng, record, i, shape.requests)
        yield record


def _failures(rng: random.Random, record: RequestRecord, i: int, n: int) -> None:
    """Turn a few records into the failures a real month has."""
    if record.source != "proxy":
        return
    roll = rng.random()
    if roll < 0.012:
        record.status, record.error = 429, "rate limited by upstream"
    elif roll < 0.02:
        record.status, record.error = 500, "upstream error"
    elif roll < 0.025:
        record.status, record.error = None, "upstream timeout after 120 s"
    elif roll < 0.028 and record.streamed and record.usage is not None:
        # A stream the client cut before the final usage event: a lower bound, still priced.
        record.usage_source, record.client_disconnected = "partial", True
        record.usage.output_tokens //= 3
        record.usage.reasoning_tokens //= 3
        return
    elif roll < 0.03 and record.tags.get("team") == "data" and i > n * 0.8:
        record.status, record.error = 429, "blocked by budget 'data-team-day'"
        record.extra = {"budget": "data-team-day"}
    else:
        return
    record.usage, record.usage_source, record.streamed = None, "none", False
    record.duration_ms = round(rng.uniform(50, 400), 1)


def write_demo(db: str | Path, shape: DemoShape = DemoShape(), now: datetime | None = None) -> int:
    """Write the demo rows and budgets into `db` (created and migrated if new); returns the row count."""
    price = price_record_with(PriceBook.default())
    writer = StoreWriter(str(db), queue_max=shape.requests + 10)
    writer.start()
    try:
        count = 0
        for record in demo_records(shape, now):
            price(record)
            writer.submit(record)
            count += 1
        while writer.call(roll_up).result() > 0:
            pass
        moment = now or datetime.now(UTC)
        budgets = [BudgetSpec.model_validate(spec) for spec in DEMO_BUDGETS]

        def add_budgets(conn: Any) -> None:
            for budget in budgets:
                save_budget(conn, budget, moment, create=True)

        writer.call(add_budgets).result()
    finally:
        writer.close()
    return count


def demo_total(records: list[RequestRecord]) -> Decimal:
    """The exact cost of priced records (for tests and the command's summary line)."""
    return sum((r.cost_usd for r in records if r.cost_usd is not None), Decimal(0))

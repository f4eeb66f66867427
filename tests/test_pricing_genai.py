"""Cross-check our tables against the independent `genai-prices` package.

For every model both sides know, at the day after each of our dated entries and
at a recent date, price the same usages on both sides and demand exact equality.
Every model where the two disagree is listed in KNOWN_DISAGREEMENTS with the
reason and which side is right; the test fails on an unlisted disagreement and
on a listed one that no longer disagrees (so the list cannot rot).

Compared: standard tier, no web searches (Gemini's grounding fee has a free
allowance genai-prices does not model), two usages: a small one with every kind
of token and a large one over every long-context threshold.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meterproxy.pricing import PriceBook
from meterproxy.usage import Usage

genai_prices = pytest.importorskip("genai_prices")

# Our provider name -> genai-prices provider id.
GENAI_PROVIDER = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "google",
    "mistral": "mistral",
    "xai": "x-ai",
    "deepseek": "deepseek",
    "groq": "groq",
}

USAGES = {
    "small": Usage(
        input_tokens=20_000,
        cache_read_tokens=6_000,
        cache_write_tokens=3_000,
        cache_write_1h_tokens=1_000,
        output_tokens=4_000,
        reasoning_tokens=1_500,
    ),
    "large": Usage(
        input_tokens=250_000, cache_read_tokens=50_000, cache_write_tokens=10_000, output_tokens=8_000
    ),
}
RECENT = datetime(2026, 11, 20, 12, tzinfo=UTC)

KNOWN_DISAGREEMENTS: dict[str, str] = {
    "mistral-embed": (
        "genai-prices gives this embedding model an output price ($0.10); embeddings return "
        "no tokens, so only this test's synthetic output tokens differ (ours matches Mistral's "
        "page, which lists one $0.10 input rate; mistral.ai/pricing#api-pricing)"
    ),
    "o3": (
        "before 2025-06-10 genai-prices bills cached input at $0.50; o3 launched at "
        "$10 / $2.50 cached / $40 and only the 2025-06-10 cut brought cached input to "
        "$0.50 (ours is right; https://openai.com/index/introducing-o3-and-o4-mini/, "
        "OpenAI pricing page archive)"
    ),
    "claude-3-5-haiku": (
        "genai-prices has no history: Haiku 3.5 launched 2024-11-04 at $1/$5 and was cut "
        "to $0.80/$4 on 2024-12-03 (ours is right; anthropic.com/news/3-5-models-and-computer-use, "
        "anthropic.com/news/trainium2-and-distillation)"
    ),
    "claude-sonnet-4": (
        "genai-prices lacks Sonnet 4's >200K-token long-context rates ($6/$22.50), which "
        "Anthropic's pricing page lists for Sonnet 4 and 4.5 alike (ours is right; "
        "docs.claude.com/en/docs/about-claude/pricing#long-context-pricing)"
    ),
    "gemini-1.5-flash": (
        "genai-prices has no history: launch price $0.35/$1.05 (<=128K) until the "
        "2024-08-12 cut to $0.075/$0.30 (ours is right; developers.googleblog.com, "
        "'Gemini 1.5 Flash price drop')"
    ),
    "gemini-1.5-pro": (
        "genai-prices has no history (launch $3.50/$10.50 until the 2024-10-01 cut) and no "
        "context-cache price, so it bills cached tokens at full input instead of "
        "$0.3125/$0.625 (ours is right; developers.googleblog.com 'reduced 1.5 Pro pricing', "
        "ai.google.dev/gemini-api/docs/pricing archive)"
    ),
    "gemini-1.5-flash-8b": (
        "genai-prices has no 1.5 Flash-8B entry and matches it to 1.5 Flash ($0.075/$0.30); "
        "Flash-8B is $0.0375/$0.15 (ours is right; ai.google.dev/gemini-api/docs/pricing archive)"
    ),
    "deepseek-chat": (
        "genai-prices models only the Feb-Sep 2025 peak/off-peak rates; it misses the launch "
        "promotion ($0.14/$0.28 until 2025-02-08), the 2025-09-05 V3.1 price ($0.56/$1.68) and "
        "the 2025-09-29 V3.2-Exp cut ($0.28/$0.028/$0.42) (ours is right; "
        "api-docs.deepseek.com/news). We do not model off-peak discounts (noon UTC is peak)."
    ),
    "deepseek-reasoner": (
        "as deepseek-chat: genai-prices misses the 2025-09-05 and 2025-09-29 price changes "
        "(ours is right; api-docs.deepseek.com/news)"
    ),
}


def _dates(book: PriceBook, model: str) -> list[datetime]:
    days = [e.effective_from + timedelta(days=1) for e in book.history(model)]
    noon = [d.replace(hour=12, minute=0, second=0) for d in days]
    return sorted({*noon, RECENT})


def _genai_cost(model: str, provider: str, usage: Usage, at: datetime) -> Decimal | None:
    gusage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        output_tokens=usage.output_tokens,
        output_reasoning_tokens=usage.reasoning_tokens,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = genai_prices.calc_price(gusage, model, provider_id=provider, genai_request_timestamp=at)
    except LookupError:
        return None
    return Decimal(calc.total_price)


def _disagreements() -> tuple[dict[str, list[str]], int]:
    book = PriceBook.default()
    found: dict[str, list[str]] = {}
    compared = 0
    for model in book.models():
        provider = GENAI_PROVIDER.get(book.provider_of(model) or "")
        if provider is None:
            continue
        for at in _dates(book, model):
            for name, usage in USAGES.items():
                theirs = _genai_cost(model, provider, usage, at)
                ours = book.price(model=model, usage=usage, at=at)
                if theirs is None or ours is None:
                    continue
                compared += 1
                if ours.cost_usd != theirs:
                    found.setdefault(model, []).append(
                        f"{at.date()} {name}: ours {ours.cost_usd} theirs {theirs}"
                    )
    return found, compared


def test_agrees_with_genai_prices_except_known() -> None:
    found, compared = _disagreements()
    assert compared > 100
    unlisted = {m: d for m, d in found.items() if m not in KNOWN_DISAGREEMENTS}
    stale = sorted(set(KNOWN_DISAGREEMENTS) - set(found))
    assert not unlisted, f"new disagreements with genai-prices: {unlisted}"
    assert not stale, f"listed disagreements that now agree (remove them): {stale}"

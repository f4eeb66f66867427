"""Cross-check our tables against the independent `genai-prices` package.

For every model both sides know, at the day after each of our dated entries and
at a recent date, price the same usages on both sides and demand exact equality.
Every model where the two disagree is listed in KNOWN_DISAGREEMENTS with the
reason and which side is right; the test fails on an unlisted disagreement and
on a listed one that no longer disagrees (so the list cannot rot).

Compared: standard tier, no web searches (Gemini's grounding fee has a free
allowance genai-prices does not model), two usages: a small one with every kind
of token and a large one over every long-context threshold.

Entries with time-of-day windows (DeepSeek) are also compared one second
before, at and one second after every window edge (and around midnight for a
window that wraps it), on a weekday and on a Saturday after the entry starts;
genai-prices has the same windows (``TimeOfDateConstraint``). A separate test
demands exact agreement at the weekday edges of the current DeepSeek V4 prices,
which the per-model KNOWN_DISAGREEMENTS entries would otherwise hide.
"""

from __future__ import annotations

import warnings
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import pytest

from meterproxy.pricing import PriceBook, PriceEntry
from meterproxy.usage import Usage

genai_prices = pytest.importorskip("genai_prices")

# Our provider name -> genai-prices provider id.
GENAI_PROVIDER = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
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

_XAI_RETIRED = (
    "since 2026-05-15 19:00 UTC xAI serves and bills this retired name as grok-4.3 ($1.25 / $0.20 / "
    "$2.50); genai-prices keeps the retired rates (ours is right: xAI migration guide, docs.x.ai, "
    "2026-05-15 'retired Grok model slugs now redirect to Grok 4.3 ... at standard Grok 4.3 rates')"
)

KNOWN_DISAGREEMENTS: dict[str, str] = {
    "grok-4": _XAI_RETIRED,
    "grok-3": _XAI_RETIRED,
    "grok-code-fast-1": _XAI_RETIRED,
    "grok-4-fast-reasoning": _XAI_RETIRED,
    "grok-4-1-fast-reasoning": _XAI_RETIRED,
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
        "genai-prices models only the Feb-Sep 2025 peak/off-peak rates, at every date; it misses "
        "the launch promotion ($0.14/$0.28 until 2025-02-08), the 2025-09-05 V3.1 price "
        "($0.56/$1.68, no off-peak discount), the 2025-09-29 V3.2-Exp cut ($0.28/$0.028/$0.42) and "
        "the 2026-04-24 switch to V4 Flash prices (ours is right; api-docs.deepseek.com/news, "
        "api-docs.deepseek.com/quick_start/pricing). Inside 2025-02-26..2025-09-05 we agree at "
        "every window edge."
    ),
    "deepseek-reasoner": (
        "as deepseek-chat: genai-prices misses the 2025-09-05, 2025-09-29 and 2026-04-24 price "
        "changes (ours is right; api-docs.deepseek.com/news)"
    ),
    "deepseek-v4-flash": (
        "(1) 2026-04-24..04-26 12:15 UTC: genai-prices has no launch cache-hit price ($0.028; cut "
        "to $0.0028 from 2026-04-26 12:15 UTC per the pricing page's footnote); (2) from 2026-08-23 "
        "DeepSeek bills weekends off-peak all day, which genai-prices cannot express and bills at "
        "peak (its own price_comments call this an upper bound; genai-prices issue #582); (3) "
        "2026-08-17..09-10 peak hours: genai-prices cannot date a window and bills V4.1 Flash's "
        "later peak price ($0.30/$1.20) instead of V4 Flash's ($0.44/$0.014/$1.32), as its "
        "price_comments say. Ours is right in all three (api-docs.deepseek.com/quick_start/pricing "
        "and /updates); current weekdays agree exactly (test_deepseek_window_edges_agree_on_weekdays)."
    ),
    "deepseek-v4-pro": "as deepseek-v4-flash: launch cache-hit price ($0.03625) and weekends",
    "claude-sonnet-5-5": (
        "2026-09-28..2026-10-07: genai-prices has only today's cache-read price ($0.10); Sonnet 5.5 "
        "launched with cache reads at $0.20 and Anthropic cut them to $0.10 on 2026-10-07 (ours is "
        "right; platform.claude.com/docs/en/release-notes/overview, September 28 and October 7, 2026)"
    ),
    # Targets of dated redirects: a row billed through a redirect names the target as its priced
    # model, and differs from genai-prices' price for the name the client sent.
    "grok-4.3": "target of xAI's retired names from 2026-05-15 19:00 UTC: " + _XAI_RETIRED,
    "mistral-large-2512": (
        "target of mistral-large-latest from 2025-12-02, which genai-prices bills as Large 2 "
        "($2 / $6); see mistral-large-latest"
    ),
    "mistral-large-latest": (
        "from 2025-12-02 the alias serves Mistral Large 3 (mistral-large-2512, $0.50 / $1.50); "
        "genai-prices still bills it as Large 2 ($2 / $6) at every date (ours is right: Mistral 3 "
        "release 2025-12-02; mistral-large-2411 retired 2026-05-31; sources in pricing/mistral.toml)"
    ),
    "gemini-flash-latest": (
        "genai-prices bills the alias as Gemini 3.8 Flash at every date; from 2025-09-25 it pointed "
        "at Gemini 2.5 Flash Preview 09-2025 (2.5 Flash rates), and before 2026-10-12 no source "
        "dates its later moves, so we leave that span unpriced (developers.googleblog.com "
        "2025-09-25; sources in pricing/gemini.toml)"
    ),
    "mistral-medium-2505": (
        "the name mistral-medium-3: genai-prices' Mistral Medium 3.5 rule (starts_with "
        "'mistral-medium-3') catches it and bills $1.50 / $7.50; Mistral Medium 3 is $0.40 / $2 "
        "(ours: the alias of mistral-medium-2505, Mistral's model card mistral-medium-3-1-25-08)"
    ),
    "ft:gpt-4o-2024-08-06": (
        "genai-prices has no cached-input rate for fine-tuned GPT-4o and bills cached tokens at the "
        "full $3.75; fine-tuned models cache like their base, at $1.875 (ours; LiteLLM's price map, "
        "OpenAI's pricing page Fine-tuning table)"
    ),
    "ft:gpt-4o-mini-2024-07-18": (
        "as ft:gpt-4o-2024-08-06: genai-prices bills cached tokens of fine-tuned GPT-4o mini at $0.30, "
        "not $0.15 (ours; LiteLLM's price map)"
    ),
    "gemini-flash-lite-latest": (
        "as gemini-flash-latest: genai-prices bills it as Gemini 3.5 Flash-Lite at every date; from "
        "2025-09-25 it pointed at 2.5 Flash-Lite Preview 09-2025 (2.5 Flash-Lite rates), and the "
        "span without a dated move is unpriced (sources in pricing/gemini.toml)"
    ),
    "deepseek-flash": (
        "weekends: DeepSeek bills them off-peak all day, genai-prices at peak (upper bound, its "
        "issue #582); ours is right (api-docs.deepseek.com/quick_start/pricing)"
    ),
}

# Current DeepSeek V4 prices: both sides must agree exactly at every weekday window edge.
DEEPSEEK_WINDOWED = ("deepseek-flash", "deepseek-v4-flash", "deepseek-v4-pro")
WEEKDAY = date(2026, 11, 18)  # a Wednesday, not a Chinese public holiday


def _dates(book: PriceBook, model: str) -> list[datetime]:
    entries = book.history(model)
    info = book.info(model)
    moves = [r.effective_from for r in info.redirects] if info is not None else []
    days = [d + timedelta(days=1) for d in (*(e.effective_from for e in entries), *moves)]
    noon = [d.replace(hour=12, minute=0, second=0) for d in days]
    edges = [t for e in entries for t in _window_edges(e)]
    return sorted({*noon, *edges, RECENT})


def _next(day: date, weekday: int) -> date:
    return day + timedelta(days=(weekday - day.weekday()) % 7)


def _window_edges(entry: PriceEntry, days: tuple[date, ...] | None = None) -> list[datetime]:
    """One second before, at and after each window edge (and midnight inside a wrapping window)."""
    if not entry.windows:
        return []
    if days is None:
        first = entry.effective_from.date() + timedelta(days=1)
        days = (_next(first, 2), _next(first, 5))  # a Wednesday and a Saturday
    second = timedelta(seconds=1)
    out = []
    for day in days:
        for w in entry.windows:
            marks = [w.start, w.end] + ([time(0)] if w.end < w.start else [])
            for mark in marks:
                edge = datetime.combine(day, mark, UTC)
                out += [edge - second, edge, edge + second]
    return out


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
        info = book.info(model)
        if provider is None or info is None:
            continue
        # The table id and every alias: an alias is a name clients send, and genai-prices
        # may match it to another model than ours does (recorded under the table id).
        for spelling, at in ((s, at) for s in (model, *info.aliases) for at in _dates(book, model)):
            for name, usage in USAGES.items():
                theirs = _genai_cost(spelling, provider, usage, at)
                ours = book.price(model=spelling, usage=usage, at=at, provider=book.provider_of(model))
                if theirs is None or ours is None:
                    continue
                compared += 1
                if ours.cost_usd != theirs:
                    found.setdefault(model, []).append(
                        f"{spelling} {at.isoformat()} {name}: ours {ours.cost_usd} theirs {theirs}"
                    )
    return found, compared


def test_agrees_with_genai_prices_except_known() -> None:
    found, compared = _disagreements()
    assert compared > 100
    unlisted = {m: d for m, d in found.items() if m not in KNOWN_DISAGREEMENTS}
    book = PriceBook.default()
    targets = {r.to for m in book.models() if (info := book.info(m)) is not None for r in info.redirects}
    stale = sorted(set(KNOWN_DISAGREEMENTS) - set(found) - targets)
    assert not unlisted, f"new disagreements with genai-prices: {unlisted}"
    assert not stale, f"listed disagreements that now agree (remove them): {stale}"


def test_deepseek_window_edges_agree_on_weekdays() -> None:
    book = PriceBook.default()
    compared = 0
    for model in DEEPSEEK_WINDOWED:
        current = book.history(model)[-1]
        assert current.windows, model
        for at in _window_edges(current, (WEEKDAY,)):
            for usage in USAGES.values():
                ours = book.price(model=model, usage=usage, at=at)
                theirs = _genai_cost(model, "deepseek", usage, at)
                assert ours is not None and theirs is not None
                assert ours.cost_usd == theirs, f"{model} at {at}"
                compared += 1
    assert compared == len(DEEPSEEK_WINDOWED) * 2 * 6 * len(USAGES)


# Usages with audio and image parts (subsets of the totals), for the realtime, audio and image models.
MODALITY_USAGES = (
    Usage(
        input_tokens=1000,
        audio_input_tokens=400,
        cache_read_tokens=200,
        audio_cache_read_tokens=50,
        output_tokens=100,
        audio_output_tokens=60,
    ),
    Usage(input_tokens=1000, image_input_tokens=300, output_tokens=500, image_output_tokens=400),
)
MODALITY_MODELS = (
    "gpt-realtime",
    "gpt-realtime-1.5",
    "gpt-realtime-mini",
    "gpt-realtime-2",
    "gpt-4o-realtime-preview",
    "gpt-4o-mini-realtime-preview",
    "gpt-audio",
    "gpt-audio-mini",
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "gpt-image-2",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-tts",
)


def _genai_modality_cost(model: str, usage: Usage, at: datetime) -> Decimal:
    gusage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        output_tokens=usage.output_tokens,
        input_audio_tokens=usage.audio_input_tokens,
        cache_audio_read_tokens=usage.audio_cache_read_tokens,
        output_audio_tokens=usage.audio_output_tokens,
        input_image_tokens=usage.image_input_tokens,
        output_image_tokens=usage.image_output_tokens,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = genai_prices.calc_price(gusage, model, provider_id="openai", genai_request_timestamp=at)
    return Decimal(calc.total_price)


@pytest.mark.parametrize("model", MODALITY_MODELS)
def test_audio_and_image_tokens_agree_with_genai_prices(model: str) -> None:
    """Base and curated entries bill audio and image tokens at their own rates, as genai-prices does.

    Not compared: gpt-4o-audio-preview and gpt-4o-mini-audio-preview, whose audio rates
    genai-prices lacks (it bills their audio as text; ours are OpenAI's model pages, see
    pricing/openai.toml).
    """
    book = PriceBook.default()
    for usage in MODALITY_USAGES:
        ours = book.price(model=model, usage=usage, at=RECENT, provider="openai")
        assert ours is not None, model
        assert ours.cost_usd == _genai_modality_cost(model, usage, RECENT), (model, usage)


def test_chat_audio_models_bill_audio_at_openais_audio_rates() -> None:
    book = PriceBook.default()
    usage = Usage(input_tokens=1_000_000, audio_input_tokens=1_000_000, output_tokens=0)
    for model, rate in (("gpt-4o-audio-preview", 40), ("gpt-4o-mini-audio-preview", 10)):
        ours = book.price(model=model, usage=usage, at=RECENT, provider="openai")
        assert ours is not None and ours.cost_usd == rate

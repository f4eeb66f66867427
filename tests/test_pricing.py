"""Pricing: hand-computed vectors, name matching, and table validation."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterproxy.pricing import DEFAULT_PRICING_DIR, PriceBook, PricingError
from meterproxy.usage import Usage

ROOT = Path(__file__).resolve().parent.parent
VECTORS: list[dict[str, Any]] = tomllib.loads(
    (Path(__file__).parent / "pricing_vectors.toml").read_text(), parse_float=Decimal
)["vector"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any], tmp_path: Path) -> None:
    overrides = [ROOT / p for p in vector.get("overrides", [])]
    if "override_toml" in vector:
        extra = tmp_path / "override.toml"
        extra.write_text(vector["override_toml"])
        overrides.append(extra)
    book = PriceBook.load(overrides=overrides) if overrides else PriceBook.default()
    assert book.check() == []
    result = book.price(
        model=vector["model"],
        usage=Usage(**vector["usage"]),
        at=vector["at"],
        provider=vector.get("provider"),
        service_tier=vector.get("tier"),
    )
    if vector["expected"] == "none":
        assert result is None
        return
    assert result is not None
    assert isinstance(result.cost_usd, Decimal)
    assert result.cost_usd == Decimal(vector["expected"])
    assert result.model == vector.get("expected_model", vector["model"])
    assert result.tier == vector.get("expected_tier")
    assert result.window == vector.get("expected_window")


def test_default_dir_is_repo_pricing() -> None:
    assert DEFAULT_PRICING_DIR == ROOT / "pricing"


def test_shipped_tables_pass_check() -> None:
    book = PriceBook.load()
    assert book.check() == []
    assert len(book.models()) > 50


def test_default_is_cached() -> None:
    assert PriceBook.default() is PriceBook.default()


@pytest.mark.parametrize(
    ("name", "provider", "expected"),
    [
        ("gpt-4o", None, "gpt-4o"),
        ("GPT-4o", None, "gpt-4o"),
        (" gpt-4o ", None, "gpt-4o"),
        ("gpt-4o-2024-08-06", None, "gpt-4o"),
        ("gpt-4o-2024-05-13", None, "gpt-4o-2024-05-13"),
        ("gpt-4o-mini-2024-07-18", None, "gpt-4o-mini"),
        ("openai/gpt-4o", None, "gpt-4o"),
        ("openai/gpt-4o", "openai", "gpt-4o"),
        ("gpt-4o", "openai", "gpt-4o"),
        ("o3-2025-04-16", None, "o3"),
        ("gpt-5-2025-08-07", "openai", "gpt-5"),
        ("claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", None, "claude-sonnet-4-5"),
        ("anthropic/claude-sonnet-4.5", None, "claude-sonnet-4-5"),
        ("claude-opus-4-20250514", "anthropic", "claude-opus-4"),
        ("claude-3-5-haiku-latest", "anthropic", "claude-3-5-haiku"),
        ("google/gemini-2.5-flash", None, "gemini-2.5-flash"),
        ("models/gemini-2.5-flash", "google", "gemini-2.5-flash"),
        ("models/gemini-1.5-flash-002", "gemini", "gemini-1.5-flash"),
        ("gemini-1.5-flash-8b-001", None, "gemini-1.5-flash-8b"),
        ("x-ai/grok-4", "openrouter", "grok-4"),
        ("grok-4-0709", "xai", "grok-4"),
        ("mistralai/mistral-large", "openrouter", "mistralai/mistral-large"),
        ("openai/gpt-oss-120b", "groq", "openai/gpt-oss-120b"),
        ("anthropic/claude-3.7-sonnet:thinking", "openrouter", "anthropic/claude-3.7-sonnet"),
        ("deepseek-chat", "deepseek", "deepseek-chat"),
        # Vertex AI's OpenAI-compatible endpoint and resource names (same model, same list).
        ("google/gemini-2.5-flash", "vertex", "gemini-2.5-flash"),
        ("publishers/google/models/gemini-2.5-pro", "vertex", "gemini-2.5-pro"),
        # Curated entries for models genai-prices lacks, on their own provider's list only.
        (
            "accounts/fireworks/models/llama-v3p3-70b-instruct",
            "fireworks",
            "accounts/fireworks/models/llama-v3p3-70b-instruct",
        ),
        ("deepseek-ai/DeepSeek-R1", "together", "deepseek-ai/DeepSeek-R1"),
        ("devstral-medium-latest", "mistral", "devstral-medium-2507"),
        ("grok-beta", "xai", "grok-beta"),
        # OpenAI fine-tunes bill at their base model's fine-tuned rates.
        ("ft:gpt-4.1-2025-04-14:acme::B1c2D3e4", "openai", "ft:gpt-4.1"),
        ("ft:gpt-4.1-mini-2025-04-14:acme:exp:ckpt-step-100:Zz9", "openai", "ft:gpt-4.1-mini"),
        ("ft:gpt-4o-mini-2024-07-18:my-org::9xYzAbC1", "openai", "ft:gpt-4o-mini-2024-07-18"),
        ("ft:gpt-4o-2024-11-20:org::x", "openai", "ft:gpt-4o-2024-08-06"),
        ("ft:o4-mini-2025-04-16:org::x", "openai", "ft:o4-mini"),
        ("ft:gpt-3.5-turbo-0125:personal::8qWeRtY9", "openai", "ft:gpt-3.5-turbo-"),  # genai-prices' id
        # An OpenRouter slug its own list lacks: the vendor's list, base layer included.
        ("google/gemini-2.5-flash-preview-05-20", "openrouter", "gemini-2.5-flash-preview"),
        # A LiteLLM-style provider prefix on an Azure upstream.
        ("azure/gpt-4o", "azure", "gpt-4o"),
        ("openai/gpt-4o-mini", "azure", "gpt-4o-mini"),
        # The list's own provider before a base-layer model (curated ones already resolved).
        ("openai/gpt-4-turbo", "openai", "gpt-4-turbo"),
        ("anthropic/claude-2.1", "anthropic", "claude-2"),
        ("gemini/gemini-2.5-pro-preview-06-05", "gemini", "gemini-2.5-pro"),
        ("mistralai/open-mistral-7b", "mistral", "mistral-7b"),
        ("x-ai/grok-3-fast", "xai", "grok-3-fast"),
        ("cohere/command-r", "cohere", "command-r"),
        # Vertex's partner models: the same name is Mistral's own model on Mistral's list.
        ("mistral-large-2411", "vertex", "mistral-large-2411@001"),
        ("mistralai/mistral-large-2411@001", "vertex", "mistral-large-2411@001"),
        ("mistral-large-2411", "mistral", "mistral-large-2411"),
    ],
)
def test_resolve(name: str, provider: str | None, expected: str) -> None:
    assert PriceBook.default().resolve(name, provider) == expected


@pytest.mark.parametrize(
    ("name", "provider"),
    [
        (None, None),
        ("", None),
        ("gpt-4o", "groq"),  # Groq does not serve gpt-4o
        ("openai/gpt-4o", "anthropic"),  # vendor prefix of another provider
        ("openai/gpt-4-turbo", "groq"),  # Groq's slash ids are its own; not OpenAI's prices
        ("perplexity/sonar-pro", "perplexity"),  # perplexity/<model> ids are models of their own
        ("mistral-medium-3@001", "mistral"),  # Vertex's version id, not on Mistral's own list
        ("gpt-4o", "local"),  # a list nobody publishes: never another provider's price
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "local"),
        ("deepseek-ai/DeepSeek-R1", "fireworks"),  # Together's curated entry stays on Together's list
        ("google/gemini-2.5-flash", "openai"),  # the Vertex spelling is tried on the Vertex list only
        ("ft:gpt-4.1-2025-04-14:acme::x", "azure"),  # OpenAI's fine-tune rates are OpenAI's list only
        ("azure/gpt-4o", "openai"),
        ("google/gemini-2.5-flash-preview-05-20:online", "openrouter"),  # a variant OpenRouter prices itself
        ("ft:davinci-002:org::x", "openai"),  # no fine-tuned rate recorded for davinci-002
    ],
)
def test_resolve_unknown(name: str | None, provider: str | None) -> None:
    assert PriceBook.default().resolve(name, provider) is None


def test_history_lists_dated_entries() -> None:
    history = PriceBook.default().history("o3-2025-04-16", "openai")
    assert [(e.effective_from, e.layer) for e in history] == [
        (datetime(1970, 1, 1, tzinfo=UTC), "base"),  # genai-prices' undated row, before the curated ones
        (datetime(2025, 4, 16, tzinfo=UTC), "curated"),
        (datetime(2025, 6, 10, tzinfo=UTC), "curated"),
    ]
    assert [e.rates.input for e in history] == [Decimal(10), Decimal(10), Decimal(2)]
    assert PriceBook.default().history("nope") == []


def test_naive_time_is_utc() -> None:
    book = PriceBook.default()
    usage = Usage(input_tokens=1000)
    naive = book.price(model="o3", usage=usage, at=datetime(2025, 6, 10))
    aware = book.price(model="o3", usage=usage, at=datetime(2025, 6, 10, tzinfo=UTC))
    assert naive == aware


def test_no_float_anywhere() -> None:
    book = PriceBook.default()
    for model in book.models():
        for entry in book.history(model):
            assert all(isinstance(v, Decimal | None) for v in entry.rates._values())


BAD_FILE = """
provider = "badco"
[[models]]
id = "dup-dates"
colour = "blue"
[[models.prices]]
effective_from = 2025-01-01T00:00:00Z
input = 1
output = 2
[[models.prices]]
effective_from = 2025-01-01T00:00:00Z
input = 1
output = -2
surprise = 3
[models.prices.long_context]
threshold = 1000
input = 2
output = 4
shade = 1

[[models]]
id = "collider"
aliases = ["dup-dates"]
[[models.prices]]
effective_from = 2025-01-01
input = 1
output = 1
tiers.batch = { multiplier = -0.5 }

[[models]]
id = "dangling"
same_as = "no-such-model"
"""


def test_check_finds_planted_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_FILE)
    problems = PriceBook.load(overrides=[bad]).check()
    text = "\n".join(problems)
    assert all(str(bad) in p or "badco" in p for p in problems), text
    assert "duplicate effective_from" in text
    assert "output is negative (-2)" in text
    assert "unknown key 'colour'" in text
    assert "unknown key 'surprise'" in text
    assert "unknown key long_context.'shade'" in text
    assert "'dup-dates' collides with model 'dup-dates' (badco)" in text
    assert "tiers.batch.multiplier must be positive" in text
    assert "same_as 'no-such-model'" in text


def test_a_name_may_be_on_several_lists_each_at_its_own_price(tmp_path: Path) -> None:
    """One open-weight model id on two hosts: each list prices it, neither borrows the other's."""
    book = PriceBook.default()
    assert book.check() == []
    # 1M prompt tokens, half from cache: Groq bills cache reads at $0.50, Together lists no cache rate.
    usage = Usage(input_tokens=1_000_000, cache_read_tokens=500_000, output_tokens=1_000_000)
    at = datetime(2026, 12, 3, 12, tzinfo=UTC)
    groq = book.price(model="moonshotai/kimi-k2-instruct", usage=usage, at=at, provider="groq")
    together = book.price(model="moonshotai/Kimi-K2-Instruct", usage=usage, at=at, provider="together")
    assert groq is not None and together is not None
    assert (together.model, together.provider) == ("moonshotai/Kimi-K2-Instruct", "together")
    assert (groq.model, groq.provider) == ("moonshotai/kimi-k2-instruct", "groq")
    assert (together.cost_usd, groq.cost_usd) == (4, Decimal("3.75"))
    # The same spelling on each list still finds that list's own entry.
    assert book.resolve("moonshotai/kimi-k2-instruct", "together") == "moonshotai/Kimi-K2-Instruct"
    assert book.resolve("moonshotai/Kimi-K2-Instruct", "groq") == "moonshotai/kimi-k2-instruct"
    # An operator list may reuse a name another list has; a clash inside one list is still a problem.
    own = tmp_path / "host.toml"
    own.write_text(
        'provider = "myhost"\n[[models]]\nid = "my-gpt"\naliases = ["gpt-4o"]\n'
        "[[models.prices]]\neffective_from = 2025-01-01\ninput = 1\noutput = 1\n"
        '[[models]]\nid = "other"\naliases = ["GPT-4o"]\n'
        "[[models.prices]]\neffective_from = 2025-01-01\ninput = 2\noutput = 2\n"
    )
    mine = PriceBook.load(overrides=[own])
    assert mine.check() == [f"{own}: model 'other': name 'GPT-4o' collides with model 'my-gpt' (myhost)"]
    assert mine.resolve("gpt-4o", "myhost") == "my-gpt"
    assert mine.resolve("gpt-4o", "openai") == book.resolve("gpt-4o", "openai") == "gpt-4o"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("provider = 1", "'provider' must be a non-empty string"),
        ('provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\ninput = 1\noutput = 1', "effective_from"),
        (
            'provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\n'
            "effective_from = 2025-01-01T00:00:00\ninput = 1\noutput = 1",
            "UTC offset",
        ),
        (
            'provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\n'
            'effective_from = 2025-01-01\ninput = "1"\noutput = 1',
            "'input' must be a number",
        ),
        (
            'provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\neffective_from = 2025-01-01\ninput = 1',
            "'output'",
        ),
        ("provider = [", "cannot read"),
    ],
)
def test_bad_file_raises_naming_file_and_model(tmp_path: Path, body: str, message: str) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text(body)
    with pytest.raises(PricingError, match=message) as info:
        PriceBook.load(dirs=[tmp_path])
    assert str(bad) in str(info.value)
    if "[[models]]" in body:
        assert "model 'm'" in str(info.value)


def test_override_adds_dated_entry_without_repricing_history(tmp_path: Path) -> None:
    override = tmp_path / "mine.toml"
    override.write_text(
        'provider = "openai"\n[[models]]\nid = "gpt-4o"\n[[models.prices]]\n'
        "effective_from = 2026-01-01T00:00:00Z\ninput = 1\noutput = 4\n"
    )
    book = PriceBook.load(overrides=[override])
    assert book.check() == []
    usage = Usage(input_tokens=1_000_000)
    before = book.price(model="gpt-4o", usage=usage, at=datetime(2025, 12, 31, tzinfo=UTC))
    after = book.price(model="gpt-4o", usage=usage, at=datetime(2026, 1, 2, tzinfo=UTC))
    assert before is not None and before.cost_usd == Decimal("2.5")
    assert after is not None and after.cost_usd == Decimal(1)


WINDOW_PROBLEMS = """
provider = "windowco"
[[models]]
id = "w-overlap"
[[models.prices]]
effective_from = 2025-01-01
input = 1
output = 2
[[models.prices.windows]]
start = "22:00"
end = "02:00"
days = ["sun"]
[[models.prices.windows]]
start = "01:00"
end = "03:00"
days = ["mon"]
colour = "red"
[[models.prices.windows]]
start = "05:00"
end = "05:00"
output = -1

[[models]]
id = "w-fine"
[[models.prices]]
effective_from = 2025-01-01
input = 1
output = 2
[[models.prices.windows]]
start = "22:00"
end = "02:00"
days = ["sun"]
[[models.prices.windows]]
start = "01:00"
end = "03:00"
days = ["tue"]
[[models.prices.windows]]
start = "02:00"
end = "22:00"
days = ["sun"]

[[models]]
id = "w-long"
[[models.prices]]
effective_from = 2025-01-01
input = 1
output = 2
long_context = { threshold = 1000, input = 2, output = 4 }
[[models.prices.windows]]
start = "01:00"
end = "02:00"
"""


def test_check_finds_window_problems(tmp_path: Path) -> None:
    bad = tmp_path / "windows.toml"
    bad.write_text(WINDOW_PROBLEMS)
    problems = PriceBook.load(overrides=[bad]).check()
    text = "\n".join(problems)
    # Sunday's 22:00-02:00 runs into Monday 01:00-03:00, across midnight and the week's days.
    assert "windows[0] (22:00-02:00 UTC sun) overlaps windows[1] (01:00-03:00 UTC mon)" in text
    assert "windows[2] (05:00-05:00 UTC) is empty" in text
    assert "windows[2] output is negative (-1)" in text
    assert "unknown key windows[1].'colour'" in text
    assert "'w-long'" in text and "windows cannot be combined with long_context" in text
    # Adjacent windows (end == next start) and the same hours on other days do not overlap.
    assert "w-fine" not in text, text
    assert len(problems) == 5, text


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ('start = "25:00"\nend = "02:00"', "'start' is not a time of day"),
        ('start = "01:00"', "'end' must be a UTC time of day"),
        ("start = 2025-01-01T01:00:00Z\nend = 02:00:00", "'start' must be a UTC time of day"),
        ('start = "01:00"\nend = "02:00"\ndays = ["monday"]', "'days' must list days"),
        ('start = "01:00"\nend = "02:00"\ninput = "cheap"', "'input' must be a number"),
    ],
)
def test_bad_window_raises_naming_file_and_model(tmp_path: Path, window: str, message: str) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text(
        'provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\neffective_from = 2025-01-01\n'
        f"input = 1\noutput = 1\n[[models.prices.windows]]\n{window}\n"
    )
    with pytest.raises(PricingError, match=message) as info:
        PriceBook.load(dirs=[tmp_path])
    assert str(bad) in str(info.value) and "model 'm'" in str(info.value)
    assert "windows[0]" in str(info.value)


def test_a_fine_tune_bills_at_its_base_models_fine_tuned_rates() -> None:
    usage = Usage(input_tokens=1_000_000, cache_read_tokens=400_000, output_tokens=1_000_000)
    at = datetime(2026, 12, 3, tzinfo=UTC)
    result = PriceBook.default().price(
        model="ft:gpt-4.1-2025-04-14:acme:support:B1c2D3e4", usage=usage, at=at, provider="openai"
    )
    assert result is not None and result.model == "ft:gpt-4.1"
    # 600k uncached at $3, 400k cached at $0.75, 1M out at $12 (per 1M).
    assert result.cost_usd == Decimal("1.8") + Decimal("0.3") + Decimal(12)
    # Before fine-tuning of GPT-4.1 opened there is no such model: unpriced, not guessed.
    early = datetime(2025, 4, 1, tzinfo=UTC)
    assert (
        PriceBook.default().price(
            model="ft:gpt-4.1-2025-04-14:a::b", usage=usage, at=early, provider="openai"
        )
        is None
    )

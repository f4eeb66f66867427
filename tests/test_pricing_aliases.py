"""Moving ``-latest`` aliases are priced as what they pointed at when the request was made.

An alias is a curated model with only dated redirects (``pricing/README.md``, "Moving
aliases"): each move names the model billed from then on, and a span no source dates is
``unknown`` and stays unpriced. Checked on the shipped tables (both sides of each move),
on an operator file, through ``meterproxy reprice`` (each row by its own date), and the
file checks that keep a typo from pricing nothing silently.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook, PricingError
from meterproxy.reprice import reprice
from meterproxy.testing import make_record
from meterproxy.usage import Usage
from tests.helpers.stores import rows_by_id, store_records, ts_text

MILLION = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
SECOND = timedelta(seconds=1)
LARGE3_MOVE = datetime(2025, 12, 2, tzinfo=UTC)


def _priced(book: PriceBook, model: str, plist: str, at: datetime) -> tuple[str, Decimal] | None:
    result = book.price(model=model, usage=MILLION, at=at, provider=plist)
    return None if result is None else (result.model, result.cost_usd)


def test_mistral_large_latest_follows_its_moves() -> None:
    book = PriceBook.default()
    # Large 24.11 at $2 / $6 until Mistral 3's release, then Large 3 at $0.50 / $1.50.
    assert _priced(book, "mistral-large-latest", "mistral", LARGE3_MOVE - SECOND) == (
        "mistral-large-2411",
        Decimal(8),
    )
    assert _priced(book, "mistral-large-latest", "mistral", LARGE3_MOVE) == ("mistral-large-2512", Decimal(2))
    assert _priced(book, "mistral-large-latest", "mistral", datetime(2026, 12, 3, tzinfo=UTC)) == (
        "mistral-large-2512",
        Decimal(2),
    )


def test_gemini_flash_latest_is_unpriced_where_no_source_dates_its_target() -> None:
    book = PriceBook.default()
    october_2025 = datetime(2025, 10, 1, tzinfo=UTC)
    assert _priced(book, "gemini-flash-latest", "gemini", october_2025) == (
        "gemini-2.5-flash",
        _priced(book, "gemini-2.5-flash", "gemini", october_2025)[1],  # type: ignore[index]
    )
    gap = datetime(2026, 3, 1, tzinfo=UTC)
    assert _priced(book, "gemini-flash-latest", "gemini", gap) is None
    assert book.resolve("gemini-flash-latest", "gemini") == "gemini-flash-latest"  # known name, no price then
    now = datetime(2026, 12, 3, tzinfo=UTC)
    target = book.price(model="gemini-3.8-flash", usage=MILLION, at=now, provider="gemini")
    assert target is not None
    assert _priced(book, "models/gemini-flash-latest", "gemini", now) == ("gemini-3.8-flash", target.cost_usd)


def test_gemini_pro_latest_moves_on_the_announced_day() -> None:
    book = PriceBook.default()
    move = datetime(2026, 3, 6, tzinfo=UTC)
    before = _priced(book, "gemini-pro-latest", "gemini", move - SECOND)
    after = _priced(book, "gemini-pro-latest", "gemini", move)
    assert before is not None and before[0] == "gemini-3-pro-preview"
    assert after is not None and after[0] == "gemini-3.1-pro-preview"


ALIAS_FILE = """
provider = "vllm"
[[models]]
id = "small-v1"
[[models.prices]]
effective_from = 2025-01-01
input = 1
output = 2
[[models]]
id = "small-v2"
[[models.prices]]
effective_from = 2025-01-01
input = 10
output = 20
[[models]]
id = "small-latest"
[[models.redirects]]
effective_from = 2025-01-01
to = "small-v1"
[[models.redirects]]
effective_from = 2025-06-01
unknown = "the changelog is silent until v2"
[[models.redirects]]
effective_from = 2025-07-01T12:00:00Z
to = "small-v2"
"""


def test_an_operator_alias_with_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "vllm.toml"
    path.write_text(ALIAS_FILE)
    book = PriceBook.load(dirs=[], overrides=[path], base=[])
    assert book.check() == []
    at = datetime(2025, 3, 1, tzinfo=UTC)
    assert _priced(book, "small-latest", "vllm", at) == ("small-v1", Decimal(3))
    assert _priced(book, "small-latest", "vllm", datetime(2025, 6, 15, tzinfo=UTC)) is None
    move = datetime(2025, 7, 1, 12, tzinfo=UTC)
    assert _priced(book, "small-latest", "vllm", move - SECOND) is None
    assert _priced(book, "small-latest", "vllm", move) == ("small-v2", Decimal(30))
    before_alias = datetime(2024, 12, 31, tzinfo=UTC)
    assert _priced(book, "small-latest", "vllm", before_alias) is None


@pytest.mark.parametrize(
    ("redirect", "message"),
    [
        ('to = "small-v1"\nunknown = "both"', "exactly one of 'to'"),
        ('note = "neither"', "exactly one of 'to'"),
    ],
)
def test_a_redirect_names_a_target_or_says_why_not(tmp_path: Path, redirect: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'provider = "vllm"\n[[models]]\nid = "a"\n[[models.redirects]]\n'
        f"effective_from = 2025-01-01\n{redirect}\n"
    )
    with pytest.raises(PricingError, match=message):
        PriceBook.load(dirs=[], overrides=[path], base=[])


def test_a_redirect_to_a_name_the_list_does_not_price_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(ALIAS_FILE.replace('to = "small-v2"', 'to = "smal-v2"'))
    problems = PriceBook.load(dirs=[], overrides=[path], base=[]).check()
    assert any("redirect target 'smal-v2' is not on the 'vllm' list" in p for p in problems), problems


def test_reprice_bills_each_row_as_what_the_alias_pointed_at_that_day(tmp_path: Path) -> None:
    """Rows written by a book that priced the alias as Large 2 at every date (genai-prices' mapping)."""
    old_book = PriceBook.load(dirs=[])  # the base layer alone
    times = [LARGE3_MOVE - timedelta(hours=2), LARGE3_MOVE - SECOND, LARGE3_MOVE]
    times.append(LARGE3_MOVE + timedelta(days=30))
    price = price_record_with(old_book)
    records = []
    for ts in times:
        r = make_record(
            model="mistral-large-latest",
            upstream="mistral",
            ts=ts,
            usage=Usage(input_tokens=10_000, output_tokens=2_000),
        )
        price(r)
        assert r.cost_usd == Decimal("0.032")  # 10k * $2 + 2k * $6 per 1M
        records.append(r)
    db = tmp_path / "m.db"
    store_records(db, records)

    report = reprice(db, PriceBook.default(), since=ts_text(LARGE3_MOVE - timedelta(days=1)))

    rows = rows_by_id(db)
    before, after = records[:2], records[2:]
    for r in before:  # Large 24.11: same rate, now named
        assert Decimal(rows[r.id]["cost_usd"]) == Decimal("0.032")
        assert rows[r.id]["priced_model"] == "mistral-large-2411"
    for r in after:  # Large 3: 10k * $0.50 + 2k * $1.50 per 1M
        assert Decimal(rows[r.id]["cost_usd"]) == Decimal("0.008")
        assert rows[r.id]["priced_model"] == "mistral-large-2512"
    assert report.scanned == 4
    assert report.difference == 2 * (Decimal("0.008") - Decimal("0.032"))


def test_gemini_flash_lite_latest_follows_the_same_dated_moves() -> None:
    book = PriceBook.default()
    october_2025, gap, now = (
        datetime(2025, 10, 1, tzinfo=UTC),
        datetime(2026, 5, 1, tzinfo=UTC),
        datetime(2026, 12, 3, tzinfo=UTC),
    )
    first = _priced(book, "gemini-flash-lite-latest", "gemini", october_2025)
    assert first is not None and first[0] == "gemini-2.5-flash-lite"
    assert _priced(book, "gemini-flash-lite-latest", "gemini", gap) is None
    current = _priced(book, "gemini-flash-lite-latest", "gemini", now)
    assert current == _priced(book, "gemini-3.5-flash-lite", "gemini", now)

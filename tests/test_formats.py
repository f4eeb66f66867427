"""The one parser/formatter per fact: timestamps (`meterproxy.timestamps`) and costs (`meterproxy.money`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from meterproxy.money import from_pico, stored_cost_text, to_pico, usd_text, usd_value
from meterproxy.store.schema import COLUMNS, record_to_row
from meterproxy.testing import make_record
from meterproxy.timestamps import format_ts, parse_ts


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2026-03-01T10:00:00Z", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T10:00:00.000123Z", datetime(2026, 3, 1, 10, 0, 0, 123, tzinfo=UTC)),
        ("2026-03-01T12:00:00+02:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T10:00:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_parse_ts_reads_every_iso_form_into_aware_utc(text: str, want: datetime) -> None:
    got = parse_ts(text)
    assert got == want and got.tzinfo is UTC


def test_parse_ts_takes_a_naive_value_in_the_zone_given() -> None:
    assert parse_ts("2026-03-01T10:00:00", naive=ZoneInfo("Europe/Paris")) == datetime(
        2026, 3, 1, 9, tzinfo=UTC
    )


def test_parse_ts_rejects_what_is_not_iso() -> None:
    with pytest.raises(ValueError):
        parse_ts("yesterday")


def test_format_ts_is_the_stored_form_and_round_trips() -> None:
    moment = datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    text = format_ts(moment)
    assert text == "2026-03-01T10:00:00.000005Z"
    assert parse_ts(text) == moment


def test_stored_cost_text_is_what_the_writer_stores_and_never_exponent_form() -> None:
    row = dict(zip(COLUMNS, record_to_row(make_record(cost_usd=Decimal(0))), strict=True))
    assert row["cost_usd"] == stored_cost_text(row["cost_pico"]) == "0.000000000000"
    assert stored_cost_text(to_pico(Decimal("0.000123"))) == "0.000123000000"
    assert stored_cost_text(None) is None
    assert from_pico(to_pico(Decimal("0.0000000000015"))) == Decimal("0.000000000002")  # half-even


@pytest.mark.parametrize(
    ("value", "plain", "signed"),
    [
        ("0E-12", "0", "0"),
        ("2.500000000000", "2.5", "+2.5"),
        ("1E+1", "10", "+10"),
        ("-0.007500000000", "-0.0075", "-0.0075"),
        ("0.000000000001", "0.000000000001", "+0.000000000001"),
    ],
)
def test_usd_text_is_exact_without_trailing_zeros(value: str, plain: str, signed: str) -> None:
    assert usd_text(Decimal(value)) == plain
    assert usd_text(Decimal(value), sign=True) == signed
    assert usd_value(Decimal(value)) == Decimal(value)

"""What prompt caching saved: one definition for the report, ``/api/summary``, ``/api/whatif``, the page.

Savings are **net of cache-write premiums**: for every cached input token, the
plain input price minus what it was billed at. A cache read saves (input minus
cache-read price); a cache write costs extra (its 1.25x or 2x write price minus
input), so a write that is never read again shows as a negative saving.

They are computed from token sums per model and day (rollups, so a month on
the page stays cheap and ranges past the raw-row retention still count), at
each model's per-token rates of that day (noon UTC). Rates are taken from a
small probe request, so they are the base tier's: a long-context tier (Gemini
above 200k prompt tokens) is not applied to a day's sum of tokens, which would
wrongly push the whole day into it. Models the price tables do not know save
nothing (their costs are unknown, not zero).

Before this module there were two definitions: the report's (cache reads only)
and the what-if's (per raw row); the page showed both, side by side, different.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from meterproxy.money import pico_to_usd, to_pico
from meterproxy.pricing import PriceBook
from meterproxy.usage import Usage

__all__ = ["CacheSavings", "cache_savings"]

#: Probe size for per-token rates: small enough for every base tier, big enough to be exact
#: (prices are decimal dollars per million tokens, so a thousand tokens divide exactly).
_PROBE = 1000


@dataclass(slots=True)
class CacheSavings:
    """What caching saved over some traffic, net of cache-write premiums (module docstring)."""

    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    #: Dollars, rounded to the picodollar once, after summing exact per-token rates x tokens.
    saved_usd: Decimal = Decimal(0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "saved_usd": self.saved_usd,
        }


def _rates(book: PriceBook, model: str, at: datetime) -> tuple[Decimal, Decimal, Decimal] | None:
    """Saving per cache-read token, per 5-minute write token and per 1-hour write token."""
    plain = book.price(model=model, usage=Usage(input_tokens=_PROBE), at=at)
    if plain is None:
        return None
    probes = (
        Usage(input_tokens=_PROBE, cache_read_tokens=_PROBE),
        Usage(input_tokens=_PROBE, cache_write_tokens=_PROBE),
        Usage(input_tokens=_PROBE, cache_write_tokens=_PROBE, cache_write_1h_tokens=_PROBE),
    )
    out = []
    for usage in probes:
        priced = book.price(model=model, usage=usage, at=at)
        if priced is None:
            return None
        out.append((plain.cost_usd - priced.cost_usd) / _PROBE)
    return out[0], out[1], out[2]


Group = tuple[Mapping[str, Any], Mapping[str, Any]]


def cache_savings(book: PriceBook, groups: Iterable[Group]) -> CacheSavings:
    """Savings over ``(key, measures)`` groups of a summary by ``model`` and ``day``.

    ``measures`` need ``cache_read_tokens``, ``cache_write_tokens`` and
    ``cache_write_1h_tokens`` (the last a part of the second).
    """
    result = CacheSavings()
    exact = Decimal(0)
    rates: dict[tuple[str, str], tuple[Decimal, Decimal, Decimal] | None] = {}
    for key, measures in groups:
        read = int(measures.get("cache_read_tokens") or 0)
        written = int(measures.get("cache_write_tokens") or 0)
        model, day = key.get("model"), key.get("day")
        if not (read or written) or not model or not day:
            continue
        if (model, day[:10]) not in rates:
            at = datetime.combine(date.fromisoformat(day[:10]), time(12), UTC)
            rates[model, day[:10]] = _rates(book, model, at)
        found = rates[model, day[:10]]
        if found is None:
            continue
        per_read, per_write_5m, per_write_1h = found
        hour = min(int(measures.get("cache_write_1h_tokens") or 0), written)
        result.cache_read_tokens += read
        result.cache_write_tokens += written
        exact += read * per_read + (written - hour) * per_write_5m + hour * per_write_1h
    result.saved_usd = pico_to_usd(to_pico(exact))
    return result

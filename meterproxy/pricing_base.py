"""The base price layer: a genai-prices data file, read without genai-prices.

genai-prices (github.com/pydantic/genai-prices) publishes every provider's
prices as one JSON file (``prices/new_data/v2/data.json``, the file its own
``UpdatePrices`` fetches): providers, each with an ordered list of models, each
model with a *match* rule (``{"or": [{"starts_with": "gpt-4o"}, ...]}``), dated
or time-of-day conditional prices, long-context tiers and service-tier
variants. meterproxy ships one such file (``pricing/base/genai-prices.json``,
written by ``pricing/base/generate.py`` from the pinned package) and
``meterproxy prices update`` installs newer ones; this module reads either.

Reading is pure and exact: numbers are parsed straight into `Decimal`, never
float. Each model becomes a tuple of our `PriceEntry` rows so the one formula
in `meterproxy.pricing` prices base and curated models alike:

- conditional prices become dated entries: a ``start_date`` constraint starts
  an entry at 00:00 UTC that day (genai-prices compares UTC dates), a
  ``start_time``/``end_time`` constraint becomes a time-of-day `TimeWindow`
  with genai-prices' precedence (the last active conditional price wins);
- a price tiered on prompt size (``{"base": 3, "tiers": [{"start": 200000,
  "price": 6}]}``) becomes ``long_context`` when every tiered rate of the entry
  shares one threshold (all of today's data but eight rows);
- ``price_variants`` for ``service_tier`` / ``processing: batch`` become our
  tiers (partial overrides of the standard rates, first matching variant
  wins per rate, as in genai-prices);
- audio and image token rates (``input_audio_mtok``, ``output_image_mtok``, ...)
  price the modality parts of the usage, as in genai-prices; its separate cached
  *image* rate has no usage count here (cached image tokens bill as cached text);
- ``requests_kcount`` (Perplexity's per-request fee) and ``web_searches_kcount``
  are per-1000-request fees; rates for units we do not meter (audio hours,
  characters, pages) are left out, which prices those units at nothing, as
  genai-prices does when they are absent from the usage.

A model whose prices cannot be represented exactly (several thresholds) is
kept out and listed in `BaseData.skipped`, so it stays unpriced rather than
priced wrongly. Name matching follows genai-prices (`BaseProvider.find`):
lower-cased name, first model in file order whose rule matches, then a
compact date retried as ``-YYYY-MM-DD``, then the provider's
``fallback_model_providers`` one step deep.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterproxy.pricing_load import LongContext, PriceEntry, PricingError, Rates, TierPrice, TimeWindow

__all__ = ["BASE_EPOCH", "BaseData", "BaseModel", "BaseProvider", "parse_base", "read_base"]

#: effective_from of prices genai-prices gives no start date: "always".
BASE_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_RATE_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
    "output_reasoning_mtok": "reasoning",
    # Audio and image parts of the token counts (subsets of input / output, as in our Usage).
    "input_audio_mtok": "input_audio",
    "cache_audio_read_mtok": "cache_read_audio",
    "output_audio_mtok": "output_audio",
    "input_image_mtok": "input_image",
    "output_image_mtok": "output_image",
}
_FEE_KEYS = {"web_searches_kcount": "web_search", "requests_kcount": "requests"}
# Variant contexts that select one of our service tiers.
_TIER_CONTEXT = {"service_tier": None, "processing": None, "speed": None}

Match = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class BaseModel:
    """One genai-prices model of one provider, converted to dated entries."""

    provider: str  # genai-prices provider id
    id: str  # genai-prices model id
    match: Match = field(repr=False, compare=False)
    entries: tuple[PriceEntry, ...]
    deprecated: bool = False
    name: str | None = None


@dataclass(frozen=True, slots=True)
class BaseProvider:
    id: str
    name: str
    source: str | None
    fallbacks: tuple[str, ...]
    models: tuple[BaseModel, ...]

    def find(self, name: str, providers: Mapping[str, BaseProvider]) -> BaseModel | None:
        """The model genai-prices would price lower-cased `name` as, or None."""
        hit = self._match(name, providers)
        if hit is None and (compact := _dash_date(name)) != name:
            hit = self._match(compact, providers)
        return hit

    def _match(self, name: str, providers: Mapping[str, BaseProvider] | None) -> BaseModel | None:
        for model in self.models:
            if model.match(name):
                return model
        for other_id in self.fallbacks if providers is not None else ():
            other = providers.get(other_id) if providers is not None else None
            if other is not None and (hit := other._match(name, None)) is not None:
                return hit
        return None


@dataclass(frozen=True, slots=True)
class BaseData:
    """A whole data file: providers by genai-prices id, and what could not be used."""

    providers: dict[str, BaseProvider]
    origin: str
    skipped: tuple[str, ...] = ()

    def model_count(self) -> int:
        return sum(len(p.models) for p in self.providers.values())


def read_base(path: Path) -> BaseData:
    """Read a genai-prices v2 data file; `PricingError` (naming the file) if unusable."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PricingError(f"{path}: cannot read: {exc}") from exc
    return parse_base(raw, str(path))


def parse_base(raw: bytes, origin: str) -> BaseData:
    """Parse the bytes of a genai-prices v2 data file (a JSON list of providers)."""
    try:
        doc = json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PricingError(f"{origin}: not a JSON document: {exc}") from exc
    if not isinstance(doc, list) or not doc or not all(isinstance(p, dict) for p in doc):
        raise PricingError(f"{origin}: expected a genai-prices data file (a JSON list of providers)")
    providers: dict[str, BaseProvider] = {}
    skipped: list[str] = []
    for raw_provider in doc:
        provider = _provider(raw_provider, origin, skipped)
        providers[provider.id] = provider
    if sum(len(p.models) for p in providers.values()) == 0:
        raise PricingError(f"{origin}: no models")
    return BaseData(providers, origin, tuple(skipped))


def _provider(raw: Mapping[str, Any], origin: str, skipped: list[str]) -> BaseProvider:
    pid = raw.get("id")
    if not isinstance(pid, str) or not pid:
        raise PricingError(f"{origin}: a provider without an 'id'")
    where = f"{origin}: provider {pid!r}"
    urls = raw.get("pricing_urls") or []
    source = urls[0] if urls and isinstance(urls[0], str) else None
    fallbacks = raw.get("fallback_model_providers") or []
    models = []
    for i, m in enumerate(raw.get("models") or []):
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            raise PricingError(f"{where}: models[{i}] has no 'id'")
        try:
            entries = tuple(
                dataclasses.replace(e, origin=f"genai-prices {pid}/{m['id']}", source=source, layer="base")
                for e in _entries(m)
            )
        except _Unsupported as exc:
            skipped.append(f"{pid}/{m['id']}: {exc}")
            continue
        except (TypeError, ValueError, KeyError) as exc:
            raise PricingError(f"{where}: model {m['id']!r}: malformed prices ({exc})") from exc
        try:
            match = _compile(m["match"])
        except (TypeError, ValueError, KeyError, re.error) as exc:
            raise PricingError(f"{where}: model {m['id']!r}: malformed match ({exc})") from exc
        models.append(BaseModel(pid, m["id"], match, entries, bool(m.get("deprecated")), m.get("name")))
    return BaseProvider(
        pid,
        str(raw.get("name") or pid),
        source,
        tuple(f for f in fallbacks if isinstance(f, str)),
        tuple(models),
    )


# ---- match rules ---------------------------------------------------------


def _compile(rule: Any) -> Match:
    """A genai-prices match clause as a predicate on a lower-cased name."""
    if not isinstance(rule, dict) or len(rule) != 1:
        raise ValueError(f"a clause must have one key, got {rule!r}")
    ((kind, arg),) = rule.items()
    if kind in ("or", "and"):
        parts = [_compile(r) for r in arg]
        if kind == "or":
            return lambda s: any(p(s) for p in parts)
        return lambda s: all(p(s) for p in parts)
    if kind == "regex":
        pattern = re.compile(arg)
        return lambda s: pattern.search(s) is not None
    text = str(arg).lower()
    tests: dict[str, Match] = {
        "equals": lambda s: s == text,
        "starts_with": lambda s: s.startswith(text),
        "ends_with": lambda s: s.endswith(text),
        "contains": lambda s: text in s,
    }
    if kind not in tests:
        raise ValueError(f"unknown clause {kind!r}")
    return tests[kind]


_COMPACT_DATE = re.compile(r"(-)(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")


def _dash_date(name: str) -> str:
    """``gpt-5.2-20251211`` -> ``gpt-5.2-2025-12-11`` (genai-prices' second try)."""

    def repl(m: re.Match[str]) -> str:
        try:
            date(int(m[2]), int(m[3]), int(m[4]))
        except ValueError:
            return m[0]
        return f"-{m[2]}-{m[3]}-{m[4]}"

    return _COMPACT_DATE.sub(repl, name)


# ---- prices -> dated entries ----------------------------------------------


class _Unsupported(ValueError):
    """Prices our entries cannot represent exactly; the model is skipped."""


@dataclass(frozen=True, slots=True)
class _Conditional:
    start: date | None  # start_date constraint
    window: tuple[time, time] | None  # start_time/end_time constraint
    prices: Mapping[str, Any]


def _entries(model: Mapping[str, Any]) -> tuple[PriceEntry, ...]:
    raw = model.get("prices", {})
    conds = [_conditional(c) for c in raw] if isinstance(raw, list) else [_Conditional(None, None, raw)]
    if not conds:
        raise _Unsupported("no prices")
    variants = [v for v in model.get("price_variants") or [] if _variant_tier(v) is not None]
    starts = {c.start for c in conds if c.start} | {d for v in variants if (d := _start(v.get("constraint")))}
    entries: list[PriceEntry] = []
    for day in [None, *sorted(starts)]:
        at = BASE_EPOCH if day is None else datetime.combine(day, time(), UTC)
        entry = _entry_at(conds, variants, day, at)
        if not entries or not entries[-1].same_prices(entry):
            entries.append(entry)
    return tuple(entries)


def _conditional(raw: Mapping[str, Any]) -> _Conditional:
    constraint = raw.get("constraint")
    window = None
    if isinstance(constraint, dict) and "start_time" in constraint:
        window = (_utc_time(constraint["start_time"]), _utc_time(constraint["end_time"]))
    return _Conditional(_start(constraint), window, raw["prices"])


def _start(constraint: Any) -> date | None:
    if isinstance(constraint, dict) and "start_date" in constraint:
        return date.fromisoformat(str(constraint["start_date"])[:10])
    return None


def _utc_time(value: Any) -> time:
    t = time.fromisoformat(str(value))
    if t.tzinfo is None:
        return t
    return datetime.combine(date(2000, 1, 3), t).astimezone(UTC).time()


def _entry_at(
    conds: Sequence[_Conditional], variants: Sequence[Any], day: date | None, at: datetime
) -> PriceEntry:
    """The entry in force from `at`: genai-prices scans conditional prices last to first."""

    def constant(c: _Conditional) -> bool:
        return c.window is None and (c.start is None or (day is not None and c.start <= day))

    windows: list[_Conditional] = []
    base = conds[0]
    for c in reversed(conds):
        if c.window is not None and (c.start is None or (day is not None and c.start <= day)):
            windows.append(c)
        elif constant(c):
            base = c
            break
    rates, long_context = _rates(base.prices)
    fees = _fees(base.prices)
    tiers = _tiers(base.prices, variants, day)
    out_windows = []
    for w in windows:
        w_rates, w_lc = _rates(w.prices)
        if w_lc is not None or long_context is not None:
            raise _Unsupported("time-of-day prices beside long-context tiers")
        assert w.window is not None
        out_windows.append(TimeWindow(w.window[0], w.window[1], w_rates))
    return PriceEntry(
        effective_from=at,
        rates=rates,
        long_context=long_context,
        web_search=fees.get("web_search"),
        requests=fees.get("requests"),
        tiers=tiers,
        windows=tuple(out_windows),
        origin="base",
    )


def _variant_tier(variant: Mapping[str, Any]) -> str | None:
    when = variant.get("when") or {}
    if len(when) != 1:
        return None
    ((key, value),) = when.items()
    if key not in _TIER_CONTEXT or not isinstance(value, str):
        return None
    value = value.lower()
    return None if value in ("default", "standard", "auto") else value


def _tiers(standard: Mapping[str, Any], variants: Sequence[Any], day: date | None) -> dict[str, TierPrice]:
    overrides: dict[str, dict[str, Any]] = {}
    for v in variants:
        start = _start(v.get("constraint"))
        if start is not None and (day is None or start > day):
            continue
        tier = _variant_tier(v)
        assert tier is not None
        chosen = overrides.setdefault(tier, {})
        for key, value in (v.get("prices") or {}).items():
            if value is not None:
                chosen.setdefault(key, value)
    out = {}
    for tier, keys in overrides.items():
        rates, lc = _rates({**standard, **keys})
        out[tier] = TierPrice(rates, lc)
    return out


def _rates(prices: Mapping[str, Any]) -> tuple[Rates, LongContext | None]:
    flat: dict[str, Decimal] = {}
    tiered: dict[str, tuple[Decimal, int, Decimal]] = {}
    for key, value in prices.items():
        ours = _RATE_KEYS.get(key)
        if ours is None or value is None:
            continue
        if isinstance(value, dict):
            steps = value.get("tiers") or []
            if len(steps) != 1:
                raise _Unsupported(f"{key} has {len(steps)} context tiers")
            tiered[ours] = (_dec(value["base"]), int(steps[0]["start"]), _dec(steps[0]["price"]))
        else:
            flat[ours] = _dec(value)
    base = {**flat, **{k: v[0] for k, v in tiered.items()}}
    rates = _make_rates(base)
    if not tiered:
        return rates, None
    thresholds = {v[1] for v in tiered.values()}
    if len(thresholds) != 1:
        raise _Unsupported(f"context tiers at different thresholds {sorted(thresholds)}")
    above = {**flat, **{k: v[2] for k, v in tiered.items()}}
    return rates, LongContext(thresholds.pop(), _make_rates(above))


def _make_rates(values: Mapping[str, Decimal]) -> Rates:
    return Rates(
        values.get("input", Decimal(0)),
        values.get("output", Decimal(0)),
        values.get("cache_read"),
        values.get("cache_write"),
        values.get("cache_write_1h"),
        values.get("reasoning"),
        values.get("input_audio"),
        values.get("cache_read_audio"),
        values.get("output_audio"),
        values.get("input_image"),
        values.get("output_image"),
    )


def _fees(prices: Mapping[str, Any]) -> dict[str, Decimal]:
    out = {}
    for key, ours in _FEE_KEYS.items():
        value = prices.get(key)
        if isinstance(value, dict):
            raise _Unsupported(f"{key} is tiered")
        if value is not None:
            out[ours] = _dec(value)
    return out


def _dec(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise ValueError(f"not a number: {value!r}")
    number = Decimal(value)
    if not number.is_finite() or number < 0:
        raise ValueError(f"not a non-negative price: {value!r}")
    return number

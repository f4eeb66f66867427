"""What a request cost: dated price tables and the one formula that applies them.

Prices live in data, not code: one TOML file per provider in ``pricing/``
(``pricing/README.md`` documents every field). This module only loads those
files and applies them, so it is pure: no clock, no network, no float.

Design, in the order a price is computed:

1. **Resolve** the model name a provider reported to a table id
   (`PriceBook.resolve`): exact id or alias (case-insensitive), then a vendor
   prefix (``openai/gpt-4o``, ``models/gemini-2.5-flash``), then a dated
   snapshot suffix is stripped (``-2024-08-06``, ``-20250929``, ``@20250929``,
   Gemini's ``-001``). Undated 4-digit suffixes (``gpt-3.5-turbo-1106``) are
   *not* stripped: those snapshots were priced differently, and an unknown
   model must stay unpriced rather than be priced wrongly.
2. **Pick the dated entry**: the one with the latest ``effective_from`` at or
   before the request time. Past entries are never edited, so recomputing an
   old request gives the price that applied then.
3. **Pick the rates**: service tier (``batch``, ``flex``, ``priority``; a full
   price set or a multiplier of the base), then the long-context rates when the
   whole prompt is over the entry's threshold.
4. **Apply one formula** (`Rates.token_cost`) and divide by a million; then a
   negotiated multiplier from a user override, if one is in force at that time.

The result is an exact `Decimal`; callers round for display only. `price`
returns ``None`` for an unknown model (never zero), so "unpriced" stays visible.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from meterproxy.usage import Usage

__all__ = [
    "DEFAULT_PRICING_DIR",
    "LongContext",
    "Multiplier",
    "PriceBook",
    "PriceEntry",
    "PriceResult",
    "PricingError",
    "Rates",
    "TierPrice",
]


def _default_dir() -> Path:
    packaged = Path(__file__).parent / "_pricing"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "pricing"


DEFAULT_PRICING_DIR: Path = _default_dir()

_MILLION = 6  # prices are per 10**6 tokens
_RATE_KEYS = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning")
_ENTRY_KEYS = frozenset(
    {*_RATE_KEYS, "effective_from", "web_search", "long_context", "tiers", "correction", "source", "note"}
)
_TIER_KEYS = frozenset({*_RATE_KEYS, "multiplier", "long_context"})
_LC_KEYS = frozenset({*_RATE_KEYS, "threshold"})
_MODEL_KEYS = frozenset({"id", "aliases", "prices", "same_as", "multipliers", "source", "note", "deprecated"})
_FILE_KEYS = frozenset({"provider", "prefixes", "aggregator", "models", "multipliers", "source", "note"})
_MULT_KEYS = frozenset({"effective_from", "multiplier", "note"})
# Service tiers that mean "no special tier" in provider responses.
_STANDARD_TIERS = frozenset({"", "default", "standard", "auto", "on_demand"})
# Dated snapshot suffixes that are safe to strip (they never changed the price).
_SNAPSHOT_RE = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8})|-\d{3})$")


class PricingError(ValueError):
    """A pricing file cannot be used; the message names the file, model and problem."""


@dataclass(frozen=True, slots=True)
class Rates:
    """One set of token rates in USD per million tokens (``None`` = not listed)."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    reasoning: Decimal | None = None

    def token_cost(self, usage: Usage) -> Decimal:
        """USD times one million for the tokens in `usage` (exact, not divided yet).

        Missing cache prices fall back to the input price (a 1h write falls back
        to the 5-minute write price first); a missing reasoning price means
        reasoning tokens bill as ordinary output.
        """
        cache_read = self.cache_read if self.cache_read is not None else self.input
        write_5m = self.cache_write if self.cache_write is not None else self.input
        write_1h = self.cache_write_1h if self.cache_write_1h is not None else write_5m
        reasoning = self.reasoning if self.reasoning is not None else self.output
        reasoning_tokens = min(usage.reasoning_tokens, usage.output_tokens)
        write_1h_tokens = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        return (
            usage.uncached_input_tokens * self.input
            + usage.cache_read_tokens * cache_read
            + (usage.cache_write_tokens - write_1h_tokens) * write_5m
            + write_1h_tokens * write_1h
            + (usage.output_tokens - reasoning_tokens) * self.output
            + reasoning_tokens * reasoning
        )

    def scaled(self, factor: Decimal) -> Rates:
        """These rates times `factor` (a tier or discount multiplier)."""

        def mul(v: Decimal | None) -> Decimal | None:
            return None if v is None else v * factor

        return Rates(
            self.input * factor,
            self.output * factor,
            mul(self.cache_read),
            mul(self.cache_write),
            mul(self.cache_write_1h),
            mul(self.reasoning),
        )

    def _values(self) -> tuple[Decimal | None, ...]:
        return tuple(getattr(self, k) for k in _RATE_KEYS)


@dataclass(frozen=True, slots=True)
class LongContext:
    """Rates for a request whose prompt (``input_tokens``, cached included) exceeds `threshold`."""

    threshold: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class TierPrice:
    """A service tier: either its own full rates or a multiplier of the base rates."""

    rates: Rates | None = None
    long_context: LongContext | None = None
    multiplier: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One dated row of a model's price history."""

    effective_from: datetime
    rates: Rates
    long_context: LongContext | None = None
    web_search: Decimal | None = None  # USD per 1000 requests
    tiers: Mapping[str, TierPrice] = field(default_factory=dict)
    correction: str | None = None
    source: str | None = None
    note: str | None = None
    origin: str = ""

    def select(self, tier: str | None) -> tuple[Rates, LongContext | None, str | None]:
        """Base or tier rates; an unknown tier falls back to base and reports no tier."""
        chosen = self.tiers.get(tier) if tier else None
        if chosen is None:
            return self.rates, self.long_context, None
        if chosen.multiplier is not None:
            m = chosen.multiplier
            lc = self.long_context
            scaled_lc = LongContext(lc.threshold, lc.rates.scaled(m)) if lc else None
            return self.rates.scaled(m), scaled_lc, tier
        assert chosen.rates is not None
        return chosen.rates, chosen.long_context, tier


@dataclass(frozen=True, slots=True)
class Multiplier:
    """A negotiated factor on the final cost, in force from `effective_from` on."""

    effective_from: datetime
    multiplier: Decimal
    note: str | None = None


@dataclass(frozen=True, slots=True)
class PriceResult:
    """What `PriceBook.price` found: exact cost and which table row produced it."""

    cost_usd: Decimal
    model: str
    effective_from: datetime
    tier: str | None
    provider: str = ""
    multiplier: Decimal | None = None


@dataclass(slots=True)
class _Model:
    id: str
    provider: str
    origin: str
    aliases: list[str] = field(default_factory=list)
    entries: list[PriceEntry] = field(default_factory=list)
    multipliers: list[Multiplier] = field(default_factory=list)
    same_as: str | None = None


@dataclass(slots=True)
class _Provider:
    name: str
    prefixes: set[str] = field(default_factory=set)
    aggregator: bool = False
    multipliers: list[Multiplier] = field(default_factory=list)
    index: dict[str, str] = field(default_factory=dict)  # lowercase name -> model id


class PriceBook:
    """All price tables, indexed for lookup. Build with `load` or `default`."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}
        self._providers: dict[str, _Provider] = {}
        self._prefix: dict[str, str] = {}  # provider name or vendor prefix -> provider
        self._global: dict[str, str] = {}  # lowercase name -> model id
        self._problems: list[str] = []

    # ---- construction -------------------------------------------------

    @classmethod
    def load(cls, dirs: Sequence[Path] = (DEFAULT_PRICING_DIR,), overrides: Sequence[Path] = ()) -> PriceBook:
        """Read every ``*.toml`` in `dirs`, then apply `overrides` (files or dirs) in order."""
        book = cls()
        for path in _toml_files(dirs):
            book._add_file(path, override=False)
        for path in _toml_files(overrides):
            book._add_file(path, override=True)
        book._build_index()
        return book

    @classmethod
    def default(cls) -> PriceBook:
        """The built-in tables, loaded once per process."""
        return _default_book()

    def _add_file(self, path: Path, *, override: bool) -> None:
        try:
            with path.open("rb") as f:
                doc = tomllib.load(f, parse_float=Decimal)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PricingError(f"{path}: cannot read: {exc}") from exc
        where = str(path)
        self._unknown(doc, _FILE_KEYS, where)
        name = _req_str(doc, "provider", where).lower()
        prov = self._providers.setdefault(name, _Provider(name))
        prov.prefixes |= {name, *(p.lower() for p in _str_list(doc, "prefixes", where))}
        prov.aggregator = prov.aggregator or bool(doc.get("aggregator", False))
        prov.multipliers += _multipliers(doc.get("multipliers", []), where)
        for i, raw in enumerate(_table_list(doc, "models", where)):
            self._add_model(raw, prov, f"{where}: models[{i}]", override=override)

    def _add_model(self, raw: Mapping[str, Any], prov: _Provider, where: str, *, override: bool) -> None:
        model_id = _req_str(raw, "id", where)
        where = f"{where.rsplit(':', 1)[0]}: model {model_id!r}"
        self._unknown(raw, _MODEL_KEYS, where)
        raw_entries = _table_list(raw, "prices", where)
        entries = [_entry(e, f"{where} prices[{j}]") for j, e in enumerate(raw_entries)]
        for j, e in enumerate(raw_entries):
            self._problems.extend(_entry_unknown_keys(e, f"{where} prices[{j}]"))
        mults = _multipliers(raw.get("multipliers", []), where)
        aliases = _str_list(raw, "aliases", where)
        same_as = raw.get("same_as")
        if same_as is not None and not isinstance(same_as, str):
            raise PricingError(f"{where}: same_as must be a string")
        existing = self._models.get(model_id)
        if existing is None:
            self._models[model_id] = _Model(model_id, prov.name, where, aliases, entries, mults, same_as)
        elif override:
            # Merge: an override entry replaces the built-in one with the same date.
            dates = {e.effective_from for e in entries}
            existing.entries = [e for e in existing.entries if e.effective_from not in dates] + entries
            existing.aliases += aliases
            existing.multipliers += mults
            existing.same_as = same_as or existing.same_as
        else:
            self._problems.append(f"{where}: duplicate model id (also in {existing.origin})")
            return
        self._check_dates(self._models[model_id], entries, where)

    def _check_dates(self, model: _Model, new: list[PriceEntry], where: str) -> None:
        seen: set[datetime] = set()
        for e in new:
            if e.effective_from in seen:
                self._problems.append(f"{where}: duplicate effective_from {e.effective_from.isoformat()}")
            seen.add(e.effective_from)
        model.entries.sort(key=lambda e: e.effective_from)
        model.multipliers.sort(key=lambda m: m.effective_from)

    def _build_index(self) -> None:
        for prov in self._providers.values():
            for p in prov.prefixes:
                owner = self._prefix.setdefault(p, prov.name)
                if owner != prov.name:
                    self._problems.append(f"prefix {p!r} claimed by both {owner!r} and {prov.name!r}")
        for model in self._models.values():
            prov = self._providers[model.provider]
            for name in (model.id, *model.aliases):
                key = name.lower()
                for index, scope in ((prov.index, prov.name), (self._global, "all providers")):
                    other = index.setdefault(key, model.id)
                    if other != model.id:
                        self._problems.append(
                            f"{model.origin}: name {name!r} collides with model {other!r} ({scope})"
                        )
        self._problems.extend(self._validate())

    def _unknown(self, raw: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
        for key in sorted(set(raw) - allowed):
            self._problems.append(f"{where}: unknown key {key!r}")

    # ---- lookup -------------------------------------------------------

    def resolve(self, model: str | None, provider: str | None = None) -> str | None:
        """The table id `model` prices as, or ``None``. `provider` narrows the search.

        A known provider searches only its own table (an aggregator may also
        route vendor-prefixed slugs); an unknown or absent provider searches all.
        """
        if not model or not model.strip():
            return None
        scope = self._prefix.get(provider.strip().lower()) if provider else None
        found = self._lookup(model.strip().lower(), scope)
        seen: set[str] = set()
        while found is not None and (target := self._models[found].same_as) is not None:
            if found in seen or target not in self._models:
                return None
            seen.add(found)
            found = target
        return found

    def _lookup(self, name: str, scope: str | None) -> str | None:
        index = self._providers[scope].index if scope else self._global
        if (hit := index.get(name)) is not None:
            return hit
        head, sep, rest = name.partition("/")
        if sep and rest:
            if head == "models":
                return self._lookup(rest, scope)
            vendor = self._prefix.get(head)
            if vendor and (scope is None or scope == vendor or self._providers[scope].aggregator):
                return self._lookup(rest, vendor)
        stripped = _SNAPSHOT_RE.sub("", name)
        return self._lookup(stripped, scope) if stripped != name else None

    def price(
        self,
        *,
        model: str | None,
        usage: Usage,
        at: datetime,
        provider: str | None = None,
        service_tier: str | None = None,
    ) -> PriceResult | None:
        """Exact cost of `usage` at time `at` (naive = UTC); ``None`` if no price is known."""
        model_id = self.resolve(model, provider)
        if model_id is None:
            return None
        table = self._models[model_id]
        when = _utc(at)
        entry = _latest(table.entries, when)
        if entry is None:
            return None
        tier = (service_tier or "").strip().lower()
        rates, long_context, tier_used = entry.select(None if tier in _STANDARD_TIERS else tier)
        if long_context is not None and usage.input_tokens > long_context.threshold:
            rates = long_context.rates
        cost = rates.token_cost(usage).scaleb(-_MILLION)
        if entry.web_search is not None and usage.web_search_requests:
            cost += (usage.web_search_requests * entry.web_search).scaleb(-3)
        mult = _latest(table.multipliers, when) or _latest(self._providers[table.provider].multipliers, when)
        factor = mult.multiplier if mult is not None else None
        if factor is not None:
            cost *= factor
        return PriceResult(cost, model_id, entry.effective_from, tier_used, table.provider, factor)

    def models(self) -> list[str]:
        """Every table id, sorted."""
        return sorted(self._models)

    def provider_of(self, model_id: str) -> str | None:
        table = self._models.get(model_id)
        return table.provider if table else None

    def history(self, model: str) -> list[PriceEntry]:
        """The dated entries `model` resolves to, oldest first ([] if unknown)."""
        model_id = self.resolve(model)
        return list(self._models[model_id].entries) if model_id else []

    def check(self) -> list[str]:
        """Validation problems found while loading; an empty list means the tables are sound."""
        return list(self._problems)

    def _validate(self) -> Iterable[str]:
        for m in self._models.values():
            if m.same_as is not None:
                if m.same_as not in self._models:
                    yield f"{m.origin}: same_as {m.same_as!r} is not a known model id"
                if m.entries:
                    yield f"{m.origin}: has both same_as and prices"
            elif not m.entries:
                yield f"{m.origin}: no prices"
            for e in m.entries:
                yield from (f"{m.origin} {e.effective_from.date()}: {p}" for p in _entry_problems(e))
            for mult in m.multipliers:
                if mult.multiplier <= 0:
                    yield f"{m.origin}: multiplier must be positive"
        for prov in self._providers.values():
            if any(x.multiplier <= 0 for x in prov.multipliers):
                yield f"provider {prov.name!r}: multiplier must be positive"


@lru_cache(maxsize=1)
def _default_book() -> PriceBook:
    return PriceBook.load()


# ---- parsing helpers ---------------------------------------------------


def _toml_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        out += sorted(p.glob("*.toml")) if p.is_dir() else [p]
    return out


def _req_str(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise PricingError(f"{where}: {key!r} must be a non-empty string")
    return value


def _str_list(raw: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PricingError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def _table_list(raw: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PricingError(f"{where}: {key!r} must be an array of tables")
    return value


def _num(raw: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> Decimal | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise PricingError(f"{where}: missing {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise PricingError(f"{where}: {key!r} must be a number, got {value!r}")
    return Decimal(value)


def _when(raw: Mapping[str, Any], where: str) -> datetime:
    value = raw.get("effective_from")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise PricingError(f"{where}: effective_from needs a UTC offset (e.g. ...T00:00:00Z)")
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC)
    raise PricingError(f"{where}: effective_from must be a TOML date or offset datetime")


def _rates(raw: Mapping[str, Any], where: str) -> Rates:
    input_, output = _num(raw, "input", where, required=True), _num(raw, "output", where, required=True)
    assert input_ is not None and output is not None
    return Rates(
        input_,
        output,
        _num(raw, "cache_read", where),
        _num(raw, "cache_write", where),
        _num(raw, "cache_write_1h", where),
        _num(raw, "reasoning", where),
    )


def _long_context(raw: Any, where: str) -> LongContext | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PricingError(f"{where}: long_context must be a table")
    threshold = raw.get("threshold")
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise PricingError(f"{where}: long_context.threshold must be an integer")
    return LongContext(threshold, _rates(raw, f"{where} long_context"))


def _entry(raw: Mapping[str, Any], where: str) -> PriceEntry:
    tiers: dict[str, TierPrice] = {}
    raw_tiers = raw.get("tiers", {})
    if not isinstance(raw_tiers, dict):
        raise PricingError(f"{where}: tiers must be a table")
    for name, t in raw_tiers.items():
        tw = f"{where} tiers.{name}"
        if not isinstance(t, dict):
            raise PricingError(f"{tw}: must be a table")
        mult = _num(t, "multiplier", tw)
        if mult is not None:
            tiers[name.lower()] = TierPrice(multiplier=mult)
        else:
            tiers[name.lower()] = TierPrice(_rates(t, tw), _long_context(t.get("long_context"), tw))
    notes: dict[str, str | None] = {}
    for k in ("correction", "source", "note"):
        v = raw.get(k)
        if v is not None and not isinstance(v, str):
            raise PricingError(f"{where}: {k!r} must be a string")
        notes[k] = v
    return PriceEntry(
        effective_from=_when(raw, where),
        rates=_rates(raw, where),
        long_context=_long_context(raw.get("long_context"), where),
        web_search=_num(raw, "web_search", where),
        tiers=tiers,
        correction=notes["correction"],
        source=notes["source"],
        note=notes["note"],
        origin=where,
    )


def _entry_unknown_keys(raw: Mapping[str, Any], where: str) -> Iterable[str]:
    """Unknown keys at every level of one price entry (reported by `PriceBook.check`)."""
    parts: list[tuple[str, Any, frozenset[str]]] = [("", raw, _ENTRY_KEYS)]
    if isinstance(raw.get("long_context"), dict):
        parts.append(("long_context.", raw["long_context"], _LC_KEYS))
    for name, t in (raw.get("tiers") or {}).items():
        if isinstance(t, dict):
            parts.append((f"tiers.{name}.", t, _TIER_KEYS))
            if isinstance(t.get("long_context"), dict):
                parts.append((f"tiers.{name}.long_context.", t["long_context"], _LC_KEYS))
    for label, table, allowed in parts:
        for key in sorted(set(table) - allowed):
            yield f"{where}: unknown key {label}{key!r}"


def _multipliers(raw: Any, where: str) -> list[Multiplier]:
    if not isinstance(raw, list):
        raise PricingError(f"{where}: multipliers must be an array of tables")
    out = []
    for i, m in enumerate(raw):
        mw = f"{where} multipliers[{i}]"
        if not isinstance(m, dict):
            raise PricingError(f"{mw}: must be a table")
        factor = _num(m, "multiplier", mw, required=True)
        assert factor is not None
        out.append(Multiplier(_when(m, mw), factor, m.get("note")))
    return out


def _entry_problems(e: PriceEntry) -> Iterable[str]:
    sets: list[tuple[str, Rates]] = [("", e.rates)]
    if e.long_context:
        sets.append(("long_context ", e.long_context.rates))
        if e.long_context.threshold <= 0:
            yield "long_context.threshold must be positive"
    for name, t in e.tiers.items():
        if t.rates:
            sets.append((f"tiers.{name} ", t.rates))
        if t.multiplier is not None and t.multiplier <= 0:
            yield f"tiers.{name}.multiplier must be positive"
    for label, rates in sets:
        for key, value in zip(_RATE_KEYS, rates._values(), strict=True):
            if value is not None and value < 0:
                yield f"{label}{key} is negative ({value})"
    if e.web_search is not None and e.web_search < 0:
        yield f"web_search is negative ({e.web_search})"


_Dated = TypeVar("_Dated", PriceEntry, Multiplier)


def _latest(items: Sequence[_Dated], when: datetime) -> _Dated | None:
    found = None
    for item in items:  # sorted by effective_from
        if item.effective_from > when:
            break
        found = item
    return found


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

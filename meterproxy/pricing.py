"""What a request cost: dated price tables and the one formula that applies them.

Prices live in data, not code: one TOML file per provider in ``pricing/``
(``pricing/README.md`` documents every field). This module only loads those
files and applies them, so it is pure: no clock, no network, no float.
Reading one file (the schema's types, parsing, per-file checks) is
`meterproxy.pricing_load`; this module merges files into one book, indexes the
names, checks across files, and prices.

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
   whole prompt is over the entry's threshold. Standard-tier requests then take
   the rates of a time-of-day window (DeepSeek peak / off-peak) in force at the
   request time, UTC, if the entry has one.
4. **Apply one formula** (`Rates.token_cost`) and divide by a million; then a
   negotiated multiplier from a user override, if one is in force at that time.

The result is an exact `Decimal`; callers round for display only. `price`
returns ``None`` for an unknown model (never zero), so "unpriced" stays visible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from meterproxy.pricing_load import (
    LongContext,
    ModelSpec,
    Multiplier,
    PriceEntry,
    PricingError,
    PricingFile,
    Rates,
    TierPrice,
    TimeWindow,
    entry_problems,
    read_pricing_file,
    toml_files,
)
from meterproxy.usage import Usage

__all__ = [
    "DEFAULT_PRICING_DIR",
    "LongContext",
    "ModelInfo",
    "Multiplier",
    "PriceBook",
    "PriceEntry",
    "PriceResult",
    "PricingError",
    "Rates",
    "TierPrice",
    "TimeWindow",
]


def _default_dir() -> Path:
    packaged = Path(__file__).parent / "_pricing"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "pricing"


DEFAULT_PRICING_DIR: Path = _default_dir()

_MILLION = 6  # prices are per 10**6 tokens
# Service tiers that mean "no special tier" in provider responses.
_STANDARD_TIERS = frozenset({"", "default", "standard", "auto", "on_demand"})
# Dated snapshot suffixes that are safe to strip (they never changed the price).
_SNAPSHOT_RE = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8})|-\d{3})$")


@dataclass(frozen=True, slots=True)
class PriceResult:
    """What `PriceBook.price` found: exact cost and which table row produced it."""

    cost_usd: Decimal
    model: str
    effective_from: datetime
    tier: str | None
    provider: str = ""
    multiplier: Decimal | None = None
    window: str | None = None  # `TimeWindow.label()` of the time-of-day window applied


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One table id as loaded (overrides merged): what ``meterproxy prices`` shows."""

    id: str
    provider: str
    aliases: tuple[str, ...]
    entries: tuple[PriceEntry, ...]  # oldest first; empty when `same_as` is set
    multipliers: tuple[Multiplier, ...]
    same_as: str | None
    origin: str


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
        for path in toml_files(dirs):
            book._add_file(path, override=False)
        for path in toml_files(overrides):
            book._add_file(path, override=True)
        book._build_index()
        return book

    @classmethod
    def default(cls) -> PriceBook:
        """The built-in tables, loaded once per process."""
        return _default_book()

    def _add_file(self, path: Path, *, override: bool) -> None:
        self._add(read_pricing_file(path), override=override)

    def _add(self, parsed: PricingFile, *, override: bool) -> None:
        self._problems.extend(parsed.problems)
        prov = self._providers.setdefault(parsed.provider, _Provider(parsed.provider))
        prov.prefixes |= parsed.prefixes
        prov.aggregator = prov.aggregator or parsed.aggregator
        prov.multipliers += parsed.multipliers
        for spec in parsed.models:
            self._add_model(spec, prov, override=override)

    def _add_model(self, spec: ModelSpec, prov: _Provider, *, override: bool) -> None:
        existing = self._models.get(spec.id)
        if existing is None:
            self._models[spec.id] = _Model(
                spec.id, prov.name, spec.where, spec.aliases, spec.entries, spec.multipliers, spec.same_as
            )
        elif override:
            # Merge: an override entry replaces the built-in one with the same date.
            dates = {e.effective_from for e in spec.entries}
            existing.entries = [e for e in existing.entries if e.effective_from not in dates] + spec.entries
            existing.aliases += spec.aliases
            existing.multipliers += spec.multipliers
            existing.same_as = spec.same_as or existing.same_as
        else:
            self._problems.append(f"{spec.where}: duplicate model id (also in {existing.origin})")
            return
        self._check_dates(self._models[spec.id], spec.entries, spec.where)

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
        # Windows price the standard tier only; `check` rejects windows beside long_context.
        window = entry.window_at(when) if tier_used is None else None
        if window is not None:
            rates = window.rates
        cost = rates.token_cost(usage).scaleb(-_MILLION)
        if entry.web_search is not None and usage.web_search_requests:
            cost += (usage.web_search_requests * entry.web_search).scaleb(-3)
        mult = _latest(table.multipliers, when) or _latest(self._providers[table.provider].multipliers, when)
        factor = mult.multiplier if mult is not None else None
        if factor is not None:
            cost *= factor
        label = window.label() if window is not None else None
        return PriceResult(cost, model_id, entry.effective_from, tier_used, table.provider, factor, label)

    def models(self) -> list[str]:
        """Every table id, sorted."""
        return sorted(self._models)

    def provider_of(self, model_id: str) -> str | None:
        table = self._models.get(model_id)
        return table.provider if table else None

    def info(self, model_id: str) -> ModelInfo | None:
        """The table row `model_id` (an exact table id, not resolved), or ``None``."""
        m = self._models.get(model_id)
        if m is None:
            return None
        return ModelInfo(
            m.id, m.provider, tuple(m.aliases), tuple(m.entries), tuple(m.multipliers), m.same_as, m.origin
        )

    def provider_multipliers(self, provider: str) -> list[Multiplier]:
        """Negotiated multipliers on a whole provider (from overrides), oldest first."""
        prov = self._providers.get(provider)
        return list(prov.multipliers) if prov else []

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
                yield from (f"{m.origin} {e.effective_from.date()}: {p}" for p in entry_problems(e))
            for mult in m.multipliers:
                if mult.multiplier <= 0:
                    yield f"{m.origin}: multiplier must be positive"
        for prov in self._providers.values():
            if any(x.multiplier <= 0 for x in prov.multipliers):
                yield f"provider {prov.name!r}: multiplier must be positive"


@lru_cache(maxsize=1)
def _default_book() -> PriceBook:
    return PriceBook.load()


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

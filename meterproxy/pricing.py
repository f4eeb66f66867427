"""What a request cost: layered, dated price data and the one formula that applies it.

Prices live in data, not code, in three layers (``pricing/README.md``):

1. **base**: genai-prices' data file (`meterproxy.pricing_base`), about two
   thousand models of 47 providers, refreshed by ``meterproxy prices update``
   (each update in force from the moment it was applied, so a billed period is
   never rewritten);
2. **curated**: ``pricing/*.toml``, meterproxy's own corrections on top (DeepSeek
   time-of-day windows, long-context rates, launch prices, dated redirects);
3. **operator**: the user's ``--pricing`` files (private models, negotiated
   multipliers).

A higher layer's dated entries are merged into the lower one's history; on
the same ``effective_from`` the higher layer wins. Every entry keeps its layer
and origin, so a result says which layer and source priced it. This module is
pure: no clock, no network, no float.

Design, in the order a price is computed:

1. **Choose the list** (`meterproxy.pricing_names`): the request's price list
   (``openai``, ``together``, ...). Only that list is searched: a model is never
   priced from another provider's list. An unknown list prices nothing.
2. **Resolve** the name on that list (`PriceBook.lookup`, cached per list and
   name): curated/operator names first (exact id or alias, case-insensitive;
   ``vendor/`` prefixes; a dated snapshot suffix stripped), and genai-prices'
   match rules for the base; then client spellings of the same name (Bedrock
   ``us.`` profiles, Azure ``gpt-35``, ``models/``).
3. **Follow redirects**: a retired name billed as another model from a date on.
4. **Pick the dated entry**, then the rates (service tier, long context,
   time-of-day window), **apply one formula** (`Rates.token_cost`) and add the
   per-request fees; then a negotiated multiplier, if one is in force.

The result is an exact `Decimal`; callers round for display only. `price`
returns ``None`` for an unknown model (never zero), so "unpriced" stays visible.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from meterproxy.pricing_base import BaseData, BaseModel, read_base
from meterproxy.pricing_load import (
    LongContext,
    ModelSpec,
    Multiplier,
    PriceEntry,
    PricingError,
    PricingFile,
    Rates,
    Redirect,
    TierPrice,
    TimeWindow,
    entry_problems,
    read_pricing_file,
    toml_files,
)
from meterproxy.pricing_names import PRICE_LISTS, PriceList, canonical, client_spellings, price_list
from meterproxy.usage import Usage

__all__ = [
    "DEFAULT_BASE_FILE",
    "DEFAULT_PRICING_DIR",
    "BaseLayer",
    "LivePrices",
    "LongContext",
    "ModelInfo",
    "Multiplier",
    "PriceBook",
    "PriceEntry",
    "PriceResult",
    "PricingError",
    "Rates",
    "Redirect",
    "Resolved",
    "TierPrice",
    "TimeWindow",
]


def _default_dir() -> Path:
    packaged = Path(__file__).parent / "_pricing"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "pricing"


DEFAULT_PRICING_DIR: Path = _default_dir()
DEFAULT_BASE_FILE: Path = DEFAULT_PRICING_DIR / "base" / "genai-prices.json"

_MILLION = 6  # prices are per 10**6 tokens
# Service tiers that mean "no special tier" in provider responses.
_STANDARD_TIERS = frozenset({"", "default", "standard", "auto", "on_demand"})
# Dated snapshot suffixes that are safe to strip (they never changed the price).
_SNAPSHOT_RE = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8})|-\d{3})$")
_CACHE_MAX = 16_384  # resolved (list, name) pairs kept; cleared when full
_MAX_REDIRECTS = 4
_TOLERANCE = Decimal("1e-9")
_DAY = timedelta(days=1)

#: One base data file and when it was applied (None: the shipped file, in force for all time).
BaseLayer = tuple[BaseData, datetime | None]


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
    layer: str = ""  # "base", "curated" or "operator": the layer of the entry that priced it
    source: str = ""  # where that entry came from (file and model, or genai-prices' page)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A name resolved on one price list: the merged history it prices with (cached)."""

    id: str  # curated table id, else genai-prices' model id
    provider: str  # the price list
    entries: tuple[PriceEntry, ...]  # all layers merged, oldest first
    multipliers: tuple[Multiplier, ...] = ()
    redirects: tuple[Redirect, ...] = ()
    base_id: str | None = None  # "provider/model" in genai-prices, when the base layer knows it


@dataclass(slots=True)
class LivePrices:
    """The price book a running server prices with now. `meterproxy.prices_watch` replaces
    `book` when ``prices update`` installs a file and counts `generation` up (tests wait on it)."""

    book: PriceBook
    generation: int = 0


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
    redirects: tuple[Redirect, ...] = ()


@dataclass(slots=True)
class _Model:
    id: str
    provider: str
    origin: str
    aliases: list[str] = field(default_factory=list)
    entries: list[PriceEntry] = field(default_factory=list)
    multipliers: list[Multiplier] = field(default_factory=list)
    same_as: str | None = None
    redirects: list[Redirect] = field(default_factory=list)


@dataclass(slots=True)
class _Provider:
    name: str
    prefixes: set[str] = field(default_factory=set)
    aggregator: bool = False
    multipliers: list[Multiplier] = field(default_factory=list)
    index: dict[str, str] = field(default_factory=dict)  # lowercase name -> model id


class PriceBook:
    """All price layers, indexed for lookup. Build with `load` or `default`."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}
        self._providers: dict[str, _Provider] = {}
        self._prefix: dict[str, str] = {}  # provider name or vendor prefix -> provider
        self._global: dict[str, str] = {}  # lowercase name -> model id
        self._problems: list[str] = []
        self._base: list[BaseLayer] = []
        self._base_ids: frozenset[str] = frozenset()
        self._files: frozenset[str] = frozenset()
        self._cache: dict[tuple[str, str], Resolved | None] = {}

    # ---- construction -------------------------------------------------

    @classmethod
    def load(
        cls,
        dirs: Sequence[Path] = (DEFAULT_PRICING_DIR,),
        overrides: Sequence[Path] = (),
        base: Sequence[BaseLayer] | None = None,
    ) -> PriceBook:
        """Read the base layer(s), every ``*.toml`` in `dirs`, then `overrides` (files or dirs).

        `base` defaults to the shipped genai-prices file; pass ``[]`` for none,
        or the shipped layer plus installed updates (`meterproxy.prices_update`).
        """
        book = cls()
        book._base = list(base) if base is not None else [(shipped_base(), None)]
        for path in toml_files(dirs):
            book._add_file(path, override=False)
        for path in toml_files(overrides):
            book._add_file(path, override=True)
        book._build_index()
        return book

    @classmethod
    def default(cls) -> PriceBook:
        """The shipped layers, loaded once per process."""
        return _default_book()

    def _add_file(self, path: Path, *, override: bool) -> None:
        self._add(read_pricing_file(path), override=override)

    def _add(self, parsed: PricingFile, *, override: bool) -> None:
        self._problems.extend(parsed.problems)
        name = canonical(parsed.provider)
        prov = self._providers.setdefault(name, _Provider(name))
        prov.prefixes |= {canonical(p) for p in parsed.prefixes} | parsed.prefixes
        prov.aggregator = prov.aggregator or parsed.aggregator
        prov.multipliers += parsed.multipliers
        for spec in parsed.models:
            if override:
                spec.entries = [dataclasses.replace(e, layer="operator") for e in spec.entries]
            self._add_model(spec, prov, override=override)

    def _add_model(self, spec: ModelSpec, prov: _Provider, *, override: bool) -> None:
        existing = self._models.get(spec.id)
        if existing is None:
            self._models[spec.id] = _Model(
                spec.id,
                prov.name,
                spec.where,
                spec.aliases,
                spec.entries,
                spec.multipliers,
                spec.same_as,
                spec.redirects,
            )
        elif override:
            # Merge: an override entry replaces the built-in one with the same date.
            dates = {e.effective_from for e in spec.entries}
            existing.entries = [e for e in existing.entries if e.effective_from not in dates] + spec.entries
            existing.aliases += spec.aliases
            existing.multipliers += spec.multipliers
            existing.redirects = sorted(existing.redirects + spec.redirects, key=lambda r: r.effective_from)
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
        self._base_ids = frozenset(pid for data, _ in self._base for pid in data.providers)
        self._files = frozenset(self._providers)
        for prov in self._providers.values():
            for p in prov.prefixes:
                owner = self._prefix.setdefault(p, prov.name)
                if owner != prov.name:
                    self._problems.append(f"prefix {p!r} claimed by both {owner!r} and {prov.name!r}")
        for model in self._models.values():
            prov = self._providers[model.provider]
            for name in (model.id, *model.aliases):
                key = name.lower()
                # A name means one model per price list. The same open-weight model id is
                # legitimately on several lists at different prices (Groq's and Together's
                # Kimi K2), and a request is only ever priced from its upstream's list, so
                # names may repeat across lists; the first file (sorted) wins in the
                # all-lists index that `prices show` without --provider uses.
                other = prov.index.setdefault(key, model.id)
                if other != model.id:
                    self._problems.append(
                        f"{model.origin}: name {name!r} collides with model {other!r} ({prov.name})"
                    )
                self._global.setdefault(key, model.id)
        self._problems.extend(self._validate())

    # ---- lookup -------------------------------------------------------

    def price_list(self, provider: str | None) -> PriceList | None:
        """The price list `provider` names (vocabulary, alias, genai-prices id or a file's provider)."""
        return price_list(provider, self._base_ids, self._files)

    def lookup(self, model: str | None, provider: str | None) -> Resolved | None:
        """What `model` prices as on `provider`'s list (cached), or None.

        `provider` None searches every list (for ``prices show`` without
        ``--provider``); the meter always names the list.
        """
        if not model or not model.strip():
            return None
        key = (provider or "", model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._lookup_uncached(model.strip().lower(), provider)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _lookup_uncached(self, name: str, provider: str | None) -> Resolved | None:
        if provider is None:
            return self._lookup_anywhere(name)
        plist = self.price_list(provider)
        if plist is None:
            return None
        for spelling in (name, *client_spellings(name, plist.name)):
            if (found := self._on_list(spelling, plist)) is not None:
                return found
        return None

    def _lookup_anywhere(self, name: str) -> Resolved | None:
        model_id = self._follow(self._curated(name, None))
        if model_id is not None:
            return self._on_list(name, self.price_list(self._models[model_id].provider) or PRICE_LISTS[0])
        for plist in PRICE_LISTS:
            if (found := self._on_list(name, plist)) is not None:
                return found
        return None

    def _on_list(self, name: str, plist: PriceList) -> Resolved | None:
        scope = plist.name if plist.name in self._providers else None
        curated = self._follow(self._curated(name, scope, routed=False)) if scope else None
        base_id = self._base_id(name, plist)
        if curated is None and base_id is None and scope and self._providers[scope].aggregator:
            # OpenRouter bills vendor models at the vendor's list price; used only when
            # OpenRouter's own list (the base layer) does not have the slug.
            curated = self._follow(self._curated(name, scope, routed=True))
            if curated is None:
                return self._vendor_list(name)
        if curated is None and base_id is None:
            return None
        m = self._models[curated] if curated is not None else None
        entries = self._layered(name, plist, m.entries if m is not None else ())
        if m is None:
            assert base_id is not None
            return Resolved(base_id.split("/", 1)[1], plist.name, entries, base_id=base_id)
        return Resolved(m.id, m.provider, entries, tuple(m.multipliers), tuple(m.redirects), base_id)

    def _vendor_list(self, name: str) -> Resolved | None:
        """An aggregator's ``vendor/model`` slug on the vendor's own list (base layer included).

        Only plain slugs: a ``:free`` / ``:online`` / ``:nitro`` variant is priced by the
        aggregator differently from the vendor, so it stays unpriced rather than guessed.
        """
        head, sep, rest = name.partition("/")
        vendor = self._prefix.get(head) if sep else None
        plist = self.price_list(vendor) if vendor else None
        if plist is None or not rest or ":" in rest:
            return None
        return self._on_list(rest, plist)

    def _curated(self, name: str, scope: str | None, *, routed: bool = True) -> str | None:
        index = self._providers[scope].index if scope else self._global
        if (hit := index.get(name)) is not None:
            return hit
        head, sep, rest = name.partition("/")
        if sep and rest:
            if head == "models":
                return self._curated(rest, scope, routed=routed)
            vendor = self._prefix.get(head)
            if vendor and (
                scope is None or scope == vendor or (routed and self._providers[scope].aggregator)
            ):
                return self._curated(rest, vendor, routed=routed)
        if name.startswith("ft:") and (base := name[3:].split(":", 1)[0]) and name != f"ft:{base}":
            # An OpenAI fine-tune, ft:<base model>:<org>:<suffix>:<id>, bills at its base
            # model's fine-tuned rates: the curated id is ft:<base> (snapshot date stripped next).
            return self._curated(f"ft:{base}", scope, routed=routed)
        stripped = _SNAPSHOT_RE.sub("", name)
        return self._curated(stripped, scope, routed=routed) if stripped != name else None

    def _follow(self, found: str | None) -> str | None:
        seen: set[str] = set()
        while found is not None and (target := self._models[found].same_as) is not None:
            if found in seen or target not in self._models:
                return None
            seen.add(found)
            found = target
        return found

    def _base_id(self, name: str, plist: PriceList) -> str | None:
        """``provider/model`` of the newest base data file that knows `name` on `plist`."""
        for data, _ in reversed(self._base):
            if (hit := _find_base(data, name, plist.base)) is not None:
                return f"{hit.provider}/{hit.id}"
        return None

    def _layered(self, name: str, plist: PriceList, curated: Sequence[PriceEntry]) -> tuple[PriceEntry, ...]:
        """The history `name` prices with: base, curated over it, then each base update.

        Curated entries were written against the shipped base, so from a curated
        model's first entry on they replace it. An update (`prices update`) is newer
        than both: where it changes a model's price it is in force from the moment
        it was applied, over curated entries too; where it changes nothing the
        curated history stands. Nothing before an update's time ever changes.
        """
        base: tuple[PriceEntry, ...] = ()
        for data, applied_at in self._base:
            if applied_at is not None:
                break
            if (hit := _find_base(data, name, plist.base)) is not None:
                base = hit.entries
        history = _cover(base, curated)
        for data, applied_at in self._base:
            if applied_at is None or (hit := _find_base(data, name, plist.base)) is None:
                continue
            if base and not _changes(base, hit.entries, applied_at):
                continue
            history = _apply_update(history, hit.entries, applied_at)
            base = _apply_update(base, hit.entries, applied_at)
        return history

    def resolve(self, model: str | None, provider: str | None = None) -> str | None:
        """The id `model` prices as on `provider`'s list (None: any list), or ``None``."""
        found = self.lookup(model, provider)
        return found.id if found is not None else None

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
        found = self.lookup(model, provider)
        when = _utc(at)
        hops = 0
        while found is not None and (redirect := _latest(found.redirects, when)) is not None:
            hops += 1
            # An alias whose target at `when` no source gives (`unknown`) prices nothing.
            known = redirect.to and hops <= _MAX_REDIRECTS
            found = self.lookup(redirect.to, found.provider) if known else None
        if found is None:
            return None
        entry = _latest(found.entries, when)
        if entry is None:
            return None
        cost, tier_used, window = _entry_cost(entry, usage, when, service_tier)
        prov = self._providers.get(found.provider)
        mult = _latest(found.multipliers, when) or (_latest(prov.multipliers, when) if prov else None)
        factor = mult.multiplier if mult is not None else None
        if factor is not None:
            cost *= factor
        label = window.label() if window is not None else None
        return PriceResult(
            cost,
            found.id,
            entry.effective_from,
            tier_used,
            found.provider,
            factor,
            label,
            entry.layer,
            entry.source or entry.origin,
        )

    # ---- what the CLI shows ---------------------------------------------

    def models(self) -> list[str]:
        """Every curated and operator table id, sorted."""
        return sorted(self._models)

    def base_models(self, plist: PriceList) -> list[Resolved]:
        """The base layer's models on `plist` (newest data file's list, updates merged)."""
        out = []
        seen: set[str] = set()
        for data, _ in reversed(self._base):
            for pid in plist.base:
                prov = data.providers.get(pid)
                for m in prov.models if prov else ():
                    if m.id.lower() in seen:
                        continue
                    seen.add(m.id.lower())
                    if self._base_id(m.id.lower(), plist) == f"{pid}/{m.id}":
                        history = self._layered(m.id.lower(), plist, ())
                        out.append(Resolved(m.id, plist.name, history, base_id=f"{pid}/{m.id}"))
        return out

    def base_layers(self) -> list[BaseLayer]:
        return list(self._base)

    def provider_of(self, model_id: str) -> str | None:
        table = self._models.get(model_id)
        return table.provider if table else None

    def info(self, model_id: str) -> ModelInfo | None:
        """The table row `model_id` (an exact curated/operator id, not resolved), or ``None``."""
        m = self._models.get(model_id)
        if m is None:
            return None
        return ModelInfo(
            m.id,
            m.provider,
            tuple(m.aliases),
            tuple(m.entries),
            tuple(m.multipliers),
            m.same_as,
            m.origin,
            tuple(m.redirects),
        )

    def provider_multipliers(self, provider: str) -> list[Multiplier]:
        """Negotiated multipliers on a whole provider (from overrides), oldest first."""
        prov = self._providers.get(canonical(provider))
        return list(prov.multipliers) if prov else []

    def history(self, model: str, provider: str | None = None) -> list[PriceEntry]:
        """The dated entries `model` resolves to, all layers merged, oldest first ([] if unknown)."""
        found = self.lookup(model, provider)
        return list(found.entries) if found else []

    def check(self) -> list[str]:
        """Validation problems found while loading; an empty list means the tables are sound."""
        return list(self._problems)

    def disagreements(self, usages: Sequence[Usage], also_at: Sequence[datetime]) -> list[str]:
        """Where a curated or operator model bills differently from the base layer, by more than 1e-9.

        Compared at noon the day after each of the model's own entries and at `also_at`
        (each from the model's first entry on), for each of `usages`, standard tier.
        One line per model: the first difference found, and the model's stated reason
        (an entry's ``correction`` or ``note``) when it gives one.
        """
        out = []
        for m in sorted(self._models.values(), key=lambda m: (m.provider, m.id)):
            plist = self.price_list(m.provider)
            if plist is None or self._base_id(m.id.lower(), plist) is None:
                continue
            if not m.entries:
                out += self._alias_disagreement(m, plist, usages, also_at)
                continue
            base = self._layered(m.id.lower(), plist, ())
            first = m.entries[0].effective_from
            points = [e.effective_from.replace(hour=12, minute=0, second=0) + _DAY for e in m.entries]
            points = sorted({p for p in (*points, *also_at) if p >= first})
            diff = next(
                (
                    (at, a, b)
                    for at in points
                    for u in usages
                    if (mine := _latest(m.entries, at)) is not None
                    and (theirs := _latest(base, at)) is not None
                    and abs(
                        (a := _entry_cost(mine, u, at, None)[0]) - (b := _entry_cost(theirs, u, at, None)[0])
                    )
                    > _TOLERANCE
                ),
                None,
            )
            if diff is None:
                continue
            at, a, b = diff
            why = next((e.correction or e.note for e in reversed(m.entries) if e.correction or e.note), None)
            reason = f"; {why}" if why else ""
            out.append(f"{m.provider}/{m.id} at {at.isoformat()}: {m.entries[0].layer} {a}, base {b}{reason}")
        return out

    def _alias_disagreement(
        self, m: _Model, plist: PriceList, usages: Sequence[Usage], also_at: Sequence[datetime]
    ) -> list[str]:
        """An alias priced through dated redirects vs the base's own history for the name.

        Compared at noon the day after each move and at `also_at` (from the first move on);
        a span whose target is unknown (unpriced here) is not a disagreement.
        """
        if not m.redirects:
            return []
        base = self._layered(m.id.lower(), plist, ())
        first = m.redirects[0].effective_from
        points = [r.effective_from.replace(hour=12, minute=0, second=0) + _DAY for r in m.redirects]
        for at in sorted({p for p in (*points, *also_at) if p >= first}):
            move = _latest(m.redirects, at)
            theirs = _latest(base, at)
            for u in usages:
                mine = self.price(model=m.id, usage=u, at=at, provider=m.provider)
                if mine is None or theirs is None or move is None:
                    continue
                b = _entry_cost(theirs, u, at, None)[0]
                if abs(mine.cost_usd - b) > _TOLERANCE:
                    why = f"; {move.note}" if move.note else ""
                    return [
                        f"{m.provider}/{m.id} at {at.isoformat()}: alias -> {mine.model} "
                        f"({mine.layer}) {mine.cost_usd}, base {b}{why}"
                    ]
        return []

    def _validate(self) -> Iterable[str]:
        for m in self._models.values():
            if m.same_as is not None:
                if m.same_as not in self._models:
                    yield f"{m.origin}: same_as {m.same_as!r} is not a known model id"
                if m.entries:
                    yield f"{m.origin}: has both same_as and prices"
            elif not m.entries and not m.redirects and not self._base_knows(m):
                yield f"{m.origin}: no prices"
            for e in m.entries:
                yield from (f"{m.origin} {e.effective_from.date()}: {p}" for p in entry_problems(e))
            for mult in m.multipliers:
                if mult.multiplier <= 0:
                    yield f"{m.origin}: multiplier must be positive"
            for r in m.redirects:
                if r.to.lower() == m.id.lower():
                    yield f"{m.origin}: redirects to itself"
                elif r.to and self.lookup(r.to, m.provider) is None:
                    yield f"{m.origin}: redirect target {r.to!r} is not on the {m.provider!r} list"
        for prov in self._providers.values():
            if any(x.multiplier <= 0 for x in prov.multipliers):
                yield f"provider {prov.name!r}: multiplier must be positive"

    def _base_knows(self, m: _Model) -> bool:
        plist = self.price_list(m.provider)
        return plist is not None and self._base_id(m.id.lower(), plist) is not None


def _entry_cost(
    entry: PriceEntry, usage: Usage, when: datetime, service_tier: str | None
) -> tuple[Decimal, str | None, TimeWindow | None]:
    """The one formula: `usage` at `entry`'s rates for the tier, prompt size and time of day."""
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
    if entry.requests is not None:
        cost += entry.requests.scaleb(-3)
    return cost, tier_used, window


def _find_base(data: BaseData, name: str, provider_ids: Sequence[str]) -> BaseModel | None:
    for pid in provider_ids:
        prov = data.providers.get(pid)
        if prov is not None and (hit := prov.find(name, data.providers)) is not None:
            return hit
    return None


def _cover(lower: Sequence[PriceEntry], upper: Sequence[PriceEntry]) -> tuple[PriceEntry, ...]:
    """`upper` from its first entry on; `lower`'s history only before that."""
    if not upper:
        return tuple(lower)
    first = upper[0].effective_from
    return (*(e for e in lower if e.effective_from < first), *upper)


def _changes(old: Sequence[PriceEntry], new: Sequence[PriceEntry], at: datetime) -> bool:
    """Whether `new` prices anything from `at` on differently from `old`."""
    a, b = _latest(old, at), _latest(new, at)
    if (a is None) != (b is None) or (a is not None and b is not None and not a.same_prices(b)):
        return True
    later_old = [e for e in old if e.effective_from > at]
    later_new = [e for e in new if e.effective_from > at]
    return len(later_old) != len(later_new) or any(
        x.effective_from != y.effective_from or not x.same_prices(y)
        for x, y in zip(later_old, later_new, strict=True)
    )


def _apply_update(
    old: Sequence[PriceEntry], new: Sequence[PriceEntry], applied_at: datetime
) -> tuple[PriceEntry, ...]:
    """A newer data file's history, in force only from `applied_at`: what was billed stays billed."""
    before = [e for e in old if e.effective_from < applied_at]
    current = _latest(new, applied_at)
    at_update = [dataclasses.replace(current, effective_from=applied_at)] if current is not None else []
    return (*before, *at_update, *(e for e in new if e.effective_from > applied_at))


@lru_cache(maxsize=4)
def _read_base_cached(path: Path, mtime_ns: int) -> BaseData:
    return read_base(path)


def shipped_base(path: Path = DEFAULT_BASE_FILE) -> BaseData:
    """The shipped genai-prices file, parsed once per process (immutable, shared by books)."""
    return _read_base_cached(path, path.stat().st_mtime_ns if path.exists() else 0)


@lru_cache(maxsize=1)
def _default_book() -> PriceBook:
    return PriceBook.load()


_Dated = TypeVar("_Dated", PriceEntry, Multiplier, Redirect)


def _latest(items: Sequence[_Dated], when: datetime) -> _Dated | None:
    found = None
    for item in items:  # sorted by effective_from
        if item.effective_from > when:
            break
        found = item
    return found


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

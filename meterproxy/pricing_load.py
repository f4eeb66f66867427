"""Reading price tables: the schema's types, TOML parsing, and per-file checks.

`read_pricing_file` turns one ``pricing/*.toml`` file (or a user override in
the same schema, documented in ``pricing/README.md``) into a `PricingFile`:
plain, typed data with every number an exact `Decimal` (``tomllib`` with
``parse_float=Decimal``). It knows nothing about other files; merging files,
indexing names and cross-file checks (colliding names, overlapping dates,
dangling ``same_as``) are `meterproxy.pricing.PriceBook`'s job.

Two kinds of trouble, on purpose:

- a file that cannot be used at all (bad TOML, a missing or mistyped required
  field, a naive datetime) raises `PricingError` naming the file and model, so
  ``serve --pricing FILE`` stops with that message instead of pricing wrongly;
- a file that can be used but is suspect (unknown keys, negative prices,
  non-positive multipliers) is loaded and its problems are returned, for
  `PriceBook.check` and ``meterproxy prices check`` to report.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterproxy.usage import Usage

__all__ = [
    "LongContext",
    "ModelSpec",
    "Multiplier",
    "PriceEntry",
    "PricingError",
    "PricingFile",
    "Rates",
    "Redirect",
    "TierPrice",
    "TimeWindow",
    "entry_problems",
    "read_pricing_file",
    "toml_files",
]

_RATE_KEYS = (
    "input",
    "output",
    "cache_read",
    "cache_write",
    "cache_write_1h",
    "reasoning",
    "input_audio",
    "cache_read_audio",
    "output_audio",
    "input_image",
    "output_image",
)
_ENTRY_KEYS = frozenset(
    {*_RATE_KEYS, "effective_from", "web_search", "requests", "long_context", "tiers", "windows"}
    | {"correction", "source", "note"}
)
_WINDOW_KEYS = frozenset({*_RATE_KEYS, "name", "start", "end", "days"})
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_DAY_US = 86_400 * 10**6
_WEEK_US = 7 * _DAY_US
_TIER_KEYS = frozenset({*_RATE_KEYS, "multiplier", "long_context"})
_LC_KEYS = frozenset({*_RATE_KEYS, "threshold"})
_MODEL_KEYS = frozenset(
    {"id", "aliases", "prices", "same_as", "multipliers", "redirects", "source", "note", "deprecated"}
)
_REDIRECT_KEYS = frozenset({"effective_from", "to", "unknown", "source", "note"})
_FILE_KEYS = frozenset({"provider", "prefixes", "aggregator", "models", "multipliers", "source", "note"})


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
    # Audio and image tokens (OpenAI realtime, images, audio); unlisted: the text rate.
    input_audio: Decimal | None = None
    cache_read_audio: Decimal | None = None
    output_audio: Decimal | None = None
    input_image: Decimal | None = None
    output_image: Decimal | None = None

    def token_cost(self, usage: Usage) -> Decimal:
        """USD times one million for the tokens in `usage` (exact, not divided yet).

        Missing cache prices fall back to the input price (a 1h write falls back
        to the 5-minute write price first); a missing reasoning price means
        reasoning tokens bill as ordinary output. Audio and image tokens (subsets
        of input and output) bill at their own rates when the entry lists them,
        else as text; cached audio falls back to the audio input rate (to the cached
        text rate when the entry lists no audio rates).
        """
        cache_read = self.cache_read if self.cache_read is not None else self.input
        write_5m = self.cache_write if self.cache_write is not None else self.input
        write_1h = self.cache_write_1h if self.cache_write_1h is not None else write_5m
        reasoning = self.reasoning if self.reasoning is not None else self.output
        input_audio = self.input_audio if self.input_audio is not None else self.input
        # Cached audio: its own rate, else the audio input rate, else (no audio rates: all
        # tokens are text) the cached text rate, as genai-prices bills it.
        cached_audio = (
            self.cache_read_audio
            if self.cache_read_audio is not None
            else self.input_audio
            if self.input_audio is not None
            else cache_read
        )
        input_image = self.input_image if self.input_image is not None else self.input
        output_audio = self.output_audio if self.output_audio is not None else self.output
        output_image = self.output_image if self.output_image is not None else self.output
        # Each modality clamped inside its total, so odd counts never price below zero.
        audio_in = min(usage.audio_input_tokens, usage.input_tokens)
        audio_cached = min(usage.audio_cache_read_tokens, audio_in, usage.cache_read_tokens)
        image_in = min(usage.image_input_tokens, usage.input_tokens - audio_in)
        text_uncached = max(usage.uncached_input_tokens - (audio_in - audio_cached) - image_in, 0)
        text_cached = usage.cache_read_tokens - audio_cached
        audio_out = min(usage.audio_output_tokens, usage.output_tokens)
        image_out = min(usage.image_output_tokens, usage.output_tokens - audio_out)
        text_out = usage.output_tokens - audio_out - image_out
        reasoning_tokens = min(usage.reasoning_tokens, text_out)
        write_1h_tokens = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        return (
            text_uncached * self.input
            + text_cached * cache_read
            + (usage.cache_write_tokens - write_1h_tokens) * write_5m
            + write_1h_tokens * write_1h
            + (audio_in - audio_cached) * input_audio
            + audio_cached * cached_audio
            + image_in * input_image
            + (text_out - reasoning_tokens) * self.output
            + reasoning_tokens * reasoning
            + audio_out * output_audio
            + image_out * output_image
        )

    def scaled(self, factor: Decimal) -> Rates:
        """These rates times `factor` (a tier or discount multiplier)."""

        def mul(v: Decimal | None) -> Decimal | None:
            return None if v is None else v * factor

        return Rates(
            self.input * factor,
            self.output * factor,
            *(mul(getattr(self, k)) for k in _RATE_KEYS[2:]),
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
class TimeWindow:
    """A daily UTC time-of-day window with its own rates (DeepSeek peak / off-peak).

    In force from `start` (inclusive) to `end` (exclusive), UTC. ``end < start``
    wraps midnight (16:30 -> 00:30). `days` are the weekdays (``datetime.weekday``
    numbers) on which the window *starts*, so the after-midnight part of a
    wrapping window belongs to the day before; ``None`` means every day.
    `rates` are complete: the keys the window lists, the entry's base rates for
    the rest.
    """

    start: time
    end: time
    rates: Rates
    days: frozenset[int] | None = None
    name: str | None = None

    def contains(self, when: datetime) -> bool:
        """Whether `when` (aware, UTC) falls in this window."""
        t = when.time()
        if self.start < self.end:
            return self.start <= t < self.end and self._on(when.weekday())
        if self.start == self.end:  # empty; `entry_problems` reports it
            return False
        if t >= self.start:
            return self._on(when.weekday())
        return t < self.end and self._on((when.weekday() - 1) % 7)

    def _on(self, weekday: int) -> bool:
        return self.days is None or weekday in self.days

    def label(self) -> str:
        """``peak 01:00-04:00 mon,tue,...``: how messages and ``prices show`` name it."""
        days = "" if self.days is None else " " + ",".join(DAY_NAMES[d] for d in sorted(self.days))
        name = f"{self.name} " if self.name else ""
        return f"{name}{_hhmm(self.start)}-{_hhmm(self.end)} UTC{days}"

    def week_spans(self) -> list[tuple[int, int]]:
        """The microseconds of a Monday-based week this window covers (for overlap checks)."""
        start, length = _us(self.start), (_us(self.end) - _us(self.start)) % _DAY_US
        spans = []
        for day in sorted(self.days) if self.days is not None else range(7):
            a = day * _DAY_US + start
            b = a + length
            spans += [(a, b)] if b <= _WEEK_US else [(a, _WEEK_US), (0, b - _WEEK_US)]
        return spans


def _us(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 10**6 + t.microsecond


def _hhmm(t: time) -> str:
    return t.isoformat(timespec="seconds" if t.second or t.microsecond else "minutes")


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One dated row of a model's price history."""

    effective_from: datetime
    rates: Rates
    long_context: LongContext | None = None
    web_search: Decimal | None = None  # USD per 1000 requests
    requests: Decimal | None = None  # USD per 1000 requests, a fee on every request (Perplexity)
    tiers: Mapping[str, TierPrice] = field(default_factory=dict)
    windows: tuple[TimeWindow, ...] = ()
    correction: str | None = None
    source: str | None = None
    note: str | None = None
    origin: str = ""
    layer: str = "curated"  # "base" (genai-prices), "curated" (pricing/*.toml) or "operator"

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

    def same_prices(self, other: PriceEntry) -> bool:
        """Whether `other` bills every request exactly as this entry does (dates and notes aside)."""
        mine = (self.rates, self.long_context, self.web_search, self.requests, dict(self.tiers), self.windows)
        theirs = (other.rates, other.long_context, other.web_search, other.requests, dict(other.tiers))
        return mine == (*theirs, other.windows)

    def window_at(self, when: datetime) -> TimeWindow | None:
        """The time-of-day window in force at `when` (aware, UTC), if any."""
        return next((w for w in self.windows if w.contains(when)), None)


@dataclass(frozen=True, slots=True)
class Multiplier:
    """A negotiated factor on the final cost, in force from `effective_from` on."""

    effective_from: datetime
    multiplier: Decimal
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    """From `effective_from` on, the model is billed as model `to` (a retired name, an alias).

    A moving alias (``mistral-large-latest``) is a list of these, one per move. Where no
    source says what the alias pointed at, the redirect has no `to` and `unknown` says
    why: requests in that span stay unpriced rather than priced as a guess.
    """

    effective_from: datetime
    to: str  # "" when `unknown`
    source: str | None = None
    note: str | None = None
    unknown: str | None = None


@dataclass(slots=True)
class ModelSpec:
    """One ``[[models]]`` table as written in a file (entries in file order)."""

    id: str
    where: str  # "path: model 'id'", the prefix of every message about it
    aliases: list[str] = field(default_factory=list)
    entries: list[PriceEntry] = field(default_factory=list)
    multipliers: list[Multiplier] = field(default_factory=list)
    same_as: str | None = None
    redirects: list[Redirect] = field(default_factory=list)


@dataclass(slots=True)
class PricingFile:
    """One pricing file, parsed; `problems` are the suspect-but-usable findings."""

    path: Path
    provider: str
    prefixes: set[str]
    aggregator: bool
    multipliers: list[Multiplier]
    models: list[ModelSpec]
    problems: list[str]


def read_pricing_file(path: Path) -> PricingFile:
    """Parse one file; raises `PricingError` (naming the file) if it cannot be used."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f, parse_float=Decimal)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PricingError(f"{path}: cannot read: {exc}") from exc
    where = str(path)
    problems = list(_unknown(doc, _FILE_KEYS, where))
    name = _req_str(doc, "provider", where).lower()
    models = [
        _model_spec(raw, f"{where}: models[{i}]", problems)
        for i, raw in enumerate(_table_list(doc, "models", where))
    ]
    return PricingFile(
        path=path,
        provider=name,
        prefixes={name, *(p.lower() for p in _str_list(doc, "prefixes", where))},
        aggregator=bool(doc.get("aggregator", False)),
        multipliers=_multipliers(doc.get("multipliers", []), where),
        models=models,
        problems=problems,
    )


def _model_spec(raw: Mapping[str, Any], where: str, problems: list[str]) -> ModelSpec:
    model_id = _req_str(raw, "id", where)
    where = f"{where.rsplit(':', 1)[0]}: model {model_id!r}"
    problems.extend(_unknown(raw, _MODEL_KEYS, where))
    raw_entries = _table_list(raw, "prices", where)
    entries = [_entry(e, f"{where} prices[{j}]") for j, e in enumerate(raw_entries)]
    for j, e in enumerate(raw_entries):
        problems.extend(_entry_unknown_keys(e, f"{where} prices[{j}]"))
    same_as = raw.get("same_as")
    if same_as is not None and not isinstance(same_as, str):
        raise PricingError(f"{where}: same_as must be a string")
    return ModelSpec(
        id=model_id,
        where=where,
        aliases=_str_list(raw, "aliases", where),
        entries=entries,
        multipliers=_multipliers(raw.get("multipliers", []), where),
        same_as=same_as,
        redirects=_redirects(raw.get("redirects", []), where, problems),
    )


def _redirects(raw: Any, where: str, problems: list[str]) -> list[Redirect]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise PricingError(f"{where}: redirects must be an array of tables")
    out = []
    for i, r in enumerate(raw):
        rw = f"{where} redirects[{i}]"
        problems.extend(_unknown(r, _REDIRECT_KEYS, rw))
        notes = {k: r.get(k) for k in ("source", "note", "unknown")}
        if any(v is not None and not isinstance(v, str) for v in notes.values()):
            raise PricingError(f"{rw}: 'source', 'note' and 'unknown' must be strings")
        if ("to" in r) == bool(notes["unknown"]):
            raise PricingError(f"{rw}: needs exactly one of 'to' (the target) or 'unknown' (why not known)")
        to = _req_str(r, "to", rw) if "to" in r else ""
        out.append(Redirect(_when(r, rw), to, notes["source"], notes["note"], notes["unknown"]))
    return sorted(out, key=lambda r: r.effective_from)


def _unknown(raw: Mapping[str, Any], allowed: frozenset[str], where: str) -> Iterable[str]:
    for key in sorted(set(raw) - allowed):
        yield f"{where}: unknown key {key!r}"


def toml_files(paths: Iterable[Path]) -> list[Path]:
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
    return Rates(input_, output, *(_num(raw, k, where) for k in _RATE_KEYS[2:]))


def _long_context(raw: Any, where: str) -> LongContext | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PricingError(f"{where}: long_context must be a table")
    threshold = raw.get("threshold")
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise PricingError(f"{where}: long_context.threshold must be an integer")
    return LongContext(threshold, _rates(raw, f"{where} long_context"))


def _time_of_day(raw: Mapping[str, Any], key: str, where: str) -> time:
    value = raw.get(key)
    if isinstance(value, str):
        try:
            value = time.fromisoformat(value)
        except ValueError:
            raise PricingError(f"{where}: {key!r} is not a time of day: {raw.get(key)!r}") from None
    if not isinstance(value, time) or value.tzinfo is not None:
        raise PricingError(f'{where}: {key!r} must be a UTC time of day ("16:30" or 16:30:00)')
    return value


def _days(raw: Mapping[str, Any], where: str) -> frozenset[int] | None:
    if "days" not in raw:
        return None
    names = _str_list(raw, "days", where)
    unknown = [d for d in names if d.lower() not in DAY_NAMES]
    if unknown or not names:
        raise PricingError(f"{where}: 'days' must list days among {', '.join(DAY_NAMES)}, got {names!r}")
    return frozenset(DAY_NAMES.index(d.lower()) for d in names)


def _windows(raw: Any, base: Rates, where: str) -> tuple[TimeWindow, ...]:
    """Parse ``windows``; each inherits the rates it does not list from `base`."""
    if not isinstance(raw, list) or not all(isinstance(w, dict) for w in raw):
        raise PricingError(f"{where}: windows must be an array of tables")
    out = []
    for i, w in enumerate(raw):
        ww = f"{where} windows[{i}]"
        own = {k: _num(w, k, ww) for k in _RATE_KEYS}
        rates = Rates(*(v if v is not None else getattr(base, k) for k, v in own.items()))
        name = w.get("name")
        if name is not None and not isinstance(name, str):
            raise PricingError(f"{ww}: 'name' must be a string")
        start, end = _time_of_day(w, "start", ww), _time_of_day(w, "end", ww)
        out.append(TimeWindow(start, end, rates, _days(w, ww), name))
    return tuple(out)


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
    rates = _rates(raw, where)
    return PriceEntry(
        effective_from=_when(raw, where),
        rates=rates,
        long_context=_long_context(raw.get("long_context"), where),
        web_search=_num(raw, "web_search", where),
        requests=_num(raw, "requests", where),
        tiers=tiers,
        windows=_windows(raw.get("windows", []), rates, where),
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
    for i, w in enumerate(raw.get("windows") or []):
        if isinstance(w, dict):
            parts.append((f"windows[{i}].", w, _WINDOW_KEYS))
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


def entry_problems(e: PriceEntry) -> Iterable[str]:
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
    for i, w in enumerate(e.windows):
        sets.append((f"windows[{i}] ", w.rates))
    yield from _window_problems(e)
    for label, rates in sets:
        for key, value in zip(_RATE_KEYS, rates._values(), strict=True):
            if value is not None and value < 0:
                yield f"{label}{key} is negative ({value})"
    for fee, value in (("web_search", e.web_search), ("requests", e.requests)):
        if value is not None and value < 0:
            yield f"{fee} is negative ({value})"


def _window_problems(e: PriceEntry) -> Iterable[str]:
    """Empty windows, overlapping windows, and windows beside long-context rates."""
    if e.windows and e.long_context is not None:
        yield "windows cannot be combined with long_context (which rates would win is undefined)"
    for i, w in enumerate(e.windows):
        if w.start == w.end:
            yield f"windows[{i}] ({w.label()}) is empty: start equals end"
    for i, a in enumerate(e.windows):
        for j in range(i + 1, len(e.windows)):
            b = e.windows[j]
            if any(x0 < y1 and y0 < x1 for x0, x1 in a.week_spans() for y0, y1 in b.week_spans()):
                yield f"windows[{i}] ({a.label()}) overlaps windows[{j}] ({b.label()})"

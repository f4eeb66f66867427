"""``meterproxy prices list|show MODEL|check``: read and validate the price tables.

The same `PriceBook` the proxy prices with, loaded the same way: the shipped
tables plus any ``--pricing FILE`` overrides (repeatable; a directory means
every ``*.toml`` in it), so what this prints is what ``serve --pricing FILE``
would charge.

- ``list``: one aligned line per table id with the prices in force now (USD
  per 1M tokens), ``--provider`` to narrow, ``--json`` for scripts (prices as
  JSON numbers written from the Decimal, never computed in float). A model
  whose entry has time-of-day windows shows its rates outside the windows,
  marked ``*`` (JSON: a ``windows`` list with each window's full rates).
- ``show MODEL``: resolves MODEL the way a request's model is resolved
  (aliases, dated snapshots, ``vendor/`` prefixes) and prints its dated history
  with tiers, long-context rates, time-of-day windows and negotiated multipliers.
- ``check``: every problem `PriceBook.check` finds (unknown keys, negative
  prices, duplicate dates, colliding names, ...), one per line; exit status 1
  if there is any, or if a file cannot be read at all. CI runs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from meterproxy.exact_json import dumps
from meterproxy.pricing import ModelInfo, PriceBook, PriceEntry, PricingError, Rates, TimeWindow
from meterproxy.pricing_load import DAY_NAMES
from meterproxy.pricing_names import PRICE_LISTS, canonical

__all__ = ["command", "format_price", "load_book"]

_PRICING = click.option(
    "--pricing",
    "pricing",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Extra pricing TOML file or directory, as for 'serve --pricing' (repeatable).",
)


def load_book(pricing: Sequence[Path]) -> PriceBook:
    """The shipped tables plus `pricing`; a file that cannot be used exits with its message."""
    try:
        return PriceBook.load(overrides=list(pricing)) if pricing else PriceBook.default()
    except PricingError as exc:
        raise click.ClickException(f"invalid pricing file: {exc}") from exc


def format_price(value: Decimal | None) -> str:
    """A rate as plain decimal text (``0.075``, ``10``), ``-`` when not listed."""
    if value is None:
        return "-"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _in_force(entries: Sequence[PriceEntry], now: datetime) -> PriceEntry | None:
    current = None
    for e in entries:
        if e.effective_from <= now:
            current = e
    return current or (entries[0] if entries else None)


def _target(book: PriceBook, info: ModelInfo) -> ModelInfo:
    """Follow ``same_as`` to the row that holds the prices (bounded: no loops)."""
    seen = {info.id}
    while info.same_as is not None and info.same_as not in seen:
        nxt = book.info(info.same_as)
        if nxt is None:
            break
        seen.add(nxt.id)
        info = nxt
    return info


def _rates_dict(rates: Rates) -> dict[str, Decimal | None]:
    return {
        "input": rates.input,
        "output": rates.output,
        "cache_read": rates.cache_read,
        "cache_write": rates.cache_write,
        "cache_write_1h": rates.cache_write_1h,
        "reasoning": rates.reasoning,
    }


def _window_dict(window: TimeWindow) -> dict[str, Any]:
    days = None if window.days is None else [DAY_NAMES[d] for d in sorted(window.days)]
    return {
        "name": window.name,
        "start_utc": window.start.isoformat(),
        "end_utc": window.end.isoformat(),
        "days": days,
        **_rates_dict(window.rates),
    }


def _list_rows(book: PriceBook, provider: str | None, now: datetime) -> list[dict[str, Any]]:
    wanted = canonical(provider) if provider else None
    rows = []
    curated_ids: set[tuple[str, str]] = set()
    for model_id in book.models():
        info = book.info(model_id)
        assert info is not None
        if wanted and info.provider != wanted:
            continue
        curated_ids.add((info.provider, info.id.lower()))
        priced = _target(book, info)
        entry = _in_force(priced.entries, now)
        rows.append(_row(info.provider, info.id, list(info.aliases), info.same_as, entry))
    for plist in PRICE_LISTS:
        if wanted and plist.name != wanted:
            continue
        for found in book.base_models(plist):
            if (plist.name, found.id.lower()) not in curated_ids:
                rows.append(_row(plist.name, found.id, [], None, _in_force(found.entries, now)))
    return rows


def _row(
    provider: str, model: str, aliases: list[str], same_as: str | None, entry: PriceEntry | None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "aliases": aliases,
        "same_as": same_as,
        "layer": entry.layer if entry else None,
        "effective_from": entry.effective_from.isoformat() if entry else None,
    }
    row.update(_rates_dict(entry.rates) if entry else dict.fromkeys(("input", "output")))
    row["windows"] = [_window_dict(w) for w in entry.windows] if entry else []
    return row


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


@click.group("prices")
def command() -> None:
    """Show and validate the price tables (USD per 1M tokens)."""


@command.command("list")
@click.option("--provider", default=None, help="Only this provider's table (openai, anthropic, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_PRICING
def list_command(provider: str | None, as_json: bool, pricing: tuple[Path, ...]) -> None:
    """Every model with the prices in force now."""
    book = load_book(pricing)
    rows = _list_rows(book, provider, datetime.now(UTC))
    if as_json:
        click.echo(dumps(rows))
        return
    if not rows:
        raise click.ClickException(f"no models for provider {provider!r}")
    header = (
        "PROVIDER",
        "MODEL",
        "INPUT",
        "OUTPUT",
        "CACHE_READ",
        "CACHE_WRITE",
        "SINCE",
        "LAYER",
        "ALIASES",
    )
    body = []
    for r in rows:
        aliases = ", ".join(r["aliases"])
        if r["same_as"]:
            aliases = f"= {r['same_as']}" + (f"; {aliases}" if aliases else "")
        since = (r["effective_from"] or "-")[:10]
        since = "always" if since == "1970-01-01" else since
        prices = [format_price(r[k]) for k in ("input", "output", "cache_read", "cache_write")]
        model = r["model"] + ("*" if r["windows"] else "")
        body.append((r["provider"], model, *prices, since, r["layer"] or "-", aliases))
    click.echo(_table(header, body))
    click.echo(f"\n{len(rows)} models; prices in USD per 1M tokens, in force now (UTC).")
    if any(r["windows"] for r in rows):
        click.echo("* time-of-day rates: shown outside the windows; 'prices show MODEL' lists them.")


def _rates_text(rates: Rates) -> str:
    return ", ".join(f"{k} {format_price(v)}" for k, v in _rates_dict(rates).items() if v is not None)


def _entry_lines(entry: PriceEntry) -> list[str]:
    since = "always" if entry.effective_from.year == 1970 else entry.effective_from.isoformat()
    lines = [f"{since}  [{entry.layer}]  {_rates_text(entry.rates)}"]
    if entry.requests is not None:
        lines.append(f"    requests {format_price(entry.requests)} per 1000 requests")
    if entry.web_search is not None:
        lines.append(f"    web_search {format_price(entry.web_search)} per 1000 requests")
    if entry.long_context is not None:
        lc = entry.long_context
        lc_rates = ", ".join(
            f"{k} {format_price(v)}" for k, v in _rates_dict(lc.rates).items() if v is not None
        )
        lines.append(f"    above {lc.threshold} input tokens: {lc_rates}")
    for window in entry.windows:
        lines.append(f"    window {window.label()}: {_rates_text(window.rates)}")
    for name, tier in sorted(entry.tiers.items()):
        if tier.multiplier is not None:
            lines.append(f"    tier {name}: x{format_price(tier.multiplier)}")
        elif tier.rates is not None:
            lines.append(f"    tier {name}: {_rates_text(tier.rates)}")
    for label, text in (("correction", entry.correction), ("note", entry.note), ("source", entry.source)):
        if text:
            lines.append(f"    {label}: {text}")
    return lines


@command.command("show")
@click.argument("model")
@click.option(
    "--provider", default=None, help="The price list to resolve on (openai, together, ...) [default: any]."
)
@_PRICING
def show_command(model: str, provider: str | None, pricing: tuple[Path, ...]) -> None:
    """One model's dated price history, each entry with the layer and source that priced it."""
    book = load_book(pricing)
    found = book.lookup(model, provider)
    if found is None:
        where = f"on the {provider!r} price list" if provider else "in any price list"
        click.echo(
            f"{model!r} is not {where}: requests with it are recorded with cost null.\n"
            "Add it with a pricing file (see pricing/README.md) or check the spelling "
            "with 'meterproxy prices list'.",
            err=True,
        )
        sys.exit(1)
    title = found.id if found.id == model else f"{model} -> {found.id}"
    click.echo(f"{title}  (price list {found.provider}; USD per 1M tokens)")
    info = book.info(found.id)
    if info is not None and info.aliases:
        click.echo(f"aliases: {', '.join(info.aliases)}")
    if info is not None:
        priced = _target(book, info)
        if priced is not info:
            click.echo(f"priced as: {priced.id}")
        click.echo(f"curated in: {info.origin.split(': model')[0]}")
    if found.base_id is not None:
        click.echo(f"base layer: genai-prices {found.base_id}")
    now = datetime.now(UTC)
    current = _in_force(found.entries, now)
    redirect = next((r for r in reversed(found.redirects) if r.effective_from <= now), None)
    if redirect is not None:
        click.echo(f"in force now: billed as {redirect.to} (redirect, curated layer)")
    elif current is not None:
        click.echo(f"in force now: {current.layer} layer, {current.source or current.origin}")
    for entry in found.entries:
        click.echo("\n".join(_entry_lines(entry)))
    for r in found.redirects:
        note = f" ({r.source})" if r.source else ""
        click.echo(f"from {r.effective_from.isoformat()} billed as {r.to}{note}")
    mults = [(m, "model") for m in found.multipliers]
    mults += [(m, f"provider {found.provider}") for m in book.provider_multipliers(found.provider)]
    for m, scope in sorted(mults, key=lambda pair: pair[0].effective_from):
        note = f" ({m.note})" if m.note else ""
        click.echo(
            f"multiplier x{format_price(m.multiplier)} on {scope} from {m.effective_from.isoformat()}{note}"
        )


@command.command("check")
@_PRICING
def check_command(pricing: tuple[Path, ...]) -> None:
    """Validate the shipped tables and any --pricing files; exit 1 on any problem."""
    try:
        book = PriceBook.load(overrides=list(pricing))
    except PricingError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    problems = book.check()
    if problems:
        click.echo(f"{len(problems)} problem(s) in the price tables:", err=True)
        for p in problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(1)
    extra = f" + {len(pricing)} override(s)" if pricing else ""
    click.echo(f"ok: {len(book.models())} models{extra}, no problems")

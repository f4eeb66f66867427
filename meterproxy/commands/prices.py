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
from meterproxy.prices_update import DEFAULT_URL, fetch, install, installed, plan, stage
from meterproxy.prices_update import base_layers as installed_layers
from meterproxy.prices_update import load_book as load_with_updates
from meterproxy.pricing import ModelInfo, PriceBook, PriceEntry, PricingError, Rates, Redirect, TimeWindow
from meterproxy.pricing_base import parse_base
from meterproxy.pricing_load import DAY_NAMES
from meterproxy.pricing_names import PRICE_LISTS, canonical
from meterproxy.settings import default_prices_dir
from meterproxy.usage import Usage

__all__ = ["command", "format_price", "load_book"]

_PRICING = click.option(
    "--pricing",
    "pricing",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Extra pricing TOML file or directory, as for 'serve --pricing' (repeatable).",
)


_PRICES_DIR = click.option(
    "--prices-dir",
    "prices_dir",
    envvar="METERPROXY_PRICES_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Installed base-price updates, as for 'serve' [default: $XDG_DATA_HOME/meterproxy/prices].",
)


def load_book(pricing: Sequence[Path], prices_dir: Path | None = None) -> PriceBook:
    """The shipped layers, installed updates and `pricing`; an unusable file exits with its message."""
    prices_dir = prices_dir or default_prices_dir()
    try:
        if not pricing and not installed(prices_dir):
            return PriceBook.default()
        return load_with_updates(list(pricing), prices_dir)
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


def _redirect_now(redirects: Sequence[Redirect], now: datetime) -> Redirect | None:
    """The redirect in force at `now` (redirects are sorted), or None."""
    return next((r for r in reversed(redirects) if r.effective_from <= now), None)


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
        same_as = info.same_as
        redirect = _redirect_now(info.redirects, now)
        if redirect is not None:
            # A retired name or a moving alias: the prices of what it is billed as now.
            same_as = redirect.to or "unknown (unpriced)"
            entry = _in_force(book.history(redirect.to, info.provider), now) if redirect.to else None
        rows.append(_row(info.provider, info.id, list(info.aliases), same_as, entry))
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
    row.update(
        _rates_dict(entry.rates) if entry else dict.fromkeys(_rates_dict(Rates(Decimal(0), Decimal(0))))
    )
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
@_PRICES_DIR
def list_command(
    provider: str | None, as_json: bool, pricing: tuple[Path, ...], prices_dir: Path | None
) -> None:
    """Every model with the prices in force now."""
    book = load_book(pricing, prices_dir)
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
@_PRICES_DIR
def show_command(
    model: str, provider: str | None, pricing: tuple[Path, ...], prices_dir: Path | None
) -> None:
    """One model's dated price history, each entry with the layer and source that priced it."""
    book = load_book(pricing, prices_dir)
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
    redirect = _redirect_now(found.redirects, now)
    if redirect is not None and not redirect.to:
        click.echo("in force now: not known what it points at, unpriced (curated layer)")
    elif redirect is not None:
        click.echo(f"in force now: billed as {redirect.to} (redirect, curated layer)")
    elif current is not None:
        click.echo(f"in force now: {current.layer} layer, {current.source or current.origin}")
    for entry in found.entries:
        click.echo("\n".join(_entry_lines(entry)))
    for r in found.redirects:
        note = f" ({r.source})" if r.source else ""
        what = f"billed as {r.to}" if r.to else f"unpriced: {r.unknown}"
        click.echo(f"from {r.effective_from.isoformat()} {what}{note}")
    mults = [(m, "model") for m in found.multipliers]
    mults += [(m, f"provider {found.provider}") for m in book.provider_multipliers(found.provider)]
    for m, scope in sorted(mults, key=lambda pair: pair[0].effective_from):
        note = f" ({m.note})" if m.note else ""
        click.echo(
            f"multiplier x{format_price(m.multiplier)} on {scope} from {m.effective_from.isoformat()}{note}"
        )


# Usages the layer comparison prices: every kind of token, and one over every context threshold.
_CHECK_USAGES = (
    Usage(
        input_tokens=20_000,
        cache_read_tokens=6_000,
        cache_write_tokens=3_000,
        cache_write_1h_tokens=1_000,
        output_tokens=4_000,
        reasoning_tokens=1_500,
    ),
    Usage(input_tokens=1_100_000, cache_read_tokens=50_000, cache_write_tokens=10_000, output_tokens=8_000),
)


@command.command("check")
@_PRICING
@_PRICES_DIR
def check_command(pricing: tuple[Path, ...], prices_dir: Path | None) -> None:
    """Validate every layer; exit 1 on any problem. Also lists where layers disagree.

    A disagreement (a curated or operator model billing differently from the base layer by
    more than 1e-9) is reported, with the model's stated reason, but is not a failure: that
    is what a correction is. Review the list after 'prices update'.
    """
    try:
        book = load_with_updates(list(pricing), prices_dir or default_prices_dir())
    except PricingError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    problems = book.check()
    if problems:
        click.echo(f"{len(problems)} problem(s) in the price tables:", err=True)
        for p in problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(1)
    differ = book.disagreements(_CHECK_USAGES, [datetime.now(UTC)])
    extra = f" + {len(pricing)} override(s)" if pricing else ""
    layers = book.base_layers()
    click.echo(
        f"ok: {len(book.models())} curated models{extra} over {layers[-1][0].model_count()} base models "
        f"({len(layers) - 1} update(s) installed), no problems"
    )
    if differ:
        click.echo(f"{len(differ)} model(s) where a higher layer disagrees with the base by more than 1e-9:")
        for line in differ:
            click.echo(f"  - {line}")


def _change_text(before: PriceEntry | None, after: PriceEntry | None) -> str:
    if before is None or after is None:
        entry = after or before
        return _rates_text(entry.rates) if entry is not None else ""
    parts = []
    for key, old in _rates_dict(before.rates).items():
        new = getattr(after.rates, key)
        if old != new:
            parts.append(f"{key} {format_price(old)} -> {format_price(new)}")
    if before.long_context != after.long_context:
        parts.append("long-context rates")
    if dict(before.tiers) != dict(after.tiers):
        parts.append("tier rates")
    if before.windows != after.windows:
        parts.append("time-of-day windows")
    if (before.web_search, before.requests) != (after.web_search, after.requests):
        parts.append("per-request fees")
    return ", ".join(parts) or "later dated prices"


@command.command("update")
@click.argument("source", required=False, default=DEFAULT_URL)
@_PRICES_DIR
@click.option("--dry-run", is_flag=True, help="Validate and print what would change; install nothing.")
def update_command(source: str, prices_dir: Path | None, dry_run: bool) -> None:
    """Refresh the base layer from a newer genai-prices data file (SOURCE: a path or URL).

    SOURCE defaults to genai-prices' published file; offline machines pass a file. The new
    prices are in force from now on, and only where they differ: requests already made keep
    their prices (and reprice to the same). A running 'serve' with the same prices directory
    picks the update up within prices_reload_interval seconds.
    """
    prices_dir = prices_dir or default_prices_dir()
    try:
        raw, origin = fetch(source)
        data = parse_base(raw, origin)
    except (PricingError, OSError) as exc:
        raise click.ClickException(f"cannot use {source}: {exc}") from exc
    at = datetime.now(UTC)
    planned = plan(data, installed_layers(prices_dir), at)
    skipped = f" ({len(data.skipped)} skipped: not representable exactly)" if data.skipped else ""
    click.echo(f"{origin}: {len(data.providers)} providers, {data.model_count()} models{skipped}")
    for problem in planned.problems:
        click.echo(f"error: {problem}", err=True)
    if planned.problems:
        raise click.ClickException("not installed: the file does not look like a full genai-prices data file")
    for label, changes in (
        ("changed", planned.changed),
        ("added", planned.added),
        ("removed", planned.removed),
    ):
        click.echo(f"{label} {len(changes)}")
        for c in changes:
            click.echo(f"  {c.model}: {_change_text(c.before, c.after)}")
    click.echo(f"unchanged {planned.unchanged}")
    if planned.removed:
        click.echo("(removed models keep the prices of the layer below)")
    if dry_run:
        click.echo("dry run: nothing installed")
        return
    if planned.empty:
        click.echo("nothing changes: not installed")
        return
    staged = stage(raw, prices_dir)
    try:
        target = install(staged, planned, prices_dir)
    finally:
        staged.unlink(missing_ok=True)
    click.echo(
        f"installed {target}: in force from {at.isoformat()} (earlier requests keep their prices); "
        "a running serve with this prices directory picks it up within seconds"
    )

"""``meterproxy reprice --since DATE``: recompute stored costs with the current tables.

Thin wrapper around `meterproxy.reprice.reprice`: resolves the database and
the pricing overrides the way ``serve`` does (``--db``/``METERPROXY_DB``,
``--config``, ``--pricing``), then prints what changed: rows scanned and
changed, old and new totals, the difference, and a line per model; rows whose
cost was estimated (``estimate_usage``) are re-estimated apart, on one line of
their own. With
``--dry-run`` nothing is written. Safe to run while the proxy is serving the
same database.
"""

from __future__ import annotations

from pathlib import Path

import click

from meterproxy.api import ParamError, parse_time
from meterproxy.commands.database import announce_db
from meterproxy.money import usd_text
from meterproxy.prices_update import load_book
from meterproxy.pricing import PricingError
from meterproxy.reports import ensure_schema
from meterproxy.reprice import RepriceReport, reprice
from meterproxy.settings import SettingsError, load_settings

__all__ = ["command", "format_report"]


def format_report(report: RepriceReport) -> str:
    lines = [
        f"scanned {report.scanned} rows with reported usage",
        f"changed {report.changed} rows ({report.newly_priced} newly priced, "
        f"{report.now_unpriced} now unpriced)",
        *(
            [f"kept {report.kept_source_cost} imported rows' own costs (--source-costs reprices them)"]
            if report.kept_source_cost
            else []
        ),
        f"old total  {usd_text(report.old_total)} USD",
        f"new total  {usd_text(report.new_total)} USD",
        f"difference {usd_text(report.difference, sign=True)} USD",
    ]
    if report.estimates_scanned:
        # Estimates (estimate_usage) are repriced into their own columns, never into spend.
        lines += [
            f"re-estimated {report.estimates_scanned} rows without usage from meterproxy's token counts, "
            f"changed {report.estimates_changed}: estimated {usd_text(report.old_estimated)} -> "
            f"{usd_text(report.new_estimated)} USD (estimates, not spend)",
        ]
    if report.by_model:
        rows = [
            (model, str(c.rows), usd_text(c.old_usd), usd_text(c.new_usd), usd_text(c.difference, sign=True))
            for model, c in sorted(report.by_model.items(), key=lambda kv: -abs(kv[1].difference))
        ]
        header = ("MODEL", "ROWS", "OLD_USD", "NEW_USD", "DIFFERENCE")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines.append("")
        for r in (header, *rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if report.dry_run:
        lines.append("\ndry run: nothing was written")
    return "\n".join(lines)


@click.command("reprice")
@click.option("--since", required=True, help="First request time to reprice (ISO date or datetime, UTC).")
@click.option("--until", default=None, help="Stop before this time (exclusive) [default: now and later].")
@click.option("--db", default=None, envvar="METERPROXY_DB", help="SQLite file [default: XDG data dir].")
@click.option(
    "--config", "config_file", default=None, type=click.Path(dir_okay=False), help="TOML config file."
)
@click.option("--pricing", "pricing", multiple=True, help="Extra pricing TOML file (repeatable).")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option(
    "--source-costs",
    is_flag=True,
    help="Also reprice imported rows whose cost came from the agent's own log (kept by default).",
)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
def command(
    since: str,
    until: str | None,
    db: str | None,
    config_file: str | None,
    pricing: tuple[str, ...],
    dry_run: bool,
    source_costs: bool,
    batch_size: int,
) -> None:
    """Recompute stored costs (after a price fix) and report what changed."""
    try:
        settings = load_settings(config_file, cli={"db": db, "pricing": list(pricing) or None})
        announce_db(settings.db)
        since_ts = parse_time("--since", since)
        until_ts = parse_time("--until", until)
    except (SettingsError, ParamError) as exc:
        raise click.UsageError(str(exc)) from exc
    assert since_ts is not None
    if not Path(settings.db).exists():
        raise click.ClickException(f"database {settings.db} does not exist")
    try:
        book = load_book([Path(p) for p in settings.pricing], Path(settings.prices_dir))
    except PricingError as exc:
        raise click.ClickException(f"invalid pricing file: {exc}") from exc
    for problem in book.check():
        click.echo(f"warning: {problem}", err=True)
    ensure_schema(settings.db)  # a database last written by an older version lacks newer columns
    try:
        report = reprice(
            settings.db,
            book,
            since=since_ts,
            until=until_ts,
            dry_run=dry_run,
            batch_size=batch_size,
            upstream_prices=settings.upstream_prices,
            source_costs=source_costs,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_report(report))

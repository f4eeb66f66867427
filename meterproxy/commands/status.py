"""``meterproxy status``: one line for a shell prompt or an editor's status bar.

``today 4.1M tok (400K cached) · $1.23 · session $0.04 · budget monthly 62%``:
today's tokens and spend (midnight in ``--tz``), the spend of the current
session (``--session`` or ``$METERPROXY_SESSION``, the value an agent sends as
``X-Meter-Session``), and, when budgets exist, the budget with the worst
outlook (`meterproxy.budgets.outlook`: a projected overrun counts): from a
running proxy's ``/api/budgets`` with ``--url``, else computed from the
database's rows for the budgets in the config file (``--config``) and the
database's budgets table. Colored green / yellow / red on a terminal
(``--color/--no-color`` to force) by the worse of the budget's outlook and the
spend bands the user sets for today's cost (``--bands 5,20`` or
``$METERPROXY_STATUS_BANDS``); plain text otherwise. An unreachable proxy or a
missing database prints the reason and exits 1.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import click

from meterproxy.budgets.outlook import OUTLOOK_RANK, outlook
from meterproxy.commands.database import resolve_db
from meterproxy.commands.report import make_reader, source_options, zone
from meterproxy.reports import Query, compact, money
from meterproxy.settings import load_settings
from meterproxy.store.db import db_errors
from meterproxy.timestamps import format_ts

__all__ = ["band", "command", "db_budgets", "fetch_budgets", "parse_bands", "worst_budget"]

_COLORS = {
    "ok": "green",
    "warning": "yellow",
    "projected-over": "yellow",
    "exceeded": "red",
    "blocking": "red",
}


def fetch_budgets(url: str, token: str | None, timeout: float = 5.0) -> list[dict[str, Any]]:
    request = urllib.request.Request(url.rstrip("/") + "/api/budgets")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read(), parse_float=Decimal)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []  # a proxy without the budgets feature
        raise
    return list(body.get("budgets", []))


def db_budgets(db: str, config_file: str | None) -> list[dict[str, Any]]:
    """Budgets read without a proxy: from the config file and the database's budgets table.

    Spend is computed from the stored rows the way the proxy's budget engine does
    (`meterproxy.budgets`); without that feature installed there are no budgets.
    """
    try:
        from meterproxy.budgets.spend import SpendTracker
        from meterproxy.budgets.store import load_api_budgets, spend_buckets
    except ImportError:  # pragma: no cover - the budgets feature is part of the package
        return []
    from meterproxy.store.backend import connect
    from meterproxy.usage import utcnow

    settings = load_settings(config_file, cli={"db": db})
    conn = connect(db, readonly=True)
    try:
        specs = [(s, "config") for s in settings.budgets] + [(s, "api") for s in load_api_budgets(conn)]
        tracker = SpendTracker(settings.budget_timezone)
        now = utcnow()
        views = []
        for spec, source in specs:
            state = tracker.new_state(spec, source)
            start, _ = state.advance(now)
            tracker.install(state, spend_buckets(conn, spec.scope, start))
            snap = state.snapshot(now)
            crossed = any(snap.spend_usd * 100 >= t * snap.limit_usd for t in spec.thresholds if t < 100)
            status = "exceeded" if snap.exceeded else "warning" if crossed else "ok"
            views.append(
                {
                    "name": spec.name,
                    "percent": snap.percent,
                    "state": status,
                    "limit_usd": snap.limit_usd,
                    "projected_spend_usd": snap.projected_spend_usd,
                }
            )
    finally:
        conn.close()
    return views


def worst_budget(budgets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The budget with the worst outlook (a projected overrun counts), the fullest among equals."""
    if not budgets:
        return None
    return max(budgets, key=lambda b: (OUTLOOK_RANK[outlook(b)], Decimal(str(b.get("percent") or 0))))


def band(spend: Decimal, bands: tuple[Decimal, Decimal] | None) -> str:
    """``ok`` below the first band, ``warning`` below the second, ``exceeded`` from it on."""
    if bands is None:
        return "ok"
    return "ok" if spend < bands[0] else "warning" if spend < bands[1] else "exceeded"


def parse_bands(text: str | None) -> tuple[Decimal, Decimal] | None:
    if not text:
        return None
    try:
        low, high = (Decimal(part.strip().lstrip("$")) for part in text.split(","))
    except (ValueError, ArithmeticError) as exc:
        raise click.BadParameter(
            f"{text!r}: expected two amounts in USD, e.g. 5,20", param_hint="--bands"
        ) from exc
    if not 0 <= low <= high:
        raise click.BadParameter(f"{text!r}: the first amount must be the lower one", param_hint="--bands")
    return low, high


def _totals(db: str | None, url: str | None, token: str | None, query: Query) -> dict[str, Any]:
    return dict(make_reader(db, url, token, query).summary([])["totals"])


def _cost(totals: dict[str, Any]) -> Decimal:
    return Decimal(str(totals.get("cost_usd") or 0))


def _tokens(totals: dict[str, Any]) -> str:
    tokens = int(totals.get("input_tokens") or 0) + int(totals.get("output_tokens") or 0)
    cached = int(totals.get("cache_read_tokens") or 0)
    return f"{compact(tokens)} tok" + (f" ({compact(cached)} cached)" if cached else "")


@click.command("status")
@click.option("--session", envvar="METERPROXY_SESSION", default=None, help="Session id to show spend for.")
@click.option("--color/--no-color", default=None, help="Force color on or off [default: when a tty].")
@click.option(
    "--bands",
    envvar="METERPROXY_STATUS_BANDS",
    default=None,
    help="Spend bands for today's cost, LOW,HIGH in USD: green below LOW, yellow below HIGH, red above.",
)
@click.option(
    "--config", "config_file", default=None, type=click.Path(dir_okay=False), help="Config file (budgets)."
)
@source_options
def command(
    session: str | None,
    color: bool | None,
    bands: str | None,
    config_file: str | None,
    db: str | None,
    url: str | None,
    token: str | None,
    tz: str | None,
) -> None:
    """Print today's tokens and spend, this session's spend and the nearest budget on one line."""
    zone_ = zone(tz)
    limits = parse_bands(bands)
    midnight = datetime.combine(datetime.now(zone_).date(), time(), zone_).astimezone(UTC)
    since = format_ts(midnight)
    if not url:  # a prompt runs this every time: only warnings, said once
        db = resolve_db(db, config_file, quiet=True)
    try:
        today = _totals(db, url, token, Query(since=since, tz=zone_))
        parts = [f"today {_tokens(today)} · {money(_cost(today))}"]
        if session:
            spent = _cost(_totals(db, url, token, Query(tz=zone_, session=session)))
            parts.append(f"session {money(spent)}")
        budgets = fetch_budgets(url, token) if url else db_budgets(resolve_db(db, config_file), config_file)
        worst = worst_budget(budgets)
    except (OSError, urllib.error.URLError) as exc:
        raise click.ClickException(f"cannot read spend: {exc}") from exc
    except db_errors() as exc:
        raise click.ClickException(f"cannot read spend: {exc}") from exc
    level = band(_cost(today), limits)
    if worst is not None:
        heading = outlook(worst)
        note = " (projected to overrun)" if heading == "projected-over" else ""
        parts.append(f"budget {worst['name']} {Decimal(str(worst.get('percent') or 0)):.0f}%{note}")
        level = max(level, heading, key=OUTLOOK_RANK.__getitem__)
    line = " · ".join(parts)
    colored = worst is not None or limits is not None
    click.echo(click.style(line, fg=_COLORS[level]) if colored else line, color=color)

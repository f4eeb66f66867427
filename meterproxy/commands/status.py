"""``meterproxy status``: one line for a shell prompt or an editor's status bar.

``today $1.23 · session $0.04 · budget monthly 62%``: today's spend (midnight
in ``--tz``), the spend of the current session (``--session`` or
``$METERPROXY_SESSION``, the value an agent sends as ``X-Meter-Session``), and,
when budgets exist, the budget closest to its limit: from a running proxy's
``/api/budgets`` with ``--url``, else computed from the database's rows for the
budgets in the config file (``--config``) and the database's budgets table.
Colored green / yellow / red by the worst budget state when printing to a
terminal (``--color/--no-color`` to force); plain text otherwise. An
unreachable proxy or a missing database prints the reason and exits 1.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import click

from meterproxy.commands.imports import resolve_db
from meterproxy.commands.report import make_reader, source_options, zone
from meterproxy.reports import Query, money
from meterproxy.settings import load_settings
from meterproxy.timestamps import format_ts

__all__ = ["command", "db_budgets", "fetch_budgets", "worst_budget"]

_COLORS = {"ok": "green", "warning": "yellow", "exceeded": "red", "blocking": "red"}
_RANK = {"ok": 0, "warning": 1, "exceeded": 2, "blocking": 2}


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
            views.append({"name": spec.name, "percent": snap.percent, "state": status})
    finally:
        conn.close()
    return views


def worst_budget(budgets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The budget in the worst state, the fullest among equals."""
    scored = [b for b in budgets if b.get("state") in _RANK]
    if not scored:
        return None
    return max(scored, key=lambda b: (_RANK[b["state"]], Decimal(str(b.get("percent") or 0))))


def _spend(db: str | None, url: str | None, token: str | None, query: Query) -> Decimal:
    totals = make_reader(db, url, token, query).summary([])["totals"]
    return Decimal(str(totals.get("cost_usd") or 0))


@click.command("status")
@click.option("--session", envvar="METERPROXY_SESSION", default=None, help="Session id to show spend for.")
@click.option("--color/--no-color", default=None, help="Force color on or off [default: when a tty].")
@click.option(
    "--config", "config_file", default=None, type=click.Path(dir_okay=False), help="Config file (budgets)."
)
@source_options
def command(
    session: str | None,
    color: bool | None,
    config_file: str | None,
    db: str | None,
    url: str | None,
    token: str | None,
    tz: str | None,
) -> None:
    """Print today's and this session's spend on one line, colored by budget state."""
    zone_ = zone(tz)
    midnight = datetime.combine(datetime.now(zone_).date(), time(), zone_).astimezone(UTC)
    since = format_ts(midnight)
    try:
        parts = [f"today {money(_spend(db, url, token, Query(since=since, tz=zone_)))}"]
        if session:
            spent = _spend(db, url, token, Query(tz=zone_, session=session))
            parts.append(f"session {money(spent)}")
        budgets = fetch_budgets(url, token) if url else db_budgets(resolve_db(db, config_file), config_file)
        worst = worst_budget(budgets)
    except (OSError, urllib.error.URLError, sqlite3.Error) as exc:
        raise click.ClickException(f"cannot read spend: {exc}") from exc
    style: dict[str, Any] = {}
    if worst is not None:
        parts.append(f"budget {worst['name']} {Decimal(str(worst.get('percent') or 0)):.0f}%")
        style = {"fg": _COLORS[worst["state"]]}
    line = " · ".join(parts)
    click.echo(click.style(line, **style) if style else line, color=color)

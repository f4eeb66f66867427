"""``meterproxy status``: one line for a shell prompt or an editor's status bar.

``today $1.23 · session $0.04 · budget monthly 62%``: today's spend (midnight
in ``--tz``), the spend of the current session (``--session`` or
``$METERPROXY_SESSION``, the value an agent sends as ``X-Meter-Session``), and,
when budgets exist (read from a running proxy's ``/api/budgets`` with
``--url``), the budget closest to its limit. Colored green / yellow / red by the
worst budget state when printing to a terminal (``--color/--no-color`` to
force); plain text otherwise. Never fails a prompt: an unreachable proxy or a
missing database prints ``meterproxy: …`` and exits 1.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import click

from meterproxy.commands.report import make_reader, source_options, zone
from meterproxy.reports import Query, money

__all__ = ["command", "fetch_budgets", "worst_budget"]

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
@source_options
def command(
    session: str | None,
    color: bool | None,
    db: str | None,
    url: str | None,
    token: str | None,
    tz: str | None,
) -> None:
    """Print today's and this session's spend on one line, colored by budget state."""
    zone_ = zone(tz)
    midnight = datetime.combine(datetime.now(zone_).date(), time(), zone_).astimezone(UTC)
    since = midnight.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        parts = [f"today {money(_spend(db, url, token, Query(since=since, tz=zone_)))}"]
        if session:
            spent = _spend(db, url, token, Query(tz=zone_, session=session))
            parts.append(f"session {money(spent)}")
        worst = worst_budget(fetch_budgets(url, token)) if url else None
    except (OSError, urllib.error.URLError) as exc:
        raise click.ClickException(f"cannot read spend: {exc}") from exc
    style: dict[str, Any] = {}
    if worst is not None:
        parts.append(f"budget {worst['name']} {Decimal(str(worst.get('percent') or 0)):.0f}%")
        style = {"fg": _COLORS[worst["state"]]}
    line = " · ".join(parts)
    click.echo(click.style(line, **style) if style else line, color=color)

"""``meterproxy budgets list|add|rm``: manage budgets in the database or on a running proxy.

Two targets:

- ``--url http://127.0.0.1:8787`` (with ``--token`` or ``METERPROXY_ADMIN_TOKEN``):
  the running proxy's ``/api/budgets``; changes apply at once.
- otherwise the SQLite file (``--db``, ``METERPROXY_DB`` or the default path):
  the ``budgets`` table is written directly and a running proxy on that file
  picks the change up within ``budget_check_interval`` seconds. ``list`` computes
  spend from the stored rows, the same way the proxy does.

Budgets from a config file are listed with ``--config`` and are changed by
editing that file, not here.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from decimal import Decimal
from typing import Any

import click
from pydantic import ValidationError

from meterproxy.budgets.definition import BudgetSpec
from meterproxy.budgets.outlook import OUTLOOK_TEXT, outlook, scope_text
from meterproxy.commands.database import resolve_db
from meterproxy.exact_json import dumps
from meterproxy.reports import money

__all__ = ["command", "render_budgets"]


class _Amount(click.ParamType[Decimal]):
    """A decimal amount (USD, percent) with a message a person can act on, not a parser's."""

    name = "amount"

    def __init__(self, what: str) -> None:
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            amount = Decimal(str(value).strip().lstrip("$"))
        except ArithmeticError:
            amount = None
        if amount is None or not amount.is_finite() or amount <= 0:
            self.fail(f"{value!r} is not {self.what} (a positive number, e.g. 100 or 12.50)", param, ctx)
        return amount


#: BudgetSpec field -> the option that sets it, to name it in error messages.
_OPTION_OF = {
    "limit_usd": "--limit",
    "period": "--period",
    "timezone": "--timezone",
    "thresholds": "--threshold",
    "action": "--action",
    "webhooks": "--webhook",
    "name": "NAME",
    "scope": "the scope options",
}


def _explain(exc: ValidationError) -> str:
    """Pydantic's errors as ``--option: what is wrong`` lines (no type codes, no URLs)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        option = _OPTION_OF.get(loc[0], "--" + loc[-1]) if loc else "budget"
        if loc[:1] == ["scope"] and len(loc) > 1:
            option = "--tag" if loc[1] == "tags" else "--" + loc[1]
        message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{option}: {message}")
    return "; ".join(lines)


def _api(url: str, token: str | None, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body, default=str).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:
            message = str(exc)
        raise click.ClickException(f"{method} {path}: {exc.code} {message}") from exc
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc.reason}") from exc
    return json.loads(raw, parse_float=Decimal) if raw else None


def _db_path(db: str | None) -> str:
    return resolve_db(db)


def _db_views(db: str, config_file: str | None) -> list[dict[str, Any]]:
    from meterproxy.budgets.spend import SpendTracker
    from meterproxy.budgets.store import load_api_budgets, spend_buckets
    from meterproxy.settings import SettingsError, load_settings
    from meterproxy.store.backend import connect, parse_db
    from meterproxy.usage import utcnow

    specs: list[tuple[BudgetSpec, str]] = []
    timezone = "UTC"
    if config_file:
        try:
            settings = load_settings(config_file, cli={"db": db})
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from exc
        specs += [(s, "config") for s in settings.budgets]
        timezone = settings.budget_timezone
    url = parse_db(db)
    if not url.is_postgres and not os.path.exists(url.target):
        raise click.ClickException(f"no database at {db}")
    conn = connect(db, readonly=True)
    try:
        specs += [(s, "api") for s in load_api_budgets(conn)]
        tracker = SpendTracker(timezone)
        now = utcnow()
        views = []
        for spec, source in specs:
            state = tracker.new_state(spec, source)
            start, _ = state.advance(now)
            tracker.install(state, spend_buckets(conn, spec.scope, start))
            snap = state.snapshot(now)
            crossed = any(snap.spend_usd * 100 >= t * snap.limit_usd for t in spec.thresholds if t < 100)
            if snap.exceeded:
                state_name = "blocking" if spec.action == "block" else "exceeded"
            else:
                state_name = "warning" if crossed else "ok"
            views.append(
                {
                    "name": spec.name,
                    "source": source,
                    "scope": spec.scope.describe(),
                    "period": spec.period,
                    "action": spec.action,
                    "state": state_name,
                    **snap.as_dict(),
                }
            )
    finally:
        conn.close()
    return views


def _write_db(db: str, fn: Any) -> Any:
    from meterproxy.store.backend import apply_migrations, connect

    conn = connect(db)
    try:
        apply_migrations(conn)
        with conn.transaction():
            return fn(conn)
    finally:
        conn.close()


def _target_options(fn: Any) -> Any:
    fn = click.option("--token", envvar="METERPROXY_ADMIN_TOKEN", help="Admin token for --url.")(fn)
    fn = click.option("--url", default=None, help="A running proxy, e.g. http://127.0.0.1:8787.")(fn)
    fn = click.option(
        "--db",
        default=None,
        envvar="METERPROXY_DB",
        help="SQLite file (default: METERPROXY_DB or XDG data dir).",
    )(fn)
    return fn


@click.group("budgets")
def command() -> None:
    """List, add and remove spend budgets."""


@command.command("list")
@_target_options
@click.option("--config", "config_file", default=None, help="Also list this config file's budgets.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(
    db: str | None, url: str | None, token: str | None, config_file: str | None, as_json: bool
) -> None:
    """Budgets with their spend, limit and percent for the current period."""
    if url:
        views = _api(url, token, "GET", "/api/budgets")["budgets"]
    else:
        views = _db_views(_db_path(db), config_file)
    if as_json:
        click.echo(dumps(views))
        return
    if not views:
        click.echo("no budgets")
        return
    click.echo(render_budgets(views))


def render_budgets(views: list[dict[str, Any]]) -> str:
    """One aligned line per budget: spend in cents, scope and action in words, the outlook last."""
    head = ["Budget", "Scope", "Period", "Action", "Spend", "Limit", "Used", "Projected", "Outlook"]
    rows = [head]
    for v in views:
        projected = v.get("projected_spend_usd")
        rows.append(
            [
                str(v["name"]),
                scope_text(v.get("scope")),
                str(v["period"]),
                str(v.get("action") or "alert"),
                money(Decimal(str(v["spend_usd"]))),
                money(Decimal(str(v["limit_usd"]))),
                f"{Decimal(str(v['percent'])):.0f}%",
                money(Decimal(str(projected))) if projected is not None else "–",
                OUTLOOK_TEXT[outlook(v)],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {4, 5, 6, 7}
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


@command.command("add")
@click.argument("name")
@click.option(
    "--limit",
    "limit_usd",
    required=True,
    type=_Amount("an amount in USD"),
    help="Limit in USD, e.g. 100 or 12.50.",
)
@click.option("--period", default="month", show_default=True, help="day, week, month or rolling:<dur>.")
@click.option("--timezone", default=None, help="IANA timezone for calendar periods.")
@click.option("--upstream", default=None, help="Scope: route prefix.")
@click.option("--provider", default=None, help="Scope: openai, anthropic or gemini.")
@click.option("--model", default=None, help="Scope: model id.")
@click.option("--user", default=None, help="Scope: user.")
@click.option("--key", default=None, help="Scope: API key fingerprint.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Scope: tag (repeatable).")
@click.option(
    "--threshold", "thresholds", multiple=True, type=_Amount("a percentage"), help="Alert at this percent."
)
@click.option(
    "--action", type=click.Choice(["alert", "block", "reserve"]), default="alert", show_default=True
)
@click.option(
    "--unpriced",
    type=click.Choice(["refuse", "reserve", "allow"]),
    default=None,
    help="reserve: a request without a price is refused (default), holds --unpriced-reserve, or is allowed.",
)
@click.option(
    "--unpriced-reserve",
    "unpriced_reserve_usd",
    type=_Amount("an amount in USD"),
    default=None,
    help="With --unpriced reserve: USD held for each unpriced request.",
)
@click.option("--projected", is_flag=True, help="Alert when the projection exceeds the limit.")
@click.option("--webhook", "webhooks", multiple=True, help="Endpoint name to alert (repeatable).")
@_target_options
def add_command(name: str, db: str | None, url: str | None, token: str | None, **fields: Any) -> None:
    """Add a budget."""
    from meterproxy.budgets.store import save_budget
    from meterproxy.usage import utcnow

    scope = {k: fields.pop(k) for k in ("upstream", "provider", "model", "user", "key")}
    scope = {k: v for k, v in scope.items() if v is not None}
    tags = {}
    for item in fields.pop("tags"):
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value.strip()
    if tags:
        scope["tags"] = tags
    body: dict[str, Any] = {"name": name, "scope": scope, **{k: v for k, v in fields.items() if v}}
    for key in ("thresholds", "webhooks"):
        if key in body:
            body[key] = list(body[key])
    if body.get("action") == "alert" and not fields.get("projected"):
        body.pop("projected", None)
    try:
        spec = BudgetSpec.model_validate(body)
    except ValidationError as exc:
        raise click.UsageError(_explain(exc)) from None
    if url:
        _api(url, token, "POST", "/api/budgets", json.loads(spec.model_dump_json(exclude_none=True)))
    else:
        created = _write_db(_db_path(db), lambda conn: save_budget(conn, spec, utcnow(), create=True))
        if not created:
            raise click.ClickException(f"a budget named {name!r} already exists")
    click.echo(f"added budget {name}")


@command.command("rm")
@click.argument("name")
@_target_options
def rm_command(name: str, db: str | None, url: str | None, token: str | None) -> None:
    """Remove a budget (its past events stay in the database)."""
    from meterproxy.budgets.store import delete_budget

    if url:
        _api(url, token, "DELETE", f"/api/budgets/{name}")
    elif not _write_db(_db_path(db), lambda conn: delete_budget(conn, name)):
        click.echo(f"no budget named {name!r} in the database", err=True)
        sys.exit(1)
    click.echo(f"removed budget {name}")

"""``meterproxy report [daily|weekly|monthly|session|model]``: spend as a table, CSV or JSON.

Reads the database directly (read-only, safe while the proxy runs) or, with
``--url``, a running proxy's ``/api/summary``. The figures and layout are
`meterproxy.reports`; this module only turns options into a query.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from meterproxy.commands.database import resolve_db
from meterproxy.pricing import PriceBook
from meterproxy.reports import (
    KINDS,
    ApiReader,
    DbReader,
    Query,
    SummaryReader,
    build_report,
    ensure_schema,
    parse_bound,
    render_csv,
    render_json,
    render_table,
)
from meterproxy.store.backend import parse_db
from meterproxy.store.queries import RequestFilter, read_connection
from meterproxy.whatif import what_if, whatif_csv, whatif_json, whatif_table

__all__ = ["command", "existing_db", "make_reader", "source_options", "zone"]

SECOND_DIMENSIONS = ("model", "provider", "upstream", "user", "source", "key")


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or os.environ.get("TZ") or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise click.BadParameter(
            f"{name!r} is not an IANA time zone (e.g. Europe/Paris)", param_hint="--tz"
        ) from exc


def make_reader(db: str | None, url: str | None, token: str | None, query: Query) -> SummaryReader:
    if url:
        return ApiReader(url, query, token)
    return DbReader(existing_db(db), query)


def existing_db(db: str | None) -> str:
    """The database to read; a SQLite file that is not there is a usage error, not a traceback."""
    path = resolve_db(db)
    target = parse_db(path)
    if not target.is_postgres and not Path(target.target).exists():
        raise click.UsageError(f"no database at {path} (start `meterproxy serve`, or pass --db / --url)")
    return path


def source_options(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        [
            click.option("--db", default=None, envvar="METERPROXY_DB", help="SQLite file [default: XDG]."),
            click.option("--url", default=None, envvar="METERPROXY_URL", help="Read a running proxy's API."),
            click.option(
                "--token", default=None, envvar="METERPROXY_ADMIN_TOKEN", help="Admin token for --url."
            ),
            click.option(
                "--tz", default=None, help="IANA time zone for days and dates [default: $TZ or UTC]."
            ),
        ]
    ):
        fn = option(fn)
    return fn


@click.command("report")
@click.argument("kind", type=click.Choice(list(KINDS)), default="daily")
@click.option("--since", default=None, help="First day (YYYY-MM-DD, in --tz) or ISO datetime.")
@click.option("--until", default=None, help="Last day, inclusive (YYYY-MM-DD) or ISO datetime (exclusive).")
@click.option(
    "--group-by",
    "group_by",
    default=None,
    help=f"Split each row by one more dimension ({', '.join(SECOND_DIMENSIONS)} or tag:NAME).",
)
@click.option("--source", default=None, help="Only requests from this source (proxy, claude-code, ...).")
@click.option(
    "--as-model",
    "as_model",
    default=None,
    help="What-if: price the selected traffic as if it had gone to this model (stored token counts).",
)
@click.option("--as-provider", "as_provider", default=None, help="What-if: the price list of --as-model.")
@click.option(
    "--prices",
    "prices",
    type=click.Choice(["dated", "today"]),
    default="dated",
    show_default=True,
    help="What-if: prices in effect at each request's time, or today's.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="session/model: only the N most expensive rows."
)
@click.option(
    "--raw-models", is_flag=True, help="Keep every model name apart (default: grouped by the priced model)."
)
@click.option("--json", "as_json", is_flag=True, help="Stable JSON for scripts (exact figures).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row (exact figures).")
@source_options
def command(
    kind: str,
    since: str | None,
    until: str | None,
    group_by: str | None,
    source: str | None,
    as_model: str | None,
    as_provider: str | None,
    prices: str,
    limit: int | None,
    raw_models: bool,
    as_json: bool,
    as_csv: bool,
    db: str | None,
    url: str | None,
    token: str | None,
    tz: str | None,
) -> None:
    """Print spend per day, week, month, session or model, with totals and cache savings."""
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    if group_by and group_by not in SECOND_DIMENSIONS and not group_by.startswith("tag:"):
        raise click.BadParameter(f"{group_by!r}: use {', '.join(SECOND_DIMENSIONS)} or tag:NAME")
    zone_ = zone(tz)
    try:
        first, last = parse_bound(since, zone_, end=False), parse_bound(until, zone_, end=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if as_model is not None:
        if not as_model.strip():
            raise click.BadParameter("name the model to price the traffic as", param_hint="--as-model")
        _what_if(db, url, as_model, as_provider, prices, first, last, source, as_json, as_csv)
        return
    reader = make_reader(db, url, token, Query(first, last, zone_, source))
    try:
        report = build_report(reader, kind, PriceBook.default(), group_by, limit=limit, raw_models=raw_models)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(
            f"{url} answered {exc.code}: {exc.read().decode(errors='replace')}"
        ) from exc
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc.reason}") from exc
    if as_json:
        click.echo(render_json(report))
    elif as_csv:
        click.echo(render_csv(report), nl=False)
    else:
        click.echo(render_table(report))


def _what_if(
    db: str | None,
    url: str | None,
    as_model: str,
    as_provider: str | None,
    prices: str,
    since: str | None,
    until: str | None,
    source: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    if url:
        raise click.UsageError("--as-model reads the database (--db); over HTTP use GET /api/whatif")
    book = PriceBook.default()
    if book.resolve(as_model, as_provider) is None:
        where = f" in the {as_provider} price list" if as_provider else ""
        raise click.BadParameter(f"{as_model!r} has no price{where} (see `meterproxy prices list`)")
    db = existing_db(db)
    ensure_schema(db)  # a database last written by an older version lacks newer columns
    conn = read_connection(db)
    try:
        result = what_if(
            conn,
            RequestFilter(since=since, until=until, source=source),
            book,
            as_model,
            target_provider=as_provider,
            prices="today" if prices == "today" else "dated",
        )
    finally:
        conn.close()
    if as_json:
        click.echo(whatif_json(result))
    elif as_csv:
        click.echo(whatif_csv(result), nl=False)
    else:
        click.echo(whatif_table(result))

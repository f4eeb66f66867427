"""``GET /api/summary`` and ``GET /api/models/unpriced``: totals and groups over a time range.

Query: ``since``/``until`` (ISO 8601, UTC unless an offset is given; ``until``
exclusive), ``group_by`` (one or two of ``model, provider, upstream, user,
session, key, source, tag:<name>, day, week, month, hour``; comma-separated or
repeated), ``tz`` (IANA zone for calendar buckets, default UTC), ``limit``
(groups returned, default 1000) and the filters of ``/api/requests``
(``session, user, model, provider, upstream, key, source, tag=k:v``).

The numbers come from `meterproxy.store.summary.summarize` (rollups plus raw
rows, one snapshot, integer picodollars). Every parameter is checked before
anything is read: an unknown parameter, a bad ``group_by``, a malformed date or
an unknown zone is a 400 naming the parameter. Parsing helpers here are
shared with the timeseries, sessions and export endpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web
from multidict import MultiMapping

from meterproxy.api import ParamError, api_error, json_response, parse_int
from meterproxy.api.models import measures_to_api
from meterproxy.api.requests import filter_from_query
from meterproxy.app_state import PRICES, READERS
from meterproxy.pricing import PriceBook
from meterproxy.savings import cache_savings
from meterproxy.store.queries import RequestFilter, run_read
from meterproxy.store.summary import (
    GROUPABLE,
    TIME_DIMENSIONS,
    Summary,
    SummaryQuery,
    is_groupable,
    summarize,
)

__all__ = [
    "FILTER_PARAMS",
    "check_known",
    "parse_filter",
    "parse_group_by",
    "parse_tz",
    "priced_models",
    "setup",
    "unpriced_models",
]

FILTER_PARAMS = ("since", "until", "session", "user", "model", "provider", "upstream", "key", "source", "tag")


def check_known(query: MultiMapping[str], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    for name in query:
        if name not in allowed:
            raise ParamError(name, f"unknown parameter (accepted: {', '.join(sorted(allowed))})")


def _check_tag_name(param: str, name: str) -> None:
    # The name goes into a JSON path ('$."name"'), where a double quote cannot be written.
    if '"' in name:
        raise ParamError(param, f"tag name {name!r} cannot contain '\"'")


def parse_filter(query: MultiMapping[str]) -> RequestFilter:
    flt = filter_from_query(query)
    for name in flt.tags:
        _check_tag_name("tag", name)
    if flt.since and flt.until and flt.since >= flt.until:
        raise ParamError("until", "must be later than since")
    return flt


def parse_tz(value: str | None) -> ZoneInfo:
    name = value or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ParamError("tz", f"{name!r} is not an IANA time zone name (e.g. Europe/Paris)") from exc


def parse_group_by(query: MultiMapping[str], param: str = "group_by", most: int = 2) -> list[str]:
    names = [n.strip() for raw in query.getall(param, []) for n in raw.split(",") if n.strip()]
    for name in names:
        if not is_groupable(name):
            raise ParamError(param, f"{name!r} is not a dimension (use {', '.join(GROUPABLE)} or tag:<name>)")
    for name in names:
        if name.startswith("tag:"):
            _check_tag_name(param, name[4:])
    if len(set(names)) != len(names):
        raise ParamError(param, "a dimension is repeated")
    if len(names) > most:
        raise ParamError(param, f"at most {most} dimension{'s' if most > 1 else ''}")
    if sum(n in TIME_DIMENSIONS for n in names) > 1:
        raise ParamError(param, "at most one of hour, day, week, month")
    return names


#: Unpriced models per page (``/api/models/unpriced``), and the most ``/api/summary`` lists.
UNPRICED_PAGE = 100


def unpriced_models(summary: Summary) -> list[dict[str, Any]]:
    """Models with unpriced requests, from a summary grouped by model and provider."""
    return [
        {
            "model": key["model"],
            "provider": key["provider"],
            "unpriced_requests": m["unpriced_requests"],
            "input_tokens": m["input_tokens"],
            "output_tokens": m["output_tokens"],
        }
        for key, m in sorted(summary.groups, key=lambda g: -g[1]["unpriced_requests"])
        if m["unpriced_requests"]
    ]


def priced_models(book: PriceBook, summaries: Iterable[Summary]) -> dict[str, str | None]:
    """Every model name in the summaries' groups -> the price-table id it prices as (None: unknown).

    One model reaches the store under several names (``claude-haiku-4-5`` and
    ``claude-haiku-4-5-20251001``, ``anthropic/claude-sonnet-4`` through a
    router); this map lets a reader group them under the priced model.
    """
    names: dict[str, str | None] = {}
    for summary in summaries:
        for key, _ in summary.groups:
            model = key.get("model")
            if model and model not in names:
                names[model] = book.resolve(model, key.get("provider"))
    return names


def _by_model(q: SummaryQuery, *extra: str) -> SummaryQuery:
    return SummaryQuery(q.filter, ["model", *extra], q.tz)


async def summary_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        check_known(query, (*FILTER_PARAMS, "group_by", "tz", "limit"))
        q = SummaryQuery(parse_filter(query), parse_group_by(query), parse_tz(query.get("tz")))
        limit = parse_int("limit", query.get("limit"), 1000, 1, 100_000)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)

    def read(conn: Any) -> tuple[Summary, Summary, Summary]:
        return (
            summarize(conn, q),
            summarize(conn, _by_model(q, "provider")),
            summarize(conn, _by_model(q, "day")),
        )

    summary, models, days = await run_read(request.app[READERS], read)
    live = request.app.get(PRICES)
    book = live.book if live is not None else PriceBook.default()
    return json_response(
        {
            "since": q.filter.since,
            "until": q.filter.until,
            "tz": str(q.tz),
            "group_by": q.group_by,
            "totals": measures_to_api(summary.totals),
            "groups": [{"key": key, **measures_to_api(m)} for key, m in summary.groups[:limit]],
            "truncated": len(summary.groups) > limit,
            # The first page only: the full, paged list is /api/models/unpriced.
            "unpriced_models": unpriced_models(models)[:UNPRICED_PAGE],
            "priced_models": priced_models(book, [summary, models]),
            "cache_savings_usd": cache_savings(book, days.groups).saved_usd,
            "notes": summary.notes,
        },
        request=request,
    )


async def unpriced_handler(request: web.Request) -> web.Response:
    """Paged (``limit`` 1..1000, default 100; ``offset``): model names are client-chosen, so unbounded."""
    query = request.query
    try:
        check_known(query, (*FILTER_PARAMS, "limit", "offset"))
        q = SummaryQuery(parse_filter(query), ["model", "provider"])
        limit = parse_int("limit", query.get("limit"), UNPRICED_PAGE, 1, 1000)
        offset = parse_int("offset", query.get("offset"), 0, 0, 10**9)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    summary = await run_read(request.app[READERS], lambda conn: summarize(conn, q))
    models = unpriced_models(summary)
    page = models[offset : offset + limit]
    more = offset + len(page) < len(models)
    return json_response(
        {
            "since": q.filter.since,
            "until": q.filter.until,
            "models": page,
            "total": len(models),
            "next_offset": offset + len(page) if more else None,
        },
        request=request,
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/summary", summary_handler)
    app.router.add_get("/api/models/unpriced", unpriced_handler)

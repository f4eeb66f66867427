"""``GET /api/timeseries``: totals per calendar bucket, for burn-rate charts.

Query: ``bucket`` (``hour``, ``day``, ``week`` or ``month``; required),
``split`` (optional: one non-time dimension, e.g. ``model``, giving one series
per value), ``since``/``until`` (defaults: ``until`` = now, ``since`` = one
day, 30 days, 26 weeks or 12 months before it), ``tz``, ``limit`` (most
series, by cost; default 20) and the usual filters.

It is a summary grouped by ``(bucket[, split])`` (same engine, same exact
sums), reshaped into series whose points cover EVERY bucket of the range,
empty ones as zeros, so a chart needs no gap handling. Ranges that would give
more than `MAX_POINTS` buckets are refused with a 400.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from meterproxy.api import ParamError, api_error, json_response, parse_int
from meterproxy.api.models import measures_to_api
from meterproxy.api.summary import (
    FILTER_PARAMS,
    check_known,
    parse_filter,
    parse_group_by,
    parse_tz,
    priced_models,
)
from meterproxy.app_state import PRICES, READERS
from meterproxy.pricing import PriceBook
from meterproxy.store.queries import run_read
from meterproxy.store.summary import (
    MEASURE_NAMES,
    TIME_DIMENSIONS,
    SummaryQuery,
    bucket_label,
    bucket_start,
    summarize,
)
from meterproxy.timestamps import format_ts, parse_ts

__all__ = ["MAX_POINTS", "setup"]

MAX_POINTS = 5000
_DEFAULT_SPAN = {
    "hour": timedelta(days=1),
    "day": timedelta(days=30),
    "week": timedelta(weeks=26),
    "month": timedelta(days=365),
}


def _bucket_labels(since: str, until: str, kind: str, tz: Any) -> list[str]:
    """Every bucket label in ``[since, until)``, in order (stepping by UTC hour)."""
    start = parse_ts(since).replace(minute=0, second=0, microsecond=0)
    end = parse_ts(until)
    hours = (end - start) // timedelta(hours=1) + 1
    if hours > MAX_POINTS * (1 if kind == "hour" else 24 * 31):
        raise ParamError("since", f"too many {kind} buckets in this range (at most {MAX_POINTS})")
    labels: dict[str, None] = {}
    at = start
    while at < end:
        labels[bucket_label(at.strftime("%Y-%m-%dT%H"), kind, tz)] = None
        at += timedelta(hours=1)
    if len(labels) > MAX_POINTS:
        raise ParamError("since", f"too many {kind} buckets in this range (at most {MAX_POINTS})")
    return list(labels)


async def timeseries_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        check_known(query, (*FILTER_PARAMS, "bucket", "split", "tz", "limit"))
        kind = query.get("bucket", "")
        if kind not in TIME_DIMENSIONS:
            raise ParamError("bucket", f"{kind!r}: use one of {', '.join(TIME_DIMENSIONS)}")
        split = parse_group_by(query, "split", most=1)
        if split and split[0] in TIME_DIMENSIONS:
            raise ParamError("split", "split by a non-time dimension (the bucket is already time)")
        tz = parse_tz(query.get("tz"))
        limit = parse_int("limit", query.get("limit"), 20, 1, 1000)
        flt = parse_filter(query)
        if flt.until is None:
            flt.until = format_ts(datetime.now(UTC))
        if flt.since is None:
            flt.since = format_ts(parse_ts(flt.until) - _DEFAULT_SPAN[kind])
        if flt.since >= flt.until:
            raise ParamError("since", "must be earlier than until")
        labels = _bucket_labels(flt.since, flt.until, kind, tz)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    q = SummaryQuery(flt, [kind, *split], tz)
    summary = await run_read(request.app[READERS], lambda conn: summarize(conn, q))

    series: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, measures in summary.groups:
        skey = tuple(key[s] for s in split)
        entry = series.setdefault(skey, {"key": {s: key[s] for s in split}, "by": {}, "sum": {}})
        entry["by"][key[kind]] = measures
        for name, value in measures.items():
            entry["sum"][name] = entry["sum"].get(name, 0) + value
    if not split and not series:
        series[()] = {"key": {}, "by": {}, "sum": {}}
    ranked = sorted(
        series.values(), key=lambda e: (-e["sum"].get("cost_pico", 0), -e["sum"].get("requests", 0))
    )
    # A zone with a non-whole-hour offset can put data in a bucket the hourly walk skipped.
    seen = {label for e in series.values() for label in e["by"]}
    labels = sorted(set(labels) | seen, key=lambda lb: bucket_start(lb, kind, tz))
    zero = dict.fromkeys(MEASURE_NAMES, 0)
    starts = {label: bucket_start(label, kind, tz).isoformat() for label in labels}
    out = [
        {
            "key": e["key"],
            "totals": measures_to_api({**zero, **e["sum"]}),
            "points": [{"t": starts[lb], **measures_to_api(e["by"].get(lb, zero))} for lb in labels],
        }
        for e in ranked[:limit]
    ]
    return json_response(
        {
            "bucket": kind,
            "tz": str(tz),
            "since": flt.since,
            "until": flt.until,
            "split": split[0] if split else None,
            "series": out,
            "truncated": len(ranked) > limit,
            "priced_models": priced_models(_book(request.app), [summary]),
            "notes": summary.notes,
        },
        request=request,
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/timeseries", timeseries_handler)


def _book(app: web.Application) -> PriceBook:
    live = app.get(PRICES)
    return live.book if live is not None else PriceBook.default()

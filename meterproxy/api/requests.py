"""``GET /api/requests``: stored requests, newest first (keyset pages) or sorted (offset pages).

Query: ``limit`` (1..1000, default 100), ``cursor`` (from the previous page's
``next_cursor``), ``sort`` (``time`` default, ``cost``, ``tokens``,
``latency``: the whole range is sorted by the server, so ``sort=cost`` is the
most expensive requests of the range) with ``order`` (``desc`` default or
``asc``) and ``offset``; a sort other than ``time`` answers ``total`` and
``next_offset`` instead of a cursor. Filters ``session``, ``user``, ``model``, ``provider``,
``upstream``, ``key`` (fingerprint), ``source``, ``tag=k:v`` (repeatable), and
``since``/``until`` (ISO 8601, UTC when no offset is given; ``until`` is
exclusive). A filter value ending in ``*`` matches by prefix (``model=gpt-4o*``).

Each row carries ``cost_difference_usd``: ``provider_cost_usd - cost_usd`` when the
provider reported its own cost (OpenRouter's ``usage.cost``) and we priced the
request, else null; a non-zero value means our table and their bill disagree.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import MultiMapping

from meterproxy.api import ParamError, api_error, json_response, parse_int, parse_time
from meterproxy.app_state import READERS
from meterproxy.store.queries import REQUEST_SORTS, RequestFilter, count_requests, list_requests, run_read

__all__ = ["filter_from_query", "setup"]


def filter_from_query(query: MultiMapping[str]) -> RequestFilter:
    tags: dict[str, str] = {}
    for raw in query.getall("tag", []):
        key, sep, value = raw.partition(":")
        if not sep or not key:
            raise ParamError("tag", f"{raw!r}: expected tag=KEY:VALUE")
        tags[key] = value
    return RequestFilter(
        since=parse_time("since", query.get("since")),
        until=parse_time("until", query.get("until")),
        session=query.get("session"),
        user=query.get("user"),
        model=query.get("model"),
        provider=query.get("provider"),
        upstream=query.get("upstream"),
        key=query.get("key"),
        source=query.get("source"),
        tags=tags,
    )


async def list_requests_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = parse_int("limit", query.get("limit"), 100, 1, 1000)
        flt = filter_from_query(query)
        cursor = query.get("cursor") or None
        sort = query.get("sort") or "time"
        if sort not in REQUEST_SORTS:
            raise ParamError("sort", f"{sort!r}: use one of {', '.join(REQUEST_SORTS)}")
        order = query.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise ParamError("order", f"{order!r}: use asc or desc")
        offset = parse_int("offset", query.get("offset"), 0, 0, 10**9)
        if sort == "time" and order == "desc":
            rows, next_cursor = await run_read(
                request.app[READERS], lambda conn: list_requests(conn, flt, limit, cursor)
            )
            return json_response({"requests": rows, "next_cursor": next_cursor}, request=request)

        def read(conn: Any) -> tuple[list[dict[str, Any]], int]:
            page, _ = list_requests(conn, flt, limit, None, sort, order == "desc", offset)
            return page, count_requests(conn, flt)

        rows, total = await run_read(request.app[READERS], read)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    except ValueError as exc:  # bad cursor
        return api_error(400, "bad_parameter", f"cursor: {exc}", "cursor")
    more = offset + len(rows) < total
    body = {
        "requests": rows,
        "next_cursor": None,
        "total": total,
        "next_offset": offset + len(rows) if more else None,
    }
    return json_response(body, request=request)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/requests", list_requests_handler)

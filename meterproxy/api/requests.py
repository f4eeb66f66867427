"""``GET /api/requests``: stored requests, newest first, keyset-paginated.

Query: ``limit`` (1..1000, default 100), ``cursor`` (from the previous page's
``next_cursor``), filters ``session``, ``user``, ``model``, ``provider``,
``upstream``, ``key`` (fingerprint), ``source``, ``tag=k:v`` (repeatable), and
``since``/``until`` (ISO 8601, UTC when no offset is given; ``until`` is
exclusive).

Each row carries ``cost_difference_usd``: ``provider_cost_usd - cost_usd`` when the
provider reported its own cost (OpenRouter's ``usage.cost``) and we priced the
request, else null; a non-zero value means our table and their bill disagree.
"""

from __future__ import annotations

from aiohttp import web
from multidict import MultiMapping

from meterproxy.api import ParamError, api_error, json_response, parse_int, parse_time
from meterproxy.app_state import WRITER
from meterproxy.store.queries import RequestFilter, list_requests, run_read

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
        rows, next_cursor = await run_read(
            request.app[WRITER].path, lambda conn: list_requests(conn, flt, limit, cursor)
        )
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    except ValueError as exc:  # bad cursor
        return api_error(400, "bad_parameter", f"cursor: {exc}", "cursor")
    return json_response({"requests": rows, "next_cursor": next_cursor})


def setup(app: web.Application) -> None:
    app.router.add_get("/api/requests", list_requests_handler)

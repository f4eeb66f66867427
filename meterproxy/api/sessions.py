"""``GET /api/sessions`` (one line per session, paginated, sortable) and ``GET /api/sessions/{id}``.

A session is every request with the same ``X-Meter-Session``. Sessions are read
from raw rows (rollups do not keep session ids), using the
``(session, ts)`` index; after retention deletes old raw rows, a session's
older requests are no longer listed (its spend still counts in
``/api/summary``).

``/api/sessions`` query: ``sort`` (``last_seen`` default, ``first_seen``,
``cost``, ``requests``, ``tokens``), ``order`` (``desc`` default or ``asc``),
``limit`` (1..1000, default 50), ``offset``, and the usual filters
(``since``/``until`` select the requests counted, so a session's totals are
those inside the range). Offset pagination, because a sortable list has no
stable keyset; ``total`` says how many sessions match.

``/api/sessions/{id}`` returns the session's totals and one page of its
requests, newest first, with the same ``limit``/``cursor`` paging as
``/api/requests``; 404 when no request has that session.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any

from aiohttp import web

from meterproxy.api import ParamError, api_error, json_response, parse_int
from meterproxy.api.models import measures_to_api
from meterproxy.api.summary import FILTER_PARAMS, check_known, parse_filter
from meterproxy.app_state import WRITER
from meterproxy.store.queries import RequestFilter, decode_cursor, list_requests, run_read
from meterproxy.store.rollups import MEASURES

__all__ = ["SORTS", "list_sessions", "session_detail", "setup"]

SORTS = {
    "last_seen": "last_ts",
    "first_seen": "first_ts",
    "cost": "cost_pico",
    "requests": "requests",
    "tokens": "input_tokens + output_tokens",
}

_AGGREGATES = ", ".join(f"{sql} AS {name}" for name, sql in MEASURES.items())


def _where(flt: RequestFilter) -> tuple[str, list[Any]]:
    where, params = flt.where()
    return f"session IS NOT NULL AND {where}", params


def _session_row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "session": row["session"],
        "first_ts": row["first_ts"],
        "last_ts": row["last_ts"],
        "users": sorted(u for u in json.loads(row["users"]) if u is not None),
        "models": sorted(m for m in json.loads(row["models"]) if m is not None),
        **measures_to_api({name: int(row[name] or 0) for name in MEASURES}),
    }


def list_sessions(
    conn: sqlite3.Connection, flt: RequestFilter, sort: str, desc: bool, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    where, params = _where(flt)
    direction = "DESC" if desc else "ASC"
    rows = conn.execute(
        f"SELECT session, min(ts) AS first_ts, max(ts) AS last_ts, json_group_array(DISTINCT user) AS users, "
        f"json_group_array(DISTINCT model) AS models, {_AGGREGATES} FROM requests WHERE {where} "
        f"GROUP BY session ORDER BY {SORTS[sort]} {direction}, session {direction} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    total = conn.execute(f"SELECT count(DISTINCT session) FROM requests WHERE {where}", params).fetchone()[0]
    return [_session_row(r) for r in rows], int(total)


def session_detail(
    conn: sqlite3.Connection, flt: RequestFilter, limit: int, cursor: str | None
) -> dict[str, Any] | None:
    where, params = _where(flt)
    row = conn.execute(
        f"SELECT session, min(ts) AS first_ts, max(ts) AS last_ts, '[]' AS users, '[]' AS models, "
        f"{_AGGREGATES} FROM requests WHERE {where} GROUP BY session",
        params,
    ).fetchone()
    if row is None:
        return None
    requests, next_cursor = list_requests(conn, flt, limit, cursor)
    totals = _session_row(row)
    return {
        "session": totals.pop("session"),
        "first_ts": totals.pop("first_ts"),
        "last_ts": totals.pop("last_ts"),
        "totals": {k: v for k, v in totals.items() if k not in ("users", "models")},
        "requests": requests,
        "next_cursor": next_cursor,
    }


async def sessions_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        check_known(query, (*FILTER_PARAMS, "sort", "order", "limit", "offset"))
        flt = parse_filter(query)
        sort = query.get("sort", "last_seen")
        if sort not in SORTS:
            raise ParamError("sort", f"{sort!r}: use one of {', '.join(SORTS)}")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ParamError("order", f"{order!r}: use asc or desc")
        limit = parse_int("limit", query.get("limit"), 50, 1, 1000)
        offset = parse_int("offset", query.get("offset"), 0, 0, 10**9)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    sessions, total = await run_read(
        request.app[WRITER].path,
        lambda conn: list_sessions(conn, flt, sort, order == "desc", limit, offset),
    )
    more = offset + len(sessions) < total
    return json_response(
        {"sessions": sessions, "total": total, "next_offset": offset + len(sessions) if more else None}
    )


async def session_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        check_known(query, ("since", "until", "limit", "cursor"))
        flt = dataclasses.replace(parse_filter(query), session=request.match_info["id"])
        limit = parse_int("limit", query.get("limit"), 100, 1, 1000)
        cursor = query.get("cursor") or None
        if cursor:
            decode_cursor(cursor)
        detail = await run_read(
            request.app[WRITER].path, lambda conn: session_detail(conn, flt, limit, cursor)
        )
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    except ValueError as exc:  # bad cursor
        return api_error(400, "bad_parameter", f"cursor: {exc}", "cursor")
    if detail is None:
        return api_error(404, "not_found", f"no requests with session {flt.session!r}", "id")
    return json_response(detail)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/sessions", sessions_handler)
    app.router.add_get("/api/sessions/{id}", session_handler)

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
stable keyset; ``total`` says how many sessions match and ``cost_usd`` what
they cost together (both over all pages).

``/api/sessions/{id}`` returns the session's totals, its users, subtotals per
model (``models``), and one page of its requests, newest first, paged by
``limit`` and ``offset`` (``next_offset``) or, as ``/api/requests`` does, by
``cursor`` (``next_cursor``); ``totals.requests`` says how many there are, so a
reader can show "100 of 228"; 404 when no request has that session.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from meterproxy.api import ParamError, api_error, json_response, parse_int
from meterproxy.api.models import measures_to_api
from meterproxy.api.summary import FILTER_PARAMS, check_known, parse_filter
from meterproxy.app_state import READERS
from meterproxy.money import pico_to_usd
from meterproxy.store.db import Db, Params
from meterproxy.store.queries import RequestFilter, decode_cursor, encode_cursor, list_requests, run_read
from meterproxy.store.rollups import MEASURES
from meterproxy.store.sessions import session_facts

__all__ = ["SORTS", "list_sessions", "session_detail", "setup"]


_AGGREGATES = ", ".join(f"{sql} AS {name}" for name, sql in MEASURES.items())


def _where(conn: Db, flt: RequestFilter, p: Params) -> str:
    return f"session IS NOT NULL AND {flt.where(p, conn.dialect)}"


def _measures(row: Any) -> dict[str, Any]:
    return measures_to_api({name: int(row[name] or 0) for name in MEASURES})


#: ``sort`` -> the key of phase one, from columns the ``requests_ts_cover`` index holds.
SORTS = {
    "last_seen": "max(ts)",
    "first_seen": "min(ts)",
    "cost": "COALESCE(sum(cost_pico), 0)",
    "requests": "count(*)",
    # The group's sums, spelled out (an alias inside an expression would name one row's column).
    "tokens": "COALESCE(sum(input_tokens), 0) + COALESCE(sum(output_tokens), 0)",
}


def list_sessions(
    conn: Db, flt: RequestFilter, sort: str, desc: bool, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int, int]:
    """One page of sessions, how many match and what they cost together.

    Two phases. The first groups the whole range by session but reads only
    columns of the ``requests_ts_cover`` index (session, ts, cost, tokens), so it
    never touches the table; ``count(*) OVER ()`` and ``sum(..) OVER ()`` give
    the number of sessions and their cost in the same pass. The second sums
    every measure for the page's sessions only, on the ``(session, ts)`` index.
    A filter on another column (user, model, ...) reads the table in phase one.
    """
    p = Params()
    where = _where(conn, flt, p)
    filter_values = list(p.values)
    direction = "DESC" if desc else "ASC"
    page = conn.execute(
        f"SELECT session, {SORTS[sort]} AS sort_key, count(*) OVER () AS total_sessions, "
        "sum(COALESCE(sum(cost_pico), 0)) OVER () AS all_cost_pico "
        f"FROM requests WHERE {where} GROUP BY session "
        f"ORDER BY sort_key {direction}, session {direction} LIMIT {p(limit)} OFFSET {p(offset)}",
        p.values,
    ).fetchall()
    if page:
        total, all_cost = int(page[0]["total_sessions"]), int(page[0]["all_cost_pico"] or 0)
    elif offset:
        count = f"SELECT count(DISTINCT session) FROM requests WHERE {where}"
        total, all_cost = int(conn.execute(count, filter_values).fetchone()[0]), 0
    else:
        total, all_cost = 0, 0
    names = [r["session"] for r in page]
    measures: dict[str, Any] = {}
    if names:
        q = Params()
        marks = ", ".join(q(name) for name in names)
        rows = conn.execute(
            f"SELECT session, min(ts) AS first_ts, max(ts) AS last_ts, {_AGGREGATES} FROM requests "
            f"WHERE session IN ({marks}) AND {_where(conn, flt, q)} GROUP BY session",
            q.values,
        )
        measures = {r["session"]: r for r in rows}
    facts = session_facts(conn, flt, names)
    out = []
    for name in names:
        r = measures[name]
        out.append(
            {
                "session": name,
                "first_ts": r["first_ts"],
                "last_ts": r["last_ts"],
                "users": sorted(facts[name].users),
                "models": sorted(facts[name].models),
                **_measures(r),
            }
        )
    return out, total, all_cost


def session_detail(
    conn: Db, flt: RequestFilter, limit: int, offset: int = 0, cursor: str | None = None
) -> dict[str, Any] | None:
    """A session's totals, its subtotals per model, and one page of its requests (newest first)."""
    p = Params()
    where = _where(conn, flt, p)
    params = p.values
    row = conn.execute(
        f"SELECT min(ts) AS first_ts, max(ts) AS last_ts, {_AGGREGATES} FROM requests WHERE {where}",
        params,
    ).fetchone()
    if row is None or not row["requests"]:
        return None
    by_model = conn.execute(
        f"SELECT model, {_AGGREGATES} FROM requests WHERE {where} "
        "GROUP BY model ORDER BY cost_pico DESC, model",
        params,
    ).fetchall()
    users = session_facts(conn, flt, [flt.session or ""])[flt.session or ""].users
    if cursor:
        requests, next_cursor = list_requests(conn, flt, limit, cursor)
    else:
        requests, _ = list_requests(conn, flt, limit, None, "time", True, offset)
        next_cursor = None
    totals = _measures(row)
    more = offset + len(requests) < totals["requests"] and not cursor
    if more and requests:
        last = requests[-1]
        next_cursor = encode_cursor(last["ts"], last["id"])
    return {
        "session": flt.session,
        "first_ts": row["first_ts"],
        "last_ts": row["last_ts"],
        "users": sorted(users),
        "totals": totals,
        "models": [{"model": m["model"], **_measures(m)} for m in by_model],
        "requests": requests,
        "offset": offset,
        "next_offset": offset + len(requests) if more else None,
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
    sessions, total, all_cost = await run_read(
        request.app[READERS],
        lambda conn: list_sessions(conn, flt, sort, order == "desc", limit, offset),
    )
    more = offset + len(sessions) < total
    return json_response(
        {
            "sessions": sessions,
            "total": total,
            "cost_usd": pico_to_usd(all_cost),
            "next_offset": offset + len(sessions) if more else None,
        },
        request=request,
    )


async def session_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        check_known(query, ("since", "until", "limit", "offset", "cursor"))
        flt = dataclasses.replace(parse_filter(query), session=request.match_info["id"])
        limit = parse_int("limit", query.get("limit"), 100, 1, 1000)
        offset = parse_int("offset", query.get("offset"), 0, 0, 10**9)
        cursor = query.get("cursor") or None
        if cursor:
            decode_cursor(cursor)
        detail = await run_read(
            request.app[READERS], lambda conn: session_detail(conn, flt, limit, offset, cursor)
        )
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    except ValueError as exc:  # bad cursor
        return api_error(400, "bad_parameter", f"cursor: {exc}", "cursor")
    if detail is None:
        return api_error(404, "not_found", f"no requests with session {flt.session!r}", "id")
    return json_response(detail, request=request)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/sessions", sessions_handler)
    app.router.add_get("/api/sessions/{id}", session_handler)

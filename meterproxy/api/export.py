"""``GET /api/export?format=csv|jsonl``: every matching request row, streamed.

Query: ``format`` (``csv`` default, or ``jsonl``), ``since``/``until`` and the
usual filters. Rows are oldest first, columns as in
`meterproxy.store.export.EXPORT_COLUMNS` (CSV starts with a header row).

The response is a `web.StreamResponse`: a worker thread holds one read-only
connection and one cursor and formats one batch at a time (in SQLite, see
``store/export.py``); the handler writes each batch before asking for the next,
so memory is bounded by one batch and a slow client slows the reading instead
of filling memory. All parameters are validated before the 200 goes out; a
failure after that can only cut the connection (logged), never send a
half-formed error inside the body.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from aiohttp import web

from meterproxy.api import ParamError, api_error
from meterproxy.api.summary import FILTER_PARAMS, check_known, parse_filter
from meterproxy.keys import WRITER
from meterproxy.store.export import FORMATS, csv_header, export_batches
from meterproxy.store.queries import read_connection

__all__ = ["setup"]

log = logging.getLogger(__name__)

_CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}


async def export_handler(request: web.Request) -> web.StreamResponse:
    query = request.query
    try:
        check_known(query, (*FILTER_PARAMS, "format"))
        fmt = query.get("format", "csv")
        if fmt not in FORMATS:
            raise ParamError("format", f"{fmt!r}: use csv or jsonl")
        flt = parse_filter(query)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)

    conn = await asyncio.to_thread(read_connection, request.app[WRITER].path)
    try:
        batches = await asyncio.to_thread(export_batches, conn, flt, fmt)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        response = web.StreamResponse(
            headers={
                "Content-Type": _CONTENT_TYPES[fmt],
                "Content-Disposition": f'attachment; filename="meterproxy-{stamp}.{fmt}"',
            }
        )
        await response.prepare(request)
        if fmt == "csv":
            await response.write(csv_header().encode())
        while (chunk := await asyncio.to_thread(next, batches, None)) is not None:
            await response.write(chunk.encode())
        await response.write_eof()
        return response
    finally:
        await asyncio.to_thread(conn.close)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/export", export_handler)

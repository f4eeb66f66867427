"""``GET /api/export?format=csv|jsonl``: every matching request row, streamed.

Query: ``format`` (``csv`` default, or ``jsonl``), ``since``/``until`` and the
usual filters. Rows are oldest first, columns as in
`meterproxy.store.export.EXPORT_COLUMNS` (CSV starts with a header row).

The response is a `web.StreamResponse`: `SlicedExport` cuts the range into
6-hour slices and two worker threads, each with its own read-only connection,
format alternate slices in batches (in SQLite, see ``store/export.py``) into
small bounded queues; the handler writes the batches in order, so memory is
bounded by a few batches and a slow client slows the reading instead of
filling memory. Each slice is its own query, so the export is a consistent
picture per slice, not one snapshot of the whole range.

All parameters are validated before the 200 goes out; a failure after that can
only cut the connection, never send a half-formed error inside the body.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp import web

from meterproxy.api import ParamError, api_error, run_read
from meterproxy.api.summary import FILTER_PARAMS, check_known, parse_filter
from meterproxy.keys import WRITER
from meterproxy.store.export import FORMATS, SlicedExport, csv_header, time_slices
from meterproxy.store.queries import read_connection

__all__ = ["setup"]

#: Threads formatting rows (alternate 6-hour slices); formatting is CPU-bound, one per core helps.
EXPORT_WORKERS = 2

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

    path = request.app[WRITER].path
    slices = await run_read(path, lambda conn: time_slices(conn, flt.since, flt.until))
    export = SlicedExport(lambda: read_connection(path), flt, fmt, slices, workers=EXPORT_WORKERS)
    try:
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
        while (chunk := await asyncio.to_thread(export.next_chunk)) is not None:
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        # Stop synchronously first: if this handler is being cancelled (the client hung
        # up), the awaited join below may itself be cancelled before it ever runs.
        export.stop()
        await asyncio.to_thread(export.close)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/export", export_handler)

"""``GET /api/export?format=csv|jsonl``: every matching request row, streamed.

Query: ``format`` (``csv`` default, or ``jsonl``), ``since``/``until`` and the
usual filters. Rows are oldest first, columns as in
`meterproxy.store.export.EXPORT_COLUMNS` (CSV starts with a header row).

The response is a `web.StreamResponse`. On SQLite the rows are formatted by a
child process (`meterproxy.store.export_process`): it cuts the range into
slices of a few thousand rows, two worker threads format alternate slices in
SQLite (a whole slice per query, see ``store/export_child.py``) and it writes
them in order to a pipe that this handler copies to the client. Memory is
bounded by a few slices and the pipe, and a slow client slows the reading
instead of filling memory. On PostgreSQL `SlicedExport` does the same in
threads of this process over 1-hour slices, each one string built by the
server (``string_agg``). Each slice is its own query, so
the export is a consistent picture per slice, not one snapshot of the whole range.

All parameters are validated before the 200 goes out; a failure after that can
only cut the connection, never send a half-formed error inside the body.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from aiohttp import web

from meterproxy.api import ParamError, api_error
from meterproxy.api.summary import FILTER_PARAMS, check_known, parse_filter
from meterproxy.app_state import READERS
from meterproxy.store.backend import Readers
from meterproxy.store.export import FORMATS, SlicedExport, csv_header, time_slices
from meterproxy.store.export_process import ExportFailed, ExportProcess
from meterproxy.store.queries import RequestFilter, run_read

__all__ = ["setup"]

#: Threads formatting rows (alternate slices); formatting is CPU-bound, one per core helps.
EXPORT_WORKERS = 2

#: PostgreSQL: each slice comes back as one value (`pg_slice`), so its size bounds memory.
PG_SLICE = timedelta(hours=1)

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

    readers = request.app[READERS]
    if readers.url.is_postgres:
        return await _export_in_threads(request, readers, flt, fmt)
    export = await ExportProcess.start(readers.url.target, flt, fmt, workers=EXPORT_WORKERS)
    try:
        try:
            first = await export.read()  # the child opened the database and formatted a slice
        except ExportFailed as exc:  # still before the 200: say so properly
            return api_error(500, "export_failed", str(exc))
        response = _stream_response(fmt)
        await response.prepare(request)
        await response.write((csv_header().encode() if fmt == "csv" else b"") + first)
        while chunk := await export.read():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        # Kill first (synchronous): if this handler is being cancelled (the client hung
        # up), the awaited wait inside close may itself be cancelled before it ever runs.
        export.kill()
        await export.close()


def _stream_response(fmt: str) -> web.StreamResponse:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return web.StreamResponse(
        headers={
            "Content-Type": _CONTENT_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="meterproxy-{stamp}.{fmt}"',
        }
    )


async def _export_in_threads(
    request: web.Request, readers: Readers, flt: RequestFilter, fmt: str
) -> web.StreamResponse:
    slices = await run_read(readers, lambda conn: time_slices(conn, flt.since, flt.until, PG_SLICE))
    export = SlicedExport(readers.connection, flt, fmt, slices, workers=EXPORT_WORKERS)
    try:
        response = _stream_response(fmt)
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

"""The JSON API (read side): every handler queries the store off the event loop.

Shared pieces live here: the one error shape and parameter parsing that names
the bad parameter. Handlers query through `meterproxy.store.queries.run_read`
(a read-only connection from the app's `READERS`, in a worker thread) and answer with
`json_response`, whose Decimal costs are JSON numbers with their exact digits
(`meterproxy.exact_json`, never through float).

`json_response` given the request answers with an ``ETag`` (a hash of the body)
and ``304 Not Modified`` when the client's ``If-None-Match`` names it: the page
refreshes every 30 s, and an unchanged answer then costs no transfer, no JSON
parse and no redraw in the browser.
"""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web

from meterproxy.exact_json import dumps_bytes
from meterproxy.http_errors import json_error as api_error
from meterproxy.timestamps import format_ts, parse_ts

__all__ = ["ParamError", "api_error", "json_response", "parse_int", "parse_time"]


class ParamError(ValueError):
    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param}: {why}")
        self.param = param
        self.why = why


def json_response(obj: Any, status: int = 200, request: web.Request | None = None) -> web.Response:
    body = dumps_bytes(obj)
    if request is None or status != 200:
        return web.Response(body=body, status=status, content_type="application/json")
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    sent = request.headers.get("If-None-Match", "")
    if etag in (tag.strip() for tag in sent.split(",")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


def parse_time(param: str, value: str | None) -> str | None:
    """ISO 8601 date or datetime (naive = UTC) -> the stored ``ts`` text form."""
    if value is None or value == "":
        return None
    try:
        return format_ts(parse_ts(value))
    except ValueError as exc:
        raise ParamError(param, f"{value!r} is not an ISO 8601 date or datetime") from exc


def parse_int(param: str, value: str | None, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError as exc:
        raise ParamError(param, f"{value!r} is not an integer") from exc
    if not lo <= number <= hi:
        raise ParamError(param, f"must be between {lo} and {hi}")
    return number

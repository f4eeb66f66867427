"""The JSON API (read side): every handler queries the store off the event loop.

Shared pieces live here: the one error shape, parameter parsing that names the
bad parameter, and `run_read` which runs a query function on a fresh read-only
connection in a worker thread. Decimal costs are serialized as JSON numbers
with their exact digits (never through float).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sqlite3
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web

from meterproxy.store.queries import read_connection
from meterproxy.timestamps import format_ts, parse_ts

__all__ = ["ParamError", "api_error", "dumps", "json_response", "parse_int", "parse_time", "run_read"]

T = TypeVar("T")


class ParamError(ValueError):
    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param}: {why}")
        self.param = param
        self.why = why


def api_error(status: int, code: str, message: str, param: str | None = None) -> web.Response:
    error: dict[str, Any] = {"type": "meterproxy_error", "code": code, "message": message}
    if param:
        error["param"] = param
    return web.json_response({"error": error}, status=status)


def _mark_decimals(o: Any, token: str) -> Any:
    if isinstance(o, Decimal):
        return f"{token}{format(o, 'f')}"
    if isinstance(o, dict):
        return {k: _mark_decimals(v, token) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_mark_decimals(v, token) for v in o]
    if isinstance(o, datetime):
        return o.isoformat()
    return o


def dumps(obj: Any) -> str:
    """JSON with Decimals as exact numbers: ``Decimal('0.000123')`` -> ``0.000123``.

    json's encoders print floats with ``float.__repr__`` whatever the subclass, so
    a Decimal cannot pass through as a float without rounding to 17 digits.
    Instead each Decimal goes out as a string carrying a random per-call marker
    (which no other string can contain), and the quoted marker is then replaced
    by the bare digits.
    """
    token = f"\x00{secrets.token_hex(8)}:"
    text = json.dumps(_mark_decimals(obj, token), separators=(",", ":"), default=str)
    escaped = re.escape(json.dumps(token)[1:-1])
    return re.sub(f'"{escaped}(-?[0-9.]+)"', r"\1", text)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(obj), status=status, content_type="application/json")


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


async def run_read(db_path: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    def work() -> T:
        conn = read_connection(db_path)
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(work)

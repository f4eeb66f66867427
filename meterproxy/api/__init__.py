"""The JSON API (read side): every handler queries the store off the event loop.

Shared pieces live here: the one error shape, parameter parsing that names the
bad parameter, and `run_read` which runs a query function on a fresh read-only
connection in a worker thread. Decimal costs are serialized as JSON numbers
with their exact digits (never through float).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web

from meterproxy.store.queries import read_connection

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


class _Encoder(json.JSONEncoder):
    def encode(self, o: Any) -> str:
        return super().encode(o)

    def iterencode(self, o: Any, _one_shot: bool = False) -> Any:
        return super().iterencode(_mark_decimals(o), _one_shot)


class _RawNumber(float):
    """A float subclass whose repr is the exact decimal text (json writes repr for floats)."""

    def __new__(cls, value: Decimal) -> _RawNumber:
        obj = super().__new__(cls, value)
        obj._text = format(value, "f")  # type: ignore[attr-defined]
        return obj

    def __repr__(self) -> str:
        return self._text  # type: ignore[attr-defined,no-any-return]


def _mark_decimals(o: Any) -> Any:
    if isinstance(o, Decimal):
        return _RawNumber(o)
    if isinstance(o, dict):
        return {k: _mark_decimals(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_mark_decimals(v) for v in o]
    if isinstance(o, datetime):
        return o.isoformat()
    return o


def dumps(obj: Any) -> str:
    """JSON with Decimals as exact numbers: ``Decimal('0.000123')`` -> ``0.000123``."""
    return json.dumps(_mark_decimals(obj), separators=(",", ":"), default=str)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(obj), status=status, content_type="application/json")


def parse_time(param: str, value: str | None) -> str | None:
    """ISO 8601 date or datetime (naive = UTC) -> the stored ``ts`` text form."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ParamError(param, f"{value!r} is not an ISO 8601 date or datetime") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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

"""JSON whose Decimals keep their exact digits: ``Decimal('0.000123')`` -> ``0.000123``.

Costs are Decimals and must not pass through a float (17 significant digits,
binary rounding). `orjson.Fragment` (orjson >= 3.9) places already-serialized
JSON in a document, so each Decimal goes out as the bare number text of
``format(d, 'f')`` (a NaN as ``null``); datetimes use orjson's ISO 8601 form, and anything else
orjson cannot encode is written as its ``str()``.

This sits below the API, the budgets and the CLI, which all write it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

__all__ = ["dumps", "dumps_bytes"]


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        # NaN and infinities have no JSON number form; null, as json writes a float NaN.
        return orjson.Fragment(format(obj, "f")) if obj.is_finite() else None
    return str(obj)


def dumps_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (what an HTTP body wants)."""
    return orjson.dumps(obj, default=_default, option=orjson.OPT_NON_STR_KEYS)


def dumps(obj: Any) -> str:
    """Compact JSON text."""
    return dumps_bytes(obj).decode()

"""Export rows as CSV or JSON Lines text, formatted by SQLite itself, in batches.

An export of a month can be millions of rows. Formatting each row in Python
(csv.writer, json.dumps) costs more than reading it, so SQLite builds each
output line in C: for CSV a ``||`` concatenation that quotes every text field
(RFC 4180: ``"`` doubled) and leaves numbers bare; for JSONL ``json_object``,
with the exact cost text spliced in as a JSON number (``json(cost_usd)``), so
costs keep every digit. Python only joins a batch of lines and hands it on.

Columns are `EXPORT_COLUMNS`: the API's request fields, in a fixed order (a
contract for spreadsheets and finance scripts). Internal columns
(``cost_pico``, ``extra``, ``usage_injected``) are not exported; prompt text is
never stored, so never exported. Booleans are ``true``/``false`` in both formats.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from meterproxy.store.queries import API_FIELDS, RequestFilter

__all__ = ["EXPORT_COLUMNS", "FORMATS", "csv_header", "export_batches"]

EXPORT_COLUMNS: list[str] = list(API_FIELDS)
FORMATS = ("csv", "jsonl")

_INTEGER = {
    "status",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "duration_ms",
    "ttfb_ms",
    "upstream_ms",
}
_BOOL = {"streamed", "client_disconnected"}
_NUMBER_TEXT = {"cost_usd", "provider_cost_usd"}  # exact decimal text, a bare number in CSV
_JSON_TEXT = {"tags"}


def _csv_expr(col: str) -> str:
    q = f'"{col}"'
    if col in _BOOL:
        return f"CASE WHEN {q} THEN 'true' ELSE 'false' END"
    if col in _INTEGER or col in _NUMBER_TEXT:
        return f"ifnull({q}, '')"
    return f"ifnull('\"' || replace({q}, '\"', '\"\"') || '\"', '')"


def _json_expr(col: str) -> str:
    q = f'"{col}"'
    if col in _BOOL:
        return f"json(CASE WHEN {q} THEN 'true' ELSE 'false' END)"
    if col in _NUMBER_TEXT or col in _JSON_TEXT:
        return f"json({q})"
    return q


_CSV_LINE = " || ',' || ".join(_csv_expr(c) for c in EXPORT_COLUMNS)
_JSON_LINE = "json_object(" + ", ".join(f"'{c}', {_json_expr(c)}" for c in EXPORT_COLUMNS) + ")"


def csv_header() -> str:
    return ",".join(EXPORT_COLUMNS) + "\r\n"


def export_batches(
    conn: sqlite3.Connection, flt: RequestFilter, fmt: str, batch: int = 20_000
) -> Iterator[str]:
    """Yield the export as text chunks of up to ``batch`` lines, oldest first.

    Rows are read lazily: the generator holds one cursor and fetches one batch
    per step, so memory stays bounded whatever the range.
    """
    line = _CSV_LINE if fmt == "csv" else _JSON_LINE
    end = "\r\n" if fmt == "csv" else "\n"
    where, params = flt.where()
    conn.row_factory = None
    cur = conn.execute(f"SELECT {line} FROM requests WHERE {where} ORDER BY ts, id", params)
    while rows := cur.fetchmany(batch):
        yield end.join([r[0] for r in rows]) + end

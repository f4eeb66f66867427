"""Read side: queries over stored requests, on read-only connections.

Every function here is synchronous and cheap to call from a thread
(``asyncio.to_thread``); the API layer does exactly that, so reads never block
the event loop and never wait behind the writer (WAL lets readers run while it
commits).

Pagination is by keyset on ``(ts, id)``, newest first: a cursor is the last
row's ``ts|id``, so pages stay stable while new rows arrive. Sorting by
anything else (`REQUEST_SORTS`: cost, tokens, latency) pages by offset, since
those orders have no stable keyset.

A filter value ending in ``*`` matches by prefix (``model=gpt-4o*`` finds
``gpt-4o-2024-08-06``): `match_clause` writes it as ``LIKE`` with the
wildcards of the value escaped, which both SQLite and PostgreSQL run as
written (SQLite's ``LIKE`` ignores ASCII case, PostgreSQL's does not).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from meterproxy.store import backend
from meterproxy.store.db import Db, Params
from meterproxy.store.dialect import Dialect
from meterproxy.store.schema import COLUMNS

__all__ = [
    "REQUEST_SORTS",
    "RequestFilter",
    "count_requests",
    "decode_cursor",
    "encode_cursor",
    "list_requests",
    "match_clause",
    "read_connection",
    "row_to_api",
    "run_read",
]

# Columns the API shows, in stored order; internal ones stay inside.
_INTERNAL_COLUMNS = frozenset({"cost_pico", "estimated_cost_pico", "usage_injected", "extra"})
API_FIELDS = [c for c in COLUMNS if c not in _INTERNAL_COLUMNS]
_BOOLS = {"streamed", "client_disconnected"}


#: ``sort`` name -> the SQL it orders by; NULLs (unpriced, no latency) sort as the lowest value.
REQUEST_SORTS = {
    "time": "ts",
    "cost": "COALESCE(cost_pico, -1)",
    "tokens": "input_tokens + output_tokens",
    "latency": "COALESCE(duration_ms, -1)",
}


def match_clause(column: str, value: str, p: Params) -> str:
    """``column = $n``, or a prefix match when `value` ends with ``*`` (see module docstring)."""
    if value.endswith("*"):
        prefix = value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return f"{column} LIKE {p(prefix + '%')} ESCAPE '\\'"
    return f"{column} = {p(value)}"


@dataclass(slots=True)
class RequestFilter:
    since: str | None = None
    until: str | None = None
    session: str | None = None
    user: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream: str | None = None
    key: str | None = None
    source: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def where(self, p: Params, dialect: Dialect) -> str:
        """The condition over ``requests`` (``1 = 1`` for none); ``p`` collects its values."""
        clauses: list[str] = []
        if self.since:
            clauses.append(f"ts >= {p(self.since)}")
        if self.until:
            clauses.append(f"ts < {p(self.until)}")
        for column, value in (
            ("session", self.session),
            ('"user"', self.user),
            ("model", self.model),
            ("provider", self.provider),
            ("upstream", self.upstream),
            ("key_fingerprint", self.key),
            ("source", self.source),
        ):
            if value is not None:
                clauses.append(match_clause(column, value, p))
        for tag, value in self.tags.items():
            clauses.append(f"{dialect.json_text('tags', p, tag)} = {p(value)}")
        return " AND ".join(clauses) or "1 = 1"


def read_connection(path: str | Path) -> Db:
    """A read-only connection of its own, rows by name (`meterproxy.store.backend.read_connection`)."""
    return backend.read_connection(path)


def row_to_api(row: Any) -> dict[str, Any]:
    get = row.__getitem__
    out: dict[str, Any] = {}
    for name in API_FIELDS:
        value = get(name)
        if name in _BOOLS:
            value = bool(value)
        elif name == "tags":
            value = json.loads(value) if value else {}
        elif name in ("cost_usd", "provider_cost_usd", "estimated_cost_usd") and value is not None:
            value = Decimal(value)
        out[name] = value
    # The provider's own figure (OpenRouter usage.cost) minus ours; positive: they billed more.
    theirs, ours = out["provider_cost_usd"], out["cost_usd"]
    out["cost_difference_usd"] = theirs - ours if theirs is not None and ours is not None else None
    return out


def encode_cursor(ts: str, rid: str) -> str:
    return base64.urlsafe_b64encode(f"{ts}|{rid}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, rid = raw.split("|", 1)
    except Exception as exc:
        raise ValueError("cursor is not one this API returned") from exc
    return ts, rid


def count_requests(conn: Db, flt: RequestFilter) -> int:
    p = Params()
    where = flt.where(p, conn.dialect)
    return int(conn.execute(f"SELECT count(*) FROM requests WHERE {where}", p.values).fetchone()[0])


def list_requests(
    conn: Db,
    flt: RequestFilter,
    limit: int = 100,
    cursor: str | None = None,
    sort: str = "time",
    desc: bool = True,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of rows: by time with a keyset `cursor`, or by another `REQUEST_SORTS` key and `offset`."""
    p = Params()
    where = flt.where(p, conn.dialect)
    if sort != "time" or offset or not desc:
        # Two phases: the order is found on the covering ts index (no table read for
        # the range's other rows), then only the page's rows are read whole.
        direction = "DESC" if desc else "ASC"
        ids = [
            r[0]
            for r in conn.execute(
                f"SELECT rowid FROM requests WHERE {where} "
                f"ORDER BY {REQUEST_SORTS[sort]} {direction}, ts {direction}, rowid {direction} "
                f"LIMIT {p(limit)} OFFSET {p(offset)}",
                p.values,
            )
        ]
        if not ids:
            return [], None
        picked = Params()
        marks = ", ".join(picked(i) for i in ids)
        by_rowid = {
            r["page_rowid"]: r
            for r in conn.execute(
                f"SELECT rowid AS page_rowid, * FROM requests WHERE rowid IN ({marks})", picked.values
            )
        }
        return [row_to_api(by_rowid[i]) for i in ids], None
    if cursor:
        ts, rid = decode_cursor(cursor)
        where += f" AND (ts < {p(ts)} OR (ts = {p(ts)} AND id < {p(rid)}))"
    sql = f"SELECT * FROM requests WHERE {where} ORDER BY ts DESC, id DESC LIMIT {p(limit + 1)}"
    rows = conn.execute(sql, p.values).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["ts"], rows[-1]["id"]) if more and rows else None
    return [row_to_api(r) for r in rows], next_cursor


T = TypeVar("T")


async def run_read(readers: backend.Readers, fn: Callable[[Db], T]) -> T:
    """``fn(conn)`` on a read-only connection from ``readers`` (the app's `READERS`), in a worker
    thread (the event loop never waits)."""

    def work() -> T:
        conn = readers.connection()
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(work)

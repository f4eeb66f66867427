"""A SQLite store filled and read back without an app: records in through the real writer, rows out."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from meterproxy.store.writer import StoreWriter
from meterproxy.usage import RequestRecord

__all__ = ["WRONG", "rows_by_id", "store_records", "ts_text"]

#: A "wrong" price table: gpt-4o-mini at ten times its list input price (the bug a reprice fixes).
WRONG = """
provider = "openai"
[[models]]
id = "gpt-4o-mini"
[[models.prices]]
effective_from = 2024-07-18T00:00:00Z
input = 1.5
output = 0.6
"""


def store_records(db: Path, records: list[RequestRecord]) -> None:
    writer = StoreWriter(db)
    writer.start()
    for r in records:
        assert writer.submit(r)
    assert writer.close(timeout=30)


def rows_by_id(db: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM requests")}
    finally:
        conn.close()


def ts_text(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

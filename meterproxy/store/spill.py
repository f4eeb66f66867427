"""Records the writer could not commit at shutdown, saved to a file to import later.

When it fires: `StoreWriter.close` is waiting for the last records and the
database keeps failing (disk full, read-only, locked) past the shutdown
budget. Until then the writer retries; from then on the records would be lost
with the process. Instead each is written as one JSON line (the ``requests``
row, column by column, exactly what the writer would have inserted) to a spill
file, and counted as dropped from the database
(``meterproxy_writer_dropped_records_total``); the log names the file and the
count.

Where: next to the database (``<db>.spill-<UTC time>-<pid>.jsonl``), else in the
system's temporary directory (the database's disk is often the one that is
full). ``meterproxy import spill FILE`` inserts them once the database works
again; rows already present (same id) are skipped, so importing twice, or a
record that was committed after all, never doubles anything.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterproxy.store.db import Db
from meterproxy.store.schema import COLUMNS

__all__ = ["SPILL_MARKER", "insert_spilled", "read_spill", "write_spill"]

log = logging.getLogger(__name__)

#: Key on every spilled line, so an import can tell a spill file from any other JSON lines.
SPILL_MARKER = "meterproxy_spill"


def _candidates(db_path: str) -> list[Path]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{Path(db_path).name or 'meterproxy'}.spill-{stamp}-{os.getpid()}.jsonl"
    places = []
    if db_path and not db_path.startswith(("postgres://", "postgresql://")) and db_path != ":memory:":
        places.append(Path(db_path).parent / name)
    places.append(Path(tempfile.gettempdir()) / name)
    return places


def write_spill(db_path: str, rows: Iterable[tuple[Any, ...]]) -> Path | None:
    """Append ``rows`` (as `record_to_row` makes them) to a spill file; its path (None: nowhere)."""
    lines = [
        json.dumps({SPILL_MARKER: 1, **dict(zip(COLUMNS, row, strict=True))}, separators=(",", ":")) + "\n"
        for row in rows
    ]
    if not lines:
        return None
    for path in _candidates(db_path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
            return path
        except OSError as exc:
            log.error("cannot write the spill file %s: %s", path, exc)
    return None


def read_spill(path: Path) -> Iterator[tuple[Any, ...]]:
    """The rows of a spill file, in COLUMNS order; a line that is not one raises ValueError."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict) or item.get(SPILL_MARKER) != 1 or "id" not in item:
                raise ValueError(f"{path}:{number}: not a meterproxy spill line")
            yield tuple(item.get(column) for column in COLUMNS)


def insert_spilled(db: Db, rows: Iterable[tuple[Any, ...]]) -> tuple[int, int]:
    """Insert spilled rows in one transaction, as one bulk load (`Db.insert_many`: ``COPY`` on
    PostgreSQL); a row whose id or provider request id is stored already is skipped.
    Returns (inserted, already present)."""
    batch = list(rows)
    with db.transaction():
        db.lock_request_order()
        inserted = db.insert_many("requests", COLUMNS, batch)  # no conflict target: any key skips
    return inserted, len(batch) - inserted

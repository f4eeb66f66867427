"""Any JSON-lines usage log -> records, read once or tailed (``meterproxy import jsonl``).

A `LineMapping` says where each record field sits in a line, as a dotted path
(``usage.input_tokens``). ``--format zeroclaw`` is a built-in mapping for
ZeroClaw's cost ledger (``{"session_id", "usage": {"model", "input_tokens",
"output_tokens", "total_tokens", "cost_usd", "timestamp"}}``); ``--format
generic`` takes the paths from ``--map FIELD=PATH`` options.

Reading is a loop over *complete* lines from the stored byte offset
(`read_new`): a partial last line stays in the file until its newline arrives.
Each batch of rows is committed together with the offset after it. Before
reading, the stored state is checked against the file:

- same inode, size >= offset, same first bytes: resume at the offset;
- a different inode: the file was rotated. If the old file is still next to it
  (``costs.jsonl.1``, found by inode) its unread tail is imported first; then
  the new file is read from the start;
- smaller than the offset, or its first bytes changed: truncated or rewritten,
  read from the start (ids are stable, so lines seen before are not doubled).

`follow` repeats `read_new` every ``interval`` seconds until its stop event is
set (Ctrl-C on the command line).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from meterproxy.imports import HEAD_BYTES, FileState, ImportStats, ImportStore, price_imported, stable_id
from meterproxy.pricing import PriceBook
from meterproxy.timestamps import parse_ts
from meterproxy.usage import RequestRecord, Usage

#: An agent's log rarely names the API it called: the one its provider's chat calls use,
#: the endpoint name a proxied row of the same call has.
_ENDPOINT_BY_PROVIDER = {"anthropic": "messages", "gemini": "generate_content", "openai": "chat"}

__all__ = ["FIELDS", "PRESETS", "LineMapping", "follow", "read_new"]

FIELDS = (
    "id",
    "ts",
    "model",
    "provider",
    "session",
    "user",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
)
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")

PRESETS: dict[str, dict[str, str]] = {
    "zeroclaw": {
        "id": "id",
        "session": "session_id",
        "model": "usage.model",
        "ts": "usage.timestamp",
        "input_tokens": "usage.input_tokens",
        "output_tokens": "usage.output_tokens",
        "total_tokens": "usage.total_tokens",
        "cost_usd": "usage.cost_usd",
    },
}

CHUNK = 4 * 1024 * 1024


class LineError(ValueError):
    """A line that cannot become a record."""


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LineError(f"{name} is {value!r}, not a token count")
    return value


def _ts(value: Any) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str):
        try:
            return parse_ts(value)
        except ValueError as exc:
            raise LineError(f"timestamp {value!r} is not ISO 8601 or epoch seconds") from exc
    raise LineError("no timestamp")


@dataclass(slots=True)
class LineMapping:
    source: str
    paths: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str, source: str | None = None, overrides: Mapping[str, str] = {}) -> LineMapping:
        base = dict(PRESETS.get(name, {}))
        base.update(overrides)
        unknown = set(base) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; fields: {', '.join(FIELDS)}")
        if "ts" not in base:
            raise ValueError("the mapping needs a timestamp: --map ts=PATH")
        return cls(source or name, base)

    def parse(self, raw: bytes, book: PriceBook) -> RequestRecord:
        try:
            obj = orjson.loads(raw)
        except ValueError as exc:
            raise LineError("not JSON") from exc
        if not isinstance(obj, dict):
            raise LineError("not a JSON object")
        got = {name: _get(obj, path) for name, path in self.paths.items()}
        counts = {name: _int(name, got.get(name)) for name in (*_TOKENS, "total_tokens")}
        cost = got.get("cost_usd")
        try:
            reported = None if cost is None else Decimal(str(cost))
        except InvalidOperation as exc:
            raise LineError(f"cost_usd {cost!r} is not a number") from exc
        extra: dict[str, Any] = {}
        split = counts["input_tokens"] is not None or counts["output_tokens"] is not None
        if not split and counts["total_tokens"] is not None:
            counts["input_tokens"] = counts["total_tokens"]
            extra["total_only"] = True
        elif not split and reported is None:
            raise LineError("no token counts and no cost")
        usage = Usage(**{name: counts[name] or 0 for name in _TOKENS})
        usage.input_tokens = max(usage.input_tokens, usage.cache_read_tokens + usage.cache_write_tokens)
        line_id = got.get("id")
        key = ("id", str(line_id)) if line_id not in (None, "") else ("line", hashlib.sha256(raw).hexdigest())
        model = got.get("model")
        model = str(model) if model is not None else None
        guessed = book.lookup(model, None)  # the agent's log names no provider: the one its model is on
        provider = str(got.get("provider") or "") or (guessed.provider if guessed is not None else "")
        record = RequestRecord(
            id=stable_id(self.source, *key),
            ts=_ts(got.get("ts")),
            source=self.source,
            upstream=self.source,
            provider=provider,
            endpoint=str(got.get("endpoint") or "") or _ENDPOINT_BY_PROVIDER.get(provider, "chat"),
            requested_model=model,
            model=model,
            status=200,
            usage=usage,
            usage_source="reported",
            session=_str(got.get("session")),
            user=_str(got.get("user")),
            extra=extra,
        )
        price_imported(book, record, reported)
        return record


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _head(path: Path, length: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(min(length, HEAD_BYTES))).hexdigest()


def _read_from(
    store: ImportStore,
    book: PriceBook,
    path: Path,
    offset: int,
    mapping: LineMapping,
    stats: ImportStats,
    save_as: str | None,
    on_bytes: Callable[[int], None],
) -> int:
    """Import complete lines of `path` from `offset`; returns the offset reached."""
    with open(path, "rb") as fh:
        ino = os.fstat(fh.fileno()).st_ino
        fh.seek(offset)
        buffer = b""
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                return offset
            buffer += chunk
            end = buffer.rfind(b"\n") + 1
            if end == 0:
                continue  # one very long line: keep reading until its newline
            records: list[RequestRecord] = []
            base = offset
            for raw in buffer[:end].splitlines():
                base += len(raw) + 1
                if not raw.strip():
                    continue
                stats.lines += 1
                try:
                    records.append(mapping.parse(raw, book))
                except LineError as exc:
                    stats.malformed.append(f"{path}@{base - len(raw) - 1}: {exc}")
            stats.records += len(records)
            offset += end
            buffer = buffer[end:]
            state = None
            if save_as is not None:
                state = (mapping.source, save_as, FileState(ino, offset, None, None, _head(path, offset)))
            store.write(records, stats, keep="first", file=state)
            on_bytes(end)


def _rotated_sibling(path: Path, inode: int) -> Path | None:
    for sibling in path.parent.glob(path.name + "*"):
        try:
            if sibling != path and sibling.stat().st_ino == inode:
                return sibling
        except OSError:
            continue
    return None


def read_new(
    store: ImportStore,
    book: PriceBook,
    path: Path,
    mapping: LineMapping,
    stats: ImportStats | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> ImportStats:
    """Import every complete line added to `path` since the stored offset."""
    stats = stats if stats is not None else ImportStats()
    key = os.path.abspath(path)
    state = store.file_state(mapping.source, key)
    try:
        st = path.stat()
    except FileNotFoundError:
        return stats  # between a rotation's rename and the new file's creation
    offset = 0
    if state is not None and state.inode == st.st_ino:
        same_head = state.head is None or _head(path, state.offset) == state.head
        if st.st_size >= state.offset and same_head:
            offset = state.offset
    elif state is not None and state.inode is not None:
        old = _rotated_sibling(path, state.inode)
        if old is not None:
            _read_from(store, book, old, state.offset, mapping, stats, None, on_bytes)
    if state is None or offset != state.offset or state.inode != st.st_ino:
        store.save_state(mapping.source, key, FileState(st.st_ino, offset, None, None, _head(path, offset)))
    _read_from(store, book, path, offset, mapping, stats, key, on_bytes)
    return stats


def follow(
    store: ImportStore,
    book: PriceBook,
    path: Path,
    mapping: LineMapping,
    stop: threading.Event,
    *,
    interval: float = 1.0,
    on_pass: Callable[[ImportStats], None] = lambda s: None,
) -> ImportStats:
    """`read_new` every `interval` seconds until `stop` is set; returns the running totals."""
    stats = ImportStats()
    while True:
        read_new(store, book, path, mapping, stats)
        on_pass(stats)
        if stop.wait(interval):
            return stats

"""Claude Code's local transcripts -> records (``meterproxy import claude-code``).

Claude Code appends one JSON object per line to
``~/.claude/projects/<project>/<session>.jsonl`` (older versions and
``$CLAUDE_CONFIG_DIR`` use ``~/.config/claude/projects``). Only entries with
``"type": "assistant"`` carry usage, in ``message.usage`` (Anthropic's shape:
``input_tokens`` excludes cache reads and writes, ``cache_creation`` splits the
writes by TTL). The project is the folder under ``projects/``.

What a transcript does that an importer must undo:

- **Streaming snapshots.** One answer can be written several times while it
  streams, with the same ``message.id`` and ``requestId`` and a growing
  ``output_tokens``; they are one request. The id is derived from that pair and
  the largest snapshot wins (here and in `ImportStore.write`, across runs).
- **Synthetic entries.** Messages Claude Code makes up itself (model
  ``<synthetic>``, e.g. after an interruption) cost nothing and are skipped.
- **Files still being written.** A last line without its newline is left for
  the next run, and a file whose size and mtime did not change since the last
  run is not read again.

Lines that are not JSON, or assistant entries whose usage is not a set of
counts, are reported (``file:line: why``) and skipped, never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from meterproxy.imports import FileState, ImportStats, ImportStore, price_imported, stable_id
from meterproxy.pricing import PriceBook
from meterproxy.timestamps import parse_ts
from meterproxy.usage import RequestRecord, Usage

__all__ = ["SOURCE", "default_roots", "find_files", "import_claude_code", "parse_entry"]

SOURCE = "claude-code"
SYNTHETIC_MODEL = "<synthetic>"


def default_roots(env: dict[str, str] | None = None) -> list[Path]:
    """Where Claude Code keeps transcripts: ``$CLAUDE_CONFIG_DIR`` or both default dirs."""
    env = dict(os.environ) if env is None else env
    configured = env.get("CLAUDE_CONFIG_DIR")
    if configured:
        return [Path(p) / "projects" for p in configured.split(",") if p.strip()]
    home = Path(env.get("HOME") or Path.home())
    return [home / ".claude" / "projects", home / ".config" / "claude" / "projects"]


def find_files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(p for p in path.rglob("*.jsonl") if p.is_file())
    return sorted(dict.fromkeys(found))


def project_of(path: Path) -> str:
    """The folder right under ``projects/`` (Claude Code's encoded cwd), else the parent's name."""
    for parent in path.parents:
        if parent.parent.name == "projects":
            return parent.name
    return path.parent.name


class EntryError(ValueError):
    """An assistant entry that cannot be read as usage."""


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EntryError(f"usage.{key} is {value!r}, not a token count")
    return value


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _timestamp(raw: Any) -> datetime:
    if not isinstance(raw, str):
        raise EntryError("no timestamp")
    try:
        return parse_ts(raw)
    except ValueError as exc:
        raise EntryError(f"timestamp {raw!r} is not ISO 8601") from exc


def parse_entry(entry: Any, project: str) -> RequestRecord | None:
    """One transcript line -> a record; None for lines without usage or synthetic ones."""
    if not isinstance(entry, dict) or entry.get("type") != "assistant":
        return None
    message = entry.get("message")
    if not isinstance(message, dict):
        raise EntryError("assistant entry without a message object")
    usage = message.get("usage")
    model = message.get("model")
    if model == SYNTHETIC_MODEL:
        return None
    if not isinstance(usage, dict):
        raise EntryError("assistant message without usage")
    if not isinstance(model, str) or not model:
        raise EntryError("assistant message without a model")
    plain = _count(usage, "input_tokens")
    write = _count(usage, "cache_creation_input_tokens")
    read = _count(usage, "cache_read_input_tokens")
    split = _obj(usage.get("cache_creation"))
    write_1h = min(_count(split, "ephemeral_1h_input_tokens"), write)
    tools = _obj(usage.get("server_tool_use"))
    message_id, request_id = message.get("id"), entry.get("requestId")
    if isinstance(message_id, str) and isinstance(request_id, str):
        rid = stable_id(SOURCE, message_id, request_id)
    elif isinstance(entry.get("uuid"), str):
        rid = stable_id(SOURCE, "uuid", entry["uuid"])
    else:
        raise EntryError("no message.id/requestId or uuid to identify the request")
    tags = {"project": project}
    if entry.get("isSidechain") is True:
        tags["sidechain"] = "true"
    session = entry.get("sessionId")
    extra = {k: v for k, v in (("request_id", request_id), ("message_id", message_id)) if isinstance(v, str)}
    # Fast mode is billed as its own tier (see meterproxy.providers.anthropic).
    tier = "fast" if usage.get("speed") == "fast" else usage.get("service_tier")
    return RequestRecord(
        id=rid,
        ts=_timestamp(entry.get("timestamp")),
        source=SOURCE,
        upstream=SOURCE,
        provider="anthropic",
        endpoint="messages",  # what a proxied /v1/messages row says
        requested_model=model,
        model=model,
        status=200,
        streamed=True,
        usage=Usage(
            input_tokens=plain + write + read,
            cache_read_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=write_1h,
            output_tokens=_count(usage, "output_tokens"),
            web_search_requests=_count(tools, "web_search_requests"),
        ),
        usage_source="reported",
        service_tier=tier if isinstance(tier, str) else None,
        session=session if isinstance(session, str) else None,
        provider_request_id=request_id if isinstance(request_id, str) else None,
        tags=tags,
        extra=extra,
    )


def read_transcript(path: Path, stats: ImportStats) -> tuple[list[RequestRecord], int]:
    """Records of one file, snapshots collapsed to the largest; and the bytes fully read."""
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    project = project_of(path)
    best: dict[str, RequestRecord] = {}
    for number, raw in enumerate(data[:complete].splitlines(), 1):
        if not raw.strip():
            continue
        stats.lines += 1
        try:
            record = parse_entry(orjson.loads(raw), project)
        except (ValueError, UnicodeDecodeError) as exc:
            why = "not JSON" if not isinstance(exc, EntryError) else str(exc)
            stats.malformed.append(f"{path}:{number}: {why}")
            continue
        if record is None:
            stats.skipped += _is_synthetic(raw)
            continue
        stats.records += 1
        held = best.get(record.id)
        if held is None or _bigger(record, held):
            best[record.id] = record
    return list(best.values()), complete


def _is_synthetic(raw: bytes) -> int:
    return int(SYNTHETIC_MODEL.encode() in raw)


def _bigger(a: RequestRecord, b: RequestRecord) -> bool:
    return (a.tokens.output_tokens, a.tokens.input_tokens) > (b.tokens.output_tokens, b.tokens.input_tokens)


def import_claude_code(
    store: ImportStore,
    book: PriceBook,
    paths: Iterable[Path],
    *,
    progress: Callable[[Iterable[Path]], Iterable[Path]] = lambda files: files,
) -> ImportStats:
    """Import every transcript under `paths`; files unchanged since the last run are skipped."""
    stats = ImportStats()
    for path in progress(find_files(paths)):
        st = path.stat()
        key = str(path.resolve())
        known = store.file_state(SOURCE, key)
        if known and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns:
            stats.unchanged += 1
            continue
        stats.files += 1
        records, complete = read_transcript(path, stats)
        for record in records:
            price_imported(book, record, None)
        done = complete == st.st_size
        state = FileState(st.st_ino, complete, st.st_size if done else None, st.st_mtime_ns if done else None)
        store.write(records, stats, keep="largest", file=(SOURCE, key, state))
    return stats

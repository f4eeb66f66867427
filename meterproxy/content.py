"""Opt-in storage of request and answer text (``store_content``), redacted.

Off by default: meterproxy stores counts and metadata only. When an operator
turns ``store_content`` on, the proxy keeps the client's request body and the
answer's decoded bytes (each capped at ``content_max_bytes``) on the record,
and this module's sink, at the moment the request has finished, redacts them
and writes them to their own table, ``request_content``, through the single
writer thread. Redaction always removes credentials (the same patterns the
logs use) and every match of ``content_redact_patterns``; what is stored is
already redacted, so nothing downstream can leak the original.

The text lives apart from ``requests`` on purpose: exports, summaries and the
``/api/requests`` list never read this table, so content never leaves through
them. It is read one request at a time with
``GET /api/requests/{id}/content`` (behind the admin token when one is set),
and rows follow their request when retention deletes it.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Future
from typing import Any

from aiohttp import web

from meterproxy.api import api_error, json_response
from meterproxy.app_state import METER, READERS, SETTINGS, WRITER
from meterproxy.logs import redact
from meterproxy.store import Db, Migrations
from meterproxy.store.queries import run_read
from meterproxy.usage import RequestRecord

__all__ = ["Redactor", "content_migrations", "setup"]

log = logging.getLogger(__name__)

content_migrations = Migrations("meterproxy.content")


@content_migrations()
def m001_request_content(db: Db) -> None:
    t = db.dialect.text
    db.execute(
        f"CREATE TABLE request_content (id {t} PRIMARY KEY, request {t}, response {t}, "
        "truncated BIGINT NOT NULL DEFAULT 0)"
    )
    # Content goes when its request goes (retention, manual deletes).
    for statement in db.dialect.trigger(
        "request_content_follows",
        "AFTER DELETE",
        "requests",
        ["DELETE FROM request_content WHERE id = OLD.id"],
    ):
        db.execute(statement)


class Redactor:
    """Credentials always, then the operator's patterns, each match -> ``[REDACTED]``."""

    def __init__(self, patterns: list[str]) -> None:
        self._patterns = [re.compile(p) for p in patterns]

    def __call__(self, text: str) -> str:
        text = redact(text)
        for pattern in self._patterns:
            text = pattern.sub("[REDACTED]", text)
        return text


_INSERT = (
    "INSERT INTO request_content (id, request, response, truncated) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (id) DO UPDATE SET request = excluded.request, response = excluded.response, "
    "truncated = excluded.truncated"
)


def _logged(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("storing request content failed: %s", exc)


def _content_sink(app: web.Application, redactor: Redactor) -> Any:
    def store(record: RequestRecord) -> None:
        content = record.content
        if content is None:
            return
        row = (
            record.id,
            redactor(content.request.decode("utf-8", errors="replace")),
            redactor(content.response.decode("utf-8", errors="replace")),
            int(content.truncated),
        )
        app[WRITER].call(lambda conn: conn.execute(_INSERT, row)).add_done_callback(_logged)

    return store


async def content_handler(request: web.Request) -> web.Response:
    rid = request.match_info["id"]

    def read(conn: Db) -> Any:
        return conn.execute(
            "SELECT request, response, truncated FROM request_content WHERE id = $1", [rid]
        ).fetchone()

    row = await run_read(request.app[READERS], read)
    if row is None:
        why = "content storage is off" if not request.app[SETTINGS].store_content else "no content stored"
        return api_error(404, "not_found", f"request {rid}: {why}")
    return json_response({"id": rid, "request": row[0], "response": row[1], "truncated": bool(row[2])})


async def _register_sink(app: web.Application) -> None:
    settings = app[SETTINGS]
    if settings.store_content:
        app[METER].add_sink("content", _content_sink(app, Redactor(settings.content_redact_patterns)))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/requests/{id}/content", content_handler)
    app.on_startup.append(_register_sink)

"""One request recorded twice, proxied and imported: the proxied row wins, the other goes.

A coding agent that runs through the proxy also writes its own log, and
``meterproxy import`` reads that log. Both rows carry the provider's request id
(``provider_request_id``), so the same request is recognised whichever
arrives first:

- **import after proxy**: `ImportStore.write` skips an entry whose id a proxied
  row already has (``meterproxy.imports.proxied_request_ids``);
- **proxy after import** (here): once the store writer has committed proxied
  rows, a commit listener queues one writer call that deletes the imported rows
  with the same ids, taking them out of the rollups first. The proxied row is
  the one kept: it has the user, session, tags and key the log lacks.

Budgets already counted the deleted rows until their next resync (rows that
another process imported are only counted from a resync too). The listener
queues nothing for a batch without provider request ids, and the call does
nothing while no import ever ran on this database (``import_files`` is empty).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

from aiohttp import web

from meterproxy.app_state import WRITER
from meterproxy.store.db import Db, Params
from meterproxy.store.rollups import unroll_row
from meterproxy.store.writer import StoreWriter
from meterproxy.usage import RequestRecord

__all__ = ["drop_imported_duplicates", "setup"]

log = logging.getLogger(__name__)


def drop_imported_duplicates(conn: Db, request_ids: Sequence[str]) -> int:
    """Delete imported rows whose provider request id a proxied row has; returns how many."""
    if not request_ids or conn.execute("SELECT 1 FROM import_files LIMIT 1").fetchone() is None:
        return 0
    dropped = 0
    for start in range(0, len(request_ids), 500):
        p = Params()
        marks = p.many(request_ids[start : start + 500])
        rows = conn.execute(
            f"SELECT id FROM requests WHERE provider_request_id IN ({marks}) AND source <> 'proxy'", p.values
        ).fetchall()
        for (rid,) in rows:
            unroll_row(conn, rid)
            conn.execute("DELETE FROM requests WHERE id = $1", [rid])
            dropped += 1
    return dropped


def _listener(writer: StoreWriter) -> Callable[[list[RequestRecord]], None]:
    def committed(records: list[RequestRecord]) -> None:
        ids = [r.provider_request_id for r in records if r.provider_request_id and r.source == "proxy"]
        if ids:
            # Runs on the writer thread, after the batch's own transaction: queue, never block.
            future = writer.call(lambda conn: drop_imported_duplicates(conn, ids))
            future.add_done_callback(_report)

    return committed


def _report(future: Future[int]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("could not drop imported duplicates of proxied requests: %s", exc)
    elif future.result():
        log.info("dropped %d imported rows the proxy recorded too", future.result())


async def _dedup_ctx(app: web.Application) -> AsyncIterator[None]:
    writer = app[WRITER]
    writer.on_commit(_listener(writer))
    yield


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_dedup_ctx)

"""Background store maintenance: keep the rollups current, then apply retention.

One task per application (a ``cleanup_ctx`` lifecycle, started after the store
writer and stopped before it). Every ``rollup_interval`` seconds it runs one
pass:

1. `roll_up` batches until the watermark reaches the newest row;
2. when ``retention_days`` is set, `compact` batches deleting raw rows older
   than the cutoff (only rows already rolled up, see ``store/rollups.py``).

Each batch is one ``StoreWriter.call`` — a short transaction on the single
writer thread, queued behind (and in between) the proxy's own record batches —
and the task awaits it before sending the next, so maintenance never holds
the write lock for long and never makes the proxy's records wait for more than
one batch. A failing pass is logged and retried next interval; it can never
fail a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from meterproxy.app_state import SETTINGS, WRITER
from meterproxy.store.db import Db
from meterproxy.store.rollups import compact, roll_up
from meterproxy.store.writer import StoreWriter

__all__ = ["COMPACT_BATCH", "ROLLUP_BATCH", "run_pass", "setup"]

log = logging.getLogger(__name__)

ROLLUP_BATCH = 20_000
COMPACT_BATCH = 2_000


async def _call(writer: StoreWriter, fn: Callable[[Db], int]) -> int:
    # Shielded: a cancelled pass (shutdown) lets the batch already queued finish on its own.
    return await asyncio.shield(asyncio.wrap_future(writer.call(fn)))


async def run_pass(writer: StoreWriter, retention_days: int, now: datetime | None = None) -> tuple[int, int]:
    """One maintenance pass; returns (rows rolled up, raw rows deleted)."""
    rolled = deleted = 0
    while n := await _call(writer, lambda conn: roll_up(conn, ROLLUP_BATCH)):
        rolled += n
    if retention_days > 0:
        cutoff = ((now or datetime.now(UTC)) - timedelta(days=retention_days)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
        while n := await _call(writer, lambda conn: compact(conn, cutoff, COMPACT_BATCH)):
            deleted += n
    return rolled, deleted


async def _loop(app: web.Application) -> None:
    settings = app[SETTINGS]
    while True:
        await asyncio.sleep(settings.rollup_interval)
        try:
            await run_pass(app[WRITER], settings.retention_days)
        except Exception:
            log.exception("store maintenance pass failed; retrying next interval")


async def _maintenance_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_loop(app), name="meterproxy-store-maintenance")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_maintenance_ctx)

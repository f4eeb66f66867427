"""A running ``serve`` picks up ``meterproxy prices update`` within seconds, without a restart.

``prices update`` installs a data file into ``prices_dir`` with an atomic rename
(`meterproxy.prices_update`). This lifecycle polls that directory's listing every
``prices_reload_interval`` seconds (a stat per file, off the event loop); when it
changes, the price book is rebuilt in a worker thread and swapped in whole: the
meter's pricing function and `LivePrices.book` are replaced by plain assignment,
so a request is priced entirely by the old book or entirely by the new one.
A file that cannot be read is logged and the old book stays in force.

Polling rather than inotify or a signal: it works the same in every worker process
(each has its own app), in containers and on network filesystems, and costs one
directory listing every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from meterproxy.app_state import METER, METRICS, PRICES, SETTINGS
from meterproxy.meter import price_record_with
from meterproxy.prices_update import installed, load_book
from meterproxy.pricing import PriceBook, PricingError

__all__ = ["prices_ctx", "reload_prices"]

log = logging.getLogger(__name__)


def _listing(prices_dir: Path) -> tuple[tuple[str, int], ...]:
    return tuple((p.name, p.stat().st_mtime_ns) for p, _ in installed(prices_dir))


def reload_prices(app: web.Application, book: PriceBook) -> None:
    """Make `book` the one every later request is priced with."""
    settings = app[SETTINGS]
    app[METER].set_pricer(price_record_with(book, settings.upstream_prices))
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.model_label.book = book
    live = app[PRICES]
    live.book = book
    live.generation += 1


async def _watch(app: web.Application, prices_dir: Path, seen: tuple[tuple[str, int], ...]) -> None:
    settings = app[SETTINGS]
    overrides = [Path(p) for p in settings.pricing]
    while True:
        await asyncio.sleep(settings.prices_reload_interval)
        try:
            now = await asyncio.to_thread(_listing, prices_dir)
        except OSError as exc:
            log.warning("cannot list %s: %s", prices_dir, exc)
            continue
        if now == seen:
            continue
        seen = now
        try:
            book = await asyncio.to_thread(load_book, overrides, prices_dir)
        except (PricingError, OSError) as exc:
            log.error("price update in %s not loaded, previous prices stay in force: %s", prices_dir, exc)
            continue
        reload_prices(app, book)
        log.info("prices reloaded from %s (%d base updates)", prices_dir, len(now))


async def prices_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch ``prices_dir`` while the server runs (after the proxy lifecycle loaded the book)."""
    prices_dir = Path(app[SETTINGS].prices_dir)
    seen = await asyncio.to_thread(_listing, prices_dir)
    task = asyncio.create_task(_watch(app, prices_dir, seen))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

"""Process-level tuning for a serving process (``meterproxy serve`` and each worker).

These are settings of the Python process, not of the app, so they are applied
where a process is started to serve, never inside `create_app` (tests run many
apps in one process):

- **uvloop** as the event loop (faster I/O and scheduling than asyncio's own).
- **The startup heap is frozen** once the app has started (`gc.freeze`): the
  tens of thousands of long-lived objects that imports, settings and the price
  tables leave behind move out of the garbage collector's reach. Without this,
  every full collection walks all of them, which on a small VM is a 15-25 ms
  pause in the middle of some unlucky request (a p99 spike); with it, a full
  collection only walks what requests allocated since.
"""

from __future__ import annotations

import gc

from aiohttp import web

__all__ = ["freeze_after_startup", "install_uvloop"]


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass


async def _freeze(app: web.Application) -> None:
    gc.collect()
    gc.freeze()


def freeze_after_startup(app: web.Application) -> web.Application:
    """Freeze the heap after every startup hook (and cleanup context) has run."""
    app.on_startup.append(_freeze)
    return app

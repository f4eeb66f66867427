"""Process-level tuning for a serving process (``meterproxy serve`` and each worker).

These are settings of the Python process, not of the app, so they are applied
where a process is started to serve, never inside `create_app` (tests run many
apps in one process):

- **uvloop** as the event loop (faster I/O and scheduling than asyncio's own).
- **prometheus_client's multi-process mode** (`use_metrics_dir`): the library
  reads ``PROMETHEUS_MULTIPROC_DIR`` once, when it is first imported, so the
  process that starts the servers sets it before that (the ``--workers``
  supervisor before it spawns the workers, which inherit it; a single
  ``serve`` before it builds the app). Nothing patches the library afterwards.
- **The startup heap is frozen** once the app has started (`gc.freeze`): the
  tens of thousands of long-lived objects that imports, settings and the price
  tables leave behind move out of the garbage collector's reach. Without this,
  every full collection walks all of them, which on a small VM is a 15-25 ms
  pause in the middle of some unlucky request (a p99 spike); with it, a full
  collection only walks what requests allocated since.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from meterproxy.settings import Settings

__all__ = ["METRICS_DIR_ENV", "freeze_after_startup", "install_uvloop", "serve_on", "use_metrics_dir"]

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass


def use_metrics_dir(directory: str) -> None:
    """Put prometheus_client in multi-process mode on ``directory``, for this process and its children.

    Must run before prometheus_client is imported here: it chooses its value
    class at import time, from the environment.
    """
    if "prometheus_client" in sys.modules and os.environ.get(METRICS_DIR_ENV) != directory:
        raise RuntimeError(f"{METRICS_DIR_ENV} must be set before prometheus_client is imported")
    os.makedirs(directory, exist_ok=True)
    os.environ[METRICS_DIR_ENV] = directory


async def _freeze(app: web.Application) -> None:
    gc.collect()
    gc.freeze()


def freeze_after_startup(app: web.Application) -> web.Application:
    """Freeze the heap after every startup hook (and cleanup context) has run."""
    app.on_startup.append(_freeze)
    return app


def serve_on(app: web.Application, settings: Settings, sock: socket.socket) -> None:
    """Serve ``app`` on the listening ``sock`` until SIGINT or SIGTERM, with the configured server
    (``http_server``: the lean one, or aiohttp's). The socket is bound by the caller: before the
    app is built (`meterproxy serve`), so early connections wait in its backlog."""
    if settings.http_server == "lean":
        from meterproxy.server import run as serve_lean

        serve_lean(app, sock=sock, shutdown_timeout=settings.shutdown_timeout)
        return
    web.run_app(
        app,
        sock=sock,
        shutdown_timeout=settings.shutdown_timeout,
        access_log=None,
        print=None,
        handle_signals=True,
    )

"""Several worker processes on one port: ``meterproxy serve --workers N``.

One Python process uses one core; a proxy that must keep up with many
concurrent streams on a bigger machine runs N copies of the whole app. The
moments, in order:

1. **before any worker exists** (`run_workers`, in the supervisor): the
   database is created and every migration applied once, so workers never
   race to migrate; the Prometheus multi-process directory is chosen (the
   configured one, ``PROMETHEUS_MULTIPROC_DIR``, or a fresh temporary one) and
   emptied of the previous server's files, so ``/metrics`` on any worker
   reports the totals of all of them.
2. **workers started**: N processes (``spawn``: nothing of the supervisor's
   state is shared) each build the app from the same `Settings` and listen on
   the same address with ``SO_REUSEPORT``; the kernel spreads connections
   over them. The first worker is handed the socket `serve` bound before
   anything else (a duplicate of its descriptor): the port never closes
   between that bind and the workers', so a client that connects during
   startup waits in that socket's backlog and is answered, never refused or
   reset. The others bind their own sockets in the same group. Each worker
   owns its own store writer thread; SQLite's WAL and ``busy_timeout``
   serialize the writers' short transactions, so every request is recorded
   exactly once in the one database.
3. **stopping**: SIGTERM or SIGINT to the supervisor is passed to every
   worker, which drains in-flight requests and flushes its writer like a
   single-process server does. A worker that dies on its own stops the
   others too and the supervisor exits non-zero: a half-capacity server that
   looks healthy is worse than a restart by the service manager.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
from multiprocessing.connection import wait
from types import FrameType

from meterproxy.runtime import METRICS_DIR_ENV, use_metrics_dir
from meterproxy.settings import Settings

__all__ = ["prepare_database", "run_workers", "worker_main"]

log = logging.getLogger("meterproxy")


def prepare_database(path: str) -> None:
    """Create the database and apply all migrations, once, before any worker starts."""
    from meterproxy.store.backend import apply_migrations, connect

    conn = connect(path)
    try:
        apply_migrations(conn)
    finally:
        conn.close()


def _metrics_dir(settings: Settings) -> str:
    directory = settings.metrics_multiproc_dir or os.environ.get(METRICS_DIR_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="meterproxy-metrics-")
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):
        os.unlink(stale)
    return directory


def worker_main(settings: Settings, sock: socket.socket | None = None) -> None:
    """One worker: the whole app on the shared port (runs in a child process), on ``sock``
    when the supervisor hands it the listening socket it bound first, else on its own."""
    from meterproxy.app import create_app
    from meterproxy.logs import configure_logging
    from meterproxy.runtime import freeze_after_startup, install_uvloop, serve_on
    from meterproxy.startup import bind_listener

    configure_logging(settings.log_level)
    install_uvloop()
    app = freeze_after_startup(create_app(settings))
    if sock is None:
        sock = bind_listener(settings.host, settings.port, reuse_port=True)
    serve_on(app, settings, sock)


def run_workers(settings: Settings, workers: int, sock: socket.socket | None = None) -> int:
    """Supervise ``workers`` processes until they stop; returns the exit code.

    ``sock``, the listening socket bound with ``SO_REUSEPORT`` before this call, goes to the first
    worker (the supervisor closes its own copy once that worker has it).
    """
    prepare_database(settings.db)
    directory = _metrics_dir(settings)
    use_metrics_dir(directory)  # inherited by every spawned worker, read when it imports the library
    settings = settings.model_copy(update={"metrics_multiproc_dir": directory})
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(settings, sock if i == 0 else None), name=f"worker-{i}")
        for i in range(workers)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.start()
    if sock is not None:
        sock.close()  # the first worker holds its own duplicate now
    log.info("meterproxy: %d workers on http://%s:%d", workers, settings.host, settings.port)
    failed = False
    running = list(procs)
    while running:
        ready = wait([p.sentinel for p in running], timeout=1.0)
        for p in [p for p in running if p.sentinel in ready]:
            p.join()
            running.remove(p)
            if not stopping:
                log.error("worker %s exited with %s; stopping the others", p.name, p.exitcode)
                failed = True
                stop(signal.SIGTERM, None)
    return 1 if failed else 0

"""The application: resources with lifecycles, routes, and the catch-all proxy route.

`create_app` wires everything from one `Settings`. Each long-lived resource is a
``cleanup_ctx`` (opened at startup, closed at shutdown, in reverse order), held
under a typed `web.AppKey`, never a module global, so tests can run several
apps in one process:

- the store writer (opened first, closed last, so a shutdown flushes every
  record the proxy finished) and the store's readers (PostgreSQL's read pool);
- the price book and the meter with its sinks;
- the upstream HTTP client session (connection pool, keep-alive).

Feature modules (API, metrics, budgets, dashboard) add their routes and sinks
through ``setup(app)`` functions listed in `FEATURES`, before the catch-all
proxy route, which must be registered last so it never shadows them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import import_module
from pathlib import Path

from aiohttp import web

from meterproxy import __version__
from meterproxy.access_log import log_request
from meterproxy.api.me import ME_PREFIX
from meterproxy.app_state import FINGERPRINT_SALT, METER, PRICEBOOK, PRICES, PROXY, READERS, SETTINGS, WRITER
from meterproxy.aws_sigv4 import AwsSigner
from meterproxy.estimate import Estimator, load_tokenizer
from meterproxy.http_errors import bearer_matches, unauthorized
from meterproxy.meter import Meter, price_record_with
from meterproxy.prices_update import load_book
from meterproxy.prices_watch import prices_ctx
from meterproxy.pricing import LivePrices, PriceBook
from meterproxy.proxy import Proxy
from meterproxy.settings import Settings
from meterproxy.store import backend as store_backend
from meterproxy.store.writer import StoreWriter
from meterproxy.upstream import UpstreamClient

__all__ = ["FEATURES", "METER", "PRICEBOOK", "PROXY", "SETTINGS", "WRITER", "create_app"]

log = logging.getLogger(__name__)


#: Modules whose ``setup(app)`` adds routes, sinks and lifecycles, in order.
FEATURES = [
    "meterproxy.api.requests",
    "meterproxy.metrics",
    "meterproxy.bad_requests",
    "meterproxy.store.maintenance",
    "meterproxy.api.summary",
    "meterproxy.api.timeseries",
    "meterproxy.api.sessions",
    "meterproxy.api.export",
    "meterproxy.api.openapi",
    "meterproxy.api.me",
    "meterproxy.api.whatif",
    "meterproxy.budgets.feature",
    "meterproxy.budgets.api",
    "meterproxy.budgets.replicas",
    "meterproxy.dashboard",
    "meterproxy.content",
    "meterproxy.otel",
    "meterproxy.imports.dedup",
]

# Paths behind the admin token (when one is set). The proxied paths are not:
# they carry the provider's own credentials. Nor is the dashboard's page (``/``,
# ``/dashboard``, its static files): it holds no data, it reads ``/api/*`` (guarded
# here) and asks for the token when the API answers 401.
_ADMIN_PREFIXES = ("/api/",)


def _is_admin_path(path: str) -> bool:
    # /api/me/* answers a key holder about their own key: it authenticates by that key.
    return path.startswith(_ADMIN_PREFIXES) and not path.startswith(ME_PREFIX)


@web.middleware
async def admin_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[SETTINGS].admin_token
    if token and _is_admin_path(request.path) and not bearer_matches(request, token):
        return unauthorized(request)
    return await handler(request)


def unpriced_upstreams(book: PriceBook, settings: Settings) -> list[str]:
    """One line per upstream whose requests no price list bills (they are recorded with cost null)."""
    out = []
    for name in settings.upstreams:
        chosen = settings.upstream_prices.get(name)
        if chosen is not None and book.price_list(chosen) is None:
            out.append(f"upstream {name}: price list {chosen!r} is unknown; its requests stay unpriced")
        elif chosen is None and book.price_list(name) is None:
            out.append(
                f"upstream {name}: its name names no price list and it has no prices setting "
                f"([upstreams.{name}] prices = ...); its requests are recorded with cost null"
            )
    return out


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    writer = StoreWriter(settings.db, queue_max=settings.writer_queue_max)
    writer.start()
    app[WRITER] = writer
    app[READERS] = store_backend.Readers(settings.db)
    yield
    queued = writer.pending
    if writer.close(timeout=max(settings.shutdown_timeout, 5.0)):
        # The one line a stop leaves at info: what was still queued went to the store.
        log.info(
            "stopped: %d queued records flushed to %s (%d written since start, %d dropped)",
            queued,
            store_backend.describe(settings.db),
            writer.written,
            writer.dropped,
        )
    else:
        log.error("writer did not finish flushing in time (%d records were queued)", queued)
    app[READERS].close()


async def _proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    book = load_book([Path(p) for p in settings.pricing], Path(settings.prices_dir))
    for problem in book.check():
        log.warning("pricing table problem: %s", problem)
    for problem in unpriced_upstreams(book, settings):
        log.warning("%s", problem)
    app[PRICEBOOK] = book
    app[PRICES] = LivePrices(book)
    meter = app[METER]
    meter.set_pricer(price_record_with(book, settings.upstream_prices))
    meter.add_sink("store", app[WRITER].submit)
    estimate_limit = 0
    if settings.estimate_usage:
        tokenizer = load_tokenizer(settings.estimate_tokenizer_file)
        live = app[PRICES]
        app[WRITER].prepare = Estimator(
            tokenizer, lambda: price_record_with(live.book, settings.upstream_prices)
        ).prepare
        estimate_limit = settings.estimate_max_bytes
        log.info(
            "estimate_usage: answers without usage are counted with %s (estimates, apart)", tokenizer.name
        )
    if settings.access_log:
        meter.add_sink("access_log", log_request)
    app[FINGERPRINT_SALT] = _read_salt(app[READERS])
    client = UpstreamClient(
        connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout, keepalive_timeout=60
    )
    app[PROXY] = Proxy(
        upstreams=settings.upstream_map(),
        meter=meter,
        client=client,
        fingerprint_salt=app[FINGERPRINT_SALT],
        inject_stream_usage=settings.inject_stream_usage,
        drain_timeout=settings.disconnect_drain_timeout,
        max_draining=settings.max_draining,
        body_timeout=settings.request_body_timeout,
        max_body_bytes=settings.max_body_bytes,
        max_buffered_body_bytes=settings.max_buffered_body_bytes,
        durable=_commit_barrier(app[WRITER]) if settings.durability == "strict" else None,
        content_limit=settings.content_max_bytes if settings.store_content else 0,
        estimate_limit=estimate_limit,
        signers={name: AwsSigner(region) for name, region in settings.aws_sigv4.items()},
    )
    yield
    # Streams whose clients left may still be draining for usage: let them finish (bounded).
    await app[PROXY].drain(timeout=settings.shutdown_timeout)
    await client.close()
    # Answers still in flight were just cut: give their tasks a moment to record them.
    await app[PROXY].drain(timeout=5.0)


async def _close_websockets(app: web.Application) -> None:
    """Before the server waits for its handlers: end every WebSocket tunnel (each records itself)."""
    if PROXY in app:
        await app[PROXY].sessions.close()


def _commit_barrier(writer: StoreWriter) -> Callable[[], Awaitable[object]]:
    """durability="strict": resolves once every record submitted before the call is committed.

    The writer runs calls after the records queued before them, in queue order.
    """

    def barrier() -> Awaitable[object]:
        return asyncio.wrap_future(writer.call(lambda conn: None))

    return barrier


def _read_salt(readers: store_backend.Readers) -> bytes:
    conn = readers.connection()
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint_salt'").fetchone()
    finally:
        conn.close()
    return bytes.fromhex(row[0])


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    health = app[WRITER].health()
    proxy = app[PROXY]
    return web.json_response(
        {
            "status": "ok" if health.ok else "degraded",
            "version": __version__,
            "store": {
                "ok": health.ok,
                "queue_depth": health.queue_depth,
                "written": health.written,
                "dropped": health.dropped,
                "error": health.last_error,
            },
            "in_flight": proxy.in_flight,
        }
    )


async def _proxy_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[admin_auth])
    app[SETTINGS] = settings
    app[METER] = Meter()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_proxy_ctx)
    app.cleanup_ctx.append(prices_ctx)
    app.on_shutdown.append(_close_websockets)
    app.router.add_get("/healthz", healthz)
    for name in FEATURES:
        import_module(name).setup(app)
    app.router.add_route("*", "/{tail:.*}", _proxy_handler)
    return app

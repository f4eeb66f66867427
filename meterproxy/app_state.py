"""The application's state: one typed `web.AppKey` per resource it holds.

(aiohttp calls these "app keys"; this module is named for what they index, so it
is not confused with the API keys a proxy forwards.)

Kept apart from `meterproxy.app` so that feature modules (API, metrics,
budgets) can reach a resource without importing the module that wires them
all together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from meterproxy.meter import Meter
    from meterproxy.metrics import Metrics
    from meterproxy.pricing import LivePrices, PriceBook
    from meterproxy.proxy import Proxy
    from meterproxy.settings import Settings
    from meterproxy.store.backend import Readers
    from meterproxy.store.writer import StoreWriter

__all__ = [
    "API_DOCS",
    "FINGERPRINT_SALT",
    "METER",
    "METRICS",
    "PRICEBOOK",
    "PRICES",
    "PROXY",
    "READERS",
    "SETTINGS",
    "WRITER",
]

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
#: Routes features added to the app's OpenAPI document (`meterproxy.api.openapi.document`).
API_DOCS: web.AppKey[dict[str, dict[str, dict[str, Any]]]] = web.AppKey("api_docs")
WRITER: web.AppKey[StoreWriter] = web.AppKey("writer")
#: The read side of the same database (`meterproxy.store.queries.run_read` borrows from it).
READERS: web.AppKey[Readers] = web.AppKey("readers")
METER: web.AppKey[Meter] = web.AppKey("meter")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
PROXY: web.AppKey[Proxy] = web.AppKey("proxy")
#: The price book loaded at start-up; `PRICES` holds the one in force now (``prices update``).
PRICEBOOK: web.AppKey[PriceBook] = web.AppKey("pricebook")
PRICES: web.AppKey[LivePrices] = web.AppKey("prices")
#: The database's key-fingerprint salt (read once at start-up; the proxy and /api/me use it).
FINGERPRINT_SALT: web.AppKey[bytes] = web.AppKey("fingerprint_salt")

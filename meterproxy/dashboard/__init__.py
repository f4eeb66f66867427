"""The analytics page at ``/`` and ``/dashboard``: static files that call the JSON API.

The page is a shell (``static/index.html``) plus ES modules and a stylesheet,
all served by the proxy from this package, so it works without internet. It
holds no data: every figure is fetched by the browser from ``/api/summary``,
``/api/timeseries``, ``/api/sessions``, ``/api/requests`` and, when the
budgets feature is there, ``/api/budgets``. That is what lets the page itself
be public while an admin token is set: the ``admin_auth`` middleware guards
``/api/*``; when the API answers 401 the page asks for the token, keeps it in
the browser's session storage, and sends it as ``Authorization: Bearer``.

Charts are hand-written SVG (``static/charts.js``); no third-party code.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["STATIC_DIR", "setup"]

STATIC_DIR = Path(__file__).parent / "static"
_NO_CACHE = {"Cache-Control": "no-cache"}


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)


def setup(app: web.Application) -> None:
    app.router.add_get("/", page)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/", page)
    app.router.add_static("/dashboard/static", STATIC_DIR, append_version=False)

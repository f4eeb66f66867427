"""meterproxy's own HTTP answers that are not the upstream's: one error shape, one admin-token check.

The proxy (no route, upstream unreachable), the admin middleware, ``/metrics``
and the JSON API all answer errors with the same body, readable by every
provider's SDK::

    {"error": {"type": "meterproxy_error", "code": "...", "message": "...", "param": "..."}}

and the API and ``/metrics`` check the same ``Authorization: Bearer <admin
token>`` the same way (constant-time). They sit here, below every layer that
answers, so none of them imports another to borrow it.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

__all__ = ["bearer_matches", "json_error", "unauthorized"]


def json_error(status: int, code: str, message: str, param: str | None = None) -> web.Response:
    """meterproxy's own error; ``param`` names the request parameter at fault, when one is."""
    error: dict[str, Any] = {"type": "meterproxy_error", "code": code, "message": message}
    if param:
        error["param"] = param
    return web.json_response({"error": error}, status=status)


def bearer_matches(request: web.Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (scheme case-insensitive)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def unauthorized(request: web.Request) -> web.Response:
    """The 401 for a missing or wrong admin token, naming the path that needs it."""
    return json_error(401, "unauthorized", f"{request.path} needs 'Authorization: Bearer <admin token>'")

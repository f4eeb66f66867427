"""HTTP header facts both forwarding paths share (plain HTTP in `proxy`, WebSockets in `websocket`).

Kept below both so neither imports the other for a constant.
"""

from __future__ import annotations

__all__ = ["HOP_BY_HOP"]

#: Hop-by-hop headers (RFC 9110 section 7.6.1 and the de facto ones): never forwarded as received.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

"""HTTP header facts both forwarding paths share (plain HTTP in `proxy`, WebSockets in `websocket`).

Kept below both so neither imports the other for a constant.
"""

from __future__ import annotations

__all__ = ["HOP_BY_HOP", "HOP_BY_HOP_BYTES", "header_text"]

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
#: The same names as llhttp hands them over (lower-cased bytes), for paths that never decode headers.
HOP_BY_HOP_BYTES = frozenset(name.encode("ascii") for name in HOP_BY_HOP)


def header_text(value: bytes) -> str:
    """A header's bytes as text: UTF-8, any other byte kept as a surrogate (encodes back exactly)."""
    return value.decode("utf-8", "surrogateescape")

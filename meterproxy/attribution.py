"""Who a request is for: user, session, tags and a key fingerprint, read from headers.

Clients attribute requests with ``X-Meter-User``, ``X-Meter-Session`` and
``X-Meter-Tags: team=search,env=prod``; these headers are meterproxy's own and
are removed before forwarding. The API key itself is never kept: only
`fingerprint`, a keyed hash (HMAC-SHA256 with a per-installation salt stored in
the database), truncated to 16 hex digits. Without the salt the fingerprint
cannot be checked against a guessed key, and it cannot be reversed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl

__all__ = ["ATTRIBUTION_HEADERS", "KEY_HEADERS", "api_key", "fingerprint", "parse_tags"]

ATTRIBUTION_HEADERS = ("x-meter-user", "x-meter-session", "x-meter-tags")
#: Headers that carry provider credentials (redacted in logs, fingerprinted, never stored).
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")

_MAX_TAGS = 20
_MAX_LEN = 200


def parse_tags(value: str | None) -> dict[str, str]:
    """``"team=search, env=prod"`` -> ``{"team": "search", "env": "prod"}`` (bounded)."""
    tags: dict[str, str] = {}
    if not value:
        return tags
    for item in value.split(","):
        key, sep, val = item.partition("=")
        key = key.strip()[:_MAX_LEN]
        if not key:
            continue
        tags[key] = val.strip()[:_MAX_LEN] if sep else ""
        if len(tags) >= _MAX_TAGS:
            break
    return tags


def api_key(headers: Mapping[str, str], query_string: str = "") -> str | None:
    """The credential a request carries, from whichever header or query its provider uses."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else auth.strip()
    for name in KEY_HEADERS[1:]:
        value = headers.get(name)
        if value:
            return value.strip()
    if "key=" in query_string:  # Gemini also accepts ?key=
        for name, value in parse_qsl(query_string):
            if name == "key" and value:
                return value
    return None


def fingerprint(key: str | None, salt: bytes) -> str | None:
    if not key:
        return None
    return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:16]

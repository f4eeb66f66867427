"""Who a request is for: user, session, tags and a key fingerprint, read from headers.

Clients attribute requests with ``X-Meter-User``, ``X-Meter-Session`` and
``X-Meter-Tags: team=search,env=prod``; these headers are meterproxy's own and
are removed before forwarding. Without them, what coding agents send on their
own is used (`agent_session`, `agent_user`), and forwarded untouched:

- Claude Code: the ``X-Claude-Code-Session-Id`` header, and in Anthropic's
  ``metadata.user_id`` a JSON text ``{"device_id": .., "account_uuid": ..,
  "session_id": ..}``. The user is ``account_uuid`` when logged in, else
  ``device_id`` (one stable name per machine, not one per session); the JSON
  text itself is never the user.
- Codex CLI: the ``session-id`` header (older releases: ``session_id``).

The API key itself is never kept: only
`fingerprint`, a keyed hash (HMAC-SHA256 with a per-installation salt stored in
the database), truncated to 16 hex digits. Without the salt the fingerprint
cannot be checked against a guessed key, and it cannot be reversed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl

import orjson

__all__ = [
    "ATTRIBUTION_HEADERS",
    "KEY_HEADERS",
    "MAX_VALUE_LEN",
    "READ_HEADERS",
    "agent_session",
    "agent_user",
    "api_key",
    "authorization_key",
    "bounded",
    "fingerprint",
    "is_sigv4",
    "parse_tags",
]

ATTRIBUTION_HEADERS = ("x-meter-user", "x-meter-session", "x-meter-tags")
#: Headers that carry provider credentials (redacted in logs, fingerprinted, never stored).
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")

_MAX_TAGS = 20
#: Longest user, session, tag key or tag value kept (characters); the rest is cut.
MAX_VALUE_LEN = 200
_MAX_LEN = MAX_VALUE_LEN
#: Session headers coding agents send, in the order they are trusted.
AGENT_SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "session_id")
#: Every header this module reads: a caller holding raw headers decodes only these.
READ_HEADERS = frozenset({*ATTRIBUTION_HEADERS, *KEY_HEADERS, *AGENT_SESSION_HEADERS})


def bounded(value: str | None) -> str | None:
    """A client-chosen attribution value (user, session), cut to `MAX_VALUE_LEN`."""
    return value[:MAX_VALUE_LEN] if value else value


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


#: The ``Authorization`` scheme of an AWS Signature Version 4 (Bedrock clients).
SIGV4_SCHEME = "aws4-hmac-sha256"


def is_sigv4(headers: Mapping[str, str]) -> bool:
    """Is the request signed with AWS SigV4 (whose key id identifies, but does not prove, a client)?"""
    scheme = (headers.get("authorization") or "").strip().partition(" ")[0]
    return scheme.lower() == SIGV4_SCHEME


def api_key(headers: Mapping[str, str], query_string: str = "") -> str | None:
    """The credential a request carries, from whichever header or query its provider uses.

    A SigV4 ``Authorization`` (Bedrock) names its access key id in ``Credential=AKID/date/...``;
    the rest (date, signed headers, signature) changes with every request, so the key id is
    what identifies the client.
    """
    auth = headers.get("authorization")
    if auth:
        key = authorization_key(auth)
        if key is not None:
            return key
        # "Bearer " alone carries no key: another header may (an SDK given an empty key).
    for name in KEY_HEADERS[1:]:
        value = headers.get(name)
        if value:
            return value.strip()
    if "key=" in query_string:  # Gemini also accepts ?key=
        for name, value in parse_qsl(query_string):
            if name == "key" and value:
                return value
    return None


def authorization_key(auth: str) -> str | None:
    """The credential an ``Authorization`` value carries (`api_key`); None for ``Bearer`` alone."""
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == SIGV4_SCHEME:
        for part in token.split(","):
            field, _, credential = part.strip().partition("=")
            if field == "Credential" and credential.partition("/")[0]:
                return "aws-access-key-id:" + credential.partition("/")[0]
    if scheme.lower() != "bearer":
        return auth.strip()
    return token.strip() or None


def fingerprint(key: str | None, salt: bytes) -> str | None:
    if not key:
        return None
    return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:16]


def _bounded(value: object) -> str | None:
    """A non-empty string, cut to the length every attribution field is cut to; else None."""
    if not isinstance(value, str):
        return None
    return value.strip()[:_MAX_LEN] or None


def agent_session(headers: Mapping[str, str]) -> str | None:
    """The session a coding agent names in its own headers (Claude Code, Codex), if any."""
    for name in AGENT_SESSION_HEADERS:
        value = _bounded(headers.get(name))
        if value:
            return value
    return None


def agent_user(user_id: str | None) -> tuple[str | None, str | None]:
    """A request body's user field -> (readable user, session it names).

    Claude Code's JSON ``metadata.user_id`` gives its account (else device) and
    its session; any other text is the user as sent.
    """
    text = (user_id or "").strip()
    if not text.startswith("{"):
        return _bounded(text), None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _bounded(text), None
    if not isinstance(obj, dict):
        return _bounded(text), None
    user = _bounded(obj.get("account_uuid")) or _bounded(obj.get("device_id"))
    return user or _bounded(text), _bounded(obj.get("session_id"))

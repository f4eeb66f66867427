"""The exact credentials a request carried, scrubbed from its record before anything is written.

An upstream may echo the caller's key back in an error body ("invalid
subscription key <the key>"), and meterproxy keeps the provider's error text in
the record's ``error`` (and, with ``store_content``, the answer itself). Log
redaction (`meterproxy.logs.redact`) only knows key *shapes* (``sk-...``,
``AIza...``); an Azure key or a self-hosted server's token has none. So the
proxy takes every credential value the request carried (``Authorization``,
Bearer or not, ``x-api-key``, ``x-goog-api-key``, ``api-key``, ``?key=``) and
replaces each exact occurrence, also percent-encoded, with ``[REDACTED]`` in
the record at the moment the request finishes, before the record reaches any
sink (writer, WAL, API, export, webhooks).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, quote

from meterproxy.attribution import KEY_HEADERS
from meterproxy.usage import RequestRecord

__all__ = ["REDACTED", "carried", "scrub_record", "scrub_text"]

REDACTED = "[REDACTED]"

#: Shorter values are not scrubbed: replacing every "abc" in an error text would
#: garble it while hiding nothing a guess would not find.
_MIN_LEN = 4


def carried(headers: Iterable[tuple[str, str]], query_string: str = "") -> tuple[str, ...]:
    """Every credential value in the request, in each spelling an upstream might echo, longest first."""
    values: set[str] = set()
    for name, value in headers:
        if name.lower() in KEY_HEADERS:
            value = value.strip()
            values.add(value)
            token = value.partition(" ")[2]
            if token.strip():
                values.add(token.strip())  # "Bearer <token>", "Basic <token>", ...
    if "key=" in query_string:
        values.update(v for k, v in parse_qsl(query_string, keep_blank_values=False) if k == "key")
    spellings = set()
    for value in values:
        if len(value) >= _MIN_LEN:
            spellings.add(value)
            spellings.add(quote(value, safe=""))
    return tuple(sorted(spellings, key=len, reverse=True))


def scrub_text(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_record(record: RequestRecord, secrets: tuple[str, ...]) -> None:
    """Remove ``secrets`` from every text of ``record`` that comes from the network."""
    if not secrets:
        return
    if record.error:
        record.error = scrub_text(record.error, secrets)
    notes = record.extra.get("notes")
    if isinstance(notes, list):
        record.extra["notes"] = [scrub_text(n, secrets) if isinstance(n, str) else n for n in notes]
    content = record.content
    if content is not None:
        raw = [s.encode("utf-8", "surrogateescape") for s in secrets]
        for secret in raw:
            content.request = content.request.replace(secret, REDACTED.encode())
            content.response = content.response.replace(secret, REDACTED.encode())

"""Which upstream a request goes to: a pure function of the raw path.

``/NAME/REST`` goes to upstream NAME's base URL + ``/REST``; ``/v1/REST`` goes to
the ``openai`` upstream's ``/v1/REST`` (so ``OPENAI_BASE_URL=http://host:8787/v1``
works unchanged). Anything else is refused: meterproxy is not an open proxy.

The path is taken raw (still percent-encoded) and appended to the upstream's
base URL as-is, so the upstream receives exactly what the client sent. Because
the joined URL always starts with the configured scheme and host, no path can
name another host; dot segments, encoded slashes in the route name and
backslashes are refused outright so that no upstream-side path normalization
can climb out of a configured base path either. A dot segment is refused in
every spelling some server turns into ``..`` (`_is_dot_segment`): percent-encoded
any number of times (``%252e``), with a path parameter (``..;x``, Tomcat and
Spring), as overlong UTF-8 (``%c0%ae``), IIS's ``%u002e``, fullwidth dots
(NFKC), or padded with whitespace or NUL.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

from yarl import URL

__all__ = ["RouteError", "Target", "Upstream", "make_upstream", "parse_upstream", "route"]


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: URL

    @property
    def origin_and_path(self) -> str:
        return str(self.base_url).rstrip("/")


@dataclass(frozen=True, slots=True)
class Target:
    upstream: Upstream
    path: str  # path on the upstream, percent-decoded (for provider detection)
    url: URL  # full upstream URL, encoded exactly as the client sent it


class RouteError(ValueError):
    """The path is not routable; the message is safe to show the client."""


def parse_upstream(spec: str) -> Upstream:
    """``NAME=URL`` -> Upstream, with a clear error for anything malformed."""
    name, sep, url = spec.partition("=")
    name = name.strip()
    if not sep or not name or not url.strip():
        raise ValueError(f"upstream {spec!r}: expected NAME=URL, e.g. groq=https://api.groq.com")
    return make_upstream(name, url.strip())


def make_upstream(name: str, url: str) -> Upstream:
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"upstream name {name!r}: use letters, digits, '-' and '_' only")
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"upstream {name}: {url!r} is not an http(s) URL with a host")
    if parsed.query_string or parsed.fragment or parsed.user:
        raise ValueError(f"upstream {name}: {url!r} must not carry a query, fragment or credentials")
    return Upstream(name, parsed)


_IIS_ESCAPE = re.compile(r"%u([0-9a-fA-F]{4})")
#: Overlong UTF-8 encodings of "." that lenient decoders accept.
_OVERLONG_DOTS = (b"\xc0\xae", b"\xe0\x80\xae")
_PADDING = " \t\r\n\x00\x0b\x0c"


def _decode_once(text: str) -> str:
    text = _IIS_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    raw = unquote_to_bytes(text)
    for overlong in _OVERLONG_DOTS:
        raw = raw.replace(overlong, b".")
    return raw.decode("utf-8", "replace")


def _is_dot_segment(segment: str) -> bool:
    """Would some server on the way take this raw path segment for ``.`` or ``..``?"""
    if "." not in segment and "%" not in segment and segment.isascii():
        return False  # the usual segment ("v1", "chat"): nothing here can become a dot
    text = segment
    for _ in range(5):  # %25 nests: decode until nothing changes (bounded)
        decoded = _decode_once(text)
        if decoded == text:
            break
        text = decoded
    for part in re.split(r"[/\\]", text):
        part = unicodedata.normalize("NFKC", part.split(";", 1)[0]).strip(_PADDING)
        if part in (".", ".."):
            return True
    return False


def route(raw_path: str, query_string: str, upstreams: Mapping[str, Upstream]) -> Target:
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise RouteError("path must be absolute (meterproxy is not an open proxy)")
    if "\\" in raw_path or "\x00" in raw_path:
        raise RouteError("path contains a backslash or NUL")
    first, slash, rest = raw_path[1:].partition("/")
    if "%" in first:
        raise RouteError("route name must not be percent-encoded")
    for segment in rest.split("/"):
        if _is_dot_segment(segment):
            raise RouteError("dot segments are not allowed in the path")
        decoded = unquote(segment)
        if "\\" in decoded:  # %5C: some servers treat it as a slash, then as a dot-segment boundary
            raise RouteError("path contains an encoded backslash")
    if first == "v1" and "v1" not in upstreams:
        upstream = upstreams.get("openai")
        upstream_path = "/v1" + (slash + rest)
    else:
        upstream = upstreams.get(first)
        upstream_path = slash + rest
    if upstream is None:
        raise RouteError(
            f"no upstream is configured for /{first} (configured: {', '.join(sorted(upstreams)) or 'none'})"
        )
    joined = upstream.origin_and_path + upstream_path
    if query_string:
        joined += "?" + query_string
    url = URL(joined, encoded=True)
    if url.host != upstream.base_url.host or url.scheme != upstream.base_url.scheme:
        raise RouteError("path would leave the configured upstream")
    decoded = unquote(url.raw_path)
    return Target(upstream, decoded, url)

"""The tap: reads usage out of a response while its bytes pass through the proxy.

`ResponseTap.feed(chunk)` is called with every chunk the upstream sends and
returns the bytes to forward. In pass-through mode that is the chunk itself,
untouched: the tap only looks (decompressing a copy when the body is
compressed). In rewrite mode (the proxy added ``include_usage`` to an OpenAI
stream) the tap forwards whole SSE events as they complete, minus the usage
chunk the client never asked for; a partial event is held only until its
blank line arrives, which the client could not have used anyway.

Nothing a parser does can break forwarding: any exception inside the tap is
caught, recorded as a note, and metering of that response stops while its
bytes keep flowing.

JSON answers are kept whole up to `MAX_JSON_BYTES` and parsed at the end;
beyond that only the head and a rolling tail are kept (usage and model sit at
the ends of every provider's body), so memory stays bounded for any answer.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

from meterproxy.providers.base import ParseResult, UsageParser
from meterproxy.sse import SSEDecoder

__all__ = ["MAX_JSON_BYTES", "ResponseTap", "decodable_encodings"]

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 * 1024 * 1024
_HEAD_BYTES = 64 * 1024
_TAIL_BYTES = 1024 * 1024


def _brotli() -> Any:
    try:
        import brotli  # type: ignore[import-not-found,import-untyped,unused-ignore]

        return brotli
    except ImportError:  # pragma: no cover - depends on the environment
        return None


def decodable_encodings() -> set[str]:
    """Content-codings the tap can read; the proxy asks upstreams for no others."""
    codings = {"gzip", "x-gzip", "deflate", "identity"}
    if _brotli() is not None:
        codings.add("br")
    return codings


class _Decompressor:
    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._obj: Any
        if coding in ("gzip", "x-gzip"):
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._obj = None  # zlib-wrapped or raw: decided on the first bytes
        elif coding == "br":
            brotli = _brotli()
            if brotli is None:
                raise ValueError("content-encoding br cannot be read (brotli not installed)")
            self._obj = brotli.Decompressor()
        else:
            raise ValueError(f"content-encoding {coding!r} cannot be read")

    def feed(self, chunk: bytes) -> bytes:
        if self._coding == "deflate" and self._obj is None:
            wrapped = len(chunk) >= 2 and (chunk[0] & 0x0F) == 8 and ((chunk[0] << 8) | chunk[1]) % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        if self._coding == "br":
            return bytes(self._obj.process(chunk))
        return bytes(self._obj.decompress(chunk))


class ResponseTap:
    __slots__ = (
        "_body",
        "_broken",
        "_capture",
        "_capture_limit",
        "_decoder",
        "_decomp",
        "_head",
        "_notes",
        "_on_chunk",
        "_parser",
        "_quiet",
        "_rewrite",
        "_size",
        "_sse",
        "capture_truncated",
    )

    def __init__(
        self,
        parser: UsageParser,
        *,
        sse: bool,
        rewrite: bool = False,
        content_encoding: str | None = None,
        capture_limit: int = 0,
    ) -> None:
        self._parser = parser
        # store_content: keep the first ``capture_limit`` decoded bytes of the answer.
        self._capture_limit = capture_limit
        self._capture = bytearray() if capture_limit else None
        self.capture_truncated = False
        self._sse = sse
        self._notes: list[str] = []
        coding = (content_encoding or "identity").strip().lower()
        self._decomp: _Decompressor | None = None
        self._broken = False
        if coding != "identity":
            try:
                self._decomp = _Decompressor(coding)
            except ValueError as exc:
                self._fail(str(exc))
        # Rewriting needs plain text; the proxy never injects into a compressed stream.
        self._rewrite = rewrite and sse and self._decomp is None and not self._broken
        self._decoder = SSEDecoder() if sse else None
        # A parser of a binary stream (Bedrock's event-stream) reads each chunk as it
        # arrives instead of a body kept whole; `on_body` then only marks the end.
        self._on_chunk = None if sse else getattr(parser, "on_chunk", None)
        # A parser may take whole events it has no use for in bulk (``quiet(events)``: how many
        # leading bytes it took, and what its on_event would have returned for them); those
        # skip the decoder, so a content delta costs a few byte searches per read, not an
        # event object.
        self._quiet: Callable[[bytes], tuple[int, bytes]] | None = getattr(parser, "quiet", None)
        self._body = bytearray()
        self._head = b""
        self._size = 0

    @property
    def rewriting(self) -> bool:
        return self._rewrite

    def _fail(self, why: str) -> None:
        self._broken = True
        self._notes.append(why)

    def feed(self, chunk: bytes) -> bytes:
        if self._rewrite:
            return self._feed_rewrite(chunk)
        if not self._broken:
            try:
                data = self._decomp.feed(chunk) if self._decomp else chunk
                if self._capture is not None:
                    self._keep(data)
                self._observe(data)
            except Exception as exc:
                log.warning("usage tap stopped: %s", exc)
                self._fail(f"tap error: {exc}")
        return chunk

    def _keep(self, data: bytes) -> None:
        assert self._capture is not None
        room = self._capture_limit - len(self._capture)
        if len(data) > room:
            self.capture_truncated = True
        if room > 0:
            self._capture += data[:room]

    @property
    def captured(self) -> bytes | None:
        return bytes(self._capture) if self._capture is not None else None

    def _observe(self, data: bytes) -> None:
        if self._decoder is not None:
            self._events(data, None)
        elif self._on_chunk is not None:
            self._on_chunk(data)
        else:
            self._collect(data)

    def _events(self, data: bytes, out: list[bytes] | None) -> None:
        """SSE bytes to the parser; with ``out`` (rewrite mode) what the client gets, in order.

        Runs of whole events the parser declares quiet (`quiet(events) -> (taken, bytes)`)
        are taken in bulk; each other event goes through the decoder and `on_event`.
        """
        quiet = self._quiet
        decoder = self._decoder
        assert decoder is not None
        pos = 0
        misses = 0  # quiet runs that took nothing, in a row: after two, decode the rest
        if quiet is not None:
            while misses < 2:
                if not decoder.idle():  # finish the pending event first
                    i = data.find(b"\n\n", pos)
                    if i < 0:
                        break
                    self._decode(data[pos : i + 2], out)
                    pos = i + 2
                    continue
                end = data.rfind(b"\n\n", pos) + 2
                # LF line endings only (every provider's), like the decoder's own fast path.
                if end < pos + 2 or data.find(b"\r", pos, end) >= 0:
                    break
                taken, emitted = quiet(data[pos:end])
                if taken and out is not None:
                    out.append(emitted)
                pos += taken
                misses = 0 if taken else misses + 1
                if pos >= end:
                    break
                i = data.find(b"\n\n", pos)  # an event the parser must see, on its own
                self._decode(data[pos : i + 2], out)
                pos = i + 2
        self._decode(data[pos:] if pos else data, out)

    def _decode(self, data: bytes, out: list[bytes] | None) -> None:
        assert self._decoder is not None
        for event in self._decoder.feed(data):
            kept = self._parser.on_event(event)
            if out is not None and kept is not None:
                out.append(kept)
        if out is not None and self._decoder.dropped_raw:
            out.append(self._decoder.dropped_raw)

    def _collect(self, data: bytes) -> None:
        self._size += len(data)
        self._body += data
        if self._size > MAX_JSON_BYTES:
            if not self._head:
                self._head = bytes(self._body[:_HEAD_BYTES])
            if len(self._body) > 2 * _TAIL_BYTES:
                del self._body[: len(self._body) - _TAIL_BYTES]

    def _feed_rewrite(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        try:
            self._events(chunk, out)
        except Exception as exc:
            # Stop rewriting; hand over what the decoder holds so no byte is lost.
            assert self._decoder is not None
            log.warning("usage tap stopped while rewriting: %s", exc)
            self._fail(f"tap error: {exc}")
            self._rewrite = False
            events, tail = self._decoder.finish()
            out.extend(e.raw for e in events)
            out.append(tail)
        emitted = b"".join(out)
        if self._capture is not None:
            self._keep(emitted)
        return emitted

    def finish(self) -> bytes:
        """End of the upstream body: flush the decoders; return bytes still owed to the client."""
        out = b""
        if self._decoder is not None:
            events, tail = self._decoder.finish()
            if self._rewrite:
                kept = [self._parser.on_event(e) for e in events]
                out = b"".join(k for k in kept if k is not None) + tail
            elif not self._broken:
                try:
                    for event in events:
                        self._parser.on_event(event)
                except Exception as exc:
                    self._fail(f"tap error: {exc}")
            if self._decoder.oversized:
                self._notes.append(f"{self._decoder.oversized} oversized SSE event(s) skipped")
        elif not self._broken:
            try:
                truncated = self._size > MAX_JSON_BYTES
                body = self._head + b"\n" + bytes(self._body) if truncated else bytes(self._body)
                self._parser.on_body(body, truncated)
            except Exception as exc:
                self._fail(f"tap error: {exc}")
        return out

    def result(self) -> ParseResult:
        result = self._parser.result()
        result.notes.extend(self._notes)
        return result

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

A compressed answer is inflated (a copy, for metering) only up to
`INFLATE_RATIO` times the compressed bytes seen so far plus `INFLATE_ALLOWANCE`:
each call asks zlib for no more than that (``max_length``), so a decompression
bomb (1 MB inflating to 1 GiB) costs at most a few tens of MiB of work and
memory, never seconds of a blocked event loop. Past the bound metering stops,
the result is flagged ``usage_source="invalid"`` with a note, and the original
bytes keep flowing. Real answers never come near it: the allowance alone covers
16 MiB of text, and JSON or SSE compresses 5 to 30 times, not 100.

JSON answers are kept whole up to `MAX_JSON_BYTES` and parsed at the end;
beyond that only the head and a rolling tail are kept (usage and model sit at
the ends of every provider's body), so memory stays bounded for any answer.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from meterproxy.providers.base import ParseResult, UsageParser
from meterproxy.sse import SSEDecoder

__all__ = ["INFLATE_ALLOWANCE", "INFLATE_RATIO", "MAX_JSON_BYTES", "ResponseTap", "decodable_encodings"]

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 * 1024 * 1024
_HEAD_BYTES = 64 * 1024
_TAIL_BYTES = 1024 * 1024

#: Metering inflates at most this many times the compressed bytes seen so far ...
INFLATE_RATIO = 100
#: ... plus this much (so small, highly compressible answers are never cut).
INFLATE_ALLOWANCE = 16 * 1024 * 1024
#: Inflated in pieces of at most this, each passed on before the next is made.
_PIECE = 1024 * 1024


class InflateLimitExceeded(Exception):
    """The answer inflates past the bound: a decompression bomb, or near enough."""


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
        self._in = 0
        self._out = 0
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

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The inflated bytes of ``chunk``, in pieces of at most `_PIECE` (memory stays flat)."""
        if self._coding == "deflate" and self._obj is None:
            wrapped = len(chunk) >= 2 and (chunk[0] & 0x0F) == 8 and ((chunk[0] << 8) | chunk[1]) % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        self._in += len(chunk)
        limit = INFLATE_RATIO * self._in + INFLATE_ALLOWANCE
        if self._coding == "br":
            # brotli's Python binding has no output limit: checked after the fact.
            data = bytes(self._obj.process(chunk))
            self._out += len(data)
            if self._out > limit:
                raise self._exceeded()
            yield data
            return
        data = chunk
        while True:
            ask = min(limit - self._out, _PIECE)
            if ask <= 0:
                raise self._exceeded()
            piece = self._obj.decompress(data, ask)
            self._out += len(piece)
            if piece:
                yield piece
            data = self._obj.unconsumed_tail
            if not data and len(piece) < ask:
                return  # all input consumed and nothing held back by the output limit

    def _exceeded(self) -> InflateLimitExceeded:
        return InflateLimitExceeded(
            f"decompression bomb: {self._in} compressed bytes inflate past {self._out}; "
            "metering stopped, the original bytes were relayed"
        )


class ResponseTap:
    __slots__ = (
        "_body",
        "_bomb",
        "_broken",
        "_capture",
        "_capture_limit",
        "_decoder",
        "_decomp",
        "_first",
        "_head",
        "_notes",
        "_on_chunk",
        "_parser",
        "_plain",
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
        self._decomp: _Decompressor | None = None
        self._broken = False
        self._bomb = False
        if content_encoding is not None:  # most answers have none: no strip and lower then
            coding = content_encoding.strip().lower()
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
        # SSE only (`_events`): no look for it on a JSON answer's parser.
        self._quiet: Callable[[bytes], tuple[int, bytes]] | None = (
            getattr(parser, "quiet", None) if sse else None
        )
        self._body = bytearray()
        self._head = b""
        self._size = 0
        #: A JSON answer's first piece, kept as it came while it is the only one (most
        #: answers are): parsed at the end without a copy into ``_body`` and out again.
        self._first = b""
        #: A JSON answer read only at its end: `feed` just keeps its bytes.
        self._plain = (
            not sse
            and self._decomp is None
            and not self._broken
            and self._capture is None
            and self._on_chunk is None
        )

    @property
    def rewriting(self) -> bool:
        return self._rewrite

    def _fail(self, why: str) -> None:
        self._broken = True
        self._notes.append(why)

    def feed(self, chunk: bytes) -> bytes:
        if self._plain:  # nothing here can raise: no try needed
            self._collect(chunk)
            return chunk
        if self._rewrite:
            return self._feed_rewrite(chunk)
        if not self._broken:
            try:
                for data in self._decomp.feed(chunk) if self._decomp else (chunk,):
                    if self._capture is not None:
                        self._keep(data)
                    self._observe(data)
            except InflateLimitExceeded as exc:
                log.warning("usage tap stopped: %s", exc)
                self._bomb = True
                self._fail(str(exc))
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
        if not self._size and len(data) <= MAX_JSON_BYTES:
            self._first = data
            self._size = len(data)
            return
        if self._first:
            self._body += self._first
            self._first = b""
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
                if self._first:
                    body = self._first
                elif truncated:
                    body = self._head + b"\n" + bytes(self._body)
                else:
                    body = bytes(self._body)
                self._parser.on_body(body, truncated)
            except Exception as exc:
                self._fail(f"tap error: {exc}")
        return out

    def result(self) -> ParseResult:
        result = self._parser.result()
        if self._notes:
            result.notes.extend(self._notes)
        if self._bomb:
            # Whatever was read before the bound came from an answer we refused to inflate.
            result.usage, result.usage_source = None, "invalid"
        return result

"""An incremental RFC 6455 frame decoder that reads a copy of a WebSocket's bytes.

The proxy relays a WebSocket's bytes untouched (`meterproxy.websocket`); this
module only *reads* a copy of one direction to find the usage events in it. It
is a push decoder: `MessageDecoder.feed` takes whatever bytes arrived (any
split, one byte at a time included), keeps the partial tail, and returns only
the complete messages: data frames are reassembled across continuation frames,
unmasked (client frames are masked) and, when ``permessage-deflate`` (RFC
7692) was negotiated, inflated with the same sliding window the peer uses.

It never raises and never holds more than ``max_message`` bytes of one
message: a message larger than that is inflated (the compression window must
stay in step) but not kept, and is reported as `Message.skipped`. A stream that
breaks the framing rules stops the decoder (`MessageDecoder.broken` says why);
the relay carries on regardless, because the decoder is only a reader.
Control frames (close, ping, pong) are not returned: the peers answer them
themselves, through the relay.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["DeflateParams", "Message", "MessageDecoder", "parse_deflate_params"]

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
#: Largest message kept for parsing; usage events are a few KiB, audio deltas far less than this.
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One complete data message: ``text`` or binary, its payload (empty if ``skipped``)."""

    text: bool
    payload: bytes
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """What permessage-deflate means for one direction: window size and context reuse."""

    window_bits: int = 15
    no_context_takeover: bool = False


def parse_deflate_params(extensions: str | None, *, from_server: bool) -> DeflateParams | None:
    """The negotiated permessage-deflate of one direction, from the 101's ``Sec-WebSocket-Extensions``.

    ``None`` when the extension was not accepted (frames are then never compressed).
    Parameters named ``server_*`` describe what the server compresses, ``client_*``
    what the client compresses (RFC 7692 section 7.1).
    """
    if not extensions:
        return None
    side = "server" if from_server else "client"
    for offer in extensions.split(","):
        parts = [p.strip() for p in offer.split(";")]
        if parts[0].lower() != "permessage-deflate":
            continue
        bits, takeover = 15, False
        for param in parts[1:]:
            name, _, value = param.partition("=")
            name = name.strip().lower()
            if name == f"{side}_no_context_takeover":
                takeover = True
            elif name == f"{side}_max_window_bits" and value.strip().strip('"').isdigit():
                bits = int(value.strip().strip('"'))
        return DeflateParams(window_bits=min(max(bits, 9), 15), no_context_takeover=takeover)
    return None


class MessageDecoder:
    """Push decoder of one direction's frames into messages (see module docstring)."""

    __slots__ = (
        "_buf",
        "_compressed",
        "_deflate",
        "_fin",
        "_in_message",
        "_inflater",
        "_key",
        "_key_at",
        "_max",
        "_opcode",
        "_parts",
        "_remaining",
        "_size",
        "_skipping",
        "_text",
        "broken",
    )

    def __init__(self, deflate: DeflateParams | None = None, max_message: int = MAX_MESSAGE) -> None:
        self._buf = b""
        self._deflate = deflate
        self._inflater: zlib._Decompress | None = None
        self._max = max_message
        # The message being reassembled.
        self._in_message = False
        self._parts: list[bytes] = []
        self._size = 0
        self._text = False
        self._compressed = False
        self._skipping = False
        # The frame whose payload is being read (its header is done).
        self._remaining = -1  # payload bytes still to come; -1: reading a header
        self._opcode = 0
        self._fin = False
        self._key: bytes | None = None
        self._key_at = 0
        #: Why decoding stopped (a framing error), or None while it works.
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[Message]:
        """Take the next bytes of the stream; return the messages they complete."""
        out: list[Message] = []
        if self.broken is not None or not data:
            return out
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos, n = 0, len(buf)
        while pos < n or self._remaining == 0:
            if self._remaining < 0:
                used = self._header(buf, pos)
                if used == 0:
                    self._buf = buf[pos:]
                    break
                if self.broken is not None:
                    return out
                pos += used
                continue
            take = min(self._remaining, n - pos)
            if take:
                self._payload(buf[pos : pos + take])
                pos += take
                self._remaining -= take
            if self._remaining == 0:
                self._remaining = -1
                message = self._frame_done()
                if self.broken is not None:
                    return out
                if message is not None:
                    out.append(message)
        return out

    def _header(self, buf: bytes, pos: int) -> int:
        """Read one frame header at ``pos``: its size, or 0 when it has not all arrived."""
        avail = len(buf) - pos
        if avail < 2:
            return 0
        b0, b1 = buf[pos], buf[pos + 1]
        length, head = b1 & 0x7F, 2
        if length == 126:
            if avail < 4:
                return 0
            length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            if avail < 10:
                return 0
            length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        masked = b1 & 0x80
        if masked:
            if avail < head + 4:
                return 0
            self._key = buf[pos + head : pos + head + 4]
            head += 4
        else:
            self._key = None
        self._key_at = 0
        fin, rsv1, opcode = bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F
        self._fin, self._opcode, self._remaining = fin, opcode, length
        if length >> 63:
            self._break("frame length has its top bit set")
        elif opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                self._break(f"unknown control opcode {opcode:#x}")
            elif not fin or length > 125:
                self._break("fragmented or oversized control frame")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._in_message:
                self._break("a new message began inside a fragmented one")
            elif rsv1 and self._deflate is None:
                self._break("compressed frame but permessage-deflate was not negotiated")
            else:
                self._in_message, self._text, self._compressed = True, opcode == OP_TEXT, rsv1
        elif opcode == OP_CONTINUATION:
            if not self._in_message:
                self._break("continuation frame outside a message")
        else:
            self._break(f"unknown data opcode {opcode:#x}")
        return head

    def _payload(self, chunk: bytes) -> None:
        if self._opcode >= 0x8:
            return  # control frames are the peers' business
        if self._key is not None:
            chunk = _unmask(chunk, self._key, self._key_at)
            self._key_at = (self._key_at + len(chunk)) % 4
        if self._compressed:
            self._inflate(chunk)
        else:
            self._keep(chunk)

    def _frame_done(self) -> Message | None:
        if self._opcode >= 0x8 or not self._fin:
            return None
        if self._compressed:
            self._inflate(_DEFLATE_TAIL)
            if self._deflate is not None and self._deflate.no_context_takeover:
                self._inflater = None
        if self.broken is not None:
            return None
        text, skipped = self._text, self._skipping
        payload = b"" if skipped else b"".join(self._parts)
        self._in_message, self._parts, self._size, self._skipping = False, [], 0, False
        return Message(text=text, payload=payload, skipped=skipped)

    def _keep(self, piece: bytes) -> None:
        if self._skipping or not piece:
            return
        self._size += len(piece)
        if self._size > self._max:
            self._skipping, self._parts = True, []
            return
        self._parts.append(piece)

    def _inflate(self, data: bytes) -> None:
        """Inflate in bounded steps (a small frame may inflate to gigabytes: a bomb is skipped)."""
        assert self._deflate is not None
        if self._inflater is None:
            self._inflater = zlib.decompressobj(-self._deflate.window_bits)
        inflater = self._inflater
        try:
            self._keep(inflater.decompress(data, _STEP))
            while inflater.unconsumed_tail:
                self._keep(inflater.decompress(inflater.unconsumed_tail, _STEP))
        except zlib.error as exc:
            self._break(f"permessage-deflate data did not inflate: {exc}")

    def _break(self, why: str) -> None:
        self.broken = why
        self._buf, self._parts, self._inflater = b"", [], None


#: Inflate output per step; bounds the memory one decompress call can take.
_STEP = 1 << 20


def _unmask(payload: bytes, key: bytes, offset: int) -> bytes:
    """XOR with the 4-byte masking key from ``offset``, as one big integer (no loop per byte)."""
    n = len(payload)
    if not n:
        return payload
    key = key[offset:] + key[:offset]
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")

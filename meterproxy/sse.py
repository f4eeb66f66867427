"""A push decoder for Server-Sent Events that never trusts chunk boundaries.

The proxy hands every chunk it forwards to `SSEDecoder.feed`, which returns only
the events that are complete by then and keeps the partial tail. `finish()`
flushes an event the stream ended without terminating. An event or a UTF-8
character may be split anywhere, including between the CR and LF of a CRLF
line ending; lines may end in CRLF, LF or CR (all three are legal SSE).

Each `SSEEvent` keeps the exact bytes it was parsed from (``raw``: its lines and
the blank line that ended it, plus any comment or blank lines before it), so a
caller that rewrites a stream (dropping the usage chunk that the proxy asked
for) can re-emit every other event byte for byte.

Decoding is lazy where it is cheap to be: ``data`` stays bytes; parsers look for
a marker (``b"usage"``) before they pay for JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_EVENT_BYTES", "SSEDecoder", "SSEEvent"]

#: An event larger than this is dropped from parsing (its bytes still pass through).
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: bytes
    raw: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class SSEDecoder:
    """Incremental SSE parser: ``feed(bytes) -> list[SSEEvent]``, ``finish()``."""

    __slots__ = (
        "_buf",
        "_consumed",
        "_data",
        "_event",
        "_has_data",
        "_raw_start",
        "dropped_raw",
        "oversized",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event: str | None = None
        self._data: list[bytes] = []
        self._has_data = False
        # Offset in _buf where the raw bytes of the pending event start.
        self._raw_start = 0
        # Offset in _buf where line scanning resumes.
        self._consumed = 0
        #: Bytes of an oversized event that the last feed() dropped from parsing; a caller
        #: that re-emits events must forward these itself.
        self.dropped_raw = b""
        #: Count of events dropped for exceeding MAX_EVENT_BYTES.
        self.oversized = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        self.dropped_raw = b""
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if not self._buf and self._at_boundary():
            # Nothing pending (reads usually end on an event boundary): decode straight
            # from the chunk and keep only its unfinished tail, no copy of the rest.
            pos = self._blocks(chunk, 0, events)
            pos = self._scan(chunk, pos, events)
            start = self._raw_start
            self._buf = bytearray(chunk[start:]) if start < len(chunk) else bytearray()
        else:
            buf = self._buf
            buf += chunk
            pos = self._consumed
            if not self._at_boundary():
                # Mid-event: lines until the pending event is dispatched, one at a time.
                pos = self._scan(buf, pos, events, until_event=True)
            if self._at_boundary() and buf.find(b"\n\n", pos) >= 0:
                pos = self._blocks(bytes(buf), pos, events)
            pos = self._scan(buf, pos, events)
            start = self._raw_start
            # Drop what is fully consumed: everything before the pending event's raw start.
            if start:
                del buf[:start]
        self._consumed = pos - start
        self._raw_start = 0
        if len(self._buf) > MAX_EVENT_BYTES:
            # A runaway event: stop accumulating it, keep the stream flowing.
            self.oversized += 1
            self._reset_event()
            self.dropped_raw = bytes(self._buf)
            self._buf = bytearray()
            self._consumed = 0
        return events

    def idle(self) -> bool:
        """Nothing is pending: the next byte fed starts a new event (or a blank/comment line)."""
        return not self._buf and self._at_boundary()

    def _at_boundary(self) -> bool:
        """Nothing of the pending event has been scanned yet."""
        return not self._has_data and self._event is None and self._consumed == self._raw_start

    def _blocks(self, buf: bytes, pos: int, events: list[SSEEvent]) -> int:
        """The fast path, from an event boundary: whole events split on blank lines at once.

        Only for LF line endings (every provider's); a CR anywhere ahead leaves the
        bytes to `_scan`. An event that is one ``data:`` line (nearly all of them)
        costs one slice; any other block (comments, ``event:``, several data lines,
        extra blank lines) goes through `_scan` over exactly its own lines, so both
        paths give the same events and raw bytes.
        """
        last = buf.rfind(b"\n\n", pos)
        if last < 0 or buf.find(b"\r", pos, last) >= 0:
            return pos
        start = pos
        for block in buf[pos:last].split(b"\n\n"):
            end = start + len(block) + 2
            if b"\n" not in block and block[:5] == b"data:":
                data = block[6:] if block[5:6] == b" " else block[5:]
                events.append(SSEEvent(None, data, buf[self._raw_start : end]))
                self._raw_start = end
            else:
                self._scan(buf, start, events, limit=end)
            start = end
        return last + 2

    def _scan(
        self,
        buf: bytes | bytearray,
        pos: int,
        events: list[SSEEvent],
        until_event: bool = False,
        limit: int | None = None,
    ) -> int:
        """Line by line (any line ending) from ``pos``; returns where it stopped."""
        n = len(buf) if limit is None else limit
        count = len(events)
        while pos < n:
            lf = buf.find(b"\n", pos, n)
            cr = buf.find(b"\r", pos, lf if lf != -1 else n)
            if cr != -1:
                # CR ends the line; a CR at the very end may be the first half of CRLF.
                if cr == len(buf) - 1:
                    break
                end = cr
                nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            elif lf != -1:
                end = lf
                nxt = lf + 1
            else:
                break
            self._line(buf, bytes(buf[pos:end]), nxt, events)
            pos = nxt
            if until_event and len(events) > count:
                break
        return pos

    def _line(self, buf: bytes | bytearray, line: bytes, nxt: int, events: list[SSEEvent]) -> None:
        if not line:
            if self._has_data:
                events.append(
                    SSEEvent(self._event, b"\n".join(self._data), bytes(buf[self._raw_start : nxt]))
                )
                self._reset_event()
                self._raw_start = nxt
            else:
                # A blank line with no data dispatches nothing (spec); an event name alone is discarded.
                self._event = None
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", errors="replace")
        # "id", "retry" and unknown fields do not matter for metering.

    def _reset_event(self) -> None:
        self._event = None
        self._data = []
        self._has_data = False

    def finish(self) -> tuple[list[SSEEvent], bytes]:
        """Flush at end of stream.

        Returns the events still pending (a final event without its blank line
        still counts) and any raw bytes that belong to no event (trailing blank
        or comment lines), so a caller re-emitting events loses nothing.
        """
        buf = self._buf
        events: list[SSEEvent] = []
        if self._consumed < len(buf):
            # The last line had no terminator (or ended with a lone CR).
            line = bytes(buf[self._consumed :]).rstrip(b"\r")
            self._line(buf, line, len(buf), events)
        if self._has_data:
            events.append(SSEEvent(self._event, b"\n".join(self._data), bytes(buf[self._raw_start :])))
            tail = b""
        else:
            tail = bytes(buf[self._raw_start :])
        self._reset_event()
        self._buf = bytearray()
        self._consumed = 0
        self._raw_start = 0
        return events, tail

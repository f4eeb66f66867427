"""A fake OpenAI-style upstream built to never be the bottleneck.

A raw asyncio `Protocol` on uvloop speaking just enough HTTP/1.1 (keep-alive,
Content-Length request bodies, chunked responses): no framework, no per-request
allocations beyond the answer itself. The answer's shape is chosen by the
request body so every client (our load generator, meterproxy, LiteLLM's OpenAI
client) asks for it the same way:

- ``"model":"bench-s<N>-d<MS>"`` with ``"stream":true``: an SSE stream of a
  role chunk, N content chunks and a finish chunk, ``MS`` milliseconds apart,
  then ``data: [DONE]``. With ``"include_usage":true`` every chunk carries
  ``"usage":null`` and a usage-only chunk precedes ``[DONE]``, as OpenAI does.
- any other request: a ``chat.completion`` JSON body with usage.

Run ``python bench/upstream.py --port P [--procs K]``; K processes share the
port with SO_REUSEPORT. It prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import multiprocessing
import os
import re
import signal
import socket

__all__ = ["main", "serve"]

_MODEL = re.compile(rb'"model"\s*:\s*"bench-s(\d+)-d(\d+)"')
_JSON_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello from the fake upstream, this is a short answer."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21,'
    b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'
)
_JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_JSON_BODY)).encode()
    + b"\r\n\r\n"
    + _JSON_BODY
)
_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_CHUNK_PRE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench","choices":['
)


def _event(choices: bytes, usage_null: bool) -> bytes:
    return _CHUNK_PRE + choices + b"]" + (b',"usage":null' if usage_null else b"") + b"}\n\n"


def _stream_events(n: int, include_usage: bool) -> list[bytes]:
    events = [
        _event(b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}', include_usage)
    ]
    for i in range(n):
        delta = b'{"index":0,"delta":{"content":" tok%d"},"finish_reason":null}' % i
        events.append(_event(delta, include_usage))
    events.append(_event(b'{"index":0,"delta":{},"finish_reason":"stop"}', include_usage))
    if include_usage:
        events.append(
            _CHUNK_PRE
            + b'],"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 12)
        )
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_CACHE: dict[tuple[int, bool], list[bytes]] = {}


def _frames(n: int, include_usage: bool) -> list[bytes]:
    key = (n, include_usage)
    if key not in _CACHE:
        _CACHE[key] = [_chunked(e) for e in _stream_events(n, include_usage)]
    return _CACHE[key]


class _Pacer:
    """One per event loop: writes every paced stream's next frame when its time comes.

    No task, coroutine or timer per stream: the streams wait in buckets keyed by the
    millisecond their next frame is due, and one timer (armed for the earliest bucket)
    writes every due stream's frame in one callback. Each stream keeps its own phase:
    frame k of a stream whose head went out at t0 is due at t0 + k * delay, so events
    never drift later and 2,000 streams started at different moments do not bunch into
    one burst per tick. (The former ``_slow`` coroutine, one task and one
    ``asyncio.sleep`` per event, could not pace 100,000 events/s on a shared core.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, list[_Http]] = {}
        self.ticks: list[int] = []  # heap of the buckets' keys
        self.timer: asyncio.TimerHandle | None = None
        self.armed = 0
        self.firing = False  # _fire arms the timer once, when it is done

    def now_ms(self) -> int:
        return round(self.loop.time() * 1000)

    def add(self, stream: _Http, due_ms: int) -> None:
        bucket = self.buckets.get(due_ms)
        if bucket is None:
            self.buckets[due_ms] = [stream]
            heapq.heappush(self.ticks, due_ms)
            if not self.firing and (self.timer is None or due_ms < self.armed):
                self._arm(due_ms)
        else:
            bucket.append(stream)

    def _arm(self, due_ms: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed = due_ms
        self.timer = self.loop.call_at(due_ms / 1000, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = self.now_ms()
        ticks, buckets = self.ticks, self.buckets
        self.firing = True
        try:
            while ticks and ticks[0] <= now:
                for stream in buckets.pop(heapq.heappop(ticks)):
                    stream.paced_frame(self)
        finally:
            self.firing = False
        if ticks:
            self._arm(ticks[0])


class _Http(asyncio.Protocol):
    def __init__(self, pacer: _Pacer) -> None:
        self.pacer = pacer
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        # the paced stream in flight: its frames, the next one's index, its head's time, the gap
        self.frames: list[bytes] = []
        self.sent = 0
        self.t0_ms = 0
        self.delay_ms = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        while self.transport is not None and not self.busy:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            length = 0
            i = head.find(b"\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r", i)
                length = int(head[i + 16 : j if j > 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self._answer(body)

    def _answer(self, body: bytes) -> None:
        assert self.transport is not None
        m = _MODEL.search(body)
        streaming = b'"stream":true' in body.replace(b" ", b"")
        if m is None or not streaming:
            self.transport.write(_JSON_RESPONSE)
            return
        n, delay_ms = int(m.group(1)), int(m.group(2))
        frames = _frames(n, b'"include_usage":true' in body.replace(b" ", b""))
        if delay_ms == 0:
            self.transport.write(_SSE_HEAD + b"".join(frames) + b"0\r\n\r\n")
            return
        # Paced: the head and the first frame at once, frame k at t0 + k * delay.
        self.busy = True
        pacer = self.pacer
        self.frames, self.sent, self.delay_ms = frames, 1, delay_ms
        self.t0_ms = pacer.now_ms()
        self.transport.write(_SSE_HEAD + frames[0])
        pacer.add(self, self.t0_ms + delay_ms)

    def paced_frame(self, pacer: _Pacer) -> None:
        t = self.transport
        if t is None:
            return  # the client left: drop the stream
        frames, k = self.frames, self.sent
        t.write(frames[k])
        k += 1
        if k < len(frames):
            self.sent = k
            pacer.add(self, self.t0_ms + k * self.delay_ms)
            return
        t.write(b"0\r\n\r\n")
        self.frames = []
        self.busy = False
        self._next()


def serve(port: int) -> None:
    import uvloop

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        pacer = _Pacer(loop)
        server = await loop.create_server(lambda: _Http(pacer), sock=sock, backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()

    uvloop.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--procs", type=int, default=1)
    args = ap.parse_args()
    if args.procs <= 1:
        serve(args.port)
        return
    procs = [multiprocessing.Process(target=serve, args=(args.port,)) for _ in range(args.procs)]
    for p in procs:
        p.start()
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(p.pid or 0, signal.SIGTERM) for p in procs])
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()

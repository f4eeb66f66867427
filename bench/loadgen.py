"""A bounded closed-loop HTTP/1.1 load generator that checks every answer.

``C`` keep-alive connections each send a request, wait for the whole answer,
and send the next, until the time budget (or request budget) runs out. Req/s
and the latency samples are the answers that complete inside the measured
window (after the warm-up, before the deadline); answers still in flight at
the deadline are awaited and checked, and errors are counted over the whole run. Raw asyncio protocols on
uvloop, so the client costs far less per request than the proxies it measures.

Every answer is checked: status 200, a complete body (Content-Length or a
chunked body with its terminating chunk), and for streams the decoded SSE
carries every content chunk and ends with ``[DONE]``; for JSON, usage is
present. Anything else counts as an error, never as a latency sample.

Prints one JSON object: requests, errors, req/s, latency and time-to-first-byte
percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from array import array

__all__ = ["main", "run_load"]


class _Lowat:
    """A cheap client for paced streams (``--read-lowat BYTES``): wake up every few events.

    After a stream's first body byte its socket gets ``SO_RCVLOWAT`` = BYTES, so the
    kernel neither wakes the client nor reports the socket readable until that much has
    queued: one read then takes several events. The sender's side is unchanged (each
    event is still its own write, queued as it comes, a few hundred bytes, far from any
    buffer limit). Before the stream's nominal end (``ms`` before it) the mark goes back
    to 1 byte, so the last events, and so the stream's end and its latency, are seen
    when they come; the first byte always is (the mark is 1 while a request is sent).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, nbytes: int, stream_s: float, ms: float) -> None:
        self.loop, self.nbytes = loop, nbytes
        self.until = stream_s - ms / 1000  # seconds after the first byte


class _Conn(asyncio.Protocol):
    def __init__(self, lowat: _Lowat | None = None) -> None:
        self.lowat = lowat
        self.lowat_off: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[bytes] | None = None
        self.head_end = -1
        self.length: int | None = None
        self.chunked = False
        self.first_byte: float | None = None
        self.closed = False
        # A chunked body under way, its first byte stamped: each read then only appends and
        # looks for the terminating chunk (a paced stream is one read per event).
        self.in_chunked_body = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.lowat_off is not None:
            self.lowat_off.cancel()
            self.lowat_off = None
        self.in_chunked_body = False
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def send(self, request: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None
        self.buf.clear()
        self.head_end = -1
        self.length = None
        self.chunked = False
        self.first_byte = None
        self.in_chunked_body = False
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.in_chunked_body:
            if buf.endswith(b"0\r\n\r\n"):
                self.in_chunked_body = False
                self._complete()
            return
        if self.head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            head = bytes(buf[:end]).lower()
            i = head.find(b"\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r", i)
                self.length = int(head[i + 16 : j if j > 0 else len(head)])
            self.chunked = b"\ntransfer-encoding: chunked" in head
        if self.first_byte is None and len(buf) > self.head_end:
            self.first_byte = time.perf_counter()
        if self.done is None or self.done.done():
            return
        if self.length is not None:
            if len(buf) - self.head_end >= self.length:
                self._complete()
        elif self.chunked:
            if buf.endswith(b"0\r\n\r\n"):
                self._complete()
            elif self.first_byte is not None:
                self.in_chunked_body = True
                if self.lowat is not None:
                    self._mark(self.lowat.nbytes)
                    self.lowat_off = self.lowat.loop.call_later(self.lowat.until, self._mark, 1)
        elif buf.startswith(b"HTTP/1.1 204"):
            self._complete()

    def _mark(self, nbytes: int) -> None:
        """SO_RCVLOWAT: the bytes that must queue before the socket wakes the client."""
        if nbytes == 1:
            self.lowat_off = None
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)

    def _complete(self) -> None:
        if self.lowat_off is not None:  # ended before its nominal length
            self.lowat_off.cancel()
            self._mark(1)
        done = self.done
        if done is not None and not done.done():
            done.set_result(bytes(self.buf))


def _dechunk(body: bytes) -> bytes | None:
    out = []
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        start = eol + 2
        out.append(body[start : start + size])
        pos = start + size + 2


def check(raw: bytes, head_end: int, chunked: bool, stream: bool, chunks: int) -> str | None:
    """None if the answer is complete and right, else why not."""
    if not raw.startswith(b"HTTP/1.1 200"):
        return "status " + raw[9:12].decode(errors="replace")
    body = raw[head_end:]
    if chunked:
        decoded = _dechunk(body)
        if decoded is None:
            return "bad chunked body"
        body = decoded
    if stream:
        if not body.rstrip().endswith(b"data: [DONE]"):
            return "stream did not end with [DONE]"
        got = body.count(b" tok")
        if got != chunks:
            return f"stream had {got} of {chunks} content chunks"
        return None
    if b'"total_tokens"' not in body or not body.rstrip().endswith(b"}"):
        return "JSON answer without usage"
    return None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 3)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "mean": round(sum(v) / len(v), 3),
        "max": at(1),
    }


async def run_load(
    host: str,
    port: int,
    path: str,
    *,
    stream: bool,
    chunks: int,
    delay_ms: int,
    concurrency: int,
    duration: float,
    warmup: float,
    max_requests: int,
    auth: str = "sk-bench-not-a-key",
    samples: str | None = None,
    ramp: float = 0.0,
    read_lowat: int = 0,
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    lowat = None
    if stream and delay_ms and read_lowat > 1:
        lowat = _Lowat(loop, read_lowat, (chunks + 2) * delay_ms / 1000, 5 * delay_ms)
    model = f"bench-s{chunks}-d{delay_ms}"
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello in a few words."}],
            "stream": stream,
            "user": "bench",
        },
        separators=(",", ":"),
    ).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {auth}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: dict[str, int] = {}
    counted = 0
    completed = 0
    t0 = time.perf_counter()
    measure_from = t0 + warmup
    deadline = measure_from + duration

    def error(why: str) -> None:
        errors[why] = errors.get(why, 0) + 1

    async def worker(i: int) -> None:
        nonlocal counted, completed
        conn: _Conn | None = None
        if ramp > 0:
            # Staggered starts: worker i sends its first request at i/C of the ramp, so
            # equally long streams keep arriving evenly instead of in one wave per stream.
            await asyncio.sleep(ramp * i / concurrency)
        while time.perf_counter() < deadline and counted < max_requests:
            if conn is None or conn.closed:
                try:
                    _, conn = await loop.create_connection(lambda: _Conn(lowat), host, port)
                except OSError as exc:
                    error(f"connect: {exc.strerror}")
                    await asyncio.sleep(0.05)
                    continue
            start = time.perf_counter()
            try:
                raw = await asyncio.wait_for(conn.send(request), timeout=60)
            except (ConnectionError, TimeoutError) as exc:
                error(type(exc).__name__)
                if conn.transport is not None:
                    conn.transport.close()
                conn = None
                continue
            end = time.perf_counter()
            completed += 1
            why = check(raw, conn.head_end, conn.chunked, stream, chunks)
            if why is not None:
                error(why)
                continue
            # Counted: answers that complete inside the measured window, so req/s is
            # completions per second even when one answer outlasts the warm-up.
            if not measure_from <= end <= deadline:
                continue
            counted += 1
            latencies.append((end - start) * 1000)
            ttfbs.append(((conn.first_byte or end) - start) * 1000)
            if b"\r\nconnection: close" in raw[: conn.head_end].lower():
                conn.transport.close()  # type: ignore[union-attr]
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = min(time.perf_counter(), deadline) - measure_from
    if samples is not None:
        # Every counted latency, as native doubles: for pooling rounds (percentiles of
        # percentiles hide how few samples a p99 rests on).
        with open(samples, "wb") as f:
            array("d", latencies).tofile(f)
    return {
        "requests": counted,
        "completed_total": completed,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(elapsed, 3),
        "rps": round(counted / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": _percentiles(latencies),
        "ttfb_ms": _percentiles(ttfbs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--max-requests", type=int, default=10**9)
    ap.add_argument("--auth", default="sk-bench-not-a-key", help="Bearer token to send.")
    ap.add_argument("--samples", help="also write every counted latency (ms, float64) to this file")
    ap.add_argument(
        "--ramp", type=float, default=0.0, help="spread the first requests over this many seconds"
    )
    ap.add_argument(
        "--read-lowat",
        type=int,
        default=0,
        help="paced streams: SO_RCVLOWAT after the first byte, to read several events at once (see _Lowat)",
    )
    args = ap.parse_args()
    import uvloop

    result = uvloop.run(
        run_load(
            args.host,
            args.port,
            args.path,
            stream=args.stream,
            chunks=args.chunks,
            delay_ms=args.delay_ms,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            max_requests=args.max_requests,
            auth=args.auth,
            samples=args.samples,
            ramp=args.ramp,
            read_lowat=args.read_lowat,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

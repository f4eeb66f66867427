"""Test doubles that ship with the package: a fake upstream and record factories.

`FakeUpstream` is a real aiohttp server on 127.0.0.1 that replays recorded
provider bytes (``meterproxy/fixtures/wire/*.body``, shipped in the wheel), in chunks of any size with
optional delays, and remembers every request it received (method, path,
headers, body) so tests can assert what reached the "provider". It can also
misbehave on purpose (cut the connection mid-body, stall), which is how the
fault tests drive the proxy.

`make_record` builds a `RequestRecord` with sensible defaults for store,
metrics and budget tests.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from meterproxy.usage import RequestRecord, Usage

__all__ = [
    "FIXTURES_DIR",
    "FakeUpstream",
    "Fixture",
    "Received",
    "Reply",
    "free_port",
    "load_fixture",
    "make_record",
    "wait_healthy",
]

#: Recorded provider bodies; inside the package, so the doubles work from an installed wheel.
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "wire"


@dataclass
class Fixture:
    name: str
    meta: dict[str, Any]
    body: bytes

    @property
    def expect(self) -> dict[str, Any]:
        return dict(self.meta.get("expect", {}))

    @property
    def content_type(self) -> str:
        return str(self.meta.get("content_type", "application/json"))


def load_fixture(name: str, directory: Path = FIXTURES_DIR) -> Fixture:
    with open(directory / f"{name}.toml", "rb") as fh:
        meta = tomllib.load(fh)
    return Fixture(name, meta, (directory / f"{name}.body").read_bytes())


@dataclass
class Reply:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    #: Split the body into chunks of this size (None: SSE events, or the whole JSON body).
    chunk_size: int | None = None
    delay: float = 0.0
    #: Close the connection after this many body bytes (an upstream dying mid-answer).
    cut_after: int | None = None
    #: Sleep this long before sending the headers (an upstream that stalls).
    stall: float = 0.0


@dataclass
class Received:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    raw_headers: list[tuple[str, str]]
    body: bytes


def _chunks(reply: Reply) -> list[bytes]:
    body = reply.body
    if reply.chunk_size:
        return [body[i : i + reply.chunk_size] for i in range(0, len(body), reply.chunk_size)] or [b""]
    if "event-stream" in reply.content_type:
        parts, start = [], 0
        for sep in (b"\r\n\r\n", b"\n\n"):
            if sep in body:
                while (end := body.find(sep, start)) != -1:
                    parts.append(body[start : end + len(sep)])
                    start = end + len(sep)
                break
        if start < len(body):
            parts.append(body[start:])
        return parts
    return [body]


class FakeUpstream:
    """A provider stand-in on 127.0.0.1. Use as ``async with FakeUpstream() as up:``."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply | Callable[[web.Request], Awaitable[web.StreamResponse]]] = {}
        self.default: Reply | None = None
        self.received: list[Received] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, path: str, reply: Reply) -> None:
        """Answer requests whose path (without query) is ``path``."""
        self.replies[path] = reply

    def replay(self, fixture: Fixture, path: str | None = None, **kwargs: Any) -> Reply:
        reply = Reply(
            body=fixture.body,
            status=int(fixture.meta.get("status", 200)),
            content_type=fixture.content_type,
            **kwargs,
        )
        self.reply(path or str(fixture.meta["path"]).split("?")[0], reply)
        return reply

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method,
                request.raw_path,
                CIMultiDict(request.headers),
                [(k, v) for k, v in request.headers.items()],
                body,
            )
        )
        handler = self.replies.get(request.path, self.default)
        if handler is None:
            return web.json_response({"error": {"message": f"no reply for {request.path}"}}, status=404)
        if callable(handler) and not isinstance(handler, Reply):
            return await handler(request)
        reply = handler
        if reply.stall:
            await asyncio.sleep(reply.stall)
        response = web.StreamResponse(status=reply.status)
        response.headers["Content-Type"] = reply.content_type
        for name, value in reply.headers.items():
            response.headers[name] = value
        await response.prepare(request)
        sent = 0
        for chunk in _chunks(reply):
            if reply.cut_after is not None and sent + len(chunk) > reply.cut_after:
                await response.write(chunk[: reply.cut_after - sent])
                await asyncio.sleep(0.01)
                assert request.transport is not None
                request.transport.abort()
                return response
            if chunk:
                await response.write(chunk)
            sent += len(chunk)
            if reply.delay:
                await asyncio.sleep(reply.delay)
        await response.write_eof()
        return response

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def make_record(
    *,
    model: str = "gpt-4o-mini",
    provider: str = "openai",
    upstream: str = "openai",
    ts: datetime | None = None,
    usage: Usage | None = None,
    **fields: Any,
) -> RequestRecord:
    record = RequestRecord(
        upstream=upstream,
        provider=provider,
        endpoint="chat",
        requested_model=model,
        model=model,
        status=200,
        usage=usage if usage is not None else Usage(input_tokens=100, output_tokens=20),
        usage_source="reported",
        **fields,
    )
    if ts is not None:
        record.ts = ts
    return record


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for a server started in a subprocess).

    Picked at random below the kernel's ephemeral range (``ip_local_port_range``,
    32768-60999 by default), not with ``bind(0)``: a port from that range can be
    handed to any outgoing connection (a test client, a fake upstream's peer)
    in the time between this call and the subprocess's own bind, and the server
    then fails to start with "address in use". No outgoing connection takes a
    port below the range, so only another caller picking the same port at the
    same moment can collide (1 in 10,000 per pick).
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_PORT_LOW, _PORT_HIGH)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {_PORT_LOW}-{_PORT_HIGH}")


# Below Linux's default ephemeral range, above the well-known services (see free_port).
_PORT_LOW, _PORT_HIGH = 10240, 20480


async def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout: float = 30.0,
    output: Callable[[], str] | None = None,
) -> None:
    """Poll ``url/healthz`` until it answers 200; fail at once if ``proc`` exits.

    ``output`` returns what the server printed, for the failure message; without
    it, a piped stderr is read once the process has exited.
    """

    def said() -> str:
        if output is not None:
            return output()
        if proc.poll() is not None and proc.stderr is not None:
            return proc.stderr.read().decode(errors="replace")
        return ""

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as client:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"meterproxy exited with {proc.returncode}: {said()}")
            try:
                async with client.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if loop.time() >= deadline:
                raise AssertionError(f"meterproxy did not become healthy within {timeout:g} s: {said()}")
            await asyncio.sleep(0.1)

"""Running the real Claude Code and Codex CLIs against ``meterproxy serve`` and fake providers.

The CLIs are the npm packages ``.ci/run`` installs. Each run gets its own
``HOME`` in a temp dir (so its config, credentials and transcripts are the
test's) and no network but 127.0.0.1: ``HTTPS_PROXY`` points at `Sentinel`, a
proxy that refuses every connection and lists where the CLI tried to go, and
``NO_PROXY`` lets 127.0.0.1 through. The environment is built from nothing, so
no real key or setting of the machine leaks in.

The fake providers (`AgentProviders`) replay real event shapes: the Anthropic
stream and the Responses stream of ``tests/fixtures/wire`` (their ``source``
says where each was captured), answered as the model the CLI asked for (so the
CLI's own cost figure and ours price the same model), each answer with a fresh
provider request id header the way Anthropic (``request-id``) and OpenAI
(``x-request-id``) send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meterproxy.testing import FakeUpstream, load_fixture
from tests.helpers.served import Served

CLAUDE = shutil.which("claude")
CODEX = shutil.which("codex")
#: A CLI run that takes longer than this is hung (a real run takes a second or two).
CLI_TIMEOUT = 120.0


def need(path: str | None, name: str) -> str:
    """The CLI's path; skipped when it is not installed, except in CI (which must install it)."""
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it with npm")
        pytest.skip(f"{name} is not installed (npm install -g; see .ci/run)")
    return path


class Sentinel:
    """An HTTP proxy on 127.0.0.1 that refuses everything and remembers what was asked."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            self.attempts.append(line.decode(errors="replace").strip())
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Sentinel:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()


def agent_env(home: Path, sentinel: Sentinel, **extra: str) -> dict[str, str]:
    """A CLI's whole environment: a temp HOME, the sentinel as proxy, telemetry off."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        env[name] = sentinel.url
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


async def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> CliRun:
    """Run a CLI to its end without blocking the loop (the fake providers live in it)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        cwd=str(cwd),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError(f"{args[0]} did not exit within {CLI_TIMEOUT:g} s") from None
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@dataclass
class AgentProviders:
    """Fake Anthropic and OpenAI on one port: the answers a real provider streams."""

    upstream: FakeUpstream
    #: ``usage.speed`` the Anthropic answers carry (``"fast"`` for fast mode).
    speed: str = "standard"
    #: Request ids handed out, in order; `reuse_request_id` makes the next answer repeat one.
    request_ids: list[str] = field(default_factory=list)
    reuse_request_id: str | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _request_id(self, prefix: str) -> str:
        rid = self.reuse_request_id or f"{prefix}{next(self._ids):04d}TESTreq"
        self.reuse_request_id = None
        self.request_ids.append(rid)
        return rid

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        stream = load_fixture("anthropic_messages_stream").body.decode()
        stream = stream.replace('"model":"claude-sonnet-4-20250514"', f'"model":{json.dumps(body["model"])}')
        stream = stream.replace(
            '"service_tier":"standard"}', f'"service_tier":"standard","speed":"{self.speed}"}}'
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "request-id": self._request_id("req_011C"),
            }
        )
        await response.prepare(request)
        for event in stream.encode().split(b"\n\n"):
            if event.strip():
                await response.write(event + b"\n\n")
        await response.write_eof()
        return response

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"input_tokens": 1234}, headers={"request-id": self._request_id("req_011C")})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("upgrade", "").lower() == "websocket":
            return await self.responses_socket(request)
        body = json.loads(await request.read())
        stream = load_fixture("openai_responses_stream").body.decode()
        stream = stream.replace('"model":"o3-mini-2025-01-31"', f'"model":{json.dumps(body["model"])}')
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-request-id": self._request_id("req_oa")}
        )
        await response.prepare(request)
        for event in stream.encode().split(b"\n\n"):
            if event.strip():
                await response.write(event + b"\n\n")
        await response.write_eof()
        return response

    async def responses_socket(self, request: web.Request) -> web.StreamResponse:
        """The Responses API over a WebSocket, as OpenAI serves it to Codex: each
        ``response.create`` message is answered with the stream's events, one per message."""
        ws = web.WebSocketResponse()
        ws.headers["x-request-id"] = self._request_id("req_oa")
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != web.WSMsgType.TEXT:
                break
            body = json.loads(msg.data)
            if body.get("type") != "response.create":
                continue
            stream = load_fixture("openai_responses_stream").body.decode()
            stream = stream.replace('"model":"o3-mini-2025-01-31"', f'"model":{json.dumps(body["model"])}')
            events = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data: ")]
            if body.get("generate") is False:
                # Codex's prewarm: nothing generated; created and completed with no tokens.
                done = json.loads(events[-1])
                done["response"]["output"] = []
                done["response"]["usage"] = {
                    "input_tokens": 0,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 0,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 0,
                }
                events = [events[0], json.dumps(done)]
            for event in events:
                await ws.send_str(event)
        return ws

    def install(self) -> None:
        self.upstream.replies["/v1/messages"] = self.messages
        self.upstream.replies["/v1/messages/count_tokens"] = self.count_tokens
        self.upstream.replies["/v1/responses"] = self.responses


@dataclass
class AgentProxy:
    """The `serve` an agent test points its CLI at: its URL and the store it writes."""

    url: str
    db: Path

    def rows(self, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [
                dict(r) for r in conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY ts", params)
            ]
        except sqlite3.OperationalError:
            return []  # not migrated yet
        finally:
            conn.close()

    async def wait_rows(self, n: int, where: str = "1=1", timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until at least ``n`` rows match (the writer commits within milliseconds)."""
        return await self.wait_until(lambda rows: len(rows) >= n, f"{n} rows where {where}", where, timeout)

    async def wait_until(
        self,
        done: Callable[[list[dict[str, Any]]], bool],
        what: str,
        where: str = "1=1",
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll the rows until ``done(rows)``; fail with ``what`` past the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rows = self.rows(where)
            if done(rows):
                return rows
            if loop.time() > deadline:
                raise AssertionError(f"waited {timeout:g} s for {what}; rows: {rows}")
            await asyncio.sleep(0.05)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Poll ``/healthz`` until no request is in flight (each finished one is recorded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as client:
            while True:
                async with client.get(f"{self.url}/healthz") as response:
                    in_flight = (await response.json())["in_flight"]
                if in_flight == 0:
                    return
                if loop.time() > deadline:
                    raise AssertionError(f"{in_flight} requests still in flight")
                await asyncio.sleep(0.05)

    async def wait_budget_state(self, name: str, state: str, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as client:
            while True:
                async with client.get(f"{self.url}/api/budgets/{name}") as response:
                    seen = (await response.json())["state"]
                if seen == state:
                    return
                if loop.time() > deadline:
                    raise AssertionError(f"budget {name} is {seen}, expected {state}")
                await asyncio.sleep(0.05)


@asynccontextmanager
async def serve(tmp_path: Path, upstream_url: str, config: str = "") -> AsyncIterator[AgentProxy]:
    """``meterproxy serve`` as a user starts it, in front of the fake providers (the suite's one
    launcher, `tests.helpers.served.Served`: its log goes to ``serve.log`` in ``tmp_path``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "meterproxy.toml"
    cfg.write_text(config)
    db = tmp_path / "meter.db"
    upstreams = [f"anthropic={upstream_url}", f"openai={upstream_url}"]
    server = Served(db, upstream_url, tmp_path, "serve", config=cfg, upstreams=upstreams)
    try:
        await server.ready()
        yield AgentProxy(server.url, db)
    finally:
        with contextlib.suppress(AssertionError):  # not stopped within 30 s: killed below
            await server.terminate(timeout=30)  # SIGTERM, a clean stop
        server.stop()

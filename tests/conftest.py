"""Shared fixtures: a fake upstream on 127.0.0.1 and a real meterproxy app in front of it.

The proxy runs in-process on a real port (the lean server ``meterproxy serve``
runs, or aiohttp's ``TestServer``), with its SQLite database in the test's tmp
dir, so tests can point the official SDKs at it exactly as a user would.
"""

from __future__ import annotations

import asyncio
import compileall
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import meterproxy
from meterproxy.app import create_app
from meterproxy.app_state import WRITER
from meterproxy.server import LeanServer
from meterproxy.settings import load_settings
from meterproxy.testing import FakeUpstream
from tests.helpers.browser import browser, chromium, chromium_home  # noqa: F401 - one Chromium for the suite
from tests.helpers.userdirs import isolate_user_dirs
from tests.helpers.waits import WAIT_S


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile meterproxy once, for the Python processes the suite starts (``meterproxy
    serve``, the CLI). Where ``PYTHONDONTWRITEBYTECODE`` is set (as on CI machines) nothing else
    writes the ``.pyc`` files, and each process would compile the package's ~120 modules from
    source again: 0.16 CPU-s a process here. Up-to-date files are only checked."""
    compileall.compile_dir(Path(meterproxy.__file__).parent, quiet=2)


@pytest.fixture(autouse=True)
def _isolate_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real user's home: data dir, config, caches (Chromium's crash reports too)."""
    isolate_user_dirs(monkeypatch, tmp_path)


@asynccontextmanager
async def running_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with running_upstream() as up:
        yield up


T = TypeVar("T")


class ProxyHarness:
    """A running in-process proxy, and ways to wait on what it stored (never a fixed sleep).

    Waits are driven by the app itself: the store writer's commit listener wakes a
    waiter after each committed batch, and its commit barrier (``writer.call``, done
    once everything queued before it is committed) settles work queued as calls.
    """

    def __init__(self, server: TestServer | LeanServer, app: web.Application, db: Path) -> None:
        self.server = server
        self.app = app
        self.db = db
        loop = asyncio.get_running_loop()
        self._committed = asyncio.Event()
        app[WRITER].on_commit(lambda records: loop.call_soon_threadsafe(self._committed.set))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def settle(self) -> None:
        """Return once every record and write queued so far is committed (the app's commit barrier)."""
        await asyncio.wrap_future(self.app[WRITER].call(lambda conn: None))

    async def until(self, check: Callable[[], T], timeout: float = WAIT_S, what: str = "the store") -> T:
        """``check()`` once it is truthy, re-evaluated after each commit; fail after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._committed.clear()
            if value := check():
                return value
            await self.settle()
            if value := check():
                return value
            try:
                await asyncio.wait_for(self._committed.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                value = check()
                assert value, f"timed out after {timeout}s waiting for {what}"
                return value

    async def rows(self, n: int | None = None, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        """Stored rows (oldest first), waiting until at least ``n`` have been committed."""
        if n is None:
            return read_rows(self.db)

        def enough() -> list[dict[str, Any]]:
            rows = read_rows(self.db)
            return rows if len(rows) >= n else []

        return await self.until(enough, timeout, f"{n} rows")


def read_rows(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY ts, id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


ProxyFactory = Callable[..., Awaitable[ProxyHarness]]


@asynccontextmanager
async def proxy_factory(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Starts real meterproxies on 127.0.0.1 (the lean server by default, as ``meterproxy serve``;
    ``METERPROXY_HTTP_SERVER=aiohttp`` in the environment runs the suite on the aiohttp one), and
    closes them on exit. The fixtures below and the browser tests' own (`tests.helpers.browser`)
    share it."""
    servers: list[TestServer | LeanServer] = []

    async def factory(**overrides: Any) -> ProxyHarness:
        db = tmp_path / "meter.db"
        names = ("openai", "anthropic", "gemini", "groq", "azure", "deepseek", "openrouter", "vllm", "vertex")
        cli: dict[str, Any] = {"db": str(db), "upstreams": {n: upstream.url for n in names}}
        cli["http_server"] = os.environ.get("METERPROXY_HTTP_SERVER", "lean")
        cli.update(overrides)
        settings = load_settings(None, cli=cli, env={})
        app = create_app(settings)
        server: TestServer | LeanServer
        if settings.http_server == "lean":
            server = LeanServer(app, shutdown_timeout=settings.shutdown_timeout)
            await server.start("127.0.0.1", 0)
        else:
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
        servers.append(server)
        return ProxyHarness(server, app, db)

    try:
        yield factory
    finally:
        for server in reversed(servers):
            await server.close()


@pytest.fixture
async def make_proxy(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """A real meterproxy on 127.0.0.1 in front of the test's `upstream` (see `proxy_factory`)."""
    async with proxy_factory(upstream, tmp_path) as factory:
        yield factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> ProxyHarness:
    return await make_proxy()

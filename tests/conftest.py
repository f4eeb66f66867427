"""Shared fixtures: a fake upstream on 127.0.0.1 and a real meterproxy app in front of it.

The proxy runs in-process on a real port (pytest-aiohttp's ``aiohttp_server``),
with its SQLite database in the test's tmp dir, so tests can point the official
SDKs at it exactly as a user would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meterproxy.app import create_app
from meterproxy.settings import load_settings
from meterproxy.testing import FakeUpstream


@pytest.fixture(autouse=True)
def _isolate_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real user's data dir or config."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    for name in ("METERPROXY_DB", "METERPROXY_ADMIN_TOKEN", "METERPROXY_CONFIG", "METERPROXY_UPSTREAMS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


class ProxyHarness:
    def __init__(self, server: TestServer, app: web.Application, db: Path) -> None:
        self.server = server
        self.app = app
        self.db = db

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def rows(self, n: int | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Stored rows (oldest first), waiting until at least ``n`` have been committed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rows = _read_rows(self.db)
            if n is None or len(rows) >= n or loop.time() > deadline:
                if n is not None:
                    assert len(rows) >= n, f"expected {n} rows, found {len(rows)}"
                return rows
            await asyncio.sleep(0.02)


def _read_rows(db: Path) -> list[dict[str, Any]]:
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


@pytest.fixture
async def make_proxy(
    aiohttp_server: Callable[..., Awaitable[TestServer]], upstream: FakeUpstream, tmp_path: Path
) -> ProxyFactory:
    async def factory(**overrides: Any) -> ProxyHarness:
        db = tmp_path / "meter.db"
        names = ("openai", "anthropic", "gemini", "groq", "azure", "deepseek", "openrouter", "vllm", "vertex")
        cli: dict[str, Any] = {"db": str(db), "upstreams": {n: upstream.url for n in names}}
        cli.update(overrides)
        settings = load_settings(None, cli=cli, env={})
        app = create_app(settings)
        server = await aiohttp_server(app)
        return ProxyHarness(server, app, db)

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> ProxyHarness:
    return await make_proxy()

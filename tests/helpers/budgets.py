"""Helpers shared by the budget tests: a real webhook receiver, SDK calls, polling."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from meterproxy.budgets.webhooks import verify
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.schema import record_to_row
from meterproxy.usage import RequestRecord
from tests.conftest import ProxyHarness
from tests.helpers.waits import WAIT_S

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    accepted: bool

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body, parse_float=Decimal))


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that fails the first ``fail_first`` attempts (503)."""

    fail_first: int = 0
    accept: bool = True
    attempts: list[Delivery] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def accepted(self) -> list[Delivery]:
        return [d for d in self.attempts if d.accepted]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = self.accept and len(self.attempts) >= self.fail_first
        self.attempts.append(Delivery({k.lower(): v for k, v in request.headers.items()}, body, ok))
        return web.Response(status=204 if ok else 503)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def verified(self, delivery: Delivery, secret: str = SECRET) -> bool:
        """Checked by the Standard Webhooks reference library, as a receiver would, and by ours."""
        try:
            Webhook(secret).verify(delivery.body, delivery.headers, json_parse=False)
        except WebhookVerificationError:
            return False
        return verify(secret, delivery.headers, delivery.body)


async def wait_for(cond: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll ``cond`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def query(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params or []).fetchall()
    finally:
        conn.close()


def insert_records(db: Path, records: list[RequestRecord]) -> None:
    """Rows stored before the proxy starts (as if recorded by an earlier run)."""
    from meterproxy.store.writer import INSERT_REQUEST

    conn = connect(db)
    try:
        apply_migrations(conn)
        conn.executemany(INSERT_REQUEST, [record_to_row(r) for r in records])
    finally:
        conn.close()


async def api_get(proxy: ProxyHarness, path: str) -> Any:
    """GET a proxy's JSON API path; it must answer 200."""
    async with aiohttp.ClientSession() as session, session.get(proxy.url + path) as response:
        assert response.status == 200
        return await response.json()

"""Fault-suite helpers: the checks every fault test ends with, and the requests it sends.

Every fault test ends the same way: the proxy still answers a normal request
(`still_serving`), and the faulty request was recorded with its status, error
and whatever usage was seen (`row_for`). Requests are told apart by a unique
``X-Meter-Session`` (`session_id`). The raw-socket upstream fixture
(``raw_upstream``, a `RawFactory`) is in ``tests/faults/conftest.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from meterproxy.testing import FakeUpstream, load_fixture
from meterproxy.testing_raw import RawUpstream, Script
from tests.conftest import ProxyFactory, ProxyHarness, read_rows
from tests.helpers.waits import WAIT_S

__all__ = ["CHAT", "CHAT_STREAM", "RawFactory", "post", "proxy_for", "row_for", "session_id", "still_serving"]

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
CHAT_STREAM = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'

RawFactory = Callable[[Script | None], Awaitable[RawUpstream]]


async def proxy_for(
    make_proxy: ProxyFactory, raw: RawUpstream | str, upstream: FakeUpstream, **settings: Any
) -> ProxyHarness:
    """A proxy with ``/raw/...`` going to ``raw`` and the usual names to the FakeUpstream."""
    url = raw if isinstance(raw, str) else raw.url
    names = ("openai", "anthropic", "gemini")
    return await make_proxy(upstreams={**{n: upstream.url for n in names}, "raw": url}, **settings)


def session_id() -> str:
    return f"fault-{uuid.uuid4().hex[:12]}"


async def row_for(proxy: ProxyHarness, session: str, timeout: float = WAIT_S) -> dict[str, Any]:
    """The stored row of the request sent with ``X-Meter-Session: session`` (waits for its commit)."""

    def found() -> list[dict[str, Any]]:
        return [r for r in read_rows(proxy.db) if r["session"] == session]

    rows = await proxy.until(found, timeout, f"the row of session {session}")
    assert len(rows) == 1, rows
    return rows[0]


async def still_serving(proxy: ProxyHarness, upstream: FakeUpstream) -> None:
    """A normal request through the proxy gets the upstream's exact answer and is recorded."""
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    session = session_id()
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.post(f"{proxy.url}/v1/chat/completions", data=CHAT, headers={"X-Meter-Session": session}) as r,
    ):
        assert r.status == 200
        assert await r.read() == fx.body
    row = await row_for(proxy, session)
    assert row["usage_source"] == "reported"
    assert row["input_tokens"] == fx.expect["input_tokens"]


async def post(
    proxy: ProxyHarness,
    path: str,
    body: bytes = CHAT,
    *,
    session: str,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, BaseException | None, dict[str, str]]:
    """POST through the proxy; (status, bytes received, the exception that ended the read, headers)."""
    got = bytearray()
    status = 0
    resp_headers: dict[str, str] = {}
    error: BaseException | None = None
    try:
        async with (
            aiohttp.ClientSession(
                auto_decompress=False, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as client,
            client.post(
                f"{proxy.url}{path}", data=body, headers={"X-Meter-Session": session, **(headers or {})}
            ) as r,
        ):
            status = r.status
            resp_headers = dict(r.headers)
            async for chunk in r.content.iter_any():
                got += chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = exc
    return status, bytes(got), error, resp_headers

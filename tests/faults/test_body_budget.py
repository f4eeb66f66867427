"""Request bodies held in memory at once are bounded across requests (issue 14.7).

Each body is read whole, bounded per request by ``max_body_bytes``; all bodies
together are bounded by ``max_buffered_body_bytes``. Two clients hold 1.5 MiB
bodies in flight (their upstream answers slowly); a third announcing 1.5 MiB
does not fit in a 3 MiB budget and gets ``503`` with ``Retry-After`` at once
(on the lean server, the default, and on aiohttp's),
is recorded, and never reaches the upstream. A chunked body (no length
announced) is reserved as it arrives and refused the same way. Once the two
are answered, the budget is free again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from meterproxy.app_state import PROXY
from meterproxy.testing import FakeUpstream
from meterproxy.testing_raw import RawConnection, respond
from tests.conftest import ProxyFactory
from tests.helpers.faults import RawFactory, proxy_for, row_for, session_id, still_serving
from tests.helpers.waits import WAIT_S

MIB = 1024 * 1024
BODY = b'{"model":"gpt-4o-mini","messages":[],"pad":"' + b"x" * (3 * MIB // 2) + b'"}'


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_bodies_over_the_global_budget_get_503_retry_after(
    server: str,
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    raw_upstream: RawFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both servers: the lean one (the default) reads proxy bodies on its own path, aiohttp's in read_body.
    monkeypatch.setenv("METERPROXY_HTTP_SERVER", server)
    release = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        await release.wait()  # hold the request (and so its body) in flight
        await conn.send(respond(200, b'{"ok":true}'))

    raw = await raw_upstream(script)
    proxy = await proxy_for(
        make_proxy, raw, upstream, max_body_bytes=2 * MIB, max_buffered_body_bytes=3 * MIB + MIB // 2
    )
    budget = proxy.app[PROXY].body_budget

    async with aiohttp.ClientSession() as client:

        async def send(body: bytes | AsyncIterator[bytes], sid: str) -> tuple[int, dict[str, str], bytes]:
            async with client.post(
                f"{proxy.url}/raw/v1/chat/completions", data=body, headers={"X-Meter-Session": sid}
            ) as r:
                return r.status, dict(r.headers), await r.read()

        held = [asyncio.ensure_future(send(BODY, session_id())) for _ in range(2)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while len(raw.requests) < 2:  # both bodies read and forwarded, held in flight
            assert loop.time() < deadline, "the two requests never reached the upstream"
            await asyncio.sleep(0.01)
        assert budget.held == 2 * len(BODY)

        sid = session_id()
        status, headers, body = await send(BODY, sid)
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(body)["error"]["code"] == "bodies_over_budget"

        async def chunked() -> AsyncIterator[bytes]:
            for i in range(0, len(BODY), 64 * 1024):
                yield BODY[i : i + 64 * 1024]

        sid_chunked = session_id()
        status, headers, _ = await send(chunked(), sid_chunked)
        assert status == 503 and headers["Retry-After"] == "1"
        assert len(raw.requests) == 2  # neither refused request was forwarded
        assert budget.held == 2 * len(BODY)  # a refused body gives back what it took

        release.set()
        assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]
        deadline = loop.time() + WAIT_S
        while budget.held:
            assert loop.time() < deadline, f"{budget.held} bytes still held after the answers"
            await asyncio.sleep(0.01)
        status, _, _ = await send(BODY, session_id())
        assert status == 200

    for s in (sid, sid_chunked):
        row = await row_for(proxy, s)
        assert row["status"] == 503 and "retry" in row["error"]
    await still_serving(proxy, upstream)

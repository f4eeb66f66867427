"""Memory returns to its baseline after faults (tracemalloc, in-process).

A fault that leaks (a buffer kept, a callback left on a pooled connection, a
task never finished) shows as memory that grows with the number of faults.
The test runs a mix of faults a few times to warm every cache, takes the
baseline, runs the mix many more times and compares: the growth must stay far
below what even one leaked answer per fault would cost.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import aiohttp
import pytest

from meterproxy.app_state import PROXY
from meterproxy.testing import FakeUpstream, load_fixture
from meterproxy.testing_raw import RawConnection, respond
from tests.conftest import ProxyFactory
from tests.helpers.faults import CHAT, CHAT_STREAM, RawFactory, post, proxy_for, session_id

ROUNDS = 12
BIG = 256 * 1024  # each faulty answer carries this much, so a leak of one per fault is obvious


@pytest.mark.slow
async def test_memory_returns_to_baseline_after_faults(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    fx = load_fixture("openai_chat_stream_usage")
    filler = b'data: {"model":"m","choices":[{"delta":{"content":"' + b"x" * BIG + b'"}}]}\n\n'

    async def script(conn: RawConnection) -> None:
        assert conn.request is not None
        body = conn.request.body
        if b"reset" in body:
            await conn.send(respond(200, content_type="text/event-stream", length=False) + filler)
            await asyncio.sleep(0.02)  # the fault: part of an answer, then a reset
            conn.reset()
        elif b"stall" in body:
            await conn.send(respond(200, content_type="text/event-stream", length=False) + filler)
            await asyncio.sleep(5)  # the fault: a stall past the proxy's read timeout
        elif b"leave" in body:
            await conn.send(respond(200, content_type="text/event-stream", length=False))
            for _ in range(200):
                if not await conn.send(filler):
                    break
                await asyncio.sleep(0.005)  # a stream that keeps coming after the client left
        else:
            await conn.send(respond(200, fx.body + filler, content_type="text/event-stream"))

    raw = await raw_upstream(script)
    proxy = await proxy_for(
        make_proxy, raw, upstream, read_timeout=0.3, disconnect_drain_timeout=0.2, max_body_bytes=64 * 1024
    )
    path = "/raw/v1/chat/completions"

    def req(tag: str) -> bytes:
        return CHAT_STREAM[:-1] + f',"user":"{tag}"}}'.encode()

    async def leave() -> None:
        async with aiohttp.ClientSession() as client:
            resp = await client.post(f"{proxy.url}{path}", data=req("leave"))
            await resp.content.read(1000)
            resp.close()

    async def one_round() -> None:
        # The faults of a round overlap (as they would on a busy proxy), so a round lasts about as
        # long as its slowest fault, the stall's read timeout, not the sum of all.
        await asyncio.gather(
            post(proxy, path, req("reset"), session=session_id()),
            post(proxy, path, req("stall"), session=session_id()),
            post(proxy, path, req("ok"), session=session_id()),
            post(proxy, path, b"x" * (128 * 1024), session=session_id()),  # 413
            post(proxy, "/nowhere/x", CHAT, session=session_id()),  # 404
            leave(),
        )

    async def settle() -> int:
        # Let drains finish and records reach the store (its commit barrier), then measure.
        await proxy.app[PROXY].drain(timeout=10)
        await proxy.settle()
        await asyncio.sleep(0.3)  # closed connections' callbacks, outside the app's reach
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        for _ in range(3):
            await one_round()
        baseline = await settle()
        for _ in range(ROUNDS):
            await one_round()
        after = await settle()
    finally:
        tracemalloc.stop()
    growth = after - baseline
    print(f"memory: baseline {baseline / 1e6:.1f} MB, after {ROUNDS} rounds {after / 1e6:.1f} MB")
    # One leaked answer per faulty request would be >= ROUNDS * 4 * BIG = 12 MB.
    assert growth < ROUNDS * BIG, f"memory grew by {growth / 1e6:.2f} MB over {ROUNDS} fault rounds"

"""The callback relay (`Proxy.relay_soon`): a whole answer on a pooled connection needs no task.

The lean server sends a request on an idle pooled connection at once and waits
for the answer's head in a callback; a whole answer is relayed, tapped and
recorded in that callback. These tests pin what that path must keep: the
answer byte for byte and its record, no task for it, and a shutdown that still
waits for an exchange parked in a callback (not only for tasks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import pytest

from meterproxy.app_state import PROXY
from meterproxy.server import LeanServer
from meterproxy.testing import FakeUpstream
from meterproxy.testing_raw import RawConnection, respond
from tests.conftest import ProxyFactory
from tests.helpers.faults import RawFactory, post, proxy_for, row_for, session_id

PATH = "/raw/v1/chat/completions"
BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }
).encode()


async def test_whole_answers_on_a_pooled_connection_are_relayed_without_a_task(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    raw_upstream: RawFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def keep_alive(conn: RawConnection) -> None:
        while conn.request is not None:
            await conn.send(respond(200, BODY, headers={"x-request-id": "req-1"}))  # one write
            await conn.next_request()

    raw = await raw_upstream(keep_alive)
    proxy = await proxy_for(make_proxy, raw, upstream)
    if not isinstance(proxy.server, LeanServer):
        pytest.skip("the callback relay is the lean server's")
    forwarding = proxy.app[PROXY]
    spawned: list[str] = []
    spawn = forwarding._spawn_done

    def counting(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], done: Any) -> None:
        spawned.append(coro.__qualname__)
        spawn(loop, coro, done)

    monkeypatch.setattr(forwarding, "_spawn_done", counting)
    sessions = [session_id() for _ in range(3)]
    for sid in sessions:
        status, body, err, headers = await post(proxy, PATH, session=sid)
        assert (status, body, err) == (200, BODY, None)
        assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == "req-1"
    assert raw.connections == 1
    # Only the first request, which had to open the connection, ran in a task.
    assert spawned == ["Proxy._forwarding"]
    for sid in sessions:
        row = await row_for(proxy, sid)
        assert (row["status"], row["usage_source"], row["input_tokens"], row["output_tokens"]) == (
            200,
            "reported",
            11,
            3,
        )
        assert row["provider_request_id"] == "req-1"
        assert row["duration_ms"] is not None and row["upstream_ms"] is not None
    assert forwarding.in_flight == 0


async def test_shutdown_waits_for_an_exchange_parked_in_a_callback(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    raw_upstream: RawFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    second_in = asyncio.Event()
    answer_now = asyncio.Event()

    async def keep_alive(conn: RawConnection) -> None:
        await conn.send(respond(200, BODY))  # the first request: the connection goes to the pool
        if await conn.next_request() is None:
            return
        second_in.set()
        await answer_now.wait()
        await conn.send(respond(200, BODY))

    raw = await raw_upstream(keep_alive)
    proxy = await proxy_for(make_proxy, raw, upstream)
    forwarding = proxy.app[PROXY]
    draining = asyncio.Event()
    drain = forwarding.drain

    async def noting(timeout: float) -> None:
        draining.set()
        await drain(timeout)

    monkeypatch.setattr(forwarding, "drain", noting)
    assert (await post(proxy, PATH, session=session_id()))[0] == 200
    sid = session_id()
    second = asyncio.create_task(post(proxy, PATH, session=sid))
    await asyncio.wait_for(second_in.wait(), 10)
    assert not forwarding._tasks or all(not isinstance(t, asyncio.Task) for t in forwarding._tasks)
    closing = asyncio.create_task(proxy.server.close())
    await asyncio.wait_for(draining.wait(), 10)  # shutdown is waiting for exchanges now
    answer_now.set()
    status, body, err, _ = await asyncio.wait_for(second, 10)
    assert (status, body, err) == (200, BODY, None)
    await asyncio.wait_for(closing, 10)
    row = await row_for(proxy, sid)
    assert (row["status"], row["usage_source"]) == (200, "reported")

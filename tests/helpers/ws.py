"""WebSocket test helpers: the recorded sessions' messages and a fake upstream serving them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from meterproxy.testing import FakeUpstream

__all__ = ["WS_FIXTURES", "Handler", "messages", "realtime_session", "ws_upstream", "ws_url"]

WS_FIXTURES = Path(__file__).parent.parent / "fixtures" / "ws"


def messages(name: str) -> list[str]:
    return (WS_FIXTURES / f"{name}.jsonl").read_text("utf-8").splitlines()


def ws_url(http_url: str) -> str:
    return "ws" + http_url.removeprefix("http")


Handler = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]


def ws_upstream(upstream: FakeUpstream, path: str, handler: Handler, **ws_options: Any) -> list[web.Request]:
    """Serve WebSocket sessions on ``path`` of the fake upstream; returns the handshakes seen."""
    seen: list[web.Request] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        ws = web.WebSocketResponse(**ws_options)
        await ws.prepare(request)
        await handler(ws, request)
        await ws.close()
        return ws

    upstream.replies[path] = serve
    return seen


async def realtime_session(ws: web.WebSocketResponse, request: web.Request) -> None:
    """OpenAI Realtime: session.created at once, then each response.create replays a response."""
    events = messages("openai_realtime")
    await ws.send_str(events[0])
    responses = [events[1:9], events[9:11]]
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            break
        if json.loads(msg.data)["type"] == "response.create" and responses:
            for event in responses.pop(0):
                await ws.send_str(event)

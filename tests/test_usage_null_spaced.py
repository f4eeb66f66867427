"""The ``"usage": null`` the injected ``include_usage`` adds is removed whatever the JSON spacing.

Some OpenAI-compatible servers write ``", "usage": null`` (Python's json.dumps spacing) or
pretty-print; the client must still get exactly the stream it would have got without the
proxy, chunk bytes otherwise untouched (nothing is re-serialised).
"""

from __future__ import annotations

import json

import aiohttp
from openai import AsyncOpenAI

from meterproxy.testing import Reply, load_fixture
from tests.helpers.sdk import SDK_TIMEOUT


def _spaced(stream: bytes, *, with_usage: bool) -> bytes:
    """The real capture re-spaced as json.dumps writes it; without the usage the option adds."""
    out = []
    for event in stream.decode().split("\n\n"):
        if not event.startswith("data: "):
            continue
        data = event[len("data: ") :]
        if data == "[DONE]":
            out.append("data: [DONE]\n\n")
            continue
        chunk = json.loads(data)
        if not with_usage:
            if chunk.get("usage") is not None:
                continue  # the usage-only chunk the client did not ask for
            chunk.pop("usage", None)
        out.append(f"data: {json.dumps(chunk)}\n\n")
    return "".join(out).encode()


async def test_spaced_usage_null_is_stripped_and_usage_still_metered(make_proxy, upstream) -> None:
    capture = load_fixture("openai_chat_stream_usage").body
    served = _spaced(capture, with_usage=True)
    assert b'"usage": null' in served
    upstream.reply("/v1/chat/completions", Reply(body=served, content_type="text/event-stream", chunk_size=1))
    proxy = await make_proxy()
    request = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", json=request) as response,
    ):
        got = await response.read()
    assert got == _spaced(capture, with_usage=False)
    assert b'"usage"' not in got
    sent = json.loads(upstream.received[0].body)
    assert sent["stream_options"] == {"include_usage": True}
    [row] = await proxy.rows(1)
    assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (78, 9, "reported")

    # The official SDK reads the same stream without a usage chunk it did not ask for.
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    chunks = [c async for c in await client.chat.completions.create(**request)]
    assert all(c.usage is None for c in chunks) and chunks[-1].choices
    assert len(await proxy.rows(2)) == 2

"""Decompression bomb (issue 14.6): metering inflates a bounded copy, the client gets the original.

A 64 KB gzip answer that inflates to 64 MiB (a real bomb is 1 MB to 1 GiB: the
same ratio, smaller so the test builds it quickly). The proxy relays the
compressed bytes exactly; the copy it inflates for metering stops at
`tap.INFLATE_RATIO` times the compressed bytes plus `tap.INFLATE_ALLOWANCE`, the
row is flagged (``usage_source="invalid"``, a note naming the bomb), and the
work spent on it is bounded: the peak of memory allocated while it passes
(tracemalloc) stays far below the inflated size, which it reached before (the
whole answer inflated in one call, blocking the event loop for seconds).
"""

from __future__ import annotations

import hashlib
import tracemalloc
import zlib

import aiohttp

from meterproxy import providers
from meterproxy.providers.base import RequestInfo
from meterproxy.tap import INFLATE_ALLOWANCE, INFLATE_RATIO, ResponseTap
from meterproxy.testing import FakeUpstream, load_fixture
from meterproxy.testing_raw import RawConnection, respond
from tests.conftest import ProxyFactory
from tests.helpers.faults import CHAT, RawFactory, proxy_for, row_for, session_id, still_serving

INFLATED = 64 * 1024 * 1024


def _bomb() -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"0" * (1 << 20)
    parts = [packer.compress(b'{"model":"gpt-4o-mini","pad":"')]
    parts += [packer.compress(zeros) for _ in range(INFLATED >> 20)]
    parts.append(packer.compress(b'","usage":{"prompt_tokens":1,"completion_tokens":1}}'))
    parts.append(packer.flush())
    return b"".join(parts)


BOMB = _bomb()


async def test_gzip_bomb_is_relayed_exactly_flagged_and_inflated_only_within_bounds(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    assert INFLATE_RATIO * len(BOMB) + INFLATE_ALLOWANCE < INFLATED // 2  # it really is past the bound

    async def script(conn: RawConnection) -> None:
        await conn.send(respond(200, BOMB, headers={"Content-Encoding": "gzip"}))

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    sid = session_id()
    tracemalloc.start()
    try:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as client,
            client.post(
                f"{proxy.url}/raw/v1/chat/completions",
                data=CHAT,
                headers={"X-Meter-Session": sid, "Accept-Encoding": "gzip"},
            ) as r,
        ):
            got = await r.read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
    assert hashlib.sha256(got).digest() == hashlib.sha256(BOMB).digest()
    assert peak < INFLATED // 2, f"peak {peak} bytes: the bomb was inflated"
    row = await row_for(proxy, sid)
    assert row["usage_source"] == "invalid" and row["input_tokens"] in (0, None)
    assert "decompression" in (row["extra"] or "")
    await still_serving(proxy, upstream)


def test_a_compressed_answer_within_the_ratio_is_metered_exactly() -> None:
    """The bound leaves real answers alone: a gzip stream fed in 7-byte pieces is metered."""
    fx = load_fixture("openai_chat_stream_usage")
    body = fx.body
    provider = providers.ProviderRegistry.builtin().detect("/v1/chat/completions")
    assert provider is not None
    parser = provider.new_parser("/v1/chat/completions", RequestInfo(model="gpt-4o-mini", stream=True), False)
    tap = ResponseTap(parser, sse=True, content_encoding="gzip")
    packed = zlib.compress(body, 9, wbits=16 + zlib.MAX_WBITS)
    for i in range(0, len(packed), 7):
        assert tap.feed(packed[i : i + 7]) == packed[i : i + 7]
    tap.finish()
    result = tap.result()
    assert result.usage_source == "reported"
    assert result.usage is not None and result.usage.input_tokens == fx.expect["input_tokens"]

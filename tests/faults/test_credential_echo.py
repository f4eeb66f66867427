"""An upstream that echoes the caller's key back never gets it stored (issue 14.3).

The keys here have no known shape (no ``sk-``, no ``AIza``), the way an Azure
subscription key or a self-hosted server's token looks; the log redaction's shape
patterns cannot catch them. The proxy must remove the exact credential this
request carried from the upstream's error text before the record is written:
nothing in the row, the WAL, ``/api/requests`` or either export.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from meterproxy.credentials import carried, scrub_text
from meterproxy.testing import FakeUpstream
from meterproxy.testing_raw import RawConnection, respond
from tests.conftest import ProxyFactory
from tests.helpers.faults import CHAT, RawFactory, proxy_for, row_for, session_id

SHAPELESS = "3f9c1e7a0b2d4c68a1e5f7b9c0d2e4f6"  # an Azure-style 32-hex subscription key
TOKEN = "tok_Zq8/Xy+w9==vP"  # characters that get percent-encoded


@pytest.mark.parametrize(
    ("path", "headers", "secret"),
    [
        ("/raw/v1/chat/completions", {"Authorization": f"Bearer {SHAPELESS}"}, SHAPELESS),
        ("/raw/v1/chat/completions", {"Authorization": SHAPELESS}, SHAPELESS),  # no scheme
        ("/raw/openai/deployments/d/chat/completions?api-version=1", {"api-key": SHAPELESS}, SHAPELESS),
        ("/raw/v1/messages", {"x-api-key": SHAPELESS}, SHAPELESS),
        ("/raw/v1beta/models/gemini-2.0-flash:generateContent", {"x-goog-api-key": SHAPELESS}, SHAPELESS),
        (f"/raw/v1beta/models/gemini-2.0-flash:generateContent?key={quote(TOKEN)}", {}, TOKEN),
    ],
    ids=["bearer", "bare-authorization", "api-key", "x-api-key", "x-goog-api-key", "query-key"],
)
async def test_echoed_credential_never_reaches_row_wal_api_or_export(
    tmp_path: Path,
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    raw_upstream: RawFactory,
    path: str,
    headers: dict[str, str],
    secret: str,
) -> None:
    async def echo(conn: RawConnection) -> None:
        assert conn.request is not None
        # Echo the key raw and percent-encoded, as Azure's and some gateways' 401s do.
        message = f"invalid subscription key {secret} (sent as {quote(secret, safe='')})"
        body = json.dumps({"error": {"code": "401", "message": message}}).encode()
        await conn.send(respond(401, body))

    raw = await raw_upstream(echo)
    proxy = await proxy_for(make_proxy, raw, upstream)
    sid = session_id()
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{proxy.url}{path}", data=CHAT, headers={**headers, "X-Meter-Session": sid}
        ) as r:
            assert r.status == 401
            assert secret.encode() in await r.read()  # the client gets what the upstream sent
        row = await row_for(proxy, sid)
        assert row["error"] and "[REDACTED]" in row["error"], row["error"]
        exports = []
        for api in ("/api/requests?limit=100", "/api/export?format=csv", "/api/export?format=jsonl"):
            async with client.get(f"{proxy.url}{api}") as r:
                assert r.status == 200
                exports.append(await r.read())

    needles = {secret.encode(), quote(secret, safe="").encode(), secret[4:20].encode()}
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("meter.db")}
    assert "meter.db-wal" in files or "meter.db" in files
    for needle in needles:
        assert needle not in json.dumps(row).encode()
        for name, data in files.items():
            assert needle not in data, f"the key is in {name}"
        for data in exports:
            assert needle not in data, "the key is in an API answer or export"


def test_carried_takes_every_credential_spelling() -> None:
    got = carried([("Authorization", "Bearer abcd/1234"), ("x-api-key", "zz")], "key=q%2Bw%3D&x=1")
    assert "abcd/1234" in got and "abcd%2F1234" in got and "Bearer abcd/1234" in got
    assert "q+w=" in got and "q%2Bw%3D" in got
    assert "zz" not in got  # too short to scrub without garbling the text
    assert scrub_text("bad key abcd/1234 and abcd%2F1234", got) == "bad key [REDACTED] and [REDACTED]"

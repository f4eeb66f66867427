"""``GET /api/me/usage``: a key holder sees their own spend, never anyone else's, without the admin token."""

from __future__ import annotations

import json
from decimal import Decimal

import aiohttp
import openai

from meterproxy.app_state import FINGERPRINT_SALT
from meterproxy.attribution import fingerprint
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT

KEY_A = "sk-alice-0123456789abcdef"
KEY_B = "sk-bob-fedcba9876543210"


async def test_a_key_holder_sees_only_their_own_usage(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy(admin_token="admin-secret")
    for key, n in ((KEY_A, 2), (KEY_B, 3)):
        client = openai.AsyncOpenAI(
            timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key=key, max_retries=0
        )
        for _ in range(n):
            await client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "x"}])
    rows = await proxy.rows(5)
    a_rows = [r for r in rows if r["key_fingerprint"] == rows[0]["key_fingerprint"]]
    assert len(a_rows) == 2

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/api/me/usage", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
            assert r.status == 200, await r.text()
            text = await r.text()
            body = json.loads(text, parse_float=Decimal)
        assert KEY_A not in text
        assert body["key_fingerprint"] == a_rows[0]["key_fingerprint"]
        assert body["totals"]["requests"] == 2
        assert body["totals"]["input_tokens"] == 2 * fx.expect["input_tokens"]
        assert Decimal(body["totals"]["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in a_rows)
        [group] = body["groups"]
        assert group["key"] == {"model": fx.expect["model"]}

        # The same key in another header shape is the same holder.
        async with http.get(f"{proxy.url}/api/me/usage?group_by=day", headers={"x-api-key": KEY_B}) as r:
            assert (await r.json())["totals"]["requests"] == 3

        # No key: 401 saying what to send. Another key's filter: refused, not honoured.
        async with http.get(f"{proxy.url}/api/me/usage") as r:
            assert r.status == 401
            assert "API key" in (await r.json())["error"]["message"]
        fp_b = next(r for r in rows if r not in a_rows)["key_fingerprint"]
        async with http.get(
            f"{proxy.url}/api/me/usage?key={fp_b}", headers={"Authorization": f"Bearer {KEY_A}"}
        ) as r:
            assert r.status == 400
        # A key never seen answers zeros.
        async with http.get(f"{proxy.url}/api/me/usage", headers={"Authorization": "Bearer sk-nobody"}) as r:
            assert (await r.json())["totals"]["requests"] == 0
        # The rest of the API still needs the admin token.
        async with http.get(f"{proxy.url}/api/summary", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
            assert r.status == 401


async def test_what_cannot_identify_a_caller_is_refused_with_what_to_send(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(admin_token="admin-secret")
    salt = proxy.app[FINGERPRINT_SALT]
    sigv4 = (
        "AWS4-HMAC-SHA256 Credential=AKIDCLIENT000000/20261204/us-east-1/bedrock/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
    )
    async with aiohttp.ClientSession() as http:
        # A SigV4 header names an access key id (no secret) with a signature nobody here can check.
        async with http.get(f"{proxy.url}/api/me/usage", headers={"Authorization": sigv4}) as r:
            assert r.status == 401 and "SigV4" in (await r.json())["error"]["message"]
        # A key in the URL (Gemini's ?key=) is not taken: headers only, and the reason is given.
        async with http.get(f"{proxy.url}/api/me/usage?key={KEY_A}") as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["param"] == "key" and "header" in error["message"] and KEY_A not in error["message"]
        # Azure's api-key header is a key like any other; an empty Bearer is no key.
        async with http.get(f"{proxy.url}/api/me/usage", headers={"api-key": KEY_B}) as r:
            assert r.status == 200 and (await r.json())["totals"]["requests"] == 0
        async with http.get(f"{proxy.url}/api/me/usage", headers={"Authorization": "Bearer "}) as r:
            assert r.status == 401
        both = {"Authorization": "Bearer ", "x-api-key": KEY_B}
        async with http.get(f"{proxy.url}/api/me/usage", headers=both) as r:
            assert r.status == 200 and (await r.json())["key_fingerprint"] == fingerprint(KEY_B, salt)

"""Security: not an open proxy, the admin surface, credentials never stored or logged, file modes.

The open-proxy tests run a second, "evil" server on 127.0.0.1 and throw every
trick at the proxy over a raw socket (absolute-form targets, CONNECT, dot
segments plain and encoded, encoded slashes, ``//host``, userinfo, Host and
X-Forwarded-Host games, redirects): the evil server must never see a single
connection, and the configured upstream only ever sees paths under its base.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sqlite3
import stat
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from meterproxy import http_errors
from meterproxy.testing import FakeUpstream, Reply, free_port, load_fixture
from meterproxy.testing_raw import RawUpstream
from tests.conftest import ProxyFactory
from tests.helpers.served import Served

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


async def _raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await asyncio.wait_for(reader.read(4096), timeout=10)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        writer.transport.abort()


def _tricks(evil: str) -> list[bytes]:
    """Request lines and headers that try to make the proxy connect to ``evil`` (host:port)."""
    lines = [
        f"GET http://{evil}/ HTTP/1.1",
        f"POST http://{evil}/v1/chat/completions HTTP/1.1",
        f"GET https://{evil}/openai/v1/models HTTP/1.1",
        f"CONNECT {evil} HTTP/1.1",
        f"GET {evil} HTTP/1.1",
        f"GET //{evil}/v1/chat/completions HTTP/1.1",
        f"GET ///{evil}/ HTTP/1.1",
        f"GET /http://{evil}/ HTTP/1.1",
        f"GET /openai/http://{evil}/ HTTP/1.1",
        f"GET /openai//{evil}/ HTTP/1.1",
        f"GET /openai@{evil}/ HTTP/1.1",
        f"GET /openai:x@{evil}/v1 HTTP/1.1",
        f"GET /%2F%2F{evil}/ HTTP/1.1",
        f"GET /openai%2F%2F{evil}/ HTTP/1.1",
        f"GET /openai/%2F%2F{evil}/ HTTP/1.1",
        "GET /openai/../../etc/passwd HTTP/1.1",
        "GET /openai/%2e%2e/%2e%2e/admin HTTP/1.1",
        "GET /openai/%2E%2E%2F%2E%2E%2Fadmin HTTP/1.1",
        "GET /openai/.%2e/x HTTP/1.1",
        "GET /openai/..%5c..%5cx HTTP/1.1",
        "GET /openai/..\\..\\x HTTP/1.1",
        "GET /%2e%2e/openai/ HTTP/1.1",
        "GET /openai/%00/x HTTP/1.1",
        f"GET /openai/x?url=http://{evil}/ HTTP/1.1",
        f"GET /openai/x#@{evil}/ HTTP/1.1",
        f"OPTIONS http://{evil}/ HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        f"GET /{evil}/ HTTP/1.1",
    ]
    out = [f"{line}\r\nHost: {evil}\r\n\r\n".encode() for line in lines]
    out += [
        f"GET /openai/v1/models HTTP/1.1\r\nHost: {evil}\r\nX-Forwarded-Host: {evil}\r\n"
        f"X-Forwarded-Proto: http\r\nForwarded: host={evil}\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: {evil}\r\nX-Original-URL: http://{evil}/\r\n"
        f"X-Rewrite-URL: //{evil}/\r\n\r\n".encode(),
        f"GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: {evil}\r\n\r\n".encode(),
        b"GET /openai/v1/models HTTP/1.0\r\n\r\n",
    ]
    return out


async def test_nothing_reaches_a_host_that_is_not_a_configured_upstream(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.default = Reply(b"{}")
    async with RawUpstream() as evil:
        evil_addr = f"127.0.0.1:{evil.port}"
        # The upstream has a base path: no trick may climb out of it either.
        proxy = await make_proxy(upstreams={"openai": f"{upstream.url}/base", "anthropic": upstream.url})
        answers = []
        for request in _tricks(evil_addr):
            answers.append(await _raw_request(proxy.server.port, request))
        # A redirect from the upstream is passed to the client, never followed.
        upstream.reply(
            "/base/v1/redirect", Reply(b"", status=307, headers={"Location": f"http://{evil_addr}/"})
        )
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.url}/openai/v1/redirect", allow_redirects=False) as r,
        ):
            assert r.status == 307
        await asyncio.sleep(0.2)  # let any stray connection attempt land before counting
        assert evil.connections == 0
        for received in upstream.received:
            if received.path_qs.startswith("/base/") or received.path_qs == "/base":
                continue
            # Only the anthropic upstream (no base path) may see other paths, and only with its own prefix.
            assert not received.path_qs.startswith(("//", "/..")), received.path_qs
        # Every trick got an answer (an error or a proxied reply), none hung the proxy.
        assert all(a.startswith(b"HTTP/1.") for a in answers), [a[:40] for a in answers if not a]
        paths = [r.path_qs for r in upstream.received]
        assert all(".." not in p and "%2e%2e" not in p.lower() for p in paths), paths


async def test_admin_token_guards_api_and_dashboard(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    token = "admin-token-0123456789"
    proxy = await make_proxy(admin_token=token)
    async with aiohttp.ClientSession() as client:
        # The dashboard page itself is a static shell; its data comes from /api/*.
        for path in ("/api/requests", "/api/summary", "/api/export", "/api/sessions", "/api/timeseries"):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Bearer {token}x"},
                {"Authorization": f"Basic {token}"},
                {"Authorization": token},
                {"Authorization": f"Bearer {token[:-1]}"},
            ):
                async with client.get(f"{proxy.url}{path}", headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    body = await r.json()
                    assert body["error"]["code"] == "unauthorized"
        async with client.get(f"{proxy.url}/api/requests", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        # Proxied paths carry the provider's own credentials: no admin token needed there.
        upstream.replay(load_fixture("openai_chat_json"))
        async with client.post(f"{proxy.url}/v1/chat/completions", data=CHAT) as r:
            assert r.status == 200
        # /healthz stays open for load balancers, and shows nothing sensitive.
        async with client.get(f"{proxy.url}/healthz") as r:
            assert r.status == 200 and token not in await r.text()


async def test_admin_token_is_compared_in_constant_time(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every admin check goes through hmac.compare_digest (timing independent of the contents)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http_errors.hmac, "compare_digest", spy)
    proxy = await make_proxy(admin_token="tok-123")
    async with aiohttp.ClientSession() as client:
        for sent in ("tok-124", "tok-123"):
            async with client.get(
                f"{proxy.url}/api/requests", headers={"Authorization": f"Bearer {sent}"}
            ) as r:
                assert r.status == (200 if sent == "tok-123" else 401)
    assert calls == [(b"tok-124", b"tok-123"), (b"tok-123", b"tok-123")]


def test_public_bind_refused_without_token_via_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meterproxy.cli import main

    monkeypatch.delenv("METERPROXY_ADMIN_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        result = CliRunner().invoke(
            main, ["serve", "--host", host, "--port", "1", "--db", str(tmp_path / "x.db")]
        )
        assert result.exit_code == 2, (host, result.output)
        assert "admin token" in result.output and "--allow-public-without-token" in result.output
    assert not (tmp_path / "x.db").exists()


def test_db_and_its_wal_files_are_owner_only(tmp_path: Path) -> None:
    from meterproxy.store.backend import apply_migrations, connect

    old = os.umask(0o022)
    try:
        db = tmp_path / "new" / "deep" / "m.db"
        conn = connect(db)
        apply_migrations(conn)
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        for f in files:
            assert f.exists(), f
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        conn.close()
    finally:
        os.umask(old)


# -- credentials never touch disk, logs or exports -------------------------------------

KEY = "sk-proj-SECRETKEYabc123XYZ987secretkey"
GKEY = "AIzaSyD-SECRETgeminikey0123456789abcdef"
ECHO = b'{"error":{"message":"Incorrect API key provided: %s","type":"invalid_request_error"}}'


@pytest.mark.slow
async def test_api_keys_never_reach_disk_logs_or_exports(tmp_path: Path, upstream: FakeUpstream) -> None:
    echoed: list[str] = []

    async def echo_key(request: aiohttp.web.Request) -> aiohttp.web.Response:
        # A provider that quotes the key back in its error, as OpenAI's 401 does (masked there).
        await request.read()
        sent = request.headers.get("authorization", "") or request.headers.get("x-api-key", "")
        echoed.append(sent)
        return aiohttp.web.Response(status=401, body=ECHO % sent.encode(), content_type="application/json")

    upstream.replay(load_fixture("openai_chat_json"))
    upstream.replay(load_fixture("anthropic_messages_json"))
    upstream.replay(load_fixture("gemini_generate_json"))
    upstream.replies["/v1/echo/chat/completions"] = echo_key
    db = tmp_path / "keys.db"
    dead = f"http://127.0.0.1:{free_port()}"  # refuses connections
    proxy = Served(db, upstream.url, extra_upstreams={"dead": dead}, env={"METERPROXY_LOG_LEVEL": "debug"})
    try:
        await proxy.ready()
        gem = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
        calls: list[tuple[str, dict[str, str]]] = [
            ("/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}),
            ("/v1/chat/completions", {"api-key": KEY}),  # Azure
            ("/anthropic/v1/messages", {"x-api-key": KEY}),
            (gem, {"x-goog-api-key": GKEY}),
            (f"{gem}?key={GKEY}", {}),
            ("/v1/echo/chat/completions", {"Authorization": f"Bearer {KEY}"}),
            # A broken upstream connection with the key in the query string.
            (f"/dead/v1/chat/completions?key={GKEY}", {"Authorization": f"Bearer {KEY}"}),
        ]
        async with aiohttp.ClientSession() as client:
            for path, headers in calls:
                async with client.post(f"{proxy.url}{path}", data=CHAT, headers=headers) as r:
                    await r.read()
            exports = []
            for path in (
                "/api/requests?limit=1000",
                "/api/export?format=jsonl",
                "/api/export?format=csv",
                "/api/sessions",
                "/api/summary?group_by=model",
                "/metrics",
                "/healthz",
            ):
                async with client.get(f"{proxy.url}{path}") as r:
                    exports.append(await r.read())
        assert echoed and KEY in echoed[0]  # the key really went through the proxy
        proxy.proc.terminate()
        await proxy.wait_exit()
    finally:
        proxy.stop()
    log = proxy.log.read_bytes()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys.db")}
    assert files, "no database files"
    for secret in (KEY, GKEY, KEY[8:24], GKEY[6:22]):
        needle = secret.encode()
        for name, data in files.items():
            assert needle not in data, f"key found in {name}"
        assert needle not in log, "key found in the logs"
        for data in exports:
            assert needle not in data, "key found in an export"
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT upstream, status, error, key_fingerprint FROM requests").fetchall()
    conn.close()
    assert len(rows) == len(calls), rows
    assert any(r[0] == "dead" and r[1] == 502 for r in rows)
    assert all(r[3] for r in rows), "every call carried a key: each row has its fingerprint"
    # The fingerprints are there instead (so requests can still be told apart by key).
    assert any(b"key_fingerprint" in e for e in exports)


def test_redacting_filter_covers_aiohttp_access_log(capsys: pytest.CaptureFixture[str]) -> None:
    """Every logger, aiohttp's access and client loggers included, goes through the redaction."""
    import logging

    from meterproxy.logs import configure_logging

    configure_logging("debug")
    try:
        for name in ("aiohttp.access", "aiohttp.client", "aiohttp.server", "meterproxy.proxy"):
            logging.getLogger(name).info(
                '127.0.0.1 "POST /v1/x?key=%s HTTP/1.1" Authorization: Bearer %s x-api-key=%s', GKEY, KEY, KEY
            )
        err = capsys.readouterr().err
        assert "REDACTED" in err and KEY not in err and GKEY not in err
    finally:
        logging.getLogger().handlers.clear()


def test_no_text_columns_in_the_requests_table() -> None:
    """Text never sits beside the metered row; opt-in content has its own table (test_content.py)."""
    from meterproxy.store.schema import COLUMNS

    assert not {"prompt", "completion", "content", "messages", "body"} & set(COLUMNS)


async def test_prompt_text_never_reaches_the_database(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy()  # store_content is off by default
    marker = "PROMPT-MARKER-7f3a9c-the-secret-plan"
    body = CHAT.replace(b"hi", marker.encode())
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/v1/chat/completions", data=body) as r,
    ):
        assert await r.read() == fx.body
    await proxy.rows(1)
    completion = fx.body.split(b'"content": "')[1].split(b'"')[0] if b'"content": "' in fx.body else b""
    for f in proxy.db.parent.iterdir():
        if f.name.startswith(proxy.db.name):
            data = f.read_bytes()
            assert marker.encode() not in data
            if len(completion) > 8:
                assert completion not in data


async def test_webhook_secrets_never_in_api_responses(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    pytest.importorskip("meterproxy.budgets.api")
    secret, header_secret = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LTAxMjM0NQ==", "hdr-secret-value-9876"
    proxy = await make_proxy(
        webhooks={
            "ops": {"url": "http://127.0.0.1:9/hook", "secret": secret, "headers": {"X-T": header_secret}}
        },
        budgets=[{"name": "team", "limit_usd": "10", "webhooks": ["ops"]}],
    )
    paths = ["/api/budgets", "/api/budgets/team", "/api/budgets/team/events", "/api/webhooks/deliveries"]
    paths.append("/api/openapi.json")
    async with aiohttp.ClientSession() as client:
        for path in paths:
            async with client.get(f"{proxy.url}{path}") as r:
                text = await r.text()
                assert r.status < 500, (path, text)
                assert secret not in text and header_secret not in text, path

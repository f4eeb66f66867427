"""Acceptance: issue 14's adversarial probes, replayed against ``meterproxy serve`` as an attacker would.

The proxy runs as a subprocess (``python -m meterproxy serve``) in front of a
fake upstream on 127.0.0.1; the probes are raw sockets and aiohttp. Each test
is one numbered item of issue 14; every one holds on main (they were written as
expected failures before the fixes landed, and now guard them).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from meterproxy.testing import FakeUpstream, Reply, load_fixture
from meterproxy.testing_raw import RawConnection, RawUpstream, respond
from tests.helpers.served import Served

KEY = "sk-proj-AcceptanceKey0123456789abcdefABCDEF"
CHAT = load_fixture("openai_chat_json")


@dataclass
class Running:
    proxy: Served
    upstream: FakeUpstream
    db: Path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    async with FakeUpstream() as upstream:
        upstream.replay(CHAT)
        upstream.reply("/base/v1/chat/completions", Reply(body=CHAT.body))
        db = tmp_path / "meter.db"
        # openai, and an upstream with a base path for the dot-segment probes
        proxy = serve(db, tmp_path, f"openai={upstream.url}", f"based={upstream.url}/base")
        try:
            await proxy.ready()
            yield Running(proxy, upstream, db)
        finally:
            proxy.stop()


def serve(db: Path, workdir: Path, *upstreams: str) -> Served:
    return Served(str(db), "", workdir, "serve", upstreams=upstreams)


async def chat(served: Running, headers: dict[str, str], path: str = "/v1/chat/completions") -> int:
    body = CHAT.meta["request_body"].encode()
    hdrs = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession() as s, s.post(served.proxy.url + path, data=body, headers=hdrs) as r:
        await r.read()
        return r.status


async def rows(served: Running, n: int) -> list[sqlite3.Row]:
    """The stored rows, once ``n`` are committed (polled with a deadline, not slept for)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        with sqlite3.connect(served.db) as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute("SELECT * FROM requests ORDER BY id").fetchall()
        if len(found) >= n:
            return found
        assert loop.time() < deadline, f"{len(found)} of {n} rows"
        await asyncio.sleep(0.05)


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


ANSWER = json.dumps(
    {
        "id": "chatcmpl-desync",
        "object": "chat.completion",
        "created": 1764720000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()


@pytest.mark.parametrize(
    "trailing",
    [
        respond(418, b"I'm a teapot", content_type="text/plain"),  # a second whole response
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",  # the start of one
    ],
    ids=["two-responses", "trailing-partial"],
)
async def test_1_bytes_after_a_complete_answer_never_reach_any_client(
    tmp_path: Path, trailing: bytes
) -> None:
    async def script(conn: RawConnection) -> None:
        extra = trailing
        while True:
            await conn.send(respond(200, ANSWER) + extra)
            extra = b""
            if await conn.next_request() is None:
                return

    async with RawUpstream(script) as upstream:
        proxy = serve(tmp_path / "meter.db", tmp_path, f"openai={upstream.url}")
        try:
            await proxy.ready()
            async with aiohttp.ClientSession() as s:
                for _ in range(3):  # the next, unrelated clients get their own whole answer
                    async with s.post(
                        proxy.url + "/v1/chat/completions",
                        data=b'{"model":"gpt-4o-mini","messages":[]}',
                        timeout=aiohttp.ClientTimeout(total=20),
                    ) as r:
                        assert r.status == 200
                        assert r.headers.getall("Content-Length") == [str(len(ANSWER))]
                        assert await r.read() == ANSWER
        finally:
            proxy.stop()


async def test_2_a_malformed_request_never_logs_its_key(served: Running) -> None:
    port = served.proxy.port
    bare_lf = (
        f"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\nContent-Length: 2\n\n{{}}"
    )
    for probe in (
        bare_lf.encode(),
        f"GET /v1/models?key={KEY} HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".encode(),
    ):
        answer = await raw_exchange(port, probe)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert await served.proxy.terminate() == 0
    log = served.proxy.log.read_text(errors="replace")
    assert KEY not in log
    assert KEY[8:] not in log


async def test_3_a_key_echoed_by_the_upstream_is_stored_nowhere(served: Running) -> None:
    echo = json.dumps(
        {"error": {"message": f"invalid subscription key {KEY}", "type": "invalid_request_error"}}
    )
    served.upstream.reply("/v1/chat/completions", Reply(status=401, body=echo.encode()))
    assert await chat(served, {"Authorization": f"Bearer {KEY}"}) == 401
    (row,) = await rows(served, 1)
    assert row["status"] == 401
    async with aiohttp.ClientSession() as s:
        for path in ("/api/requests", "/api/export?format=csv", "/api/export?format=jsonl"):
            async with s.get(served.proxy.url + path) as r:
                assert KEY not in await r.text(), path
    assert await served.proxy.terminate() == 0
    for f in served.db.parent.iterdir():
        if f.name.startswith("meter.db"):
            assert KEY.encode() not in f.read_bytes(), f.name


DANGEROUS = ('=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3")


async def test_4_csv_cells_never_start_a_formula(served: Running) -> None:
    for i, value in enumerate(DANGEROUS):
        headers = {"X-Meter-User": value, "X-Meter-Session": value, "X-Meter-Tags": f"team={value}"}
        assert await chat(served, {"Authorization": f"Bearer sk-{i}", **headers}) == 200
    await rows(served, len(DANGEROUS))
    async with aiohttp.ClientSession() as s, s.get(served.proxy.url + "/api/export?format=csv") as r:
        exported = await r.text()
    report = subprocess.run(
        [sys.executable, "-m", "meterproxy", "report", "session", "--db", str(served.db), "--csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    for name, text in (("export", exported), ("report", report.stdout)):
        cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
        assert any("HYPERLINK" in c for c in cells), name  # the value is kept, only neutralised
        bad = [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _number(c))]
        assert bad == [], name


def _number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


async def test_11_dot_segments_below_a_base_path_never_reach_the_upstream(served: Running) -> None:
    for path in ("/based/v1/..;/x", "/based/v1/%252e%252e/x", "/based/v1/%2e%2e/x", "/based/v1/.%2E/x"):
        before = len(served.upstream.received)
        answer = await raw_exchange(
            served.proxy.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert answer.split(b"\r\n")[0][9:12] in (b"400", b"404"), (path, answer[:80])
        assert [r.path_qs for r in served.upstream.received[before:]] == [], path


async def test_11_oversized_user_and_session_headers_are_capped(served: Running) -> None:
    headers = {"X-Meter-User": "u" * 8000, "X-Meter-Session": "s" * 8000, "Authorization": "Bearer sk-x"}
    assert await chat(served, headers) == 200  # the client still gets its answer
    (row,) = await rows(served, 1)
    assert 0 < len(row["user"]) <= 256
    assert 0 < len(row["session"]) <= 256


def _answer_costing_15_cents() -> bytes:
    # gpt-4o-mini at $0.15 per million input tokens: one million input tokens, no output.
    body = json.loads(ANSWER)
    body["usage"] = {"prompt_tokens": 1_000_000, "completion_tokens": 0, "total_tokens": 1_000_000}
    return json.dumps(body, indent=2).encode()


async def test_5_a_block_budget_stops_sequential_requests_at_its_limit(tmp_path: Path) -> None:
    config = tmp_path / "meterproxy.toml"
    config.write_text('[[budgets]]\nname = "cap"\nlimit_usd = "1"\nperiod = "month"\naction = "block"\n')
    async with FakeUpstream() as upstream:
        upstream.reply("/v1/chat/completions", Reply(body=_answer_costing_15_cents()))
        proxy = Served(str(tmp_path / "meter.db"), upstream.url, tmp_path, "serve", config=config)
        try:
            await proxy.ready()
            statuses = []
            async with aiohttp.ClientSession() as s:
                for _ in range(16):  # strictly one after the other
                    async with s.post(
                        proxy.url + "/v1/chat/completions",
                        data=b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}',
                        headers={"Authorization": "Bearer sk-x", "Content-Type": "application/json"},
                    ) as r:
                        await r.read()
                        statuses.append(r.status)
        finally:
            proxy.stop()
    # $0.15 each: the 7th brings spend to $1.05, so the 8th and every later one is refused
    assert statuses == [200] * 7 + [429] * 9


@pytest.mark.parametrize("fault", ["port-in-use", "db-parent-is-a-file", "not-a-database", "limit-abc"])
def test_10_start_up_faults_say_one_clear_line(tmp_path: Path, fault: str) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "notdb.db").write_text("hello, not a database\n" * 10)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = {
            "port-in-use": ["serve", "--port", port, "--db", str(tmp_path / "m.db")],
            "db-parent-is-a-file": ["serve", "--port", "0", "--db", str(tmp_path / "afile" / "m.db")],
            "not-a-database": ["serve", "--port", "0", "--db", str(tmp_path / "notdb.db")],
            "limit-abc": ["budgets", "add", "x", "--limit", "abc", "--db", str(tmp_path / "b.db")],
        }[fault]
        done = subprocess.run(
            [sys.executable, "-m", "meterproxy", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")},
        )
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "Traceback" not in said and "pydantic.dev" not in said, said


ODD_KEY = "AIzaSyOddShapedKey_0123456789abcdefghijk"


async def test_3_keys_of_every_shape_echoed_by_the_upstream_are_stored_nowhere(tmp_path: Path) -> None:
    said = f"API key not valid: {ODD_KEY}. Please pass a valid API key."
    gemini = {"error": {"code": 400, "message": said, "status": "INVALID_ARGUMENT"}}
    claude = {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key {ODD_KEY}"},
    }
    azure = {"error": {"code": "401", "message": f"Access denied due to invalid subscription key {ODD_KEY}"}}
    async with FakeUpstream() as upstream:
        upstream.reply(
            "/v1beta/models/gemini-2.5-flash:generateContent",
            Reply(status=400, body=json.dumps(gemini).encode()),
        )
        upstream.reply("/v1/messages", Reply(status=401, body=json.dumps(claude).encode()))
        upstream.reply(
            "/openai/deployments/d/chat/completions", Reply(status=401, body=json.dumps(azure).encode())
        )
        names = ("gemini", "anthropic", "azure")
        proxy = serve(tmp_path / "meter.db", tmp_path, *(f"{n}={upstream.url}" for n in names))
        gem = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
        probes = [
            (f"{gem}?key={ODD_KEY}", {}),
            (gem, {"x-goog-api-key": ODD_KEY}),
            ("/anthropic/v1/messages", {"x-api-key": ODD_KEY}),
            ("/azure/openai/deployments/d/chat/completions?api-version=2024-10-21", {"api-key": ODD_KEY}),
        ]
        try:
            await proxy.ready()
            async with aiohttp.ClientSession() as s:
                for path, headers in probes:
                    hdrs = {"Content-Type": "application/json", **headers}
                    async with s.post(
                        proxy.url + path, data=b'{"model":"m","contents":[]}', headers=hdrs
                    ) as r:
                        assert ODD_KEY in await r.text()  # the client still gets what the upstream sent
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while True:  # until the writer has committed every row
                    async with s.get(proxy.url + "/api/export?format=jsonl") as r:
                        exported = await r.text()
                    if len(exported.splitlines()) >= len(probes):
                        break
                    assert loop.time() < deadline, exported
                    await asyncio.sleep(0.05)
            assert await proxy.terminate() == 0
        finally:
            proxy.stop()
    assert len(exported.splitlines()) == len(probes) and ODD_KEY not in exported
    assert exported.count("[REDACTED]") == len(probes)
    assert ODD_KEY not in proxy.log.read_text(errors="replace")
    for f in tmp_path.iterdir():
        if f.name.startswith("meter.db"):
            assert ODD_KEY.encode() not in f.read_bytes(), f.name


async def test_8_a_flood_of_malformed_requests_logs_little(served: Running) -> None:
    for _ in range(50):
        answer = await raw_exchange(
            served.proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: \x00\r\n\r\n"
        )
        assert b" 400 " in answer.split(b"\r\n")[0]
    assert await served.proxy.terminate() == 0
    log = served.proxy.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert len(log) < 4_000, f"{len(log)} bytes of log for 50 bad requests"

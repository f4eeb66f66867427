"""``meterproxy serve`` as a user runs it: a real process, a real port, SIGTERM flushes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai

from meterproxy.testing import FakeUpstream, load_fixture


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as client:
        while loop.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            try:
                async with client.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("proxy did not become healthy")


async def test_serve_records_and_flushes_on_sigterm(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    db = tmp_path / "data" / "meter.db"
    port = free_port()
    env = {**os.environ, "METERPROXY_DB": str(db), "XDG_DATA_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meterproxy",
            "serve",
            "--port",
            str(port),
            "--upstream",
            f"openai={upstream.url}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, proc)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-live-secret-000000")
        for _ in range(5):
            await client.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": "x"}])
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*), sum(input_tokens) FROM requests").fetchone() == (
        5,
        5 * load_fixture("openai_chat_json").expect["input_tokens"],
    )
    assert b"sk-live-secret" not in stderr
    assert (db.stat().st_mode & 0o777) == 0o600


def test_public_bind_without_token_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "METERPROXY_DB": str(tmp_path / "x.db")}
    env.pop("METERPROXY_ADMIN_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "meterproxy", "serve", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert b"admin token" in result.stderr

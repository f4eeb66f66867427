"""``meterproxy serve`` as a user runs it: a real process, a real port, SIGTERM flushes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import openai

from meterproxy.testing import FakeUpstream, free_port, load_fixture, wait_healthy
from tests.helpers.sdk import SDK_TIMEOUT


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
        client = openai.AsyncOpenAI(
            timeout=SDK_TIMEOUT, base_url=f"{url}/v1", api_key="sk-live-secret-000000"
        )
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

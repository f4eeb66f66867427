"""``meterproxy serve`` as a user runs it: a real process, a real port, SIGTERM flushes."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
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


def test_connections_made_while_the_app_is_built_are_answered(tmp_path: Path) -> None:
    """`serve` binds its port before it builds the app (so a port in use is said at once); a
    client that connects in that time (a health check, a client started with the proxy) must be
    answered once the app is up, not reset. It was: the first socket was closed and the port
    bound again, resetting what had queued and refusing connections in between."""
    port = free_port()
    env = {**os.environ, "METERPROXY_DB": str(tmp_path / "meter.db"), "XDG_DATA_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterproxy", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The first connection the port accepts: made while the app is still being built
        # (imports, prices, the store), which takes far longer than this loop's steps.
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the port never opened"
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except ConnectionRefusedError:
                time.sleep(0.005)  # polling for the port to open, not waiting for a state
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        # And every connection after it is answered too: no moment in which the port is closed.
        for _ in range(20):
            assert _healthz_status_line(port) == b"HTTP/1.1 200"
    finally:
        _stop(proc)


def test_with_workers_the_port_stays_open_while_they_start(tmp_path: Path) -> None:
    """`serve --workers 2`: the supervisor logs that it started its workers right after spawning
    them, long before they have imported and built their apps. A client connecting then waits in
    the backlog of the socket the supervisor bound (handed to the first worker) and is answered.
    It was refused: the supervisor closed that socket and the workers had not bound theirs yet."""
    port = free_port()
    env = {**os.environ, "METERPROXY_DB": str(tmp_path / "meter.db"), "XDG_DATA_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterproxy", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        seen = []
        for line in proc.stderr:  # the supervisor's line, written once both workers are spawned
            seen.append(line)
            if b"2 workers on" in line:
                break
        else:
            raise AssertionError(b"".join(seen).decode())
        assert _healthz_status_line(port) == b"HTTP/1.1 200"
        for _ in range(20):  # both workers' sockets, once bound, answer too
            assert _healthz_status_line(port) == b"HTTP/1.1 200"
    finally:
        _stop(proc)


def _healthz_status_line(port: int) -> bytes:
    """The status line's first 12 bytes of a GET /healthz on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.makefile("rb").read(12)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()

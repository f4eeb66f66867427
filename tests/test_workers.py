"""``meterproxy serve --workers 2``: a real supervisor, two real workers, one database.

Every request answered by either worker must be recorded exactly once, and a
SIGTERM to the supervisor must flush both workers' writers before it exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from meterproxy.store.migrations import migration_sets
from meterproxy.testing import FakeUpstream, free_port, load_fixture, wait_healthy
from tests.helpers.prom import wait_for_files

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            # multiprocessing's spawned workers (not its resource tracker).
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


async def test_two_workers_record_every_request(upstream: FakeUpstream, tmp_path: Path) -> None:
    fixture = load_fixture("openai_chat_json")
    upstream.replay(fixture)
    db = tmp_path / "meter.db"
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "METERPROXY_LOG_LEVEL": "warning"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["METERPROXY_METRICS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    args = ["serve", "--workers", "2", "--port", str(port), "--db", str(db)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterproxy", *args, "--upstream", f"openai={upstream.url}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    n = 200
    try:
        await wait_healthy(url, proc)
        # Both workers have built their app (each creates its gauge file) before traffic starts.
        await wait_for_files(tmp_path / "metrics", "gauge_livesum_*.db", 2)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        # Fresh connections (no keep-alive) so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True, limit=16)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def one() -> None:
                async with client.post(f"{url}/openai/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()

            await asyncio.gather(*(one() for _ in range(n)))
            async with client.get(f"{url}/metrics") as resp:
                text = await resp.text()
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # Show what the server said: a worker that died explains a refused connection.
        print(proc.communicate(timeout=30)[1].decode(errors="replace")[-4000:])
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(workers) == 2
    assert proc.returncode == 0, stderr.decode()
    conn = sqlite3.connect(db)
    count, distinct, tokens = conn.execute(
        "SELECT count(*), count(DISTINCT id), sum(input_tokens) FROM requests"
    ).fetchone()
    assert (count, distinct) == (n, n)
    assert tokens == n * fixture.expect["input_tokens"]
    # Metrics merged over both workers count every request once.
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meterproxy_requests_total{")
    )
    assert total == n


def test_supervisor_applies_every_migration_set_before_workers_start(tmp_path: Path) -> None:
    """A fresh process (like the supervisor) must migrate every built-in set, not just core.

    Otherwise the workers each find a set pending and race to create its tables.
    """
    db = tmp_path / "fresh.db"
    code = f"from meterproxy.workers import prepare_database; prepare_database({str(db)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    conn = sqlite3.connect(db)
    applied = {row[0] for row in conn.execute("SELECT DISTINCT migration_set FROM meterproxy_migrations")}
    assert (
        applied
        == {m.name for m in migration_sets()}
        == {
            "meterproxy.core",
            "meterproxy.rollups",
            "meterproxy.budgets",
            "meterproxy.imports",
            "meterproxy.content",
        }
    )

"""Metrics across worker processes: ``serve --workers 2`` scraped by a real Prometheus.

Each scrape lands on whichever worker the kernel picks; in multi-process mode
every worker answers with the merged files of all of them, so the series must
be the same whoever answers: totals equal the database's, no counter ever
resets between scrapes (PromQL ``resets()``), and each process gauge is one
series, not one per worker.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meterproxy.metrics import TOKEN_TYPES
from meterproxy.testing import FakeUpstream, free_port, load_fixture, wait_healthy
from tests.helpers.prom import PrometheusServer, prometheus_binary, wait_for_files

pytestmark = pytest.mark.slow

# (fixture, proxy path): distinct upstream paths so one fake upstream serves them all at once.
TRAFFIC = [
    ("openai_chat_json", "/openai/v1/chat/completions"),
    ("anthropic_messages_json", "/anthropic/v1/messages"),
    ("gemini_generate_json", "/gemini/v1beta/models/gemini-2.5-flash:generateContent"),
    ("deepseek_chat_stream", "/deepseek/chat/completions"),
    ("groq_chat_stream", "/groq/openai/v1/chat/completions"),
]


async def test_two_workers_export_one_consistent_series_set(upstream: FakeUpstream, tmp_path: Path) -> None:
    prometheus_binary()
    fixtures = {name: load_fixture(name) for name, _ in TRAFFIC}
    for name, _ in TRAFFIC:
        upstream.replay(fixtures[name])
    db = tmp_path / "meter.db"
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "METERPROXY_LOG_LEVEL": "warning"}
    env["METERPROXY_METRICS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    names = ("openai", "anthropic", "gemini", "deepseek", "groq")
    args = ["serve", "--workers", "2", "--port", str(port), "--db", str(db)]
    args += [f"--upstream={name}={upstream.url}" for name in names]
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterproxy", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    prom = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"])
    rng = random.Random(4)
    n = 80
    try:
        await wait_healthy(url, proc)
        # Both workers have built their app (each creates its gauge file) before traffic starts.
        await wait_for_files(tmp_path / "metrics", "gauge_livesum_*.db", 2)
        await prom.start()
        connector = aiohttp.TCPConnector(force_close=True, limit=8)  # spread over both workers
        async with aiohttp.ClientSession(connector=connector) as client:

            async def one(name: str, path: str) -> None:
                body = fixtures[name].meta["request_body"].encode()
                headers = {"content-type": "application/json", "authorization": "Bearer sk-test"}
                async with client.post(f"{url}{path}", data=body, headers=headers) as resp:
                    assert resp.status == 200
                    await resp.read()

            # In waves, with a scrape after each (its total seen), so a counter going back between
            # scrapes would show.
            for wave in range(1, 5):
                await asyncio.gather(*(one(*rng.choice(TRAFFIC)) for _ in range(n // 4)))
                sent = wave * n // 4
                assert await prom.wait_for("sum(meterproxy_requests_total)", sent) == sent
        totals = await _wait_for_rows(db, n)
        seen = await prom.wait_for("sum(meterproxy_requests_total)", n)
        assert seen == n, prom.log_text()[-2000:]
        cost = await prom.scalar("sum(meterproxy_cost_usd_total)")
        assert cost is not None and totals["cost"] > 0
        assert round(Decimal(cost), 2) == round(totals["cost"], 2)
        assert abs(Decimal(cost) - totals["cost"]) < Decimal("1e-9")
        by_type = {
            r["metric"]["type"]: float(r["value"][1])
            for r in await prom.query("sum by (type) (meterproxy_tokens_total)")
        }
        assert {k: by_type.get(k, 0) for k in TOKEN_TYPES} == totals["tokens"]
        # Whichever worker answered each scrape, no counter went backwards.
        for metric in ("meterproxy_requests_total", "meterproxy_cost_usd_total", "meterproxy_tokens_total"):
            assert await prom.scalar(f"sum(resets({metric}[10m]))") == 0, metric
        # Process gauges are merged into one series, not one per worker.
        assert await prom.scalar("count(meterproxy_store_up)") == 1
        assert await prom.scalar("min(meterproxy_store_up)") == 1
        assert await prom.scalar("count(meterproxy_in_flight_requests)") == 1
        written = await prom.wait_for("sum(meterproxy_writer_written_records_total)", n)
        assert written == n
        # Both workers served (and counted) part of the traffic.
        files = sorted(p.name for p in (tmp_path / "metrics").iterdir())
        assert len([f for f in files if f.startswith("counter_")]) == 2, files
    finally:
        await prom.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""


async def _wait_for_rows(db: Path, n: int, timeout: float = 30.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        conn = sqlite3.connect(db)
        try:
            row = conn.execute(
                "SELECT COUNT(*), SUM(cost_pico), SUM(input_tokens), SUM(cache_read_tokens),"
                " SUM(cache_write_tokens), SUM(output_tokens), SUM(reasoning_tokens) FROM requests"
            ).fetchone()
        finally:
            conn.close()
        if row[0] >= n or loop.time() > deadline:
            assert row[0] == n
            return {
                "cost": Decimal(row[1]).scaleb(-12),
                "tokens": dict(zip(TOKEN_TYPES, row[2:], strict=True)),
            }
        await asyncio.sleep(0.1)

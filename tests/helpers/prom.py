"""A real Prometheus server for tests: started on 127.0.0.1 with a temp config and storage.

`PrometheusServer` runs ``/usr/bin/prometheus`` (Debian package ``prometheus``)
as a subprocess scraping the given targets every half second (tests wait for a
scrape that shows their traffic: the shorter the interval, the shorter the wait;
the scrape timeout equals the interval, so not much shorter on a busy machine),
and queries it over its HTTP API with aiohttp, so the event loop that serves the
in-process proxy keeps running while a test waits for a scrape. `prometheus_binary` finds the
binary or skips the test, except under ``CI=true`` where a missing binary is a
failure (CI installs it in ``.ci/run``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meterproxy.testing import free_port

__all__ = ["PromQLError", "PrometheusServer", "prometheus_binary", "wait_for_files"]


class PromQLError(Exception):
    """Prometheus answered a query with an error (``bad_data`` for a parse error)."""


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
    )
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("prometheus binary not found, but CI=true: .ci/run must install the 'prometheus' package")
    pytest.skip("prometheus binary not installed (Debian package 'prometheus'; .ci/run installs it)")


class PrometheusServer:
    def __init__(
        self, workdir: Path, targets: list[str], metrics_path: str = "/metrics", scrape_interval_ms: int = 500
    ) -> None:
        self.workdir = workdir
        self.scrape_interval_ms = scrape_interval_ms
        self.targets = targets
        self.metrics_path = metrics_path
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        targets = ", ".join(f'"{t}"' for t in self.targets)
        config.write_text(
            f"global:\n  scrape_interval: {self.scrape_interval_ms}ms\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: meterproxy\n"
            f"    metrics_path: {self.metrics_path}\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        self._log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        self._session = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_text()[-2000:]}")
            try:
                async with self._session.get(f"{self.url}/-/ready") as resp:
                    if resp.status == 200:
                        return self
            except aiohttp.ClientError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"prometheus not ready: {self.log_text()[-2000:]}")
            await asyncio.sleep(0.1)

    def log_text(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                await asyncio.to_thread(self._proc.wait, 20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    async def __aenter__(self) -> PrometheusServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises `PromQLError` on a bad expression)."""
        assert self._session is not None
        async with self._session.post(f"{self.url}/api/v1/query", data={"query": expr}) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} in {expr!r}")
        data = body["data"]
        return list(data["result"]) if data["resultType"] in ("vector", "matrix") else [data["result"]]

    async def scalar(self, expr: str) -> float | None:
        """The single value of a one-element vector, or None when the result is empty."""
        result = await self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    async def wait_for(self, expr: str, expected: float, timeout: float = 60.0) -> float | None:
        """Poll ``expr`` until it equals ``expected`` (a scrape has seen it) or time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = await self.scalar(expr)
            if got == expected or loop.time() > deadline:
                return got
            await asyncio.sleep(0.05)


async def wait_for_files(directory: Path, pattern: str, n: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(list(directory.glob(pattern))) < n:
        assert loop.time() < deadline, sorted(p.name for p in directory.iterdir())
        await asyncio.sleep(0.1)

"""``meterproxy serve`` in its own process: the one launcher the subprocess tests share.

The real command, as a user or a platform team runs it (one process, or
several replicas sharing one store behind a load balancer), on its own free
port, with every default upstream name pointing at a FakeUpstream on 127.0.0.1
(nothing may reach a real provider). The environment is the test's, without
any ``METERPROXY_*`` variable (the command line says everything) and with
``XDG_DATA_HOME`` inside the test's directory. Output goes to a log file per
process, shown when it fails to start.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from meterproxy.testing import free_port, wait_healthy

__all__ = ["Served", "metric_sum"]


class Served:
    def __init__(
        self,
        db: str | Path,
        upstream_url: str,
        workdir: Path | None = None,
        name: str = "serve",
        *,
        config: Path | None = None,
        upstreams: Sequence[str] | None = None,
        extra_upstreams: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``upstreams`` (``NAME=URL`` each) replaces openai, anthropic and gemini at ``upstream_url``;
        ``extra_upstreams`` adds names; ``env`` adds variables (``METERPROXY_DURABILITY``, ...).
        ``workdir`` (for the log and XDG_DATA_HOME) defaults to the SQLite file's directory."""
        self.db = db
        workdir = workdir if workdir is not None else Path(db).parent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("METERPROXY_")}
        environ["XDG_DATA_HOME"] = str(workdir / "xdg")
        environ.update(env or {})
        names = upstreams or [f"{n}={upstream_url}" for n in ("openai", "anthropic", "gemini")]
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meterproxy",
                "serve",
                "--port",
                str(self.port),
                "--db",
                str(db),
                *(["--config", str(config)] if config else []),
                *(f"--upstream={u}" for u in names),
                *(f"--upstream={n}={u}" for n, u in (extra_upstreams or {}).items()),
            ],
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self, timeout: float = 60.0) -> None:
        await wait_healthy(self.url, self.proc, timeout, output=self.log.read_text)

    async def get(self, path: str, **params: Any) -> tuple[int, str]:
        async with aiohttp.ClientSession() as client, client.get(self.url + path, params=params) as r:
            return r.status, await r.text()

    async def healthz(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as client, client.get(f"{self.url}/healthz") as r:
            return dict(await r.json())

    async def wait_exit(self, timeout: float = 60.0) -> int:
        """The exit status, once the process has exited (it was signalled, or stops on its own)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            assert loop.time() < deadline, "meterproxy serve did not exit"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: a clean shutdown flushes every finished request."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus text exposition whose labels include ``labels``."""
    total = 0.0
    for line in exposition.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total

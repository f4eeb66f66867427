"""Several ``meterproxy serve`` processes sharing one store: the harness the replica tests use.

Each replica is the real command in its own process (as a platform team runs
them behind a load balancer), on its own free port, with every upstream name
pointing at the test's FakeUpstream on 127.0.0.1. Logs go to a file per
replica and are shown when one fails to start.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from meterproxy.testing import free_port, wait_healthy

__all__ = ["Replica", "metric_sum"]


class Replica:
    def __init__(
        self,
        db: str,
        upstream_url: str,
        workdir: Path,
        name: str,
        config: Path | None = None,
        upstreams: Sequence[str] | None = None,
    ) -> None:
        """``upstreams`` (``NAME=URL`` each) replaces openai, anthropic and gemini at ``upstream_url``."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("METERPROXY_")}
        environ["XDG_DATA_HOME"] = str(workdir / "xdg")
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
                db,
                *(["--config", str(config)] if config else []),
                *(
                    f"--upstream={u}"
                    for u in (upstreams or [f"{n}={upstream_url}" for n in ("openai", "anthropic", "gemini")])
                ),
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

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: a clean shutdown flushes every finished request."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            assert loop.time() < deadline, "replica did not exit"
            await asyncio.sleep(0.05)
        return self.proc.returncode

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

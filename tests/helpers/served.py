"""``meterproxy serve`` in its own process: the one launcher the subprocess tests share.

The real command, as a user or a platform team runs it (one process, or
several replicas sharing one store behind a load balancer), with every default
upstream name pointing at a FakeUpstream on 127.0.0.1
(nothing may reach a real provider). The environment is the test's, without
any ``METERPROXY_*`` variable (the command line says everything) and with
``XDG_DATA_HOME`` inside the test's directory. Output goes to a log file per
process, shown when it fails to start.

It listens on ``--port 0``: the kernel picks a free port as the server binds,
and `Served.ready` reads it from the line the server logs once bound. (A port
found free beforehand can be taken by another process before the server binds
it, more often on a busy machine or with tests running side by side; then the
server fails to start, or worse, the test talks to someone else's server.)
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

from meterproxy.testing import wait_healthy

__all__ = ["Served", "metric_sum"]

#: The line ``meterproxy serve`` logs (at info) once its socket is bound, with the port it got.
_LISTENING = re.compile(r"meterproxy listening on http://\S+?:(\d+) ")


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
        self._port = 0  # known once the server has bound it (`ready`)
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
                "0",
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

    @property
    def port(self) -> int:
        assert self._port, "the server's port is known once ready() has returned"
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait for the port the server bound (from its log), then for ``/healthz`` to answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (bound := _LISTENING.search(self.log.read_text(errors="replace"))):
            if self.proc.poll() is not None:
                raise AssertionError(f"meterproxy exited with {self.proc.returncode}: {self.log.read_text()}")
            assert loop.time() < deadline, (
                f"meterproxy did not listen within {timeout:g} s: {self.log.read_text()}"
            )
            await asyncio.sleep(0.02)
        self._port = int(bound[1])
        await wait_healthy(self.url, self.proc, max(deadline - loop.time(), 1.0), output=self.log.read_text)

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

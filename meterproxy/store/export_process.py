"""The SQLite export as a child process whose stdout is the export body (``store/export_child.py``).

The event loop's part is only to copy bytes: `ExportProcess.read` returns what
the pipe holds (up to ``CHUNK`` bytes, a few hundred kilobytes to megabytes at a
time), so a 500 MB export is a few thousand awaits, never a Python object per
row. Back-pressure is the pipe's: when the client reads slowly the handler stops
reading, the pipe fills, the child's ``write`` blocks and its workers stop at
their small queues.

Failure and hang-up: the child reports a failure by its exit status (and a line
on stderr); `read` then raises `ExportFailed` instead of returning the end, so a
caller can never mistake a cut export for a complete one. `close` kills a child
that is still running (the client hung up) and waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from meterproxy.store.db import Params
from meterproxy.store.dialect import SQLITE
from meterproxy.store.export import LINE_SQL
from meterproxy.store.export_child import Job
from meterproxy.store.queries import RequestFilter

__all__ = ["CHILD", "CHUNK", "ExportFailed", "ExportProcess"]

#: The child's script: run by path with ``-I`` (no user site, no PYTHONPATH, script dir not on
#: sys.path), so it imports no meterproxy module and starts fast.
CHILD = str(Path(__file__).with_name("export_child.py"))
#: The most one `ExportProcess.read` returns; also the pipe reader's buffer limit.
CHUNK = 1 << 20


class ExportFailed(RuntimeError):
    """The child process stopped before the end of the export."""


class ExportProcess:
    """One export: start with `start`, `read` until ``b""``, always `close`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def start(
        cls,
        db: str,
        flt: RequestFilter,
        fmt: str,
        *,
        workers: int = 2,
        slice_rows: int = 8192,
        driver: str = "auto",
    ) -> ExportProcess:
        p = Params()
        where = dataclasses.replace(flt, since=None, until=None).where(p, SQLITE)
        job: Job = {
            "db": db,
            "line": LINE_SQL[fmt],
            "since": flt.since,
            "until": flt.until,
            "where": where,
            "params": p.values,
            "workers": workers,
            "slice_rows": slice_rows,
            "driver": driver,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=CHUNK,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        try:
            await proc.stdin.drain()
        finally:
            proc.stdin.close()
        return cls(proc)

    async def read(self) -> bytes:
        """The next bytes of the export; ``b""`` once it is complete. Raises `ExportFailed`."""
        assert self._proc.stdout is not None
        data = await self._proc.stdout.read(CHUNK)
        if data:
            return data
        code = await self._proc.wait()
        if code != 0:
            assert self._proc.stderr is not None
            why = (await self._proc.stderr.read(4096)).decode(errors="replace").strip()
            raise ExportFailed(f"export process exited with {code}: {why or 'no message'}")
        return b""

    def kill(self) -> None:
        """Stop the child now if it still runs (non-blocking)."""
        if self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:  # it exited meanwhile
                pass

    async def close(self) -> None:
        """Kill the child if it still runs and wait for it to be gone."""
        self.kill()
        await self._proc.wait()

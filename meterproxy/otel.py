"""OpenTelemetry export: every finished request as a GenAI span and GenAI metrics, over OTLP.

Off unless an OTLP endpoint is configured with the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` turns it off
again). The exporter honours the rest as the official SDK and OTLP/HTTP exporters do:
``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]HEADERS``, ``_TIMEOUT``, ``_COMPRESSION``,
``_CERTIFICATE``, ``_CLIENT_KEY``, ``_CLIENT_CERTIFICATE``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT``,
``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``, ``OTEL_BSP_SCHEDULE_DELAY`` /
``_MAX_EXPORT_BATCH_SIZE`` / ``_MAX_QUEUE_SIZE``. What is exported (span and metric names,
attributes) and how it is encoded is described in `meterproxy.otel_export`.

**Why a child process.** Building a span, recording two histograms and encoding
protobuf costs microseconds of Python per request (140 µs with the SDK's tracer and
instruments, 15-30 µs as the exporter does it now), and a thread doing it
would hold the GIL the event loop needs: measured with a thread, the proxy's
added latency at concurrency 1 grew by 2-3 ms (``bench/otel_overhead.py``), a
GIL hand-off per request. So the export runs in its own process
(``python -m meterproxy.otel_export``, started with the app, inheriting the
environment). On the event loop a finished record costs one tuple
(`record_fields`, in `meterproxy.otel_export.FIELDS` order: no per-request dict, no
pickling); every ``_FLUSH_S`` (or the shorter schedule the operator set:
`handoff_interval`) the batch is written to the child's stdin as one
JSON line (orjson, in C), one write per batch. The child runs at ``SCHED_BATCH``, nice 19
(see `meterproxy.otel_export`). If the child cannot keep up, batches beyond
``_MAX_BUFFERED`` bytes in the pipe are dropped from *telemetry only* (the
records are still stored and in Prometheus) and counted; if the child dies,
export stops with one error line. At shutdown the last batch is sent, stdin is
closed, and the child sends everything it holds before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from meterproxy.app_state import METER
from meterproxy.otel_export import env_seconds
from meterproxy.usage import RequestRecord

__all__ = ["OTEL", "OtelSink", "otel_configured", "record_fields", "setup"]

log = logging.getLogger(__name__)

# Two seconds: every batch wakes the exporter child, and at concurrency 1 the requests that
# meet a wake-up make the p99. Idle machine, bench/otel_overhead.py, added p99 growth with export
# on (JSON): 0.02 s +54 %, 0.1 s +23 % and +25 %, 0.5 s +3 % and -1 % (medians of 5 rounds);
# then, with every round's samples pooled (10 rounds, 2026-12-04): 0.5 s +9.2 % (JSON) and +9.1 %
# (SSE-20), 2 s +0.4 % and +0.6 %; the exporter's CPU per request is the same (bench/README).
# Spans still leave within OTEL_BSP_SCHEDULE_DELAY (5 s by default) of this, and a stop sends the
# last batch. The price: one orjson.dumps of two seconds of tuples on the loop (~0.13 µs a
# tuple: ~2 ms every 2 s at 7,000 requests/s).
_FLUSH_S = 2.0
#: The shortest hand-off, whatever the schedule delay asks (a batch per 50 ms at most).
_FLUSH_MIN_S = 0.05
_MAX_BUFFERED = 8 << 20


def otel_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when the standard variables name an OTLP endpoint and the SDK is not disabled."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(
        env.get(name, "").strip()
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        )
    )


def record_fields(record: RequestRecord) -> tuple[Any, ...]:
    """What the exporter needs of a finished record, as plain JSON values in `FIELDS` order
    (no keys, no content): a tuple, cheaper to build and to encode than a dict by name."""
    u = record.usage
    cost, theirs = record.cost_usd, record.provider_cost_usd
    return (
        record.id,
        int(record.ts.timestamp() * 1e9),
        (record.duration_ms or 0.0) / 1000.0,
        record.endpoint,
        record.upstream,
        record.provider,
        record.requested_model,
        record.model,
        record.status,
        record.usage_source,
        record.streamed,
        (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens)
        if u is not None and record.usage_source in ("reported", "partial")
        else None,
        None if cost is None else str(cost),
        None if theirs is None else str(theirs),
        record.user,
        record.session,
        record.key_fingerprint,
        bool(record.error),
        record.client_disconnected,
    )


def handoff_interval() -> float:
    """Seconds between two batches to the child: `_FLUSH_S`, or less when the operator asks for
    spans or metrics sooner (``OTEL_BSP_SCHEDULE_DELAY`` / ``OTEL_METRIC_EXPORT_INTERVAL`` below
    2 s): an export interval they set is kept, at the latency cost measured above."""
    wanted = min(
        env_seconds("OTEL_BSP_SCHEDULE_DELAY", 5000), env_seconds("OTEL_METRIC_EXPORT_INTERVAL", 60000)
    )
    return max(min(_FLUSH_S, wanted), _FLUSH_MIN_S)


class OtelSink:
    """Batches finished records to the exporter child process; never blocks the event loop."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._flush_s = handoff_interval()
        self._batch: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._broken = False
        self.sent = 0
        self.dropped = 0

    @property
    def pid(self) -> int:
        """The exporter child's process id."""
        return int(self._proc.pid)

    def submit(self, record: RequestRecord) -> None:
        """The meter's sink: a tuple on the loop; the batch leaves every `handoff_interval`."""
        if self._broken:
            self.dropped += 1
            return
        self._batch.append(record_fields(record))
        if self._timer is None:
            self._timer = self._loop.call_later(self._flush_s, self.flush)

    def flush(self) -> None:
        self._timer = None
        batch, self._batch = self._batch, []
        if not batch or self._broken:
            return
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing() or self._proc.returncode is not None:
            self._fail(len(batch))
            return
        if stdin.transport.get_write_buffer_size() > _MAX_BUFFERED:
            self.dropped += len(batch)
            return
        try:
            stdin.write(orjson.dumps(batch) + b"\n")
        except (ConnectionError, RuntimeError):
            self._fail(len(batch))
            return
        self.sent += len(batch)

    def _fail(self, lost: int) -> None:
        self.dropped += lost
        if not self._broken:
            self._broken = True
            log.error(
                "the OpenTelemetry exporter process is gone (exit %s); export stopped", self._proc.returncode
            )

    async def close(self, timeout: float = 15.0) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        stdin = self._proc.stdin
        if stdin is not None and not stdin.is_closing():
            try:
                await stdin.drain()
            except ConnectionError:
                pass
            stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            log.warning("the OpenTelemetry exporter did not finish in %.0f s; stopped", timeout)
            self._proc.kill()
            await self._proc.wait()


OTEL: web.AppKey[OtelSink] = web.AppKey("otel")


async def _otel_ctx(app: web.Application) -> AsyncIterator[None]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meterproxy.otel_export", stdin=asyncio.subprocess.PIPE
    )
    sink = OtelSink(proc)
    app[OTEL] = sink
    app[METER].add_sink("otel", sink.submit)
    log.info("exporting OpenTelemetry GenAI spans and metrics over OTLP/HTTP (exporter pid %d)", proc.pid)
    yield
    await sink.close()


def setup(app: web.Application) -> None:
    if otel_configured():
        app.cleanup_ctx.append(_otel_ctx)

"""OpenTelemetry export: every finished request as a GenAI span and GenAI metrics, over OTLP.

Off unless an OTLP endpoint is configured with the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` turns it off
again). Everything else the SDK reads itself: ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_BSP_*``. Only ``http/protobuf`` is spoken
(the official ``opentelemetry-exporter-otlp-proto-http``); the gRPC exporter would
pull grpcio into a proxy that has no other use for it.

What is exported follows the OpenTelemetry GenAI semantic conventions:

- a ``CLIENT`` span per request named ``"{operation} {model}"`` with
  ``gen_ai.operation.name``, ``gen_ai.provider.name`` (and the older
  ``gen_ai.system``), ``gen_ai.request.model``, ``gen_ai.response.model``,
  ``gen_ai.usage.input_tokens`` / ``output_tokens`` / ``cache_read.input_tokens`` /
  ``cache_creation.input_tokens`` / ``reasoning.output_tokens``, ``error.type``, and the
  proposed cost attributes ``gen_ai.usage.cost.amount`` / ``.currency`` / ``.source``
  (``provider`` when the answer carried its own cost, e.g. OpenRouter; ``local`` when
  priced from meterproxy's tables; absent when the request is unpriced, never a zero);
- the histograms ``gen_ai.client.token.usage`` (``{token}``, one point per token type)
  and ``gen_ai.client.operation.duration`` (``s``) with the conventions' bucket
  boundaries.

Why a thread: building a span and recording two histograms costs tens of
microseconds of Python, which the proxy's hot path cannot afford (bench/). The
sink (`OtelSink.submit`) only appends the finished record to a bounded deque;
a daemon thread turns records into telemetry, and the SDK's own batch span
processor and periodic metric reader do the network I/O on their threads. When
the deque is full (a collector that cannot keep up) the oldest records are
dropped from *telemetry only* (they are still stored and in Prometheus) and
counted in ``dropped``.

The SDK objects (`TracerProvider`, `MeterProvider`) are this app's own, never
the process-global ones, so several apps (tests) can run in one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meterproxy import __version__
from meterproxy.app_state import METER
from meterproxy.usage import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["OTEL", "OtelSink", "otel_configured", "setup"]

log = logging.getLogger(__name__)

#: Bucket boundaries the GenAI semantic conventions recommend.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

#: meterproxy's provider names -> ``gen_ai.provider.name`` well-known values.
_PROVIDER_NAMES = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "groq": "groq",
    "deepseek": "deepseek",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "perplexity": "perplexity",
    "cohere": "cohere",
}

#: meterproxy's endpoint names -> ``gen_ai.operation.name``.
_OPERATIONS = {
    "chat": "chat",
    "messages": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "generate_content": "generate_content",
    "stream_generate_content": "generate_content",
}

_MAX_QUEUED = 100_000


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


def _provider_name(record: RequestRecord) -> str:
    for name in (record.upstream, record.provider):
        if name and name in _PROVIDER_NAMES:
            return _PROVIDER_NAMES[name]
    return record.provider or record.upstream or "unknown"


def _operation_name(record: RequestRecord) -> str:
    return _OPERATIONS.get(record.endpoint, record.endpoint or "unknown")


def span_attributes(record: RequestRecord) -> dict[str, Any]:
    """The GenAI span attributes of one finished record (pure: tested on its own)."""
    provider = _provider_name(record)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _operation_name(record),
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "meterproxy.request_id": record.id,
        "meterproxy.upstream": record.upstream,
        "meterproxy.usage_source": record.usage_source,
        "meterproxy.streamed": record.streamed,
    }
    if record.requested_model:
        attrs["gen_ai.request.model"] = record.requested_model
    if record.model:
        attrs["gen_ai.response.model"] = record.model
    if record.status is not None:
        attrs["http.response.status_code"] = record.status
    if record.usage is not None and record.usage_source in ("reported", "partial"):
        u = record.usage
        attrs["gen_ai.usage.input_tokens"] = u.input_tokens
        attrs["gen_ai.usage.output_tokens"] = u.output_tokens
        attrs["gen_ai.usage.cache_read.input_tokens"] = u.cache_read_tokens
        attrs["gen_ai.usage.cache_creation.input_tokens"] = u.cache_write_tokens
        attrs["gen_ai.usage.reasoning.output_tokens"] = u.reasoning_tokens
    if record.provider_cost_usd is not None:
        attrs["gen_ai.usage.cost.amount"] = float(record.provider_cost_usd)
        attrs["gen_ai.usage.cost.currency"] = "USD"
        attrs["gen_ai.usage.cost.source"] = "provider"
    elif record.cost_usd is not None:
        attrs["gen_ai.usage.cost.amount"] = float(record.cost_usd)
        attrs["gen_ai.usage.cost.currency"] = "USD"
        attrs["gen_ai.usage.cost.source"] = "local"
    if record.user:
        attrs["user.id"] = record.user
    if record.session:
        attrs["session.id"] = record.session
    if record.key_fingerprint:
        attrs["meterproxy.key_fingerprint"] = record.key_fingerprint
    error = _error_type(record)
    if error:
        attrs["error.type"] = error
    return attrs


def _error_type(record: RequestRecord) -> str | None:
    if record.status is not None and record.status >= 400:
        return str(record.status)
    if record.error:
        return "client_disconnected" if record.client_disconnected else "upstream_error"
    return None


class OtelSink:
    """Turns finished records into spans and histogram points on a thread of its own."""

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer = tracer_provider.get_tracer("meterproxy")
        meter = meter_provider.get_meter("meterproxy")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self._kind = SpanKind.CLIENT
        self._error_status = Status(StatusCode.ERROR)
        self._queue: deque[RequestRecord] = deque(maxlen=_MAX_QUEUED)
        self._wake = threading.Event()
        self._stop = False
        self.dropped = 0
        self.exported = 0
        self._thread = threading.Thread(target=self._run, name="meterproxy-otel", daemon=True)
        self._thread.start()

    def submit(self, record: RequestRecord) -> None:
        """The meter's sink: O(1) on the event loop, never blocks, never raises."""
        if len(self._queue) == _MAX_QUEUED:
            self.dropped += 1
        self._queue.append(record)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                record = self._queue.popleft()
                try:
                    self._export(record)
                except Exception:  # a telemetry bug must never stop the thread
                    log.exception("OpenTelemetry export of request %s failed", record.id)
            if self._stop:
                return

    def _export(self, record: RequestRecord) -> None:
        attrs = span_attributes(record)
        start_ns = int(record.ts.timestamp() * 1e9)
        duration_s = (record.duration_ms or 0.0) / 1000.0
        name = f"{attrs['gen_ai.operation.name']} {record.model or record.requested_model or ''}".strip()
        span = self._tracer.start_span(name, kind=self._kind, attributes=attrs, start_time=start_ns)
        if "error.type" in attrs:
            span.set_status(self._error_status)
        span.end(end_time=start_ns + int(duration_s * 1e9))

        metric_attrs: dict[str, Any] = {
            "gen_ai.operation.name": attrs["gen_ai.operation.name"],
            "gen_ai.provider.name": attrs["gen_ai.provider.name"],
        }
        for key in ("gen_ai.request.model", "gen_ai.response.model", "error.type"):
            if key in attrs:
                metric_attrs[key] = attrs[key]
        self._duration.record(duration_s, metric_attrs)
        if "gen_ai.usage.input_tokens" in attrs:
            self._tokens.record(
                attrs["gen_ai.usage.input_tokens"], {**metric_attrs, "gen_ai.token.type": "input"}
            )
            self._tokens.record(
                attrs["gen_ai.usage.output_tokens"], {**metric_attrs, "gen_ai.token.type": "output"}
            )
        self.exported += 1

    def close(self, timeout: float = 10.0) -> None:
        """Export what is queued, then flush and shut the SDK down (blocking: run it off the loop)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown(timeout_millis=timeout * 1000)


def build_sink(service_version: str) -> OtelSink:
    """The SDK pipeline from the standard environment (needs the ``otel`` extra)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # pragma: no cover - exercised by the message test only
        raise RuntimeError(
            "an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_*), but the OpenTelemetry SDK is not "
            "installed: pip install 'meterproxy[otel]'"
        ) from exc

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").strip()
    if protocol and protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting over http/protobuf", protocol)
    attributes: dict[str, str] = {SERVICE_VERSION: service_version}
    # Our default name only where the operator named none (OTEL_SERVICE_NAME or
    # service.name in OTEL_RESOURCE_ATTRIBUTES); Resource.create would let ours win.
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes[SERVICE_NAME] = "meterproxy"
    resource = Resource.create(attributes)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    return OtelSink(tracer_provider, meter_provider)


OTEL: web.AppKey[OtelSink] = web.AppKey("otel")


async def _otel_ctx(app: web.Application) -> AsyncIterator[None]:
    sink = build_sink(__version__)
    app[OTEL] = sink
    app[METER].add_sink("otel", sink.submit)
    log.info("exporting OpenTelemetry GenAI spans and metrics over OTLP/HTTP")
    yield
    await asyncio.get_running_loop().run_in_executor(None, sink.close)


def setup(app: web.Application) -> None:
    if otel_configured():
        app.cleanup_ctx.append(_otel_ctx)

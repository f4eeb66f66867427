"""The OpenTelemetry exporter process: GenAI spans and metrics from the proxy's records, over OTLP/HTTP.

Run by `meterproxy.otel` as ``python -m meterproxy.otel_export`` with the
proxy's environment; reads one JSON array of `meterproxy.otel.record_fields`
rows (arrays in `FIELDS` order) per stdin line, and exits (after flushing) at end of input. It needs the
``otel`` extra (``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-http``);
only ``http/protobuf`` is spoken (the gRPC exporter would pull grpcio into a
proxy that has no other use for it).

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
  and ``gen_ai.client.operation.duration`` (``s``) with the conventions' bucket boundaries.

**How, and what it costs.** The official packages do the parts that are not per request:
``opentelemetry-sdk``'s ``Resource.create`` (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, the SDK's resource detectors), the ``opentelemetry-proto``
messages every span is encoded with, and ``OTLPMetricExporter`` (which reads its own
``OTEL_EXPORTER_OTLP_[METRICS_]*`` variables) for the histograms. The per-request work is
not the SDK's: the tracer (a live span object per request, attribute validation) and the
official span encoder cost 112 µs a request, the histogram instruments 24 µs, and on a 2-core
host that CPU competes with the proxy's own (``bench/README.md``, "OpenTelemetry export").
Instead a row becomes span bytes from cached pieces (`meterproxy.otel_spans`) and three
histogram points in plain dicts (`meterproxy.otel_metrics`), both checked field by field
against the SDK's output (``tests/test_otel_encoding.py``): 6 µs a request in-process, 15-30 µs
for the whole child (reading the pipe and the POSTs included, more at lower rates) against
140-190 µs before. Batching and queue limits follow the SDK's variables (`Exporter`), and so
do ``OTEL_TRACES_SAMPLER`` / ``_ARG`` (the SDK's own sampler decides; the histograms still
count every request) and the span attribute length limit; one thread does the POSTs.
``OTEL_TRACES_EXPORTER=none`` / ``OTEL_METRICS_EXPORTER=none`` turn one signal off. Not
supported: gRPC, exponential histograms
(``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION``; a warning, explicit buckets).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from meterproxy import __version__

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.trace.sampling import Sampler

    from meterproxy.otel_metrics import GenAiHistograms
    from meterproxy.otel_spans import OtlpHttpSender, SpanEncoder

__all__ = ["DURATION_BUCKETS", "FIELDS", "TOKEN_BUCKETS", "as_fields", "main", "span_attributes"]

log = logging.getLogger("meterproxy.otel_export")

#: The order of a record's values in a batch row (`meterproxy.otel.record_fields`): rows travel
#: as JSON arrays, so the proxy builds a tuple per request, not a dict, and no key is encoded
#: or decoded per request; names are put back here, in the exporter's process.
FIELDS = (
    "id",
    "start_ns",
    "duration_s",
    "endpoint",
    "upstream",
    "provider",
    "requested_model",
    "model",
    "status",
    "usage_source",
    "streamed",
    "tokens",
    "cost_usd",
    "provider_cost_usd",
    "user",
    "session",
    "key_fingerprint",
    "error",
    "client_disconnected",
)

#: Bucket boundaries the GenAI semantic conventions recommend.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

#: meterproxy's provider and upstream names -> ``gen_ai.provider.name`` well-known values.
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


def _provider_name(f: dict[str, Any]) -> str:
    for name in (f.get("upstream"), f.get("provider")):
        if name and name in _PROVIDER_NAMES:
            return _PROVIDER_NAMES[name]
    return str(f.get("provider") or f.get("upstream") or "unknown")


def as_fields(row: Any) -> dict[str, Any]:
    """A batch row (values in `FIELDS` order) as a dict by name."""
    return dict(zip(FIELDS, row, strict=True))


def span_attributes(f: dict[str, Any]) -> dict[str, Any]:
    """The GenAI span attributes of one record's fields (pure: tested on its own)."""
    provider = _provider_name(f)
    endpoint = f.get("endpoint") or ""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _OPERATIONS.get(endpoint, endpoint or "unknown"),
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "meterproxy.request_id": f["id"],
        "meterproxy.upstream": f.get("upstream") or "",
        "meterproxy.usage_source": f.get("usage_source") or "",
        "meterproxy.streamed": bool(f.get("streamed")),
    }
    if f.get("requested_model"):
        attrs["gen_ai.request.model"] = f["requested_model"]
    if f.get("model"):
        attrs["gen_ai.response.model"] = f["model"]
    if f.get("status") is not None:
        attrs["http.response.status_code"] = f["status"]
    if f.get("tokens"):
        inp, out, cache_read, cache_write, reasoning = f["tokens"]
        attrs["gen_ai.usage.input_tokens"] = inp
        attrs["gen_ai.usage.output_tokens"] = out
        attrs["gen_ai.usage.cache_read.input_tokens"] = cache_read
        attrs["gen_ai.usage.cache_creation.input_tokens"] = cache_write
        attrs["gen_ai.usage.reasoning.output_tokens"] = reasoning
    if f.get("provider_cost_usd") is not None:
        attrs["gen_ai.usage.cost.amount"] = float(f["provider_cost_usd"])
        attrs["gen_ai.usage.cost.currency"] = "USD"
        attrs["gen_ai.usage.cost.source"] = "provider"
    elif f.get("cost_usd") is not None:
        attrs["gen_ai.usage.cost.amount"] = float(f["cost_usd"])
        attrs["gen_ai.usage.cost.currency"] = "USD"
        attrs["gen_ai.usage.cost.source"] = "local"
    if f.get("user"):
        attrs["user.id"] = f["user"]
    if f.get("session"):
        attrs["session.id"] = f["session"]
    if f.get("key_fingerprint"):
        attrs["meterproxy.key_fingerprint"] = f["key_fingerprint"]
    status = f.get("status")
    if status is not None and status >= 400:
        attrs["error.type"] = str(status)
    elif f.get("error"):
        attrs["error.type"] = "client_disconnected" if f.get("client_disconnected") else "upstream_error"
    return attrs


def _step_aside() -> None:
    """Telemetry yields to the proxy: ``SCHED_BATCH`` at nice 19, on any core rather than the proxy's own.

    Measured on this 2-core machine, idle, 20:00 UTC 2026-12-03 (`python bench/otel_overhead.py
    --rounds 3 --duration 5`, added p99 at concurrency 1, JSON / 20-event SSE, export off -> on):
    pinned to the proxy's core at its priority +0.80 -> +4.24 / +0.99 -> +4.39 ms; ``SCHED_IDLE``
    +0.69 -> +4.11 / +0.91 -> +4.40 ms (its p99 sits at one 4 ms scheduler tick, as if the proxy
    waited for a tick to get its core back); nice 19 +0.72 -> +1.78 / +0.89 -> +2.55 ms;
    ``SCHED_BATCH`` at nice 19 (shipped: a batch task never preempts the proxy on wake-up, and
    nice 19 gives it the smallest slice) +0.81 -> +1.07 / +0.91 -> +2.33 ms. Medians unchanged in
    all of them. Since 2026-12-04 also a 0.1 ms slice (`short_slice`); with the cheaper exporter,
    two alternating pairs at load 1.5-2.4 (JSON / SSE-20 added p99 off -> on): without it
    +1.40 -> +1.97 / +1.84 -> +2.14 and +0.78 -> +0.88 / +0.96 -> +1.35 ms, with it
    +1.33 -> +1.83 / +1.92 -> +1.81 and +0.69 -> +0.84 / +0.77 -> +0.92 ms (``bench/README.md``).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
    except OSError:
        pass
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        except OSError:
            pass
    short_slice()


_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
_SLICE_NS = 100_000


def short_slice() -> None:
    """Ask for the shortest scheduler slice (0.1 ms, Linux >= 6.12, EEVDF's custom slice) for the
    calling thread, still ``SCHED_BATCH`` at nice 19: a running task keeps its core until its
    slice ends, so this bounds how long the proxy, waking on the core this thread is using,
    waits for it. No-op where unsupported."""
    number = _SCHED_SETATTR.get(os.uname().machine) if hasattr(os, "uname") else None
    if number is None:
        return
    try:
        import ctypes

        # struct sched_attr (SCHED_ATTR_SIZE_VER1): size, policy, flags, nice, priority,
        # runtime, deadline, period, util_min, util_max.
        attr = struct.pack("=IIQiIQQQII", 56, os.SCHED_BATCH, 0, 19, 0, _SLICE_NS, 0, 0, 0, 0)
        buf = ctypes.create_string_buffer(attr, len(attr))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(number, 0, buf, 0)
    except (OSError, AttributeError, ValueError):
        pass


_METRIC_KEYS = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "error.type",
)
_SHAPE_CACHE = 4096
#: What every request of one shape shares: its span's cached piece, its metric attributes, its span name.
_Shape = tuple[bytes, tuple[tuple[str, Any], ...], str]


def span_name(attrs: dict[str, Any]) -> str:
    """``"{gen_ai.operation.name} {model}"``, the conventions' span name."""
    model = attrs.get("gen_ai.response.model") or attrs.get("gen_ai.request.model") or ""
    return f"{attrs['gen_ai.operation.name']} {model}".strip()


def env_seconds(name: str, default: int) -> float:
    """A duration variable in milliseconds (the SDK's ``OTEL_BSP_*`` / ``OTEL_METRIC_*``), as seconds."""
    raw = os.environ.get(name, "").strip()
    try:
        return max(float(raw or default), 0.0) / 1000.0
    except ValueError:
        log.warning("invalid %s=%r; using %d ms", name, raw, default)
        return default / 1000.0


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return max(int(raw or default), 1)
    except ValueError:
        log.warning("invalid %s=%r; using %d", name, raw, default)
        return default


class Exporter:
    """Turns batches of rows into span bytes and histogram points; a thread does the POSTs.

    Everything but the network runs on the main thread, between reads of stdin: a row is
    one span (`meterproxy.otel_spans.SpanEncoder`, its shape's piece cached) and three
    histogram points (`meterproxy.otel_metrics.GenAiHistograms`). Spans go out as the SDK's
    batch span processor would send them: ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` (512) at a time as
    soon as that many wait, the rest ``OTEL_BSP_SCHEDULE_DELAY`` (5 s) after the first of them
    arrived; beyond ``OTEL_BSP_MAX_QUEUE_SIZE`` (2048) spans not yet sent, new ones are dropped
    and counted. Metrics every ``OTEL_METRIC_EXPORT_INTERVAL`` (60 s), and at the end.
    """

    def __init__(
        self,
        encoder: SpanEncoder,
        sender: OtlpHttpSender | None,
        histograms: GenAiHistograms | None,
        metric_exporter: OTLPMetricExporter | None,
        sampler: Sampler | None = None,
        max_attribute_length: int | None = None,
    ) -> None:
        self._sender = sender
        self._sampler = sampler
        self._max_length = max_attribute_length
        if sampler is not None:
            from opentelemetry.sdk.trace.sampling import Decision
            from opentelemetry.trace import SpanKind

            self._client, self._sampled = SpanKind.CLIENT, Decision.RECORD_AND_SAMPLE
        self._encoder = encoder
        self._histograms = histograms
        self._metric_exporter = metric_exporter
        self._delay = env_seconds("OTEL_BSP_SCHEDULE_DELAY", 5000)
        self._batch_size = _count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self._max_queue = max(_count("OTEL_BSP_MAX_QUEUE_SIZE", 2048), self._batch_size)
        self._interval = env_seconds("OTEL_METRIC_EXPORT_INTERVAL", 60000)
        self._metric_timeout_ms = env_seconds("OTEL_METRIC_EXPORT_TIMEOUT", 30000) * 1000
        self._pending: list[bytes] = []
        self._pending_since = 0.0
        self._next_metrics = time.monotonic() + self._interval
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._lock = threading.Lock()
        self._queued = 0  # spans handed to the sender thread, not yet sent
        self.dropped = 0
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_loop, name="otlp-sender")
        self._thread.start()

    def _send_loop(self) -> None:
        short_slice()
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("OTLP export failed")

    def _shape(self, row: Any, key: tuple[Any, ...]) -> _Shape:
        attrs = span_attributes(as_fields(row))
        name = span_name(attrs)
        metric_attrs = tuple((k, attrs[k]) for k in _METRIC_KEYS if k in attrs)
        limit = self._max_length
        if limit is not None:  # the SDK's span attribute limit; metric attributes have none
            attrs = {k: v[:limit] if isinstance(v, str) else v for k, v in attrs.items()}
        fixed = self._encoder.fixed_part(name, attrs) if self._sender is not None else b""
        if len(self._shapes) >= _SHAPE_CACHE:
            self._shapes.clear()
        entry = self._shapes[key] = (fixed, metric_attrs, name)
        return entry

    def _cut(self, value: str) -> str:
        return value if self._max_length is None else value[: self._max_length]

    def add(self, rows: list[Any]) -> None:
        """One batch from the proxy."""
        now_ns = time.time_ns()
        encoder, histograms = self._encoder, self._histograms
        ids = encoder.new_ids(len(rows)) if self._sender is not None else []
        spans: list[bytes] = []
        for i, row in enumerate(rows):
            try:
                (rid, start_ns, seconds, endpoint, upstream, provider, requested_model, model, status,
                 usage_source, streamed, tokens, cost, theirs, user, session, fingerprint, error,
                 disconnected) = row  # fmt: skip
                key = (endpoint, upstream, provider, requested_model, model, status, usage_source,
                       bool(streamed), not tokens, cost is None, theirs is None, fingerprint,
                       bool(error), bool(disconnected))  # fmt: skip
                entry = self._shapes.get(key) or self._shape(row, key)
                seconds = float(seconds or 0.0)
                if histograms is not None:
                    histograms.record(entry[1], seconds, (tokens[0], tokens[1]) if tokens else None, now_ns)
                if self._sender is None:
                    continue
                sampler = self._sampler
                if sampler is not None:
                    trace_id = int.from_bytes(ids[i][:16], "big")
                    result = sampler.should_sample(None, trace_id, entry[2], self._client)
                    if result.decision is not self._sampled:  # only sampled spans are exported
                        continue
                if self._max_length is not None:
                    rid, user, session = (
                        self._cut(rid),
                        user and self._cut(user),
                        session and self._cut(session),
                    )
                parts = [entry[0]]
                if user:
                    parts.append(encoder.value_part("user.id", user))
                if session:
                    parts.append(encoder.value_part("session.id", session))
                amount = float(theirs) if theirs is not None else None if cost is None else float(cost)
                start_ns = int(start_ns)
                end_ns = start_ns + int(seconds * 1e9)
                parts.append(encoder.varying_part(ids[i], start_ns, end_ns, rid, tokens or None, amount))
                spans.append(b"".join(parts))
            except Exception:  # one bad record must not stop telemetry
                log.exception("OpenTelemetry export of request %s failed", row[0] if row else None)
        if not spans:
            return
        with self._lock:
            room = self._max_queue - self._queued - len(self._pending)
        if room < len(spans):
            if self.dropped == 0:
                log.warning(
                    "OTLP receiver is behind: more than %d spans wait; dropping spans", self._max_queue
                )
            self.dropped += len(spans) - max(room, 0)
            spans = spans[: max(room, 0)]
        if spans and not self._pending:
            self._pending_since = time.monotonic()
        self._pending.extend(spans)

    def _send_spans(self, data: bytes, n: int) -> None:
        try:
            if self._sender is not None:
                self._sender.send(data, n)
        finally:
            with self._lock:
                self._queued -= n

    def flush_spans(self, everything: bool = False) -> None:
        while self._pending and (everything or len(self._pending) >= self._batch_size):
            chunk = self._pending[: self._batch_size]
            del self._pending[: self._batch_size]
            with self._lock:
                self._queued += len(chunk)
            data = self._encoder.request(chunk)
            self._jobs.put(functools.partial(self._send_spans, data, len(chunk)))

    def export_metrics(self) -> None:
        self._next_metrics = time.monotonic() + self._interval
        exporter = self._metric_exporter
        if self._histograms is None or exporter is None:
            return
        data = self._histograms.collect(time.time_ns())
        if data is not None:
            self._jobs.put(lambda: exporter.export(data, timeout_millis=self._metric_timeout_ms))

    def due(self) -> float:
        """Seconds until the next export is due (0: now)."""
        now = time.monotonic()
        if self._pending:
            self.flush_spans(everything=now >= self._pending_since + self._delay)
        if now >= self._next_metrics:
            self.export_metrics()
        wait = self._next_metrics - now
        if self._pending:
            wait = min(wait, self._pending_since + self._delay - now)
        return max(wait, 0.0)

    def close(self) -> None:
        """Send everything, wait for the sender, shut the exporters down."""
        self.flush_spans(everything=True)
        self.export_metrics()
        if self._sender is not None:
            self._sender.stop_retrying()
        self._jobs.put(None)
        self._thread.join()
        if self._sender is not None:
            self._sender.close()
        if self._metric_exporter is not None:
            self._metric_exporter.shutdown()
        if self.dropped:
            log.warning("%d spans were dropped: the OTLP receiver could not keep up", self.dropped)


def read_batches(fd: int, exporter: Exporter) -> None:
    """Feed each stdin line (one JSON batch) to ``exporter``; export when due; return at end of input."""
    # Reads of a line not yet ended are kept apart and joined once its end comes: a batch spans
    # many pipe reads (~600 KB at 3,000 requests/s), and joining each read onto the text so far,
    # then splitting it all again, copied and scanned a batch a dozen times over.
    pending: list[bytes] = []
    while True:
        readable, _, _ = select.select([fd], [], [], exporter.due())
        if not readable:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        pending.append(chunk)
        if b"\n" not in chunk:
            continue
        *lines, tail = b"".join(pending).split(b"\n")
        pending = [tail] if tail else []
        for line in lines:
            try:
                batch = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.error("unreadable batch from the proxy (%d bytes) skipped", len(line))
                continue
            exporter.add(batch)


def _enabled(signal: str) -> bool:
    return os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() != "none"


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _step_aside()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from meterproxy.otel_metrics import GenAiHistograms, histogram_temporality
        from meterproxy.otel_spans import OtlpHttpSender, SpanEncoder
    except ImportError:
        log.error(
            "an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_*), but the OpenTelemetry SDK is not "
            "installed: pip install 'meterproxy[otel]'; telemetry is off"
        )
        sys.stdin.buffer.read()  # keep the pipe open until the proxy stops, then exit quietly
        return

    for name in (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    ):
        protocol = os.environ.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            log.warning("%s=%s is not supported; exporting over http/protobuf", name, protocol)
    aggregation = (
        os.environ.get("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "").strip().lower()
    )
    if aggregation and aggregation != "explicit_bucket_histogram":
        log.warning("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=%s is not supported; "
                    "explicit bucket histograms are exported", aggregation)  # fmt: skip
    attributes: dict[str, str] = {SERVICE_VERSION: __version__}
    # Our default name only where the operator named none (OTEL_SERVICE_NAME or
    # service.name in OTEL_RESOURCE_ATTRIBUTES); Resource.create would let ours win.
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes[SERVICE_NAME] = "meterproxy"
    resource = Resource.create(attributes)
    scope = InstrumentationScope("meterproxy", __version__)
    encoder = SpanEncoder(dict(resource.attributes), resource.schema_url, scope.name, scope.version or "")
    sender = OtlpHttpSender() if _enabled("traces") else None
    metric_exporter = histograms = None
    if _enabled("metrics"):
        metric_exporter = OTLPMetricExporter()
        histograms = GenAiHistograms(
            resource, scope, TOKEN_BUCKETS, DURATION_BUCKETS, histogram_temporality()
        )
    # The SDK's own reading of OTEL_TRACES_SAMPLER / _ARG and of the attribute length limit; the
    # default sampler (parent-based, always on: every span, ours have no parent) is not consulted.
    sampler = None
    if os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() not in (
        "",
        "always_on",
        "parentbased_always_on",
    ):
        sampler = TracerProvider(shutdown_on_exit=False).sampler
    limits = SpanLimits()
    exporter = Exporter(
        encoder, sender, histograms, metric_exporter, sampler, limits.max_span_attribute_length
    )
    try:
        read_batches(sys.stdin.fileno(), exporter)
    finally:
        exporter.close()


if __name__ == "__main__":
    main()

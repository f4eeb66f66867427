"""GenAI spans straight to OTLP protobuf bytes, and the OTLP/HTTP POST that carries them.

Used by the exporter process (`meterproxy.otel_export`), never by the proxy itself.

**Why not the SDK's tracer and span exporter.** Measured per span, in-process, 2026-12-04
(``bench/README.md``, "OpenTelemetry export"): ``tracer.start_span`` + ``end`` 21 µs, then
the official ``OTLPSpanExporter``'s encoder (``encode_spans``: Python calls, an ``AnyValue``
and a ``KeyValue`` message per attribute, 22 attributes) 71 µs. A span of ours is known in
full the moment it is written (it starts and ends in the past, has no children, no events, no
context to propagate), so none of the SDK's live-span machinery has any work to do; and the
official exporter's ``export()`` only takes SDK span objects, which it must encode itself.

**How a span is encoded here**, with the official ``opentelemetry-proto`` messages: protobuf
defines the concatenation of two serialized messages as their merge, so a span's bytes are
pieces joined together:

- the attributes that repeat across requests (operation, provider, models, status, source,
  cost currency and source, key fingerprint, error type), the span's name, kind, status and
  flags: one ``Span`` message per distinct combination, serialized once and cached by the
  caller;
- ``user.id`` and ``session.id``: one cached ``Span(attributes=[...])`` piece per value;
- what differs per request (trace and span id, start and end time, request id, token counts,
  cost amount): one small ``Span`` message per combination of attributes present, its fields
  overwritten and serialized per request (1.6 µs; a new message each time is 6 µs).

A batch of spans becomes one ``ExportTraceServiceRequest``: the resource and instrumentation
scope are serialized once, and each span is added as a length-delimited field (`_field`: the
field's tag from the message descriptor, then its length as a varint). The receiver decodes
what the official encoder would have sent for the same span (``tests/test_otel_encoding.py``
decodes both and compares them field by field; only the attributes' order differs).

**The POST** (`OtlpHttpSender`) honours the variables the official OTLP/HTTP span exporter
reads: ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` (a per-signal endpoint is used as is, the
generic one gets ``/v1/traces``), ``_HEADERS``, ``_TIMEOUT`` (seconds, as the Python exporter
reads it), ``_COMPRESSION`` (``gzip``, ``deflate``), ``_CERTIFICATE``, ``_CLIENT_KEY`` and
``_CLIENT_CERTIFICATE``; it retries 429, 502, 503, 504 and connection errors with exponential
backoff (or the server's ``Retry-After``) until the timeout, as the official exporter does.
Not supported: the ``OTEL_PYTHON_EXPORTER_OTLP_HTTP_*_CREDENTIAL_PROVIDER`` entry points (the
metric exporter, being the official one, still honours them).
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.util.re import parse_env_headers

from meterproxy import __version__

__all__ = [
    "COST",
    "PER_VALUE",
    "REQUEST_ID",
    "TOKEN_KEYS",
    "VARYING",
    "OtlpHttpSender",
    "SpanEncoder",
    "any_value",
    "signal_endpoint",
]

log = logging.getLogger("meterproxy.otel_export")

#: Attributes that differ from one request to the next: built per span, never cached.
REQUEST_ID = "meterproxy.request_id"
#: The token attributes, in the order of a row's token tuple.
TOKEN_KEYS = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.reasoning.output_tokens",
)
COST = "gen_ai.usage.cost.amount"
VARYING = frozenset({REQUEST_ID, *TOKEN_KEYS, COST})
#: Attributes with one cached piece per value (many values, each repeated across requests).
PER_VALUE = ("user.id", "session.id")
_VALUE_CACHE = 16384

# The official encoder marks every span "context has is_remote" (and not remote: ours are roots).
_SPAN_FLAGS = 0x100
_STATUS_ERROR = 2


def any_value(value: Any) -> AnyValue:
    """An attribute value as OTLP's ``AnyValue`` (the official encoder's mapping)."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    raise TypeError(f"unsupported attribute value {value!r}")


def _key_values(attributes: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(message: Any, name: str) -> bytes:
    """The wire tag of length-delimited field ``name`` of ``message`` (number from its descriptor)."""
    return _varint(message.DESCRIPTOR.fields_by_name[name].number << 3 | 2)


def _field(message: Any, name: str, payload: bytes) -> bytes:
    """``payload`` (a serialized message) as field ``name`` of ``message``: tag, length, bytes."""
    return _tag(message, name) + _varint(len(payload)) + payload


class SpanEncoder:
    """Rows' spans as serialized OTLP ``Span`` messages, then a batch as one export request."""

    def __init__(
        self,
        resource_attributes: Mapping[str, Any],
        resource_schema_url: str,
        scope_name: str,
        scope_version: str,
    ) -> None:
        resource = PbResource(attributes=_key_values(resource_attributes))
        self._resource_head = ResourceSpans(
            resource=resource, schema_url=resource_schema_url
        ).SerializeToString()
        scope = InstrumentationScope(name=scope_name, version=scope_version)
        self._scope_head = ScopeSpans(scope=scope).SerializeToString()
        self._values: dict[tuple[str, Any], bytes] = {}
        self._varying: dict[tuple[bool, bool], tuple[Span, list[AnyValue]]] = {}
        self._span_tag = _tag(ScopeSpans, "spans")

    @staticmethod
    def fixed_part(name: str, attributes: Mapping[str, Any]) -> bytes:
        """The piece shared by every request of the same shape: name, kind, status, flags and
        the attributes not in `VARYING` or `PER_VALUE` (the caller caches it per shape)."""
        return bytes(
            Span(
                name=name,
                kind=Span.SPAN_KIND_CLIENT,
                flags=_SPAN_FLAGS,
                status=Status(code=_STATUS_ERROR if "error.type" in attributes else 0),  # type: ignore[arg-type]
                attributes=[
                    KeyValue(key=k, value=any_value(v))
                    for k, v in attributes.items()
                    if k not in VARYING and k not in PER_VALUE
                ],
            ).SerializeToString()
        )

    def value_part(self, key: str, value: Any) -> bytes:
        """The cached piece holding one attribute of `PER_VALUE`."""
        part = self._values.get((key, value))
        if part is None:
            if len(self._values) >= _VALUE_CACHE:
                self._values.clear()
            part = Span(attributes=[KeyValue(key=key, value=any_value(value))]).SerializeToString()
            self._values[(key, value)] = part
        return part

    def varying_part(
        self,
        ids: bytes,
        start_ns: int,
        end_ns: int,
        request_id: str,
        tokens: Sequence[int] | None,
        cost: float | None,
    ) -> bytes:
        """The piece built per request: ``ids`` (16 bytes of trace id, 8 of span id), times, and
        the `VARYING` attributes. One ``Span`` message per combination of attributes present
        is kept and overwritten in place (1.6 µs, against 6 µs for a new message per request)."""
        layout = (tokens is not None, cost is not None)
        template = self._varying.get(layout)
        if template is None:
            span = Span(attributes=[KeyValue(key=REQUEST_ID, value=AnyValue(string_value=""))])
            if tokens is not None:
                span.attributes.extend(KeyValue(key=k, value=AnyValue(int_value=0)) for k in TOKEN_KEYS)
            if cost is not None:
                span.attributes.append(KeyValue(key=COST, value=AnyValue(double_value=0.0)))
            values = [kv.value for kv in span.attributes]
            template = self._varying[layout] = (span, values)
        span, values = template
        span.trace_id = ids[:16]
        span.span_id = ids[16:24]
        span.start_time_unix_nano = start_ns
        span.end_time_unix_nano = end_ns
        values[0].string_value = request_id
        if tokens is not None:
            for value, n in zip(values[1:6], tokens, strict=True):
                value.int_value = n
        if cost is not None:
            values[-1].double_value = cost
        return bytes(span.SerializeToString())

    @staticmethod
    def new_ids(n: int) -> list[bytes]:
        """``n`` random (trace id, span id) pairs, 24 bytes each, none of them all zeros (invalid)."""
        raw = os.urandom(24 * n)
        out = [raw[i : i + 24] for i in range(0, 24 * n, 24)]
        for i, ids in enumerate(out):
            while not any(ids[:16]) or not any(ids[16:]):
                ids = os.urandom(24)
            out[i] = ids
        return out

    def request(self, spans: Iterable[bytes]) -> bytes:
        """Serialized spans as one serialized ``ExportTraceServiceRequest``."""
        tag = self._span_tag
        parts = [self._scope_head]
        for span in spans:
            parts += (tag, _varint(len(span)), span)
        scope_spans = b"".join(parts)
        resource_spans = self._resource_head + _field(ResourceSpans, "scope_spans", scope_spans)
        return _field(ExportTraceServiceRequest, "resource_spans", resource_spans)


def _env(signal_var: str, generic_var: str, env: Mapping[str, str]) -> str:
    return (env.get(signal_var) or env.get(generic_var) or "").strip()


def signal_endpoint(signal: str, env: Mapping[str, str] | None = None) -> str:
    """The OTLP/HTTP URL for ``signal`` (``traces``, ``metrics``), as the official exporters resolve it."""
    env = os.environ if env is None else env
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/{signal}"


_RETRYABLE = frozenset({429, 502, 503, 504})


class OtlpHttpSender:
    """POSTs serialized trace export requests to the OTLP/HTTP endpoint, with the official
    exporter's configuration variables and retry policy."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.endpoint = signal_endpoint("traces", env)
        timeout = _env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT", env) or "10"
        try:
            self.timeout = float(timeout)
        except ValueError:
            log.warning("invalid OTLP timeout %r; using 10 s", timeout)
            self.timeout = 10.0
        compression = (
            _env("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION", env) or "none"
        ).lower()
        if compression not in ("none", "gzip", "deflate"):
            log.warning("unsupported OTLP compression %r; sending uncompressed", compression)
            compression = "none"
        self.compression = compression
        self.headers = {
            "content-type": "application/x-protobuf",
            "user-agent": f"meterproxy/{__version__} OTel-OTLP-Exporter-Python",
        }
        raw = _env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS", env)
        self.headers.update({k.lower(): v for k, v in parse_env_headers(raw, liberal=True).items()})
        if compression != "none":
            self.headers.setdefault("content-encoding", compression)
        self._stopping = threading.Event()
        self._session = requests.Session()
        certificate = _env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE", env)
        self._session.verify = certificate or True
        client_cert = _env(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", env
        )
        client_key = _env("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY", env)
        if client_cert:
            self._session.cert = (client_cert, client_key) if client_key else client_cert

    def _compress(self, data: bytes) -> bytes:
        if self.compression == "gzip":
            return gzip.compress(data, compresslevel=6, mtime=0)
        if self.compression == "deflate":
            return zlib.compress(data)
        return data

    def send(self, data: bytes, spans: int) -> bool:
        """POST one request; True when the receiver accepted it."""
        body = self._compress(data)
        deadline = time.monotonic() + self.timeout
        for attempt in range(6):
            status: int | None = None
            retry_after: float | None = None
            try:
                response = self._session.post(
                    self.endpoint,
                    data=body,
                    headers=self.headers,
                    timeout=max(deadline - time.monotonic(), 0.001),
                )
            except requests.ConnectionError as error:
                problem: object = error
                retryable = True
                if attempt == 0:
                    continue  # most often a pooled connection the receiver closed: again at once
            except requests.RequestException as error:
                problem, retryable = error, False
            else:
                status = response.status_code
                if 200 <= status < 400:
                    return True
                problem, retryable = response.reason, status in _RETRYABLE
                header = response.headers.get("retry-after", "")
                retry_after = float(header) if header.strip().isdigit() else None
            backoff = retry_after if retry_after is not None else 2**attempt * random.uniform(0.8, 1.2)
            if not retryable or backoff > deadline - time.monotonic():
                log.error("OTLP export of %d spans failed (status %s): %s", spans, status, problem)
                return False
            if self._stopping.wait(backoff):
                log.error(
                    "OTLP export of %d spans failed at shutdown (status %s): %s", spans, status, problem
                )
                return False
        log.error("OTLP export of %d spans failed after retries", spans)
        return False

    def stop_retrying(self) -> None:
        """From now on no request waits to be retried: the process is about to exit (the official
        exporter likewise stops retrying at shutdown)."""
        self._stopping.set()

    def close(self) -> None:
        self._session.close()

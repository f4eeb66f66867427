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
  cost amount): written as wire bytes, the constant tags and keys (from the messages'
  descriptors, once) joined with the values (`SpanEncoder.varying_part`).

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
import struct
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


def _varint64(n: int) -> bytes:
    """``n`` as a protobuf varint; a negative ``int64`` as its 10-byte two's complement, as protobuf does."""
    return _varint(n + (1 << 64) if n < 0 else n)


#: Varints of 0 .. 16383 (one or two bytes), looked up instead of computed: token counts, lengths.
_SMALL = 1 << 14
_VARINTS = [_varint(n) for n in range(_SMALL)]


def _number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


#: The tags before trace_id (16 bytes), span_id (8), start and end time (fixed64), with the lengths of
#: the two ids: one ``struct.pack`` writes the four fields (`_HEAD`).
_TRACE_ID = _key(_number(Span, "trace_id"), 2) + b"\x10"
_SPAN_ID = _key(_number(Span, "span_id"), 2) + b"\x08"
_START = _key(_number(Span, "start_time_unix_nano"), 1)
_END = _key(_number(Span, "end_time_unix_nano"), 1)
_HEAD = struct.Struct(f"<{len(_TRACE_ID)}s16s{len(_SPAN_ID)}s8s{len(_START)}sQ{len(_END)}sQ")


def _attribute(key: str, value: bytes) -> bytes:
    """``Span.attributes`` holding ``KeyValue(key, value)``, ``value`` a serialized ``AnyValue``."""
    kv = _field(KeyValue, "key", key.encode()) + _field(KeyValue, "value", value)
    return _key(_number(Span, "attributes"), 2) + _varint(len(kv)) + kv


def _prefix(key: str, value_tag: bytes, value_length: int) -> bytes:
    """An attribute's bytes up to its value's own bytes, for a value of ``value_length`` bytes."""
    whole = _attribute(key, value_tag + b"\0" * value_length)
    return whole[: len(whole) - value_length]


_STRING = _key(_number(AnyValue, "string_value"), 2)
_INT = _key(_number(AnyValue, "int_value"), 0)
_DOUBLE = _key(_number(AnyValue, "double_value"), 1)
#: Per token attribute, the bytes before its value's varint, by the varint's length (1-10).
_TOKEN_PREFIXES = [[b""] + [_prefix(key, _INT, n) for n in range(1, 11)] for key in TOKEN_KEYS]
_COST = struct.Struct(f"<{len(_prefix(COST, _DOUBLE, 8))}sd")
_COST_PREFIX = _prefix(COST, _DOUBLE, 8)
_RID_PREFIXES: dict[int, bytes] = {}


def _rid_prefix(length: int) -> bytes:
    """The request id attribute's bytes before the id's own, for an id of ``length`` bytes."""
    prefix = _RID_PREFIXES.get(length)
    if prefix is None:
        prefix = _prefix(REQUEST_ID, _STRING + _varint(length), length)
        if len(_RID_PREFIXES) < 256:
            _RID_PREFIXES[length] = prefix
    return prefix


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
        self._people: dict[tuple[str | None, str | None], bytes] = {}
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

    def people_part(self, user: str | None, session: str | None) -> bytes:
        """The cached piece holding ``user.id`` and ``session.id`` (either may be absent)."""
        part = self._people.get((user, session))
        if part is None:
            if len(self._people) >= _VALUE_CACHE:
                self._people.clear()
            part = (self.value_part("user.id", user) if user else b"") + (
                self.value_part("session.id", session) if session else b""
            )
            self._people[(user, session)] = part
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
        the `VARYING` attributes, written straight as protobuf wire bytes: the constant tag and
        key pieces (built once from the messages' descriptors) joined with the values (one
        ``struct.pack`` for ids and times, varints from a table). 2026-12-04: a reused ``Span``
        message, its fields set and serialized per request, cost about twice as much."""
        rid = request_id.encode()
        parts = [
            _HEAD.pack(_TRACE_ID, ids, _SPAN_ID, ids[16:24], _START, start_ns, _END, end_ns),
            _RID_PREFIXES.get(len(rid)) or _rid_prefix(len(rid)),
            rid,
        ]
        if tokens is not None:
            for table, n in zip(_TOKEN_PREFIXES, tokens, strict=True):
                value = _VARINTS[n] if 0 <= n < _SMALL else _varint64(n)
                parts += (table[len(value)], value)
        if cost is not None:
            parts.append(_COST.pack(_COST_PREFIX, cost))
        return b"".join(parts)

    @staticmethod
    def new_ids(n: int) -> list[bytes]:
        """``n`` random (trace id, span id) pairs, 24 bytes each, none of them all zeros (invalid)."""
        raw = os.urandom(24 * n)
        out = [raw[i : i + 24] for i in range(0, 24 * n, 24)]
        if b"\0" * 8 in raw:  # eight zero bytes in a row somewhere: check each id (about never)
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
            n = len(span)
            parts += (tag, _VARINTS[n] if n < _SMALL else _varint64(n), span)
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

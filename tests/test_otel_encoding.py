"""The exporter's own span encoding and histogram aggregation against the official SDK's.

`meterproxy.otel_spans` writes OTLP span bytes without the SDK's tracer and encoder, and
`meterproxy.otel_metrics` aggregates the histograms without the SDK's instruments (both for
speed: ``bench/README.md``, "OpenTelemetry export"). These tests hold them to the official
output: the same rows go through the SDK path (``ReadableSpan`` + the official
``encode_spans``; a ``MeterProvider`` with an in-memory reader) and the decoded results must be
equal, field by field.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from meterproxy import __version__
from meterproxy.otel import record_fields
from meterproxy.otel_export import (
    DURATION_BUCKETS,
    TOKEN_BUCKETS,
    Exporter,
    as_fields,
    span_attributes,
    span_name,
)
from meterproxy.otel_metrics import GenAiHistograms
from meterproxy.otel_spans import SpanEncoder
from meterproxy.testing import make_record
from meterproxy.usage import Usage

RESOURCE = Resource.create({"service.name": "meterproxy-test", "deployment.environment": "test"})
SCOPE = InstrumentationScope("meterproxy", __version__)


def _rows() -> list[Any]:
    """Records of every shape the exporter distinguishes."""
    records = []
    for i in range(12):
        r = make_record(
            model="gpt-4o-mini" if i % 2 else "claude-sonnet-4",
            provider="openai" if i % 2 else "anthropic",
            upstream="openai" if i % 2 else "anthropic",
            usage=Usage(
                input_tokens=1000 + i, output_tokens=i, cache_read_tokens=3 * i, reasoning_tokens=i % 3
            ),
        )
        r.duration_ms = 100.0 + 37 * i
        r.streamed = bool(i % 3)
        if i % 4 == 0:
            r.cost_usd = Decimal("0.000123") * (i + 1)
        if i % 5 == 1:
            r.provider_cost_usd = Decimal("0.5")
        if i % 3 == 1:
            r.user, r.session = f"user-{i % 2}", f"session-{i}"
        if i % 6 == 2:
            r.key_fingerprint = "fp_abc"
        if i == 7:
            r.status, r.usage, r.usage_source = 429, None, "missing"
        if i == 9:
            r.error, r.client_disconnected = "cut", True
        if i == 10:
            r.error, r.requested_model, r.model = "upstream reset", "gpt-4o", None
        records.append(r)
    return [record_fields(r) for r in records]


def _official(row: Any, ids: bytes) -> ReadableSpan:
    attrs = span_attributes(as_fields(row))
    start = int(row[1])
    context = SpanContext(
        int.from_bytes(ids[:16], "big"),
        int.from_bytes(ids[16:], "big"),
        False,
        TraceFlags(TraceFlags.SAMPLED),
    )
    return ReadableSpan(
        span_name(attrs),
        context=context,
        resource=RESOURCE,
        attributes=attrs,
        kind=SpanKind.CLIENT,
        status=Status(StatusCode.ERROR if "error.type" in attrs else StatusCode.UNSET),
        start_time=start,
        end_time=start + int(float(row[2]) * 1e9),
        instrumentation_scope=SCOPE,
    )


class _Capture:
    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def send(self, data: bytes, spans: int) -> bool:
        self.requests.append(data)
        return True

    def stop_retrying(self) -> None:
        pass

    def close(self) -> None:
        pass


def _sorted_attributes(request: ExportTraceServiceRequest) -> list[Any]:
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    for span in spans:
        ordered = sorted(span.attributes, key=lambda kv: kv.key)
        del span.attributes[:]
        span.attributes.extend(ordered)
    return spans


def test_spans_decode_to_what_the_official_encoder_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows()
    ids = [bytes([i + 1]) * 24 for i in range(len(rows) + 3)]
    handed_out = iter(ids)
    monkeypatch.setattr(SpanEncoder, "new_ids", staticmethod(lambda n: [next(handed_out) for _ in range(n)]))
    encoder = SpanEncoder(dict(RESOURCE.attributes), RESOURCE.schema_url, SCOPE.name, SCOPE.version or "")
    capture = _Capture()
    exporter = Exporter(encoder, capture, None, None)  # type: ignore[arg-type]
    exporter.add(rows[:5])
    exporter.add(rows[5:])
    exporter.add(rows[:3])  # shapes and values seen before: the cached pieces
    exporter.close()

    ours = ExportTraceServiceRequest()
    ours.ParseFromString(capture.requests[0])
    official = encode_spans([_official(r, i) for r, i in zip(rows + rows[:3], ids, strict=True)])
    assert len(capture.requests) == 1
    assert ours.resource_spans[0].resource == official.resource_spans[0].resource
    assert ours.resource_spans[0].scope_spans[0].scope == official.resource_spans[0].scope_spans[0].scope
    ours_spans, official_spans = _sorted_attributes(ours), _sorted_attributes(official)
    assert len(ours_spans) == len(rows) + 3
    for mine, theirs in zip(ours_spans, official_spans, strict=True):
        assert mine == theirs, (mine, theirs)
    # The error spans carry the error status and type.
    errors = [s for s in ours_spans if s.status.code == s.status.STATUS_CODE_ERROR]
    assert {kv.value.string_value for s in errors for kv in s.attributes if kv.key == "error.type"} == {
        "429",
        "client_disconnected",
        "upstream_error",
    }


def _points(metrics_data: Any) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
    out = {}
    for rm in metrics_data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    out[(m.name, tuple(sorted(p.attributes.items())))] = p
    return out


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA])
def test_histograms_count_what_the_sdk_instruments_count(temporality: AggregationTemporality) -> None:
    rows = _rows()
    reader = InMemoryMetricReader(preferred_temporality={_histogram_type(): temporality})
    meter = MeterProvider(resource=RESOURCE, metric_readers=[reader]).get_meter("meterproxy", __version__)
    tokens = meter.create_histogram(
        "gen_ai.client.token.usage", unit="{token}", explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS)
    )
    duration = meter.create_histogram(
        "gen_ai.client.operation.duration",
        unit="s",
        explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
    )
    ours = GenAiHistograms(RESOURCE, SCOPE, TOKEN_BUCKETS, DURATION_BUCKETS, temporality)
    exporter = Exporter(SpanEncoder({}, "", "meterproxy", ""), None, ours, None)

    def sdk_record(batch: list[Any]) -> None:
        # What the exporter did per request with the SDK's instruments before.
        for row in batch:
            attrs = span_attributes(as_fields(row))
            metric_attrs = {k: attrs[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name")}
            for key in ("gen_ai.request.model", "gen_ai.response.model", "error.type"):
                if key in attrs:
                    metric_attrs[key] = attrs[key]
            duration.record(float(row[2]), metric_attrs)
            if "gen_ai.usage.input_tokens" in attrs:
                tokens.record(
                    attrs["gen_ai.usage.input_tokens"], {**metric_attrs, "gen_ai.token.type": "input"}
                )
                tokens.record(
                    attrs["gen_ai.usage.output_tokens"], {**metric_attrs, "gen_ai.token.type": "output"}
                )

    for batch in (rows[:7], rows[7:], rows[2:4]):
        exporter.add(batch)
        sdk_record(batch)
        mine, theirs = _points(ours.collect(1)), _points(reader.get_metrics_data())
        assert mine.keys() == theirs.keys()
        for key, p in theirs.items():
            q = mine[key]
            assert (q.count, q.sum, q.min, q.max) == (p.count, pytest.approx(p.sum), p.min, p.max), key
            assert tuple(q.bucket_counts) == tuple(p.bucket_counts), key
            assert tuple(q.explicit_bounds) == tuple(p.explicit_bounds), key
    exporter.close()
    assert sum(p.count for k, p in mine.items() if k[0] == "gen_ai.client.operation.duration") == (
        2 if temporality is AggregationTemporality.DELTA else len(rows) + 2
    )


def _histogram_type() -> type:
    from opentelemetry.sdk.metrics import Histogram

    return Histogram


def _spans_of(capture: _Capture) -> list[Any]:
    spans = []
    for data in capture.requests:
        request = ExportTraceServiceRequest()
        request.ParseFromString(data)
        spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    return spans


def test_a_configured_sampler_decides_which_spans_leave_but_metrics_count_every_request() -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    rows = _rows() * 20
    histograms = GenAiHistograms(
        RESOURCE, SCOPE, TOKEN_BUCKETS, DURATION_BUCKETS, AggregationTemporality.DELTA
    )
    sampler = TraceIdRatioBased(0.5)
    capture = _Capture()
    exporter = Exporter(SpanEncoder({}, "", "meterproxy", ""), capture, histograms, None, sampler=sampler)  # type: ignore[arg-type]
    exporter.add(rows)
    exporter.close()
    spans = _spans_of(capture)
    assert 0 < len(spans) < len(rows)
    for span in spans:
        trace_id = int.from_bytes(span.trace_id, "big")
        assert sampler.should_sample(None, trace_id, span.name).decision.is_sampled()
    points = _points(histograms.collect(1))
    assert sum(p.count for k, p in points.items() if k[0] == "gen_ai.client.operation.duration") == len(rows)


def test_span_attribute_values_are_cut_to_the_sdk_limit_but_metric_attributes_are_not() -> None:
    rows = _rows()
    histograms = GenAiHistograms(
        RESOURCE, SCOPE, TOKEN_BUCKETS, DURATION_BUCKETS, AggregationTemporality.DELTA
    )
    capture = _Capture()
    encoder = SpanEncoder({}, "", "meterproxy", "")
    exporter = Exporter(encoder, capture, histograms, None, max_attribute_length=5)  # type: ignore[arg-type]
    exporter.add(rows)
    exporter.close()
    spans = _spans_of(capture)
    assert len(spans) == len(rows)
    strings = [
        kv.value.string_value for s in spans for kv in s.attributes if kv.value.HasField("string_value")
    ]
    assert strings and max(map(len, strings)) == 5
    assert {s.name for s in spans} >= {"chat gpt-4o-mini"}  # the name is not an attribute
    models = {p.attributes.get("gen_ai.request.model") for p in _points(histograms.collect(1)).values()}
    assert "gpt-4o-mini" in models

"""GenAI client histograms, aggregated in the exporter process, sent by the official OTLP metric exporter.

Used by `meterproxy.otel_export`. Every request is one point of
``gen_ai.client.operation.duration`` and, when it reported usage, one ``input`` and one
``output`` point of ``gen_ai.client.token.usage``: three ``Histogram.record`` calls a request
with the SDK's instruments, 8.2 µs each in this process (attribute validation, hashing, a
``Measurement`` object, locks; measured 2026-12-04), more than everything else the exporter
does per request once spans are encoded directly (`meterproxy.otel_spans`).

So the aggregation is done here, exactly as the SDK's explicit-bucket histogram aggregation
does it (``bisect_left`` into the boundaries, sum, min, max per attribute set; cumulative
points keep their first-measurement start time; delta points start at the previous
collection; at most `CARDINALITY_LIMIT` attribute sets, then the
``otel.metric.overflow`` set): a dict lookup and a few additions per point. Every
``OTEL_METRIC_EXPORT_INTERVAL`` the result is handed, as the SDK's own `MetricsData`, to the
official ``OTLPMetricExporter.export`` (its endpoint, headers, timeout, compression and TLS
variables apply unchanged). ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` is read as
the exporter reads it (``delta`` and ``lowmemory`` make histograms delta).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["CARDINALITY_LIMIT", "GenAiHistograms", "histogram_temporality"]

#: The SDK's default limit of attribute sets per instrument.
CARDINALITY_LIMIT = 2000
_OVERFLOW: tuple[tuple[str, Any], ...] = (("otel.metric.overflow", True),)


def histogram_temporality(env: Mapping[str, str] | None = None) -> AggregationTemporality:
    """The histograms' temporality under ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``."""
    env = os.environ if env is None else env
    preference = env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "cumulative").strip().lower()
    if preference in ("delta", "lowmemory"):
        return AggregationTemporality.DELTA
    return AggregationTemporality.CUMULATIVE


class _Point:
    __slots__ = ("counts", "max", "min", "start_ns", "sum")

    def __init__(self, buckets: int, start_ns: int) -> None:
        self.counts = [0] * buckets
        self.sum: float = 0
        self.min = float("inf")
        self.max = float("-inf")
        self.start_ns = start_ns


class _Histogram:
    def __init__(self, name: str, unit: str, description: str, boundaries: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.boundaries = tuple(boundaries)
        self.points: dict[tuple[tuple[str, Any], ...], _Point] = {}
        self.collected_ns: int | None = None

    def record(self, attributes: tuple[tuple[str, Any], ...], value: float, now_ns: int) -> None:
        point = self.points.get(attributes)
        if point is None:
            if len(self.points) >= CARDINALITY_LIMIT:
                attributes = _OVERFLOW
                point = self.points.get(attributes)
            if point is None:
                point = self.points[attributes] = _Point(len(self.boundaries) + 1, now_ns)
        point.counts[bisect_left(self.boundaries, value)] += 1
        point.sum += value
        if value < point.min:
            point.min = value
        if value > point.max:
            point.max = value

    def collect(self, temporality: AggregationTemporality, now_ns: int) -> Metric | None:
        delta = temporality is AggregationTemporality.DELTA
        data_points = [
            HistogramDataPoint(
                attributes=dict(attributes),
                start_time_unix_nano=self.collected_ns if delta and self.collected_ns else p.start_ns,
                time_unix_nano=now_ns,
                count=sum(p.counts),
                sum=p.sum,
                bucket_counts=tuple(p.counts),
                explicit_bounds=self.boundaries,
                min=p.min,
                max=p.max,
            )
            for attributes, p in self.points.items()
        ]
        if delta:
            # The next interval's points start now; an attribute set with nothing new is not sent.
            self.points = {}
            self.collected_ns = now_ns
        if not data_points:
            return None
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(data_points=data_points, aggregation_temporality=temporality),
        )


class GenAiHistograms:
    """``gen_ai.client.operation.duration`` and ``gen_ai.client.token.usage`` for one process."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        token_buckets: Sequence[float],
        duration_buckets: Sequence[float],
        temporality: AggregationTemporality,
    ) -> None:
        self._resource, self._scope, self.temporality = resource, scope, temporality
        self._duration = _Histogram(
            "gen_ai.client.operation.duration", "s", "GenAI operation duration", duration_buckets
        )
        self._tokens = _Histogram(
            "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used", token_buckets
        )

    def record(
        self,
        attributes: tuple[tuple[str, Any], ...],
        seconds: float,
        tokens: tuple[int, int] | None,
        now_ns: int,
    ) -> None:
        """One request: its duration and, if it reported usage, its (input, output) tokens.
        ``attributes`` is the metric attribute set as sorted-by-caller (key, value) pairs."""
        self._duration.record(attributes, seconds, now_ns)
        if tokens is not None:
            self._tokens.record((*attributes, ("gen_ai.token.type", "input")), tokens[0], now_ns)
            self._tokens.record((*attributes, ("gen_ai.token.type", "output")), tokens[1], now_ns)

    def collect(self, now_ns: int) -> MetricsData | None:
        """Everything to export now, as the SDK's reader would hand it to an exporter; None if empty."""
        metrics = [
            m
            for h in (self._tokens, self._duration)
            if (m := h.collect(self.temporality, now_ns)) is not None
        ]
        if not metrics:
            return None
        scope_metrics = ScopeMetrics(
            scope=self._scope, metrics=metrics, schema_url=self._scope.schema_url or ""
        )
        resource_metrics = ResourceMetrics(
            resource=self._resource, scope_metrics=[scope_metrics], schema_url=self._resource.schema_url
        )
        return MetricsData(resource_metrics=[resource_metrics])

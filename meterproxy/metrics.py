"""Prometheus metrics: what every finished request adds to ``GET /metrics``.

The metric names are a contract (dashboards and alerts depend on them); the
table is in the README's "Metrics and Grafana" section and in `METRIC_NAMES`.

When it fires: `Metrics.request_finished` is a meter sink, so it runs once per
request on the event loop, right after pricing and before (or beside) the
store writer. By then the client has its answer; a failure here is logged by
the meter and never reaches the request. It only queues the record; `Metrics.flush`
counts every `FLUSH_EVERY` requests, summing requests that share their labels
first (one locked increment per series and batch instead of a dozen per request;
histogram buckets counted in one pass, ``bench/metrics_bench.py``). Every read of
the registry flushes first (`_FlushFirst`, the registry's first collector), so
``/metrics`` and ``get_sample_value`` are exact at any moment. With several
worker processes another worker may answer the scrape, so there each request is
counted at once.
A scrape renders in a worker thread, so a large exposition never stalls the
streams on the event loop.

Design:

- **An injected registry.** Each app gets its own `CollectorRegistry` (held
  under `METRICS`), never prometheus_client's global one, so several apps can
  live in one test process and tests read values with
  ``registry.get_sample_value``.
- **Base units and exact sources.** Durations are seconds, costs USD. The cost
  counter adds the request's exact Decimal converted to float once; Prometheus
  stores floats, so sums over many requests may differ from the database in
  the last float digits (far below a cent). The database (``cost_pico``) is the
  exact record; these metrics are for rates, graphs and alerts.
- **Same meanings as the stored row.** Token counters add exactly the counts
  the row stores (`RequestRecord.tokens`), so ``sum(meterproxy_tokens_total)``
  equals ``SUM(...)`` over the requests table.
- **Bounded labels.** user, session, key and tags are never labels by default.
  A model known to the price table is its own label value; unknown models keep
  their name for the first ``metrics_max_unknown_models`` distinct ones, then
  collapse into ``other``. ``metrics_tag_labels`` opts chosen tag keys in as
  ``tag_<key>`` labels, each with at most ``metrics_max_tag_values`` values.
- **Process state read at scrape time.** Writer queue depth, written/dropped
  records, store health and in-flight requests live in this process; `refresh`
  copies them into gauges and counters just before each scrape (and every
  second in multi-process mode, where another worker may be the one scraped).
- **Several worker processes.** With ``PROMETHEUS_MULTIPROC_DIR`` in the
  environment when prometheus_client is imported (the ``--workers``
  supervisor sets it from ``metrics_multiproc_dir`` or a temporary directory,
  see `meterproxy.runtime.use_metrics_dir`) metric values live in
  prometheus_client's per-process mmap files in that directory and
  ``/metrics`` merges every worker's files, so any worker answers with the
  totals of all. The directory must be emptied when the whole server starts
  (not when one worker restarts): the files of exited workers keep their
  counts, so totals never go backwards while the server runs. Gauges of a
  worker that exits cleanly are removed (`mark_process_dead`).

Budgets publish ``meterproxy_budget_spend_usd{budget}`` and
``meterproxy_budget_limit_usd{budget}`` with `Metrics.set_budget` (see
`publish_budget`); other features may add their own collector with
`Metrics.register`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from meterproxy.app_state import METER, METRICS, PRICEBOOK, PROXY, SETTINGS, WRITER
from meterproxy.http_errors import bearer_matches, unauthorized
from meterproxy.pricing import PriceBook
from meterproxy.runtime import METRICS_DIR_ENV
from meterproxy.settings import Settings
from meterproxy.usage import RequestRecord

__all__ = [
    "METRICS",
    "METRIC_NAMES",
    "TOKEN_TYPES",
    "BoundedLabel",
    "Metrics",
    "publish_budget",
    "setup",
    "status_class",
    "unmetered_reason",
]

log = logging.getLogger(__name__)

TOKEN_TYPES = ("input", "cache_read", "cache_write", "output", "reasoning")

#: Every metric family the proxy exports (the contract; see the README table).
METRIC_NAMES = (
    "meterproxy_requests_total",
    "meterproxy_tokens_total",
    "meterproxy_cost_usd_total",
    "meterproxy_unpriced_requests_total",
    "meterproxy_unpriced_tokens_total",
    "meterproxy_unmetered_requests_total",
    "meterproxy_request_duration_seconds",
    "meterproxy_time_to_first_byte_seconds",
    "meterproxy_upstream_duration_seconds",
    "meterproxy_proxy_overhead_seconds",
    "meterproxy_in_flight_requests",
    "meterproxy_writer_queue_depth",
    "meterproxy_writer_written_records_total",
    "meterproxy_writer_dropped_records_total",
    "meterproxy_store_up",
    "meterproxy_bad_requests_total",
    "meterproxy_budget_spend_usd",
    "meterproxy_budget_limit_usd",
    "meterproxy_budget_reserved_usd",
)

OTHER = "other"

# LLM calls take from milliseconds (embeddings) to many minutes (long reasoning streams).
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


#: Finished requests counted together (`Metrics.flush`); every read of the registry flushes first.
FLUSH_EVERY = 256


class _FlushFirst(Collector):
    """Registered first: every collection of the registry (a scrape, ``get_sample_value``)
    counts the pending requests before the families are read, so reads are exact."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._metrics.flush()
        return []


def _observe_all(histogram: Any, amounts: list[float]) -> None:
    """``histogram.observe(a)`` for each amount: bucket counts and the sum added once each.

    Uses the child's own bucket bounds and values (prometheus_client keeps per-bucket,
    non-cumulative counts and ``observe`` adds to the first bucket whose bound is
    >= the amount, which is `bisect_left`); a client without them gets plain ``observe``.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    where = bisect.bisect_left
    for amount in amounts:
        counts[where(bounds, amount)] += 1
    total.inc(sum(amounts))
    for i, count in enumerate(counts):
        if count:
            buckets[i].inc(count)


class BoundedLabel:
    """The first ``limit`` distinct values pass as themselves; later new ones become ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return OTHER


def status_class(status: int | None) -> str:
    """``2xx``..``5xx``; ``none`` when no HTTP status came back (upstream unreachable)."""
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


def unmetered_reason(record: RequestRecord) -> str | None:
    """Why a request has no trusted usage, or None when it was metered. A bounded set."""
    if record.usage_source == "reported":
        return None
    if record.extra.get("budget") and record.status == 429:
        return "blocked"  # refused by a budget before it went upstream
    if record.usage_source == "partial":
        return "partial"  # a stream cut before its final usage: counted, but a lower bound
    if record.usage_source == "none":
        return "not_applicable"  # not an LLM endpoint we parse (e.g. GET /v1/models)
    if record.usage_source == "invalid":
        return "invalid"
    if record.client_disconnected:
        return "client_disconnected"
    if record.status is None or record.error:
        return "upstream_error"
    if record.status >= 400:
        return "error_status"
    return "missing"


class _ModelLabel:
    """Model names in the price table pass; unknown ones are bounded by a `BoundedLabel`."""

    # Answers are cached; past this many names the cache stops growing (resolve is cheap enough).
    _CACHE_MAX = 10_000

    def __init__(self, book: PriceBook | None, max_unknown: int) -> None:
        self.book = book
        self.unknown = BoundedLabel(max_unknown)
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, model: str, provider: str, priced: bool = False) -> str:
        if not model:
            return "none"
        if priced:  # the meter found it on the request's price list (whichever list that was)
            return model
        key = (model, provider)
        label = self._cache.get(key)
        if label is None:
            known = self.book is not None and self.book.resolve(model, provider or None) is not None
            label = model if known else self.unknown(model)
            if len(self._cache) < self._CACHE_MAX:
                self._cache[key] = label
        return label


class Metrics:
    """The proxy's metric families on one registry, and the sink that updates them."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        book: PriceBook | None = None,
        max_unknown_models: int = 20,
        tag_labels: Iterable[str] = (),
        max_tag_values: int = 20,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = values.ValueClass is not values.MutexValue
        # Finished requests not counted yet (see `flush`). With several workers another
        # process may answer the scrape and cannot flush this one's: count at once there.
        self._pending: collections.deque[RequestRecord] = collections.deque()
        self._flush_every = 1 if self.multiprocess else FLUSH_EVERY
        self.registry.register(_FlushFirst(self))
        self.model_label = _ModelLabel(book, max_unknown_models)
        self.tag_keys = list(dict.fromkeys(tag_labels))
        self._tag_values = {key: BoundedLabel(max_tag_values) for key in self.tag_keys}
        tag_names = [_tag_label_name(key) for key in self.tag_keys]
        r = self.registry

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self.requests = counter(
            "meterproxy_requests_total",
            "Finished proxied requests.",
            ["upstream", "provider", "model", "status_class", *tag_names],
        )
        self.tokens = counter(
            "meterproxy_tokens_total",
            "Tokens by type, as stored (cache_read/cache_write are part of input, reasoning of output).",
            ["upstream", "provider", "model", "type", *tag_names],
        )
        self.cost = counter(
            "meterproxy_cost_usd_total",
            "Cost in USD of priced requests (float; the database holds the exact figure).",
            ["upstream", "provider", "model", *tag_names],
        )
        self.unpriced = counter(
            "meterproxy_unpriced_requests_total",
            "Requests with reported usage but a model the price table does not know.",
            ["model"],
        )
        self.unpriced_tokens = counter(
            "meterproxy_unpriced_tokens_total", "Tokens of unpriced requests, by type.", ["model", "type"]
        )
        self.unmetered = counter(
            "meterproxy_unmetered_requests_total",
            "Requests without trusted usage, by reason "
            "(missing, invalid, partial, blocked, not_applicable, client_disconnected, upstream_error, "
            "error_status).",
            ["upstream", "reason"],
        )
        self.duration = Histogram(
            "meterproxy_request_duration_seconds",
            "Whole request as the proxy saw it, from arrival to the last byte.",
            ["upstream"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "meterproxy_time_to_first_byte_seconds",
            "From arrival to the first answer byte sent to the client.",
            ["upstream"],
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "meterproxy_upstream_duration_seconds",
            "Upstream time alone: from sending the request to the end of its answer.",
            ["upstream"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "meterproxy_proxy_overhead_seconds",
            "Request duration minus upstream duration: the time the proxy itself added.",
            ["upstream"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "meterproxy_in_flight_requests",
            "Requests being forwarded right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.writer_depth = Gauge(
            "meterproxy_writer_queue_depth",
            "Records not yet committed: queued for the database writer or in the batch it is writing.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.writer_written = counter(
            "meterproxy_writer_written_records_total", "Records committed to the database.", []
        )
        self.writer_dropped = counter(
            "meterproxy_writer_dropped_records_total",
            "Records lost because the writer queue was full or the database kept failing.",
            [],
        )
        self.bad_requests = counter(
            "meterproxy_bad_requests_total",
            "Requests the server could not parse as HTTP (answered 400, never forwarded).",
            [],
        )
        self.store_up = Gauge(
            "meterproxy_store_up",
            "1 while the last database write succeeded, 0 while writes are failing.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.budget_spend = Gauge(
            "meterproxy_budget_spend_usd",
            "Spend in USD counted against each budget in its current period.",
            ["budget"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_limit = Gauge(
            "meterproxy_budget_limit_usd",
            "Each budget's limit in USD for its current period.",
            ["budget"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_reserved = Gauge(
            "meterproxy_budget_reserved_usd",
            "Reserve budgets: worst-case USD held by requests in flight (all replicas), apart from spend.",
            ["budget"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self._written_seen = 0
        self._dropped_seen = 0
        self._children: dict[tuple[object, ...], Any] = {}

    # -- the sink ----------------------------------------------------------
    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: label values are bounded, so is this dict."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_finished(self, record: RequestRecord) -> None:
        """Meter sink: count one finished (and priced) request (in the next `flush`)."""
        pending = self._pending
        pending.append(record)
        if len(pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Count the requests finished since the last flush.

        Called every `FLUSH_EVERY` requests and before every read of the registry
        (`_FlushFirst`), so a scrape is exact. Requests that share their labels are
        summed first and added with one ``inc`` per series: a batch of a few hundred
        similar requests costs a few hundred tuple keys and a dozen locked
        increments, not a dozen locked increments each. Safe from any thread: records
        are taken with ``popleft`` (atomic), each by exactly one flush.
        """
        pending = self._pending
        groups: dict[tuple[Any, ...], list[Any]] = {}
        timings: dict[str, tuple[list[float], list[float], list[float], list[float]]] = {}
        tag_keys = self.tag_keys
        while True:
            try:
                r = pending.popleft()
            except IndexError:
                break
            cost = r.cost_usd
            key = (
                r.upstream,
                r.provider,
                r.model or r.requested_model or "",
                r.priced_model is not None,
                r.status,
                cost is not None,
                r.usage_source == "reported",
                unmetered_reason(r),
                tuple([r.tags.get(k, "") for k in tag_keys]) if tag_keys else (),
            )
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0, 0, 0, 0, 0, 0, 0.0]
            group[0] += 1
            u = r.usage
            if u is not None:
                group[1] += u.input_tokens
                group[2] += u.cache_read_tokens
                group[3] += u.cache_write_tokens
                group[4] += u.output_tokens
                group[5] += u.reasoning_tokens
            if cost is not None:
                group[6] += float(cost)
            times = timings.get(r.upstream)
            if times is None:
                times = timings[r.upstream] = ([], [], [], [])
            duration_ms, upstream_ms = r.duration_ms, r.upstream_ms
            if duration_ms is not None:
                times[0].append(duration_ms / 1000)
            if r.ttfb_ms is not None:
                times[1].append(r.ttfb_ms / 1000)
            if upstream_ms is not None:
                times[2].append(upstream_ms / 1000)
                if duration_ms is not None:
                    times[3].append(max(duration_ms - upstream_ms, 0.0) / 1000)
        # Groups in order of first appearance: bounded labels see new values in arrival order.
        for key, group in groups.items():
            try:
                self._count(key, group)
            except Exception:  # one bad series (a negative amount) must not lose the others
                log.exception("metrics: counting %d request(s) failed", group[0])
        for upstream, series in timings.items():
            for metric, values_s in zip(
                (self.duration, self.ttfb, self.upstream_duration, self.overhead), series, strict=True
            ):
                if values_s:
                    _observe_all(self._child(metric, upstream), values_s)

    def _count(self, key: tuple[Any, ...], group: list[Any]) -> None:
        """Add one group of `flush` (requests sharing every label) to the counters."""
        child = self._child
        tag_keys = self.tag_keys
        n, counts, cost_sum = group[0], group[1:6], group[6]
        upstream, provider, name, priced, status, has_cost, reported, reason, raw_tags = key
        model = self.model_label(name, provider, priced=priced)
        tags = [self._tag_values[k](v) for k, v in zip(tag_keys, raw_tags, strict=True)]
        child(self.requests, upstream, provider, model, status_class(status), *tags).inc(n)
        for kind, count in zip(TOKEN_TYPES, counts, strict=True):
            if count > 0:
                child(self.tokens, upstream, provider, model, kind, *tags).inc(count)
        if has_cost:
            child(self.cost, upstream, provider, model, *tags).inc(cost_sum)
        elif reported:
            child(self.unpriced, model).inc(n)
            for kind, count in zip(TOKEN_TYPES, counts, strict=True):
                if count > 0:
                    child(self.unpriced_tokens, model, kind).inc(count)
        if reason is not None:
            child(self.unmetered, upstream, reason).inc(n)

    # -- process state -----------------------------------------------------
    def refresh(self, app: web.Application) -> None:
        """Copy this process's writer and proxy state into the gauges and counters."""
        self.flush()
        writer = app.get(WRITER)
        if writer is not None:
            health = writer.health()
            self.writer_depth.set(health.queue_depth)
            self.store_up.set(1 if health.ok else 0)
            # The writer's totals only grow; add what is new so the counters never go back.
            if health.written > self._written_seen:
                self.writer_written.inc(health.written - self._written_seen)
                self._written_seen = health.written
            if health.dropped > self._dropped_seen:
                self.writer_dropped.inc(health.dropped - self._dropped_seen)
                self._dropped_seen = health.dropped
        proxy = app.get(PROXY)
        if proxy is not None:
            self.in_flight.set(proxy.in_flight)

    # -- hooks for other features -----------------------------------------
    def set_budget(self, budget: str, spend_usd: Decimal | float, limit_usd: Decimal | float | None) -> None:
        """Publish one budget's spend and limit (USD, current period)."""
        self.budget_spend.labels(budget).set(float(spend_usd))
        if limit_usd is not None:
            self.budget_limit.labels(budget).set(float(limit_usd))

    def set_budget_reserved(self, budget: str, reserved_usd: Decimal | float) -> None:
        self.budget_reserved.labels(budget).set(float(reserved_usd))

    def remove_budget(self, budget: str) -> None:
        for gauge in (self.budget_spend, self.budget_limit, self.budget_reserved):
            with contextlib.suppress(KeyError):
                gauge.remove(budget)

    def register(self, collector: Collector) -> None:
        """Add a custom collector (collected at scrape time; single-process mode only)."""
        self.registry.register(collector)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition body and its content type for a scrape."""
        registry: Any = self.registry
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, os.environ[METRICS_DIR_ENV])  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type


def publish_budget(
    app: web.Application, budget: str, spend_usd: Decimal | float, limit_usd: Decimal | float | None
) -> None:
    """Set a budget's gauges if metrics are enabled on ``app`` (a no-op otherwise)."""
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.set_budget(budget, spend_usd, limit_usd)


def _tag_label_name(key: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in key.lower())
    return f"tag_{cleaned}"


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    token = settings.admin_token if settings.metrics_require_token else None
    if token and not bearer_matches(request, token):
        return unauthorized(request)
    metrics = app[METRICS]
    metrics.refresh(app)
    # Rendering thousands of series takes milliseconds: off the loop, so streams keep flowing.
    body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("accept", ""))
    # content_type carries parameters (version, charset): set the raw header.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the price book is loaded (by the proxy lifecycle): label models, start counting."""
    metrics = app[METRICS]
    metrics.model_label.book = app.get(PRICEBOOK)
    app[METER].add_sink("metrics", metrics.request_finished)
    task = asyncio.create_task(_refresh_forever(app, metrics)) if metrics.multiprocess else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.refresh(app)
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


async def _refresh_forever(app: web.Application, metrics: Metrics) -> None:
    while True:
        try:
            metrics.refresh(app)
        except Exception:
            log.exception("metrics refresh failed")
        await asyncio.sleep(1.0)


def create_metrics(settings: Settings) -> Metrics:
    if settings.metrics_multiproc_dir and values.ValueClass is values.MutexValue:
        # The mode is the process's, chosen when prometheus_client was imported (see
        # `meterproxy.runtime.use_metrics_dir`); an app cannot switch it afterwards.
        log.warning(
            "metrics_multiproc_dir is set but %s was not when prometheus_client was imported: "
            "this process counts on its own",
            METRICS_DIR_ENV,
        )
    metrics = Metrics(
        max_unknown_models=settings.metrics_max_unknown_models,
        tag_labels=settings.metrics_tag_labels,
        max_tag_values=settings.metrics_max_tag_values,
    )
    if not metrics.multiprocess:
        ProcessCollector(registry=metrics.registry)
    return metrics


def setup(app: web.Application) -> None:
    app[METRICS] = create_metrics(app[SETTINGS])
    app.cleanup_ctx.append(_metrics_ctx)
    app.router.add_get("/metrics", metrics_handler)

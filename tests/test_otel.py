"""OpenTelemetry export against a real OTLP/HTTP receiver that decodes the protobuf.

The receiver is a plain HTTP server on 127.0.0.1 that parses each POST with the
official ``opentelemetry-proto`` messages, as a collector would. The proxy is
driven by the official openai SDK; every proxied request must arrive as a GenAI
span with its exact tokens and cost, and the token-usage histogram must count
them. Waits are on the receiver's state, never on a fixed time.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meterproxy.otel import OTEL, handoff_interval, otel_configured, record_fields
from meterproxy.otel_export import as_fields, span_attributes
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.metrics: list[Any] = []
        self.changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.trace_headers: list[dict[str, str]] = []
        self.refuse = 0  # answer this many trace POSTs 503 (Retry-After: 0) before accepting

    async def _traces(self, request: web.Request) -> web.Response:
        self.trace_headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.refuse > 0:
            self.refuse -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())  # aiohttp has undone any gzip
        async with self.changed:
            for rs in msg.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend((rs.resource, s) for s in ss.spans)
            self.changed.notify_all()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        msg = ExportMetricsServiceRequest()
        msg.ParseFromString(await request.read())
        async with self.changed:
            for rm in msg.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metrics.extend(sm.metrics)
            self.changed.notify_all()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    r = OtlpReceiver()
    await r.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{r.port}")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "meterproxy-test")
    yield r
    await r.close()


def test_configured_only_by_the_standard_variables() -> None:
    assert not otel_configured({})
    assert otel_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert otel_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert not otel_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, 2.0),  # the SDK's defaults (5 s, 60 s) are longer: every 2 s
        ({"OTEL_BSP_SCHEDULE_DELAY": "100"}, 0.1),  # spans wanted sooner: batches as often
        ({"OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "800"}, 0.5),
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, 0.05),  # never a batch per request
        ({"OTEL_BSP_SCHEDULE_DELAY": "soon"}, 2.0),  # unreadable: the SDK's default, logged
    ],
)
def test_batches_reach_the_exporter_as_often_as_its_schedule_asks(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], seconds: float
) -> None:
    for name in ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_METRIC_EXPORT_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert handoff_interval() == pytest.approx(seconds)


def test_span_attributes_follow_the_genai_conventions() -> None:
    record = make_record(
        model="gpt-4o-mini", usage=Usage(input_tokens=100, cache_read_tokens=40, output_tokens=7)
    )
    record.cost_usd = Decimal("0.000123")
    attrs = span_attributes(as_fields(record_fields(record)))
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == 100
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 40
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["gen_ai.usage.cost.amount"] == pytest.approx(0.000123)
    assert attrs["gen_ai.usage.cost.source"] == "local"
    # The provider's own figure wins and says so.
    record.provider_cost_usd = Decimal("0.0002")
    attrs = span_attributes(as_fields(record_fields(record)))
    assert attrs["gen_ai.usage.cost.amount"] == pytest.approx(0.0002)
    assert attrs["gen_ai.usage.cost.source"] == "provider"
    # Unpriced: no invented zero.
    record.provider_cost_usd = None
    record.cost_usd = None
    assert "gen_ai.usage.cost.amount" not in span_attributes(as_fields(record_fields(record)))


async def test_every_proxied_request_becomes_a_span_and_token_histogram_points(
    receiver: OtlpReceiver, upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fx = load_fixture("openai_chat_json")
    upstream.replay(fx)
    proxy = await make_proxy()
    client = openai.AsyncOpenAI(
        timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-otel-test", max_retries=0
    )
    n = 5
    for _ in range(n):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    rows = await proxy.rows(n)

    await receiver.wait_for(lambda: len(receiver.spans) >= n)
    # The exporter never preempts the proxy (it set this before reading its first batch).
    assert os.sched_getscheduler(proxy.app[OTEL].pid) == os.SCHED_BATCH
    assert os.getpriority(os.PRIO_PROCESS, proxy.app[OTEL].pid) == 19
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    sched = f"/proc/{proxy.app[OTEL].pid}/sched"
    if release >= (6, 12) and os.uname().machine in ("x86_64", "aarch64") and os.path.exists(sched):
        with open(sched) as f:  # the custom slice (Linux 6.12+), see meterproxy.otel_export.short_slice
            assert [line.split()[-1] for line in f if line.startswith("se.slice")] == ["100000"]
    by_id = {_attrs(s)["meterproxy.request_id"]: (res, s) for res, s in receiver.spans}
    assert set(by_id) == {r["id"] for r in rows}
    for row in rows:
        resource, span = by_id[row["id"]]
        attrs = _attrs(span)
        assert span.kind == span.SPAN_KIND_CLIENT
        assert span.name == f"chat {row['model']}"
        assert attrs["gen_ai.response.model"] == row["model"]
        assert attrs["gen_ai.usage.input_tokens"] == row["input_tokens"] == fx.expect["input_tokens"]
        assert attrs["gen_ai.usage.output_tokens"] == row["output_tokens"] == fx.expect["output_tokens"]
        assert Decimal(str(attrs["gen_ai.usage.cost.amount"])) == pytest.approx(Decimal(row["cost_usd"]))
        assert attrs["gen_ai.usage.cost.currency"] == "USD"
        assert span.end_time_unix_nano > span.start_time_unix_nano
        service = {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"]
        assert service == "meterproxy-test"
        # Keys never leave the proxy.
        assert "sk-otel-test" not in str(attrs)

    def token_count() -> int:
        # Cumulative temporality: the latest export of the histogram holds every point so far.
        latest: dict[str, int] = {}
        for m in receiver.metrics:
            if m.name != "gen_ai.client.token.usage":
                continue
            for dp in m.histogram.data_points:
                kind = {kv.key: kv.value.string_value for kv in dp.attributes}["gen_ai.token.type"]
                latest[kind] = dp.count
        return min(latest.get("input", 0), latest.get("output", 0))

    await receiver.wait_for(lambda: token_count() >= n)
    names = {m.name for m in receiver.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= names
    for m in receiver.metrics:
        if m.name == "gen_ai.client.token.usage":
            assert m.unit == "{token}"
            dp = m.histogram.data_points[-1]
            assert list(dp.explicit_bounds)[:3] == [1, 4, 16]
        if m.name == "gen_ai.client.operation.duration":
            assert m.unit == "s"


async def test_the_exporter_sends_everything_it_holds_at_end_of_input(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is due by the clock (a minute's delay and interval): the 1,200 spans (three
    POSTs of at most 512) and the histogram points arrive because stdin closed."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    n = 1200
    rows = [record_fields(make_record(usage=Usage(input_tokens=10 + i, output_tokens=i))) for i in range(n)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meterproxy.otel_export", stdin=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None
    for i in range(0, n, 200):
        proc.stdin.write(orjson.dumps(rows[i : i + 200]) + b"\n")
    await proc.stdin.drain()
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 60) == 0

    assert sorted(_attrs(s)["meterproxy.request_id"] for _, s in receiver.spans) == sorted(r[0] for r in rows)
    counts = {
        (m.name, {kv.key: kv.value.string_value for kv in dp.attributes}.get("gen_ai.token.type")): dp.count
        for m in receiver.metrics
        for dp in m.histogram.data_points
    }
    assert counts == {
        ("gen_ai.client.operation.duration", None): n,
        ("gen_ai.client.token.usage", "input"): n,
        ("gen_ai.client.token.usage", "output"): n,
    }


async def test_spans_carry_the_configured_headers_and_compression_and_are_retried(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cret,x-team=metering")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    receiver.refuse = 2
    rows = [record_fields(make_record()) for _ in range(3)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meterproxy.otel_export", stdin=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write(orjson.dumps(rows) + b"\n")
    await proc.stdin.drain()
    await receiver.wait_for(lambda: len(receiver.spans) == 3)
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert len(receiver.trace_headers) == 3  # refused twice, then accepted
    for headers in receiver.trace_headers:
        assert headers["x-api-key"] == "s3cret"
        assert headers["x-team"] == "metering"
        assert headers["content-encoding"] == "gzip"
        assert headers["content-type"] == "application/x-protobuf"

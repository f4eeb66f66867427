"""The OpenTelemetry exporter child's CPU per record, fed through its own stdin protocol.

Starts ``python -m meterproxy.otel_export`` exactly as the proxy does (stdin pipe, the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT``), with a discarding OTLP/HTTP receiver
(``otlp_receiver.py``, a thread of this process) as its endpoint, writes ``--records`` rows
shaped like real ones in batches of ``--batch`` (one line each, as `meterproxy.otel.OtelSink`
does every 0.5 s), closes stdin, and waits for the child to flush and exit. Reports the child's
user+system CPU from ``wait4`` (the whole life of the process: start-up, imports, every export,
shutdown) and the same for a run of one record (start-up, the first POST of each signal and the
lazy imports it brings, shutdown), so the difference divided by the other records is the CPU per
record. CPU time, not wall time: other load on the machine hardly moves it (but ±20 %). Also
counts the spans the receiver decoded (every record must arrive).

    PYTHONPATH=<tree> python bench/otel_export_cpu.py [--records 30000] [--batch 1500] \\
        [--interval 0.5] [--repeats 3] [--callgrind] [--port P]

``--callgrind`` counts the child's user-space instructions (all threads) under valgrind instead
of its CPU seconds: the A/B measure that does not move with the machine's load.

``--breakdown`` times each stage in this process instead, nothing sent: the SDK's way (span
attributes, ``tracer.start_span`` + ``end``, the official ``encode_spans``, three
``Histogram.record``) and the exporter's (`meterproxy.otel_export.Exporter.add` with spans, with
histograms, with both). ``--profile FILE`` runs the child under cProfile instead
(``python -m cProfile -o FILE``) for a look at where the time goes (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from otlp_receiver import OtlpReceiver

import meterproxy
from meterproxy.otel import record_fields
from meterproxy.testing import make_record
from meterproxy.usage import Usage

TREE = Path(meterproxy.__file__).resolve().parents[1]


def rows(n: int) -> list[tuple[Any, ...]]:
    out = []
    for i in range(n):
        r = make_record(
            model="gpt-4o-mini" if i % 3 else "claude-sonnet-4",
            usage=Usage(input_tokens=1200 + i % 500, cache_read_tokens=1024, output_tokens=87 + i % 50),
        )
        r.cost_usd = Decimal("0.0002321") + Decimal(i) / 10**9
        r.duration_ms, r.user, r.session = 412.5 + i % 100, "alice", f"s-{i % 7}"
        r.key_fingerprint, r.streamed = "fp_0a1b2c3d", bool(i % 2)
        if i % 50 == 0:
            r.status = 429
        out.append(record_fields(r))
    return out


def run(
    lines: list[bytes], endpoint: str, profile: str | None, interval: float, callgrind: str | None = None
) -> float:
    """The child's CPU seconds (user + system) over its whole life; with ``callgrind`` (an output
    file), its user-space instructions instead, all threads, counted by valgrind's callgrind."""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
    cmd = [sys.executable]
    if callgrind:
        # ~50x slower under valgrind, the sender thread falls behind: queue every span, drop none;
        # and the histograms are sent once, at the end (as in both runs), not every 5 s of a run
        # that valgrind makes ten times longer than it is.
        env["OTEL_BSP_MAX_QUEUE_SIZE"] = "1000000"
        env["OTEL_METRIC_EXPORT_INTERVAL"] = "3600000"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={callgrind}",
            f"--log-file={callgrind}.log",
            *cmd,
        ]
    if profile:
        cmd += ["-m", "cProfile", "-o", profile]
    cmd += ["-m", "meterproxy.otel_export"]
    # From the tree this script imported meterproxy from: ``-m`` looks in the working directory first.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, cwd=TREE)
    assert proc.stdin is not None
    for line in lines:
        proc.stdin.write(line)
        proc.stdin.flush()
        time.sleep(interval)  # batches arrive spaced, as they do from the proxy
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"exporter exited {proc.returncode}")
    if callgrind:
        with open(callgrind) as f:
            return float(next(int(line.split()[1]) for line in f if line.startswith(("totals:", "summary:"))))
    return float(usage.ru_utime + usage.ru_stime)


def _best(fn: Any, n: int, repeats: int = 3) -> float:
    """Minimum process CPU over ``repeats`` runs of ``fn``, in µs per record."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return round(best * 1e6 / n, 2)


def breakdown(data: list[tuple[Any, ...]], batch: int) -> dict[str, float]:
    """In-process CPU per record of each stage, the SDK's way and the exporter's, nothing sent."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanKind

    from meterproxy.otel_export import (
        DURATION_BUCKETS,
        TOKEN_BUCKETS,
        Exporter,
        as_fields,
        span_attributes,
    )
    from meterproxy.otel_metrics import GenAiHistograms
    from meterproxy.otel_spans import SpanEncoder

    data = orjson.loads(orjson.dumps(data))  # as the exporter gets rows: a datetime as its text
    n = len(data)
    # Every span is encoded: without this, spans beyond the default queue (2048) that the sender
    # thread has not yet taken would be dropped before they are encoded.
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(2 * n)
    resource = Resource.create({"service.name": "meterproxy"})
    scope = InstrumentationScope("meterproxy", "bench")
    fields = [as_fields(r) for r in data]
    attrs = [span_attributes(f) for f in fields]
    finished: list[ReadableSpan] = []

    class Keep(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            finished.extend(spans)
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(Keep()))
    tracer = tracer_provider.get_tracer("meterproxy", "bench")

    def sdk_spans() -> None:
        finished.clear()
        for a, f in zip(attrs, fields, strict=True):
            span = tracer.start_span("chat x", kind=SpanKind.CLIENT, attributes=a, start_time=f["start_ns"])
            span.end(end_time=f["start_ns"] + int(f["duration_s"] * 1e9))

    meter = MeterProvider(resource=resource, metric_readers=[InMemoryMetricReader()]).get_meter("m")
    tokens = meter.create_histogram("t", explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS))
    duration = meter.create_histogram("d", explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS))

    def sdk_histograms() -> None:
        for a, f in zip(attrs, fields, strict=True):
            m = {k: a[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.response.model")}
            duration.record(f["duration_s"], m)
            if f["tokens"]:
                tokens.record(f["tokens"][0], {**m, "gen_ai.token.type": "input"})
                tokens.record(f["tokens"][1], {**m, "gen_ai.token.type": "output"})

    class Discard:
        def send(self, data: bytes, spans: int) -> bool:
            return True

        def stop_retrying(self) -> None:
            pass

        def close(self) -> None:
            pass

    def ours(spans: bool, metrics: bool) -> Any:
        encoder = SpanEncoder(dict(resource.attributes), resource.schema_url, "meterproxy", "bench")
        histograms = GenAiHistograms(
            resource, scope, TOKEN_BUCKETS, DURATION_BUCKETS, AggregationTemporality.CUMULATIVE
        )

        def run() -> None:
            exporter = Exporter(encoder, Discard() if spans else None, histograms if metrics else None, None)  # type: ignore[arg-type]
            for i in range(0, n, batch):
                exporter.add(data[i : i + batch])
                exporter.flush_spans(everything=True)
            exporter.close()

        return run

    out = {
        "sdk_span_attributes_us": _best(lambda: [span_attributes(as_fields(r)) for r in data], n),
        "sdk_tracer_start_end_us": _best(sdk_spans, n),
    }
    sdk_spans()
    spans = list(finished)
    out["sdk_encode_spans_us"] = _best(lambda: encode_spans(spans).SerializePartialToString(), n)
    out["sdk_three_histogram_records_us"] = _best(sdk_histograms, n)
    out["ours_spans_us"] = _best(ours(True, False), n)
    out["ours_histograms_us"] = _best(ours(False, True), n)
    out["ours_both_us"] = _best(ours(True, True), n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument(
        "--batch", type=int, default=1500, help="records per batch (0.5 s at 3,000 requests/s, c=1 JSON)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--interval", type=float, default=0.5, help="seconds between batches (the proxy's is 0.5)"
    )
    ap.add_argument("--profile", help="write a cProfile of one loaded run here instead")
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="count the child's instructions under valgrind's callgrind instead of its CPU seconds "
        "(repeatable under load; ~50x slower, so use fewer --records)",
    )
    ap.add_argument("--port", type=int, default=0, help="the OTLP receiver's port (0: any free one)")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="print the in-process CPU per record of each stage (SDK's and ours) instead",
    )
    args = ap.parse_args()
    if args.breakdown:
        print(json.dumps({"records": args.records, **breakdown(rows(args.records), args.batch)}))
        return
    receiver = OtlpReceiver(args.port, decode=True)
    data = rows(args.records)
    lines = [orjson.dumps(data[i : i + args.batch]) + b"\n" for i in range(0, len(data), args.batch)]
    if args.profile:
        run(lines, receiver.endpoint, args.profile, args.interval)
        print(json.dumps({"profile": args.profile, "spans_received": receiver.spans}))
        return
    one, loaded = [], []
    out_dir = tempfile.mkdtemp(prefix="otel-export-cg-") if args.callgrind else None
    for i in range(args.repeats):
        cg = os.path.join(out_dir, f"one-{i}.out") if out_dir else None
        one.append(run([orjson.dumps(data[:1]) + b"\n"], receiver.endpoint, None, 0, cg))
        before = receiver.spans
        cg = os.path.join(out_dir, f"loaded-{i}.out") if out_dir else None
        loaded.append(run(lines, receiver.endpoint, None, args.interval, cg))
        if receiver.spans - before != args.records:  # (the one-record run's span came before)
            raise SystemExit(f"{receiver.spans - before} spans arrived for {args.records} records")
    receiver.stop()
    out: dict[str, Any] = {"records": args.records, "batch": args.batch, "interval_s": args.interval}
    if out_dir:
        per = [(n - min(one)) / (args.records - 1) for n in loaded]
        out["one_record_run_instructions"] = int(min(one))
        out["instructions_per_record"] = [round(x) for x in per]
        out["callgrind_files"] = out_dir
    else:
        per = [(cpu - min(one)) * 1e6 / (args.records - 1) for cpu in loaded]
        out["one_record_run_cpu_s"] = round(min(one), 3)
        out["loaded_cpu_s"] = [round(x, 3) for x in loaded]
        out["cpu_us_per_record_min"] = round(min(per), 1)
        out["cpu_us_per_record_median"] = round(statistics.median(per), 1)
    out["otlp_posts"] = receiver.posts
    out["load_average"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

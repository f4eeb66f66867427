"""Does OpenTelemetry export slow the proxy? Added latency with export off and on, side by side.

Starts the bench upstream (core 0), a discarding OTLP/HTTP receiver (`otlp_receiver.py`, a
thread of this process), and ``meterproxy serve`` (core 1) alternately without and with
``OTEL_EXPORTER_OTLP_ENDPOINT``; each round measures direct and proxied latency at concurrency 1
(JSON, then 20-event SSE) with ``bench/loadgen.py``, and the CPU the proxy and its exporter child
used per proxied request (from /proc: unlike a p99, hardly moved by other load on the machine).
Rounds alternate off/on so that drift in the machine's load hits both alike. Prints one JSON line
per cell and a summary; writes ``bench/results/otel-latest.json``.

    python bench/otel_overhead.py [--rounds 3] [--duration 5] [--port-base N]

Bounded: rounds x 2 modes x 2 scenarios x duration seconds, then everything is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from otlp_receiver import OtlpReceiver

BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def spawn(cmd: list[str], cores: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", cores, *cmd],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def load(port: int, path: str, stream: bool, duration: float) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--port", str(port), "--path", path]
    cmd += ["--concurrency", "1", "--duration", str(duration)]
    if stream:
        cmd += ["--stream", "--chunks", "20"]
    out = subprocess.run(
        ["taskset", "-c", "0", *cmd], capture_output=True, check=True, timeout=duration + 120
    )
    return dict(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument(
        "--receiver-idle",
        action="store_true",
        help="run the OTLP receiver at SCHED_IDLE: a collector on another host, as in production, "
        "instead of one more busy task on the two cores the benchmark already fills",
    )
    ap.add_argument(
        "--port-base",
        type=int,
        default=0,
        help="take ports from here up (receiver, upstream, then one per proxy start) instead of "
        "free ones the kernel picks: for a machine where each user has a port range",
    )
    args = ap.parse_args()
    ports = iter(range(args.port_base, args.port_base + 1000)) if args.port_base else None

    def port_for() -> int:
        return next(ports) if ports is not None else free_port()

    # Not decoding: the receiver shares core 0 with the load generator and the upstream.
    receiver = OtlpReceiver(port_for() if ports is not None else 0, idle=args.receiver_idle)
    otel_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    }
    up_port = port_for()
    upstream = spawn([sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], "0")
    wait_port(up_port)
    cells: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                port = port_for()
                db = os.path.join(tempfile.mkdtemp(prefix="bench-otel-"), "bench.db")
                cmd = [sys.executable, "-m", "meterproxy", "serve", "--port", str(port), "--db", db]
                cmd += ["--upstream", f"bench=http://127.0.0.1:{up_port}"]
                env = {"METERPROXY_LOG_LEVEL": "warning", **(otel_env if mode == "on" else {})}
                proxy = spawn(cmd, "1", env)
                try:
                    wait_port(port)
                    for scenario, stream in (("json", False), ("sse20", True)):
                        direct = load(up_port, "/v1/chat/completions", stream, args.duration)
                        # CPU per request: unlike latency percentiles, barely moved by other load.
                        helpers = children(proxy.pid)
                        before = cpu_s(proxy.pid), sum(cpu_s(c) for c in helpers)
                        through = load(port, "/bench/v1/chat/completions", stream, args.duration)
                        after = cpu_s(proxy.pid), sum(cpu_s(c) for c in helpers)
                        n = max(through["requests"], 1)
                        cell = {
                            "round": round_,
                            "otel": mode,
                            "scenario": scenario,
                            "added_p50_ms": round(
                                through["latency_ms"]["p50"] - direct["latency_ms"]["p50"], 3
                            ),
                            "added_p99_ms": round(
                                through["latency_ms"]["p99"] - direct["latency_ms"]["p99"], 3
                            ),
                            "proxy_cpu_us_per_request": round((after[0] - before[0]) * 1e6 / n, 1),
                            "exporter_cpu_us_per_request": round((after[1] - before[1]) * 1e6 / n, 1),
                            "errors": through["errors"],
                            "requests": through["requests"],
                        }
                        print(json.dumps(cell), flush=True)
                        cells.append(cell)
                finally:
                    stop(proxy)
    finally:
        stop(upstream)
        receiver.stop()

    summary: dict[str, Any] = {
        "otlp_posts_received": receiver.posts,
        "receiver_idle": args.receiver_idle,
        "load_average": os.getloadavg(),
    }
    for scenario in ("json", "sse20"):
        for mode in ("off", "on"):
            picked = [c for c in cells if c["scenario"] == scenario and c["otel"] == mode]
            summary[f"{scenario}_{mode}_added_p50_ms"] = statistics.median(c["added_p50_ms"] for c in picked)
            summary[f"{scenario}_{mode}_added_p99_ms"] = statistics.median(c["added_p99_ms"] for c in picked)
            for what in ("proxy", "exporter"):
                summary[f"{scenario}_{mode}_{what}_cpu_us_per_request"] = statistics.median(
                    c[f"{what}_cpu_us_per_request"] for c in picked
                )
    print(json.dumps(summary, indent=2))
    out = BENCH / "results" / "otel-latest.json"
    out.write_text(json.dumps({"cells": cells, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()

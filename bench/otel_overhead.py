"""Does OpenTelemetry export slow the proxy? Added latency with export off and on, side by side.

Starts the bench upstream (core 0), a discarding OTLP/HTTP receiver (`otlp_receiver.py`, a
thread of this process), and ``meterproxy serve`` (core 1) alternately without and with
``OTEL_EXPORTER_OTLP_ENDPOINT``; each round measures direct and proxied latency at concurrency 1
(JSON, then 20-event SSE) with ``bench/loadgen.py``, and the CPU the proxy and its exporter child
used per proxied request (from /proc: unlike a p99, hardly moved by other load on the machine).
Rounds alternate off/on, and the order within a round alternates too (off-on, on-off), so that
drift in the machine's load hits both alike. Prints one JSON line per cell and a summary; writes
``bench/results/otel-latest.json``.

The verdict is the pooled figure: every round's latency samples together (``loadgen.py
--samples``), added latency = proxied percentile minus direct percentile, and its growth with
export on, with a 90% bootstrap interval over rounds. A median of per-round p99s rests on ~1% of
one 5 s cell each, and on this shared VM single cells' p99s moved several times the 5% asked;
the pooled p99 of ten rounds rests on hundreds of tail samples per mode, and the interval says
how much of it a few noisy rounds could make.

    python bench/otel_overhead.py [--rounds 3] [--duration 5] [--port-base N]

Bounded: rounds x 2 modes x 2 scenarios x duration seconds, then everything is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_right
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


def run_delay_s(pid: int) -> float:
    """Seconds the process's threads have waited on a run queue, runnable but not running
    (Linux schedstat): what another task on their core, such as the exporter child, costs them,
    read directly instead of through a latency percentile. 0 if it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def load(port: int, path: str, stream: bool, duration: float, samples: str) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--port", str(port), "--path", path]
    cmd += ["--concurrency", "1", "--duration", str(duration), "--samples", samples]
    if stream:
        cmd += ["--stream", "--chunks", "20"]
    out = subprocess.run(
        ["taskset", "-c", "0", *cmd], capture_output=True, check=True, timeout=duration + 120
    )
    return dict(json.loads(out.stdout))


def read_samples(path: str) -> list[float]:
    values = array("d")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    return sorted(values)


def pooled_pct(runs: list[list[float]], q: float) -> float:
    """The q-th percentile (nearest rank) of several sorted sample lists taken together.

    Found by bisecting on the value (a count of samples at or below it is one `bisect_right`
    per list), so that a bootstrap's thousands of pools never sort or copy a sample.
    """
    n = sum(map(len, runs))
    need = min(n - 1, int(q / 100 * n)) + 1
    lo, hi = min(r[0] for r in runs), max(r[-1] for r in runs)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(bisect_right(r, mid) for r in runs) >= need:
            hi = mid
        else:
            lo = mid
    return hi


Round = dict[str, list[float]]


def pooled_growth(rounds: list[Round], q: float) -> tuple[float, float, float]:
    """Added latency at percentile q, export off and on, from every round's samples pooled.

    Added = proxied percentile - direct percentile, with direct pooled over both modes (it does
    not depend on them). Pooling 5 s rounds gives a p99 that rests on hundreds of tail samples
    instead of the median of five p99s that rest on ~30 each.
    """
    d = pooled_pct([r[k] for r in rounds for k in ("direct_off", "direct_on")], q)
    off = pooled_pct([r["off"] for r in rounds], q) - d
    on = pooled_pct([r["on"] for r in rounds], q) - d
    return off, on, (on - off) / off if off else float("nan")


def bootstrap(rounds: list[Round], q: float, draws: int, seed: int) -> tuple[float, float]:
    """5th and 95th percentile of the growth when the rounds are resampled with replacement:
    how much of the pooled figure is which rounds happened to be noisy."""
    rng = random.Random(seed)
    growths = sorted(pooled_growth([rng.choice(rounds) for _ in rounds], q)[2] for _ in range(draws))
    return growths[int(0.05 * draws)], growths[int(0.95 * draws) - 1]


def load_rounds(sample_dir: str) -> dict[str, list[Round]]:
    """raw[scenario][round] = sorted samples of {"off", "on", "direct_off", "direct_on"}."""
    raw: dict[str, list[Round]] = {}
    for name in sorted(os.listdir(sample_dir)):
        parts = name.split("-")
        if len(parts) != 4:
            continue
        round_, mode, scenario, target = int(parts[0]), parts[1], parts[2], parts[3]
        rounds = raw.setdefault(scenario, [])
        while len(rounds) <= round_:
            rounds.append({})
        key = mode if target == "through" else f"direct_{mode}"
        rounds[round_][key] = read_samples(os.path.join(sample_dir, name))
    return raw


def summarize(cells: list[dict[str, Any]], raw: dict[str, list[Round]], draws: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scenario in ("json", "sse20"):
        for mode in ("off", "on"):
            picked = [c for c in cells if c["scenario"] == scenario and c["otel"] == mode]
            if not picked:
                continue
            summary[f"{scenario}_{mode}_added_p50_ms"] = statistics.median(c["added_p50_ms"] for c in picked)
            summary[f"{scenario}_{mode}_added_p99_ms"] = statistics.median(c["added_p99_ms"] for c in picked)
            for what in ("proxy", "exporter"):
                summary[f"{scenario}_{mode}_{what}_cpu_us_per_request"] = statistics.median(
                    c[f"{what}_cpu_us_per_request"] for c in picked
                )
            for what in ("proxy", "upstream"):
                key = f"{what}_run_delay_us_per_request"
                if all(key in c for c in picked):
                    summary[f"{scenario}_{mode}_{key}"] = statistics.median(c[key] for c in picked)
    # The verdict's figures: every round's samples pooled, with a bootstrap interval over rounds.
    for scenario, rounds in raw.items():
        for q in (50, 99):
            off, on, growth = pooled_growth(rounds, q)
            low, high = bootstrap(rounds, q, draws, seed=q)
            summary[f"{scenario}_pooled_added_p{q}_ms"] = {
                "off": round(off, 4),
                "on": round(on, 4),
                "growth": round(growth, 4),
                "growth_90pct_interval": [round(low, 4), round(high, 4)],
                "samples_off": sum(len(r["off"]) for r in rounds),
                "samples_on": sum(len(r["on"]) for r in rounds),
            }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples for the growth's interval")
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
    ap.add_argument(
        "--on-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more environment for the proxy with export on, to take the exporter apart "
        "(OTEL_TRACES_EXPORTER=none and OTEL_METRICS_EXPORTER=none leave the proxy's side and a "
        "child that only reads the pipe)",
    )
    ap.add_argument(
        "--analyse",
        metavar="DIR",
        help="no run: the summary again from a finished run's sample directory (its cells.jsonl)",
    )
    args = ap.parse_args()
    if args.analyse:
        with open(os.path.join(args.analyse, "cells.jsonl")) as f:
            old_cells = [json.loads(line) for line in f]
        print(json.dumps(summarize(old_cells, load_rounds(args.analyse), args.bootstrap), indent=2))
        return
    ports = iter(range(args.port_base, args.port_base + 1000)) if args.port_base else None

    def port_for() -> int:
        return next(ports) if ports is not None else free_port()

    # Not decoding: the receiver shares core 0 with the load generator and the upstream.
    receiver = OtlpReceiver(port_for() if ports is not None else 0, idle=args.receiver_idle)
    otel_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        **dict(item.split("=", 1) for item in args.on_env),
    }
    up_port = port_for()
    upstream = spawn([sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], "0")
    wait_port(up_port)
    cells: list[dict[str, Any]] = []
    # Kept after the run (its path is printed): `--analyse DIR` summarizes it again.
    sample_dir = tempfile.mkdtemp(prefix="bench-otel-samples-")
    try:
        for round_ in range(args.rounds):
            # Off first in even rounds, on first in odd ones: a drift in the machine's load
            # within a round then favours neither mode.
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                port = port_for()
                db = os.path.join(tempfile.mkdtemp(prefix="bench-otel-"), "bench.db")
                cmd = [sys.executable, "-m", "meterproxy", "serve", "--port", str(port), "--db", db]
                cmd += ["--upstream", f"bench=http://127.0.0.1:{up_port}"]
                env = {"METERPROXY_LOG_LEVEL": "warning", **(otel_env if mode == "on" else {})}
                proxy = spawn(cmd, "1", env)
                try:
                    wait_port(port)
                    for scenario, stream in (("json", False), ("sse20", True)):
                        base = os.path.join(sample_dir, f"{round_}-{mode}-{scenario}")
                        direct = load(
                            up_port, "/v1/chat/completions", stream, args.duration, base + "-direct"
                        )
                        # CPU per request: unlike latency percentiles, barely moved by other load.
                        helpers = children(proxy.pid)
                        before = cpu_s(proxy.pid), sum(cpu_s(c) for c in helpers)
                        waited = run_delay_s(proxy.pid), run_delay_s(upstream.pid)
                        through = load(
                            port, "/bench/v1/chat/completions", stream, args.duration, base + "-through"
                        )
                        after = cpu_s(proxy.pid), sum(cpu_s(c) for c in helpers)
                        waited = (
                            run_delay_s(proxy.pid) - waited[0],
                            run_delay_s(upstream.pid) - waited[1],
                        )
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
                            "proxy_run_delay_us_per_request": round(waited[0] * 1e6 / n, 2),
                            "upstream_run_delay_us_per_request": round(waited[1] * 1e6 / n, 2),
                            "errors": through["errors"],
                            "requests": through["requests"],
                        }
                        print(json.dumps(cell), flush=True)
                        cells.append(cell)
                        with open(os.path.join(sample_dir, "cells.jsonl"), "a") as f:
                            f.write(json.dumps(cell) + "\n")
                finally:
                    stop(proxy)
    finally:
        stop(upstream)
        receiver.stop()

    summary: dict[str, Any] = {
        "otlp_posts_received": receiver.posts,
        "receiver_idle": args.receiver_idle,
        "load_average": os.getloadavg(),
        "samples": sample_dir,
        **summarize(cells, load_rounds(sample_dir), args.bootstrap),
    }
    print(json.dumps(summary, indent=2))
    out = BENCH / "results" / "otel-latest.json"
    out.write_text(json.dumps({"cells": cells, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()

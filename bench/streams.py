"""Realistic load: thousands of concurrent slow streams through one meterproxy worker.

``python bench/streams.py`` (defaults: 2,000 concurrent streams of 200 events
20 ms apart, i.e. ~4 s each, 100,000 events/s in all). The same load generator
runs against the fake upstream directly, then through ``meterproxy serve`` (one
worker, pinned like `run.py`), and reports:

- time to first byte (TTFB) and whole-stream latency percentiles, direct and
  through the proxy, and what the proxy adds at p50 and p99;
- the proxy's peak RSS (sampled every 0.2 s from ``/proc``) and its CPU, and the
  CPU the load generator and the fake upstream used (is core 0 keeping up?);
- whether every usage is exact: every stream the load generator completed has
  a stored row with ``usage_source = 'reported'``, the 200 output tokens and
  12 input tokens the fake upstream reported, and the stream itself (checked by
  the load generator) carried every content event and ``[DONE]``.

Steady state, not one wave: the streams' first requests are spread over one
stream's length (``--ramp``), and only streams that end after ``--warmup`` (ramp
+ one stream + 0.5 s) count, so every counted stream started with all the others
under way; then ``--duration`` seconds (12). The load generator reads a stream's
events a few at a time after its first byte (``--read-lowat``, SO_RCVLOWAT; see
loadgen.py) so that it and the fake upstream fit on core 0 at 100,000 events/s.
Pinning: proxy on ``--proxy-cores`` (1), load generator on ``--load-cores`` (0),
fake upstream on ``--upstream-cores`` (default: the load generator's) with
``--upstream-procs`` processes. ``--direct-only`` runs the direct half alone.

Results go to ``results/streams-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from run import BENCH, RESULTS, Direct, MeterProxy, cpu_seconds, free_port, rss_mb  # type: ignore[import-not-found]

__all__ = ["main"]


def _load(port: int, path: str, args: argparse.Namespace, cores: str, upstream: list[int]) -> dict[str, Any]:
    """One load generator run; with the CPU seconds it and the fake upstream used."""
    cmd = ["taskset", "-c", cores, sys.executable, str(BENCH / "loadgen.py"), "--port", str(port)]
    cmd += ["--path", path, "--stream", "--chunks", str(args.events), "--delay-ms", str(args.delay_ms)]
    cmd += ["--concurrency", str(args.streams), "--duration", str(args.duration)]
    cmd += ["--warmup", str(args.warmup), "--ramp", str(args.ramp)]
    cmd += ["--read-lowat", str(args.read_lowat)]
    ru0, up0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(upstream)
    timeout, t0 = args.warmup + args.duration + 300, time.monotonic()
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = json.loads(out.stdout)
    result["wall_s"] = round(time.monotonic() - t0, 2)
    result["loadgen_cpu_s"] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2)
    result["upstream_cpu_s"] = round(cpu_seconds(upstream) - up0, 2)
    return result


def _peak_rss(pids: list[int], stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], sum(rss_mb(pids)))
        stop.wait(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--delay-ms", type=int, default=20)
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="spread the streams' first requests over this many seconds (default: one stream's length)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before answers count (default: ramp + one stream, so every counted stream "
        "started with all the others under way)",
    )
    ap.add_argument(
        "--read-lowat",
        type=int,
        default=8192,
        help="the load generator's SO_RCVLOWAT after a stream's first byte (loadgen.py's _Lowat; 0: off)",
    )
    ap.add_argument("--proxy-cores", default="1")
    ap.add_argument("--load-cores", default="0", help="taskset cores for the load generator")
    ap.add_argument(
        "--upstream-cores", default=None, help="cores for the fake upstream (default: --load-cores)"
    )
    ap.add_argument("--upstream-procs", type=int, default=1, help="fake upstream processes (SO_REUSEPORT)")
    ap.add_argument("--direct-only", action="store_true", help="only the load against the fake upstream")
    ap.add_argument(
        "--baseline", default=None, metavar="DIR", help="run the meterproxy of checkout DIR instead"
    )
    args = ap.parse_args()
    # One stream: the first event with the head, then events + 2 more (the finish chunk,
    # [DONE]; through the proxy also the usage chunk) delay_ms apart.
    stream_s = (args.events + 2) * args.delay_ms / 1000
    args.ramp = stream_s if args.ramp is None else args.ramp
    args.warmup = args.ramp + stream_s + 0.5 if args.warmup is None else args.warmup
    up_cores = args.upstream_cores or args.load_cores

    up_port = free_port()
    upstream = Direct(up_port)
    up_cmd = [sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)]
    upstream._spawn([*up_cmd, "--procs", str(args.upstream_procs)], up_cores)
    src = str(Path(args.baseline).resolve()) if args.baseline else None
    proxy = MeterProxy(free_port(), up_port, args.proxy_cores, 1, src, "baseline" if src else "meterproxy")
    result: dict[str, Any] = {
        "command": "python bench/streams.py " + " ".join(sys.argv[1:]),
        "pinning": {"proxy": args.proxy_cores, "loadgen": args.load_cores, "upstream": up_cores},
        "upstream_procs": args.upstream_procs,
        "ramp_s": args.ramp,
        "warmup_s": args.warmup,
        "read_lowat": args.read_lowat,
        "loadavg_before": os.getloadavg(),
    }
    up_pids = upstream.pids()
    try:
        # Started first and left idle during the direct run: `serve` answers on a first listener
        # while it builds the app, then binds the port again (connections in that gap are refused).
        if not args.direct_only:
            proxy.start()
        result["direct"] = _load(up_port, "/v1/chat/completions", args, args.load_cores, up_pids)
        result["loadavg_after_direct"] = os.getloadavg()[0]
        if args.direct_only:
            print(json.dumps(result, indent=1))
            return
        pids = proxy.pids()
        cpu0, peak, stop = cpu_seconds(pids), [0.0], threading.Event()
        sampler = threading.Thread(target=_peak_rss, args=(pids, stop, peak), daemon=True)
        sampler.start()
        result["meterproxy"] = _load(proxy.port, proxy.path, args, args.load_cores, up_pids)
        stop.set()
        sampler.join()
        result["proxy_cpu_s"] = round(cpu_seconds(pids) - cpu0, 2)
        result["proxy_peak_rss_mb"] = peak[0]
        result["loadavg_after_proxy"] = os.getloadavg()[0]
        time.sleep(2.0)  # the writer's last batch
        conn = sqlite3.connect(proxy.db)
        try:
            rows = conn.execute(
                "SELECT COUNT(*), SUM(CASE WHEN usage_source = 'reported' AND output_tokens = ? "
                "AND input_tokens = 12 THEN 1 ELSE 0 END) FROM requests",
                (args.events,),
            ).fetchone()
        finally:
            conn.close()
        completed = result["meterproxy"]["completed_total"]
        result["rows"], result["rows_with_exact_usage"] = rows[0], rows[1] or 0
        result["usage_exact"] = rows[0] == completed == (rows[1] or 0) and result["meterproxy"]["errors"] == 0
    finally:
        proxy.stop()
        upstream.stop()
    d, m = result["direct"], result["meterproxy"]

    def added(key: str) -> dict[str, float | None]:
        pairs = ((k, m[key][k], d[key][k]) for k in ("p50", "p99"))
        return {k: None if a is None or b is None else round(a - b, 3) for k, a, b in pairs}

    result["added_ttfb_ms"], result["added_latency_ms"] = added("ttfb_ms"), added("latency_ms")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"streams-{stamp}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("direct", "meterproxy")}, indent=1))
    for name in ("direct", "meterproxy"):
        r = result[name]
        print(
            name,
            r["completed_total"],
            "streams",
            r["errors"],
            "errors",
            "ttfb",
            r["ttfb_ms"],
            "lat",
            r["latency_ms"],
        )


if __name__ == "__main__":
    main()

"""CPU per proxied request, per thread and user/system, of one checkout's `meterproxy serve`.

Starts the fake upstream (core 0), the proxy of ``--src`` (core 1) and the load
generator (core 0), runs ``--rounds`` rounds of load and prints, per round, the
proxy's CPU microseconds per request from ``/proc`` (``utime``/``stime`` of each
thread: ``main`` is the event loop, the others are the store writer and helpers).
``--pyspy FILE`` records the first round with py-spy (``--gil``, raw format) for
`bench/stages.py`. Two checkouts measured alternately is the A/B this machine allows
with CPU time; `bench/instructions.sh` gives instruction counts that do not move.

    python bench/cpu_split.py --src . --rounds 2
    python bench/cpu_split.py --src ../old-checkout --rounds 2
    python bench/cpu_split.py --src . --pyspy /tmp/spy.txt && python bench/stages.py /tmp/spy.txt MAIN WRITER
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread (``main`` is the process's first thread) and user/system."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        name = "main" if tid == str(pid) else f"t{tid}"
        out[f"{name}.user"] = int(fields[11]) / TICK
        out[f"{name}.sys"] = int(fields[12]) / TICK
    return out


def _wait_port(port: int) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=".")
    ap.add_argument("--port", type=int, default=24002, help="the proxy's; the upstream's is one less")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument(
        "--delay-ms",
        type=int,
        default=0,
        help="paced streams: events this far apart (each its own read and write); CPU is then "
        "divided over every stream the round completed, and also given per event (the bench "
        "upstream's stream is --chunks content events plus role, stop, usage and [DONE])",
    )
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pyspy", default="", metavar="FILE")
    args = ap.parse_args()
    src = str(Path(args.src).resolve())
    up = args.port - 1
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], cores: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["taskset", "-c", cores, *cmd],
            env={**os.environ, **(env or {})},
            cwd=src,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    try:
        spawn([sys.executable, str(BENCH / "upstream.py"), "--port", str(up)], "0")
        _wait_port(up)
        db = Path(tempfile.mkdtemp(prefix="cpu-split-")) / "b.db"
        serve = [sys.executable, "-c", "from meterproxy.cli import main; main()", "serve"]
        serve += ["--port", str(args.port), "--db", str(db), "--upstream", f"bench=http://127.0.0.1:{up}"]
        proxy = spawn(serve, "1", {"PYTHONPATH": src, "METERPROXY_LOG_LEVEL": "warning"})
        _wait_port(args.port)
        load = [sys.executable, str(BENCH / "loadgen.py"), "--port", str(args.port)]
        load += ["--path", "/bench/v1/chat/completions", "--warmup", "0"]
        load += ["--concurrency", str(args.concurrency)]
        if args.stream:
            load += ["--stream", "--chunks", str(args.chunks)]
        if args.delay_ms:
            load += ["--delay-ms", str(args.delay_ms)]
        subprocess.run(["taskset", "-c", "0", *load, "--duration", "1"], capture_output=True, check=True)
        for i in range(args.rounds):
            spy = None
            if args.pyspy and i == 0:
                spy_cmd = ["py-spy", "record", "--gil", "--threads", "--nonblocking", "-r", "500"]
                spy = subprocess.Popen(
                    [*spy_cmd, "-f", "raw", "-o", args.pyspy, "-p", str(proxy.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            before = _threads(proxy.pid)
            run = subprocess.run(
                ["taskset", "-c", "0", *load, "--duration", str(args.duration)],
                capture_output=True,
                text=True,
                check=True,
            )
            after = _threads(proxy.pid)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            result = json.loads(run.stdout.strip().splitlines()[-1])
            # Paced streams outlast the window's edges: the CPU measured covers every stream
            # the round completed (those in flight at its end are awaited), not only those counted.
            n = result["completed_total"] if args.delay_ms else result["requests"]
            per = {k: round((after[k] - before.get(k, 0.0)) / n * 1e6, 1) for k in after}
            print(
                json.dumps(
                    {
                        "src": src,
                        "requests": n,
                        "rps": result["rps"],
                        "cpu_us_per_request": round(sum(per.values()), 1),
                        **(
                            {"cpu_us_per_event": round(sum(per.values()) / (args.chunks + 4), 2)}
                            if args.delay_ms
                            else {}
                        ),
                        "threads_us": {k: v for k, v in per.items() if v},
                        "loadavg_1m": os.getloadavg()[0],
                        "errors": result["errors"],
                    }
                ),
                flush=True,
            )
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()

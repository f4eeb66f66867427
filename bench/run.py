"""One command for the proxy benchmark: the same load against direct, meterproxy and LiteLLM.

Usage::

    python bench/run.py            # full matrix, about 10-12 minutes
    python bench/run.py --quick    # a smaller matrix, under 2 minutes
    python bench/run.py --targets direct,meterproxy --workers 2
    python bench/run.py --memory 200000   # long soak: RSS over 200,000 requests
    python bench/run.py --writer          # SQLite writer rows/s only

Pinning (2-core machine): the proxy under test runs on core 1 (``taskset -c 1``),
the fake upstream and the load generator share core 0 (``taskset -c 0``), so
the proxy never fights its own load for a core. With ``--workers N`` the
proxy gets cores ``1..N`` when the machine has them (here it shares core 1,
or all cores with ``--workers-cores``).

For every target, scenario (JSON, SSE with 20/200 chunks, 0/10 ms apart) and
concurrency (1, 16, 64, 256) it runs `loadgen.py` in its own process and
samples the proxy's CPU seconds (``/proc/<pid>/stat`` utime+stime, all its
processes) and RSS. Results go to ``bench/results/<stamp>.json`` and
``latest.json``, and the tables in bench/README.md between the
``proxy-results`` markers are rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LITELLM = BENCH / ".venv-litellm" / "bin" / "litellm"

# name -> (stream, chunks, delay_ms)
SCENARIOS: dict[str, tuple[bool, int, int]] = {
    "json": (False, 0, 0),
    "sse20": (True, 20, 0),
    "sse200": (True, 200, 0),
    "sse20-10ms": (True, 20, 10),
    "sse200-10ms": (True, 200, 10),
}
FULL_CONC = [1, 16, 64, 256]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / tick


def rss_mb(pids: list[int]) -> list[float]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        out.append(round(int(line.split()[1]) / 1024, 1))
        except OSError:
            pass
    return out


class Target:
    name = ""
    path = "/v1/chat/completions"
    auth = "sk-bench-not-a-key"

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        prefix = f"bench-{type(self).__name__}-"
        self.log = tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log", delete=False)  # noqa: SIM115

    def start(self) -> None: ...

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def _spawn(
        self, cmd: list[str], cores: str, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        full = ["taskset", "-c", cores, *cmd] if shutil.which("taskset") else cmd
        self.proc = subprocess.Popen(
            full,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        wait_port(self.port, self.proc)


class Direct(Target):
    name = "direct"


class MeterProxy(Target):
    name = "meterproxy"
    path = "/bench/v1/chat/completions"

    def __init__(
        self, port: int, upstream: int, cores: str, workers: int, src: str | None = None, name: str = ""
    ) -> None:
        super().__init__(port)
        self.upstream, self.cores, self.workers = upstream, cores, workers
        # Another checkout's meterproxy (``--baseline DIR``), run side by side with this one.
        self.src = src
        self.name = name or self.name
        self.dir = tempfile.mkdtemp(prefix="bench-meterproxy-")
        self.db = os.path.join(self.dir, "bench.db")

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-c",
            # BENCH_PRELUDE: Python run first, for trying a lever without editing the code.
            os.environ.get("BENCH_PRELUDE", "") + "\nfrom meterproxy.cli import main; main()",
            "serve",
            "--port",
            str(self.port),
            "--db",
            self.db,
            "--upstream",
            f"bench=http://127.0.0.1:{self.upstream}",
        ]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        env = {"METERPROXY_LOG_LEVEL": "warning"}
        if self.src:
            env["PYTHONPATH"] = self.src
        self._spawn(cmd, self.cores, env=env, cwd=self.src)

    def rows(self) -> int:
        import sqlite3

        conn = sqlite3.connect(self.db)
        try:
            return int(conn.execute("SELECT count(*) FROM requests").fetchone()[0])
        finally:
            conn.close()


class Ceiling(Target):
    """The leanest Python forwarder, no metering (``--ceiling FILE``: ../shared/ceiling/raw_forwarder.py)."""

    name = "ceiling"

    def __init__(self, port: int, upstream: int, cores: str, script: str) -> None:
        super().__init__(port)
        self.upstream, self.cores, self.script = upstream, cores, script

    def start(self) -> None:
        self._spawn([sys.executable, self.script, str(self.port), str(self.upstream)], self.cores)


class LiteLLM(Target):
    name = "litellm"

    def __init__(self, port: int, upstream: int, cores: str) -> None:
        super().__init__(port)
        self.upstream, self.cores = upstream, cores
        self.dir = tempfile.mkdtemp(prefix="bench-litellm-")
        self.auth = "sk-" + secrets.token_hex(24)

    def start(self) -> None:
        lines = ["model_list:"]
        for _stream, chunks, delay in SCENARIOS.values():
            model = f"bench-s{chunks}-d{delay}"
            if f" {model}\n" in "\n".join(lines) + "\n":
                continue
            lines += [
                f"  - model_name: {model}",
                "    litellm_params:",
                f"      model: openai/{model}",
                f"      api_base: http://127.0.0.1:{self.upstream}/v1",
                "      api_key: sk-bench",
            ]
        lines += ["litellm_settings:", "  telemetry: false", "  json_logs: false"]
        cfg = os.path.join(self.dir, "config.yaml")
        Path(cfg).write_text("\n".join(lines) + "\n")
        env = {"LITELLM_MASTER_KEY": self.auth, "LITELLM_LOG": "ERROR", "DATABASE_URL": ""}
        env.pop("DATABASE_URL")
        self._spawn(
            [str(LITELLM), "--config", cfg, "--host", "127.0.0.1", "--port", str(self.port)],
            self.cores,
            env=env,
            cwd=self.dir,
        )


def install_litellm() -> str | None:
    """Create ``bench/.venv-litellm`` with ``litellm[proxy]`` (its own venv, never ours).

    Returns None when it is ready, else why not (the exact error, for the results).
    """
    venv = LITELLM.parent.parent
    print(f"installing litellm[proxy] into {venv} (once) ...", flush=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300
        )
        pip = [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"]
        subprocess.run(pip, check=True, capture_output=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        return f"installing litellm[proxy] failed: {(exc.stderr or b'').decode(errors='replace')[-1500:]}"
    except subprocess.TimeoutExpired as exc:
        return f"installing litellm[proxy] timed out: {exc}"
    return None if LITELLM.exists() else f"{LITELLM} missing after installing litellm[proxy]"


def run_cell(target: Target, scenario: str, conc: int, duration: float, load_cores: str) -> dict[str, Any]:
    stream, chunks, delay = SCENARIOS[scenario]
    if delay:
        duration = max(duration, 2.5 * (chunks + 2) * delay / 1000)
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--port", str(target.port), "--path", target.path]
    cmd += ["--chunks", str(chunks), "--delay-ms", str(delay), "--concurrency", str(conc)]
    cmd += ["--duration", str(duration), "--warmup", "0.5", "--auth", target.auth]
    if stream:
        cmd.append("--stream")
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", load_cores, *cmd]
    pids = target.pids()
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(cmd, capture_output=True, timeout=duration + 120, check=True)
    cpu = cpu_seconds(pids) - cpu0
    result: dict[str, Any] = json.loads(out.stdout)
    result.update(target=target.name, scenario=scenario, concurrency=conc)
    if target.proc is not None:
        done = max(int(result["completed_total"]), 1)
        result["proxy_cpu_s_per_1k"] = round(cpu / done * 1000, 3)
        result["proxy_rss_mb"] = rss_mb(pids)
    return result


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario x concurrency: meterproxy vs direct and vs LiteLLM."""
    by = {(c["target"], c["scenario"], c["concurrency"]): c for c in cells}
    rows = []
    for (target, scenario, conc), mp in by.items():
        if target != "meterproxy":
            continue
        d = by.get(("direct", scenario, conc))
        ll = by.get(("litellm", scenario, conc))
        base = by.get(("baseline", scenario, conc))
        ceiling = by.get(("ceiling", scenario, conc))
        row: dict[str, Any] = {"scenario": scenario, "concurrency": conc, "meterproxy_rps": mp["rps"]}
        if d and d["requests"] and mp["requests"]:
            row["direct_rps"] = d["rps"]
            row["rps_vs_direct"] = round(mp["rps"] / d["rps"], 3) if d["rps"] else None
            for k in ("p50", "p99"):
                row[f"added_{k}_ms"] = round(mp["latency_ms"][k] - d["latency_ms"][k], 3)
            row["added_ttfb_p50_ms"] = round(mp["ttfb_ms"]["p50"] - d["ttfb_ms"]["p50"], 3)
        if ll and ll["requests"]:
            row["litellm_rps"] = ll["rps"]
            row["rps_vs_litellm"] = round(mp["rps"] / ll["rps"], 1)
            row["litellm_added_p50_ms"] = (
                round(ll["latency_ms"]["p50"] - d["latency_ms"]["p50"], 3) if d and d["requests"] else None
            )
        if base and base["requests"]:
            row["baseline_rps"] = base["rps"]
            row["baseline_cpu_s_per_1k"] = base.get("proxy_cpu_s_per_1k")
            if base.get("proxy_cpu_s_per_1k") and mp.get("proxy_cpu_s_per_1k"):
                row["cpu_vs_baseline"] = round(mp["proxy_cpu_s_per_1k"] / base["proxy_cpu_s_per_1k"], 3)
        if ceiling and ceiling["requests"] and d and d["rps"]:
            row["ceiling_vs_direct"] = round(ceiling["rps"] / d["rps"], 3)
            row["ceiling_cpu_s_per_1k"] = ceiling.get("proxy_cpu_s_per_1k")
        row["loadavg_1m"] = mp.get("loadavg_1m")
        row["cpu_s_per_1k"] = mp.get("proxy_cpu_s_per_1k")
        row["rss_mb"] = mp.get("proxy_rss_mb")
        row["errors"] = mp["errors"]
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return "+".join(str(x) for x in v)
    return str(v)


def tables(result: dict[str, Any]) -> str:
    head = (
        f"Run {result['stamp']} ({result['mode']}, workers={result['workers']}; "
        f"{result['machine']}). Command: `{result['command']}`\n\n"
    )
    cols = [
        ("scenario", "scenario"),
        ("concurrency", "conc"),
        ("direct_rps", "direct req/s"),
        ("meterproxy_rps", "meterproxy req/s"),
        ("litellm_rps", "LiteLLM req/s"),
        ("rps_vs_direct", "mp/direct"),
        ("rps_vs_litellm", "mp/LiteLLM"),
        ("added_p50_ms", "added p50 ms"),
        ("added_p99_ms", "added p99 ms"),
        ("added_ttfb_p50_ms", "added TTFB p50 ms"),
        ("litellm_added_p50_ms", "LiteLLM added p50 ms"),
        ("cpu_s_per_1k", "mp CPU s/1k req"),
        ("baseline_cpu_s_per_1k", "baseline CPU s/1k req"),
        ("cpu_vs_baseline", "mp CPU / baseline"),
        ("ceiling_vs_direct", "ceiling/direct"),
        ("ceiling_cpu_s_per_1k", "ceiling CPU s/1k req"),
        ("loadavg_1m", "load avg"),
        ("rss_mb", "mp RSS MB"),
        ("errors", "mp errors"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in result["summary"]:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
    raw = ["", "All cells (latency and TTFB in ms):", ""]
    raw.append("| target | scenario | conc | req/s | p50 | p90 | p99 | TTFB p50 | TTFB p99 | errors |")
    raw.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in result["cells"]:
        lat, tt = c["latency_ms"], c["ttfb_ms"]
        raw.append(
            f"| {c['target']} | {c['scenario']} | {c['concurrency']} | {c['rps']} | {_fmt(lat['p50'])} | "
            f"{_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(tt['p50'])} | {_fmt(tt['p99'])} | "
            f"{c['errors']} |"
        )
    notes = [f"- {n}" for n in result.get("notes", [])]
    return head + "\n".join(lines + raw) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def update_readme(marker: str, text: str) -> None:
    readme = BENCH / "README.md"
    if not readme.exists():
        return
    content = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in content or end not in content:
        return
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(before + start + "\n" + text + end + after)


def save(result: dict[str, Any], kind: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{kind}-{result['stamp']}.json"
    path.write_text(json.dumps(result, indent=1))
    (RESULTS / f"{kind}-latest.json").write_text(json.dumps(result, indent=1))
    return path


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description="meterproxy benchmark: direct vs meterproxy vs LiteLLM.")
    ap.add_argument("--quick", action="store_true", help="smaller matrix, under 2 minutes")
    ap.add_argument("--targets", default="direct,meterproxy,litellm")
    ap.add_argument("--scenarios", default=None, help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument("--concurrency", default=None, help="comma list, e.g. 1,64")
    ap.add_argument("--duration", type=float, default=None, help="seconds per cell after warm-up")
    ap.add_argument("--workers", type=int, default=1, help="meterproxy serve --workers N")
    ap.add_argument("--baseline", default=None, metavar="DIR", help="also run the meterproxy of checkout DIR")
    ap.add_argument("--ceiling", default=None, metavar="FILE", help="also run this raw forwarder script")
    ap.add_argument("--proxy-cores", default="1", help="taskset cores for the proxy under test")
    ap.add_argument("--load-cores", default="0", help="taskset cores for upstream + load generator")
    ap.add_argument("--memory", type=int, default=0, metavar="N", help="soak: N requests, RSS sampled")
    ap.add_argument("--writer", action="store_true", help="SQLite writer rows/s only")
    args = ap.parse_args()

    if args.writer:
        from writerbench import main as writer_main  # type: ignore[import-not-found]

        writer_main()
        return
    if args.memory:
        from soak import soak  # type: ignore[import-not-found]

        soak(args.memory, proxy_cores=args.proxy_cores, load_cores=args.load_cores, workers=args.workers)
        return

    quick = args.quick
    scenarios = (args.scenarios or ("json,sse20,sse20-10ms" if quick else ",".join(SCENARIOS))).split(",")
    concs = [int(c) for c in (args.concurrency or ("1,64" if quick else "1,16,64,256")).split(",")]
    duration = args.duration or (1.5 if quick else 4.0)
    targets = args.targets.split(",")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    notes: list[str] = []

    up_port = free_port()
    upstream = Direct(up_port)
    upstream._spawn([sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], args.load_cores)
    cells: list[dict[str, Any]] = []
    running: list[Target] = []
    try:
        for name in targets:
            target: Target
            if name == "direct":
                target = upstream
            elif name == "meterproxy":
                target = MeterProxy(free_port(), up_port, args.proxy_cores, args.workers)
            elif name == "baseline":
                if not args.baseline:
                    raise SystemExit("--targets baseline needs --baseline DIR")
                src = str(Path(args.baseline).resolve())
                target = MeterProxy(free_port(), up_port, args.proxy_cores, args.workers, src, "baseline")
            elif name == "ceiling":
                if not args.ceiling:
                    raise SystemExit("--targets ceiling needs --ceiling FILE")
                target = Ceiling(free_port(), up_port, args.proxy_cores, str(Path(args.ceiling).resolve()))
            elif name == "litellm":
                why = install_litellm() if not LITELLM.exists() else None
                if why:
                    notes.append(f"LiteLLM not run: {why}")
                    continue
                target = LiteLLM(free_port(), up_port, args.proxy_cores)
            else:
                raise SystemExit(f"unknown target {name}")
            try:
                if target is not upstream:
                    target.start()
                running.append(target)
            except RuntimeError as exc:
                tail = Path(target.log.name).read_text()[-2000:]
                notes.append(f"{name} did not start: {exc}: {tail}")
        # Cell-major: the targets take turns on each cell, so a burst of other load on
        # the machine hits all of them alike instead of skewing one target's ratios.
        for scenario in scenarios:
            for conc in concs:
                for target in running:
                    cell = run_cell(target, scenario, conc, duration, args.load_cores)
                    cell["loadavg_1m"] = os.getloadavg()[0]
                    if target is upstream:
                        cell.pop("proxy_cpu_s_per_1k", None)
                        cell.pop("proxy_rss_mb", None)
                    cells.append(cell)
                    print(
                        f"{target.name:10} {scenario:12} c={conc:<4} {cell['rps']:>9} req/s  "
                        f"p50 {cell['latency_ms']['p50']} p99 {cell['latency_ms']['p99']} "
                        f"ttfb50 {cell['ttfb_ms']['p50']} err {cell['errors']} "
                        f"cpu/1k {cell.get('proxy_cpu_s_per_1k')} rss {cell.get('proxy_rss_mb')}",
                        flush=True,
                    )
        for target in running:
            if isinstance(target, MeterProxy):
                time.sleep(1.0)
                sent = sum(c["completed_total"] for c in cells if c["target"] == target.name)
                notes.append(f"{target.name} answered {sent} requests and recorded {target.rows()} rows")
    finally:
        for target in running:
            if target is not upstream:
                target.stop()
        upstream.stop()

    result = {
        "stamp": stamp,
        "mode": "quick" if quick else "full",
        "workers": args.workers,
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "pinning": {"proxy": args.proxy_cores, "upstream+load": args.load_cores},
        "loadavg_end": os.getloadavg(),
        "cells": cells,
        "summary": summarize(cells),
        "notes": notes,
    }
    path = save(result, "proxy")
    text = tables(result)
    print(text)
    print(f"saved {path}")
    if not args.scenarios and not args.concurrency and args.targets == "direct,meterproxy,litellm":
        update_readme("proxy-results-quick" if quick else "proxy-results", text)


if __name__ == "__main__":
    main()

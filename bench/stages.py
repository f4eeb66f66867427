"""Where a proxied request's CPU goes, by stage, from a py-spy profile of `meterproxy serve`.

Record the proxy under load with py-spy counting only samples that hold the GIL (so a
thread waiting for the GIL, or the writer inside SQLite with the GIL released, is not
counted as work), raw format, every thread::

    py-spy record --gil --threads --nonblocking -r 500 -f raw -o /tmp/spy.txt -p PID

then split the event loop thread's samples by the stage of their innermost frame and
scale them by the CPU microseconds per request measured in the same run (``/proc``:
``utime + stime`` of the threads over the requests answered)::

    python bench/stages.py /tmp/spy.txt MAIN_US WRITER_US

A transport's ``write`` holds the GIL through its ``send`` system call, so that stage
carries the kernel's share of sending; uvloop's own C work (epoll, the socket reads,
running callbacks) shows as the event loop's frame. The writer thread's split is by
GIL-held samples, which undercounts the SQLite inserts (they run with the GIL released).
"""

from __future__ import annotations

import collections
import re
import sys
from collections.abc import Callable

__all__ = ["main", "stage_of"]

_Rule = tuple[Callable[[str], bool], str]

RULES: list[_Rule] = [
    (
        lambda f: f.startswith(("_Conn.send ", "_Connection.send ")),
        "socket writes (transport.write: the send system call)",
    ),
    (lambda f: "_has_pending_bytes" in f, "upstream client"),
    (lambda f: "(metrics.py)" in f or "prometheus_client" in f, "metrics sink"),
    (lambda f: "(server.py)" in f, "lean server: llhttp callbacks, request, answer head"),
    (lambda f: "(upstream.py)" in f, "upstream client"),
    (
        lambda f: any(m in f for m in ("(tap.py)", "(openai.py)", "(sse.py)", "(base.py)")),
        "inspect the request body, tap the answer (orjson, usage)",
    ),
    (
        lambda f: (
            ("(meter.py)" in f and "price" in f)
            or any(m in f for m in ("(pricing", "(plausibility.py)", "(money.py)"))
        ),
        "pricing",
    ),
    (lambda f: any(m in f for m in ("(spend.py)", "(reserve.py)", "(gate.py)")), "budgets"),
    (
        lambda f: any(
            m in f
            for m in ("(attribution.py)", "(usage.py)", "__create_fn__", "(credentials.py)", "(timestamps")
        ),
        "the record (id, time, attribution, scrub)",
    ),
    (
        lambda f: any(m in f for m in ("(writer.py)", "(queue.py)", "(threading.py)")),
        "hand-off to the writer (queue put)",
    ),
    (
        lambda f: any(m in f for m in ("(proxy.py)", "(meter.py)", "(exchange.py)", "(routing.py)")),
        "the exchange coroutine (proxy.py, meter.py)",
    ),
    (
        lambda f: any(m in f for m in ("(tasks.py)", "(events.py)", "(futures.py)", "(base_events.py)")),
        "asyncio tasks and futures (their Python part)",
    ),
    (lambda f: "Runner.run" in f or f.startswith("run ("), "event loop in C (uvloop: epoll, reads)"),
]


def _short(frame: str) -> str:
    """``Proxy.run (/x/meterproxy/proxy.py:418)`` -> ``Proxy.run (proxy.py)``."""
    return re.sub(r" \((.*?):\d+\)", lambda m: " (" + m.group(1).split("/")[-1] + ")", frame)


def stage_of(leaf: str) -> str:
    for matches, stage in RULES:
        if matches(leaf):
            return stage
    return "other: " + leaf


def main() -> None:
    path, main_us, writer_us = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    loop: collections.Counter[str] = collections.Counter()
    writer: collections.Counter[str] = collections.Counter()
    with open(path, encoding="utf-8") as raw:
        lines = raw.read().splitlines()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        n = int(count)
        thread, *frames = stack.split(";")
        short = [_short(f) for f in frames]
        if "StoreWriter._run (writer.py)" in short:
            if any("record_to_row" in f for f in short):
                writer["row conversion (record_to_row)"] += n
            elif any(k in f for f in short for k in ("insert_many", "transaction", "lock_request_order")):
                writer["SQLite inserts and commit (GIL-held part)"] += n
            else:
                writer["linger, queue, GIL slices, commit listeners"] += n
        elif short and "MainThread" in thread:
            loop[stage_of(short[-1])] += n
    total_loop, total_writer = sum(loop.values()), sum(writer.values())
    print(f"event loop thread: {total_loop} samples; writer thread: {total_writer} samples\n")
    print("| stage (event loop thread) | share | ≈ µs per request |\n|---|---|---|")
    small = 0
    for stage, n in loop.most_common():
        if n / total_loop < 0.005:
            small += n
            continue
        print(f"| {stage} | {n / total_loop:.0%} | {n / total_loop * main_us:.1f} |")
    print(f"| (smaller items) | {small / total_loop:.0%} | {small / total_loop * main_us:.1f} |")
    print("\n| stage (writer thread) | share | ≈ µs per request |\n|---|---|---|")
    for stage, n in writer.most_common():
        print(f"| {stage} | {n / total_writer:.0%} | {n / total_writer * writer_us:.1f} |")


if __name__ == "__main__":
    main()

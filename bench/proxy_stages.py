"""Instructions per JSON request of the whole proxy path in one process, under callgrind.

``bench/instructions.sh`` counts the event loop of a real ``serve`` under load
(minutes per run, and the count moves a little with how many requests each loop
turn serves); ``bench/lean_stages.py`` counts the lean server and the upstream
client alone, with a stub proxy. This runs everything between the two sockets
in-process: the real app (``create_app``: store writer, meter, pricing,
metrics, as ``serve`` builds it; the writer's thread stopped, so records only
queue), a lean-server connection fed the load
generator's JSON request by ``data_received``, the real `Proxy` (callback relay,
tap, record, sinks) and the upstream client on a pooled connection (a
socketpair, so the reuse ``poll`` is real) fed the bench upstream's JSON answer.
Transports are stubs (their writes are dropped): uvloop's reads, writes and
``epoll`` are not counted, the rest of a request's Python is. Seconds per run,
the same figure every run::

    bash bench/proxy_stages.sh DIR [N]

(or by hand: ``CG=1 valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes
python bench/proxy_stages.py N``; ``PROFILE=FILE python bench/proxy_stages.py N``
writes a cProfile of the N requests instead).
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from lean_stages import _Transport
from upstream import _JSON_RESPONSE

from meterproxy import server as lean
from meterproxy import upstream as up
from meterproxy.app import create_app
from meterproxy.app_state import PROXY, WRITER
from meterproxy.settings import load_settings

UPSTREAM = ("http", "127.0.0.1", 24021)
# The load generator's request (bench/loadgen.py), byte for byte.
BODY = (
    b'{"model":"bench-s0-d0","messages":[{"role":"user","content":"Say hello in a few words."}],'
    b'"stream":false,"user":"bench"}'
)
REQUEST = (
    b"POST /bench/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:24022\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-bench-not-a-key\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)


async def main(n: int) -> None:
    tmp = tempfile.mkdtemp(prefix="proxy-stages-")
    settings = load_settings(
        None, cli={"db": f"{tmp}/b.db", "upstreams": {"bench": "http://127.0.0.1:24021"}, "port": 24022}
    )
    app = create_app(settings)
    server = lean.LeanServer(app)
    await server._runner.setup()  # the app's startup, as `LeanServer.start` runs it (no socket)
    server._proxy = app[PROXY]
    # The writer thread stopped: records only queue (`StoreWriter.submit` as ever). Running, it
    # takes the GIL from the loop at its own moments and the loop's count moved by 3%.
    app[WRITER].close()
    gc.freeze()  # as `serve` does after startup (`meterproxy.runtime.freeze_after_startup`)
    conn = lean._Conn(server)
    conn.connection_made(_Transport())
    client = server.proxy.client
    a, _b = socket.socketpair()
    pooled = up._Connection(client, UPSTREAM)
    pooled.connection_made(_Transport(a))
    client._open.add(pooled)
    client._pool_put(pooled)
    written = 0

    async def step() -> None:
        conn.data_received(REQUEST)  # the request is in: routed, inspected, sent upstream
        pooled.data_received(_JSON_RESPONSE)  # the answer is in: its head's future is done
        await asyncio.sleep(0)  # the callback relays, taps, records
        assert conn.active is None, "the answer did not end in one loop turn"

    for _ in range(20):
        await step()
    profile: Any = None
    if os.environ.get("CG"):
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=False)
    elif os.environ.get("PROFILE"):
        profile = cProfile.Profile()
        profile.enable()
    t = time.perf_counter()
    for _ in range(n):
        await step()
    elapsed = time.perf_counter() - t
    if os.environ.get("CG"):
        subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True, check=False)
    elif profile is not None:
        profile.disable()
        profile.dump_stats(os.environ["PROFILE"])
    written = app[PROXY].meter.finished
    print(f"{elapsed / max(n, 1) * 1e6:.2f} µs per request (wall), {written} finished", file=sys.stderr)
    await server._runner.cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))

"""Instructions per request of the lean server's and the upstream client's own work, under callgrind.

``bench/instructions.sh`` counts the whole event loop; this counts only the two
stages ``meterproxy/server.py`` and ``meterproxy/upstream.py`` own, in-process
with no sockets to the outside: the lean server's `_Conn` is fed the load
generator's JSON request (4 headers, a 100-byte body) by ``data_received`` and
answers it through a stub proxy (memoized route, no metering: the stub relays a
200 with the bench upstream's headers at once); the upstream client sends a
request on a pooled connection (a socketpair, so the reuse ``poll`` is real)
and is fed the bench upstream's JSON answer, then the answer is taken and the
connection pooled again. Transports are stubs (their writes are dropped), so no
system call but the ``poll`` is counted. Each stage is a few seconds under
valgrind, where ``instructions.sh`` takes minutes::

    bash bench/lean_stages.sh DIR [server|upstream] [N]

(or by hand: ``CG=1 valgrind --tool=callgrind --instr-atstart=no python
bench/lean_stages.py N server``, then ``callgrind_annotate``: instrumentation
is switched on for the N requests only).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import uvloop

from meterproxy import server as lean
from meterproxy import upstream as up
from meterproxy.body_budget import BodyBudget
from meterproxy.routing import Target, make_upstream, route

BODY = b'{"model":"bench-s0-d0","messages":[{"role":"user","content":"hi"}],"stream":false,"user":"bench"}'
REQUEST = (
    b"POST /bench/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:24022\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)
ANSWER_BODY = b'{"id":"chatcmpl-bench","object":"chat.completion","usage":{"prompt_tokens":12}}' * 5
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(ANSWER_BODY),
    ANSWER_BODY,
)
UPSTREAMS = {"bench": make_upstream("bench", "http://127.0.0.1:24021")}
WIRE = b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"


class _Transport(asyncio.Transport):
    def __init__(self, sock: socket.socket | None = None) -> None:
        super().__init__()
        self.sock = sock

    def write(self, data: Any) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Proxy:
    """What the lean server asks of `meterproxy.proxy.Proxy`, and a relay that answers at once."""

    body_timeout = 60.0
    max_body_bytes = 32 * 1024 * 1024

    def __init__(self) -> None:
        self.body_budget = BodyBudget(256 * 1024 * 1024)
        self._routes: dict[str, Target] = {}
        self._headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(ANSWER_BODY)),
        ]

    def route(self, raw_path: str, raw_query: str) -> Target:
        target = self._routes.get(raw_path)
        if target is None:
            target = self._routes[raw_path] = route(raw_path, raw_query, UPSTREAMS)
        return target

    def begin_raw(self, *args: Any) -> tuple[Any, ...]:
        return args

    def relay_soon(self, exchange: Any, client: Any, done: Any, loop: Any) -> None:
        client.start_now(200, b"OK", self._headers)
        client.write_now(ANSWER_BODY)
        client.end_now()
        done()


class _Server:
    def __init__(self) -> None:
        self.proxy = _Proxy()
        self.connections: set[Any] = set()
        self.app: dict[str, Any] = {}

    @staticmethod
    def is_app_path(path: str) -> bool:
        return path == "/" or path.startswith("/api/")


async def main(n: int, stage: str) -> None:
    conn = lean._Conn(_Server())  # type: ignore[arg-type]
    conn.connection_made(_Transport())
    client = up.UpstreamClient()
    a, _b = socket.socketpair()
    pooled = up._Connection(client, ("http", "127.0.0.1", 24021))
    pooled.connection_made(_Transport(a))
    client._open.add(pooled)
    client._pool_put(pooled)
    url = route("/bench/v1/chat/completions", "", UPSTREAMS).url

    def server() -> None:
        conn.data_received(REQUEST)

    def upstream() -> None:
        sent = client.send_pooled("POST", url, WIRE, BODY)
        assert sent is not None
        pooled.data_received(ANSWER)
        assert sent.ready()
        response = sent.response()
        response.take()
        response.release()

    step = {"server": server, "upstream": upstream}[stage]
    step()
    if os.environ.get("CG"):
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=False)
    t = time.perf_counter()
    for i in range(n):
        step()
        if i % 1000 == 0:
            await asyncio.sleep(0)
    elapsed = time.perf_counter() - t
    if os.environ.get("CG"):
        subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True, check=False)
    print(f"{stage}: {elapsed / max(n, 1) * 1e6:.2f} µs per request (wall)", file=sys.stderr)


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "server"))

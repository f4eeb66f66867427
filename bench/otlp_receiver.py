"""A discarding OTLP/HTTP receiver for the OpenTelemetry benches: answers every POST 200.

One receiver for every bench that needs an endpoint for the exporter (`otel_overhead.py`,
`otel_export_cpu.py`, and ``bench/instructions.sh`` with export on): a thread of the calling
process, or a process of its own from the command line. It counts POSTs and, with ``decode``,
parses trace requests with the official ``opentelemetry-proto`` messages and counts their spans
(as a collector would; costs CPU, so off where the receiver shares cores with a latency
measurement).

    python bench/otlp_receiver.py --port P [--decode]     # until SIGTERM / Ctrl-C; prints counts
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OtlpReceiver:
    """``ThreadingHTTPServer`` on 127.0.0.1:``port`` (0: any free port), served from a daemon thread."""

    def __init__(self, port: int = 0, *, decode: bool = False, idle: bool = False) -> None:
        self.posts = 0
        self.spans = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as collectors answer: HTTP/1.0 closed every connection, so every POST
            # paid a connect and a handler thread on both sides, work no real receiver asks for.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                n = 0
                if decode and self.path.endswith("/v1/traces") and not self.headers.get("content-encoding"):
                    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                        ExportTraceServiceRequest,
                    )

                    msg = ExportTraceServiceRequest()
                    msg.ParseFromString(body)
                    n = sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)
                with receiver._lock:
                    receiver.posts += 1
                    receiver.spans += n
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._idle = idle
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self._idle:
            # Linux: pid 0 is the calling thread; the handler threads it starts inherit the policy.
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--decode", action="store_true", help="parse trace requests and count their spans")
    args = ap.parse_args()
    receiver = OtlpReceiver(args.port, decode=args.decode)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    receiver.stop()
    print(json.dumps({"posts": receiver.posts, "spans": receiver.spans}), flush=True)


if __name__ == "__main__":
    main()

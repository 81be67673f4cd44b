"""A stand-in for ``python -m service worker``: serves /healthz /readyz /metrics /status
on the socket its supervisor passes, and behaves as ``FAKE_WORKER_MODE`` says, so that
the supervisor's process handling and HTTP surface can be tested without a broker.

``python fake_worker.py INDEX FD SHUTDOWN_TIMEOUT_S`` (its /status shows the deadline it
was handed and the environment's SHUTDOWN_TIMEOUT); FAKE_WORKER_MODE (default ``ready``):
``ready``; ``not_ready:<i>`` (worker i answers /readyz with 503, a failing output);
``ignore_term`` (SIGTERM is ignored: only SIGKILL ends it); ``crash`` (exits 3 at once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def main() -> None:
    index, fd, shutdown_timeout_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    mode = os.environ.get("FAKE_WORKER_MODE", "ready")
    if mode == "crash":
        sys.exit(3)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready = mode != f"not_ready:{index}"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/readyz":
                checks = {"bus": "ok", "postgres": "ok" if ready else "ConnectionRefusedError"}
                self._send(200 if ready else 503, {"checks": checks})
            elif self.path == "/status":
                self._send(
                    200,
                    {
                        "phase": "running",
                        "index": index,
                        "events_received": 7,
                        "shutdown_timeout_s": shutdown_timeout_s,
                        "SHUTDOWN_TIMEOUT": os.environ.get("SHUTDOWN_TIMEOUT"),
                    },
                )
            elif self.path == "/metrics":
                text = (
                    "# HELP vabus_aggregator_events_received_total Events received.\n"
                    "# TYPE vabus_aggregator_events_received_total counter\n"
                    f"vabus_aggregator_events_received_total {10 + index}.0\n"
                    "# HELP vabus_aggregator_queue_depth Queued batches.\n"
                    "# TYPE vabus_aggregator_queue_depth gauge\n"
                    'vabus_aggregator_queue_depth{subscriber="sender"} 2.0\n'
                )
                self._send(200, text.encode(), "text/plain; version=0.0.4")
            else:
                self._send(200, {"status": "ok"})

        def _send(self, code: int, body: object, ctype: str = "application/json") -> None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    server.socket.listen()
    server.serve_forever()


if __name__ == "__main__":
    main()

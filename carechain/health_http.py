"""A small HTTP endpoint for Prometheus and for probes: GET /metrics, /healthz and /readyz, nothing else.

An I/O shell for the processes that have no web console (the edge agent, the miner): they set
`agent.metrics_listen` / `miner.metrics_listen` to HOST:PORT. The bridge serves the same three paths from its
console instead (chain_bridge.metrics).

- /metrics: the process's own `CollectorRegistry` in the Prometheus text format.
- /healthz: 200 while the process serves HTTP at all (liveness; systemd's watchdog covers hung work).
- /readyz: 200 "ready: …" when `ready()` says so, else 503 "not ready: <why>" (e.g. not connected to the broker).

No authentication: bind it to 127.0.0.1 or to a management network only (docs/metrics.md). Requests are bounded:
a GET with no body, a request line and headers of a few KiB, a 10 s socket timeout and at most
MAX_CONNECTIONS handled at once (more are closed at once), so a scanner cannot tie up the process.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("carechain.health_http")

__all__ = ["HealthServer", "ListenError"]

MAX_CONNECTIONS = 16
MAX_REQUEST_LINE = 1024
MAX_HEADER_BYTES = 8192
SOCKET_TIMEOUT_S = 10.0

Ready = Callable[[], tuple[bool, str]]


class ListenError(RuntimeError):
    """The endpoint could not listen on its address (in use, not local, no permission)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, ready: Ready) -> None:
        self.registry = registry
        self.ready = ready
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # over the limit: refuse rather than queue a thread
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive, nothing to bound twice
    server_version = "carechain"
    sys_version = ""

    def handle_one_request(self) -> None:
        # The stdlib reads a request line of up to 64 KiB and 100 headers of 64 KiB each; a probe needs far less.
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if len(line) > MAX_REQUEST_LINE:
            self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
            self.send_error(414)
            self.close_connection = True
            return
        self.raw_requestline = line
        if not line or not self.parse_request():
            self.close_connection = True
            return
        if sum(len(k) + len(v) for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self.send_error(431)
            return
        if self.command not in ("GET", "HEAD"):
            self.send_error(405)
            return
        if self.headers.get("Content-Length", "0") not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.send_error(413, "no request body is accepted")
            return
        self._answer(head=self.command == "HEAD")
        self.wfile.flush()

    def _answer(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                page = generate_latest(self.server.registry)
            except Exception:  # a collector's bug: say so, and keep serving the probes
                log.exception("collecting the metrics failed")
                self._send(500, b"collecting the metrics failed; see the process's log\n", "text/plain; charset=utf-8",
                           head)
                return
            self._send(200, page, CONTENT_TYPE_LATEST, head)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8", head)
        elif path == "/readyz":
            try:
                ok, why = self.server.ready()
            except Exception as exc:  # a broken check must not look ready
                ok, why = False, f"readiness check failed: {exc}"
            text = f"{'ready' if ok else 'not ready'}: {why}\n".encode()
            self._send(200 if ok else 503, text, "text/plain; charset=utf-8", head)
        else:
            self._send(404, b"not found: this endpoint serves /metrics, /healthz and /readyz\n",
                       "text/plain; charset=utf-8", head)

    def _send(self, code: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)


class HealthServer:
    """/metrics, /healthz and /readyz for one process, on a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, ready: Ready) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_listen(cls, listen: str, registry: CollectorRegistry, ready: Ready) -> HealthServer:
        """From a `metrics_listen` setting, HOST:PORT (an IPv6 host in brackets); ValueError if malformed."""
        host, sep, port = listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"metrics_listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:9101")
        return cls(host, int(port), registry, ready)

    @property
    def address(self) -> str:
        """HOST:PORT it listens on (the actual port once started with port 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> None:
        """Listen and serve in the background; `ListenError` names the address and why it cannot be used."""
        try:
            server = _Server((self.host, self.port), self.registry, self.ready)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.address}: {exc.strerror or exc}; choose a free local "
                              "address for metrics_listen (HOST:PORT)") from None
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"health-http-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

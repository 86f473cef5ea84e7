"""The console's HTTP server: uvicorn on a daemon thread beside the bridge, started and stopped with it.

Binding happens in `start()`, before it returns, so a port that is taken or an address this host does not have
fails there with a message naming the address, and `carechain bridge` stops instead of running without the
console it was asked for.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger("carechain.bridge.console")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class ConsoleError(RuntimeError):
    """The console could not be served (its address cannot be bound, or the server did not start)."""


class ConsoleServer:
    """Serve `app` on `host:port` from a daemon thread."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ConsoleServer:
        """Bind and serve; returns once the server answers, or raises `ConsoleError` saying why not."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            log.error("console: cannot listen on %s:%d: %s", self.host, self.port, exc.strerror or exc)
            raise ConsoleError(f"console: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}. Choose "
                               "another port (--http HOST:PORT or bridge.console.listen), or stop what uses it") \
                from None
        self.port = sock.getsockname()[1]  # port 0: the one the system chose
        # log_config=None: uvicorn keeps its hands off the process's logging; access logs off (a request line
        # names no secret, but the console's own log lines are enough and the bridge's log stays readable).
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2, limit_concurrency=64, h11_max_incomplete_event_size=16_384)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="console-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConsoleError(f"console: the HTTP server on {self.host}:{self.port} did not start (see the log "
                                   "above)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving (open live streams are closed) and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True  # a stream that would not end: drop it
                self._thread.join(timeout=STOP_TIMEOUT_S)
        self._thread = None
        self._server = None

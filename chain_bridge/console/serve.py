"""One call that puts a running bridge's console on the air: `carechain bridge --http` and `carechain demo --http`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from carechain.config import ConsoleConfig
from chain_bridge.console.server import ConsoleServer
from chain_bridge.console.source import BridgeSource

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from chain_bridge.bridge import Bridge

log = logging.getLogger("carechain.bridge.console")


def metrics_app_for(bridge: Bridge) -> ASGIApp | None:
    """The bridge's Prometheus endpoint (chain_bridge.metrics), or None on a build without it."""
    try:
        from chain_bridge.metrics import bridge_metrics_app
    except ImportError:
        log.warning("console: /metrics is not served: this build has no chain_bridge.metrics")
        return None
    app: ASGIApp = bridge_metrics_app(bridge)
    return app


def listen_address(listen: str) -> tuple[str, int]:
    """("HOST", PORT) of a console address "HOST:PORT"; ValueError naming the setting otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"console address {listen!r} must be HOST:PORT with a port from 1 to 65535, "
                         "e.g. 127.0.0.1:8080 (--http or bridge.console.listen)")
    return host.strip("[]"), int(port)


def serve_console(bridge: Bridge, cfg: ConsoleConfig, listen: str, accounts_file: Path) -> ConsoleServer:
    """Serve the console of `bridge` on `listen` ("HOST:PORT"); raises `ConsoleError` if it cannot listen there."""
    from chain_bridge.console.app import build_console_app

    host, port = listen_address(listen)
    app = build_console_app(BridgeSource(bridge), cfg, accounts_file, metrics_app_for(bridge))
    return ConsoleServer(app, host, port).start()

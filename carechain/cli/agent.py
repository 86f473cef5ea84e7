"""`carechain agent`: run the edge agent for the devices of the config's `agent` section."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from carechain import sd_notify
from carechain.cli._options import (
    BrokerOpt,
    ConfigOpt,
    LogFormat,
    LogFormatOpt,
    SetOpt,
    StopSignal,
    VerboseOpt,
    check_broker_tls,
    console,
    example,
    fail,
    load,
    serve_health,
    setup_logging,
)

if TYPE_CHECKING:
    from carechain.health_http import HealthServer
    from edge_agent.agent import Agent

# The event loop marks itself alive this often; the watchdog counts it hung after LOOP_STALL_S without a mark.
HEARTBEAT_S = 1.0
LOOP_STALL_S = 20.0
READY_WAIT_S = 30.0  # how long start-up waits for every device link before telling systemd it is ready anyway

EPILOG = example("carechain agent --config carechain.yaml", "carechain agent -c agent.yaml --produce-seconds 60")


def agent(config: ConfigOpt = None, broker: BrokerOpt = None,
          produce_seconds: Annotated[float | None, typer.Option(
              help="Stop sampling the sources after this many seconds; keep forwarding until stopped.",
              min=0)] = None,
          settings: SetOpt = None, log_format: LogFormatOpt = LogFormat.text,
          verbose: VerboseOpt = False) -> None:
    """Run an edge agent for the devices listed in the config's `agent.devices` (`source: ble` devices
    through bleak/BlueZ, the others simulated from their profile).

    Each event is signed with its device's key and stored in the outbox before it is sent; it is
    deleted only when the bridge's signed receipt arrives. Stops cleanly on Ctrl-C / SIGTERM and prints
    its counters as one JSON line on stdout. One agent per data directory.
    """
    import signal

    from carechain.datadir import DataDirLocked
    from carechain.sqlite_store import StoreError
    from edge_agent.assembly import assemble_agent

    early = StopSignal()  # a signal during start-up ends the run as quietly as one later
    setup_logging(verbose, log_format)
    cfg = load(config, broker, settings)
    check_broker_tls(cfg)
    try:
        assembled = assemble_agent(cfg)
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    except (ValueError, DataDirLocked) as exc:  # ConfigError is a ValueError
        raise fail(str(exc)) from None

    heartbeat = LoopHeartbeat()
    health = None
    watchdog = None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if early.is_set():
            stop.set()
        lifecycle = asyncio.create_task(_lifecycle(assembled.agent, stop, heartbeat), name="agent-lifecycle")
        try:
            await assembled.run(stop, produce_seconds, on_stop_producing=lambda: console.print(
                "agent: stopped producing; forwarding what is in the outbox"))
        finally:
            lifecycle.cancel()

    try:
        if cfg.agent.metrics_listen is not None:
            health = _health_server(cfg.agent.metrics_listen, assembled.agent)
        # Pings only while the event loop turns: a hung loop (sending, receipts, sampling) gets restarted.
        watchdog = sd_notify.Watchdog.from_env(heartbeat.fresh)
        if watchdog is not None:
            watchdog.start()
        asyncio.run(main())
        summary = assembled.agent.summary()
    finally:
        if watchdog is not None:
            watchdog.stop()
        if health is not None:
            health.stop()
        assembled.close()
    print(json.dumps(summary), flush=True)


class LoopHeartbeat:
    """The agent's event loop marks itself alive; the systemd watchdog's thread asks whether it did lately."""

    def __init__(self) -> None:
        self._at = time.monotonic()

    def beat(self) -> None:
        self._at = time.monotonic()

    def fresh(self) -> bool:
        return time.monotonic() - self._at < LOOP_STALL_S


async def _lifecycle(agent: Agent, stop: asyncio.Event, heartbeat: LoopHeartbeat) -> None:
    """systemd: READY=1 once every device link is up (or after READY_WAIT_S: links retry by themselves, and a
    broker outage must not turn into a restart loop), the loop's heartbeat, and STOPPING=1 when asked to stop."""
    started = time.monotonic()
    announced = False
    while not stop.is_set():
        heartbeat.beat()
        up = len(agent.connected)
        if not announced and (up == len(agent.devices) or time.monotonic() - started >= READY_WAIT_S):
            sd_notify.ready(f"agent: {up} of {len(agent.devices)} device link(s) up")
            announced = True
        try:
            await asyncio.wait_for(stop.wait(), timeout=HEARTBEAT_S)
        except TimeoutError:
            continue
    sd_notify.stopping("agent: stopping; flushing the outbox")


def _health_server(listen: str, agent: Agent) -> HealthServer:
    from edge_agent.metrics import agent_ready, agent_registry

    return serve_health("agent.metrics_listen", listen, agent_registry(agent), lambda: agent_ready(agent))

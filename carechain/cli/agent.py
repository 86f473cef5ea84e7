"""`carechain agent`: run the edge agent for the devices of the config's `agent` section."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from carechain.cli._options import (
    BrokerOpt,
    ConfigOpt,
    StopSignal,
    VerboseOpt,
    check_broker_tls,
    console,
    example,
    fail,
    load,
    setup_logging,
)

EPILOG = example("carechain agent --config carechain.yaml", "carechain agent -c agent.yaml --produce-seconds 60")


def agent(config: ConfigOpt = None, broker: BrokerOpt = None,
          produce_seconds: Annotated[float | None, typer.Option(
              help="Stop sampling the sources after this many seconds; keep forwarding until stopped.",
              min=0)] = None,
          verbose: VerboseOpt = False) -> None:
    """Run an edge agent for the devices listed in the config's `agent.devices` (`source: ble` devices
    through bleak/BlueZ, the others simulated from their profile).

    Each event is signed with its device's key and stored in the outbox before it is sent; it is
    deleted only when the bridge's signed receipt arrives. Stops cleanly on Ctrl-C / SIGTERM and prints
    its counters as one JSON line on stdout. One agent per data directory.
    """
    import asyncio
    import signal

    from carechain.datadir import DataDirLocked
    from carechain.sqlite_store import StoreError
    from edge_agent.assembly import assemble_agent

    early = StopSignal()  # a signal during start-up ends the run as quietly as one later
    setup_logging(verbose)
    cfg = load(config, broker)
    check_broker_tls(cfg)
    try:
        assembled = assemble_agent(cfg)
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    except (ValueError, DataDirLocked) as exc:  # ConfigError is a ValueError
        raise fail(str(exc)) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if early.is_set():
            stop.set()
        await assembled.run(stop, produce_seconds, on_stop_producing=lambda: console.print(
            "agent: stopped producing; forwarding what is in the outbox"))

    try:
        asyncio.run(main())
        summary = assembled.agent.summary()
    finally:
        assembled.close()
    print(json.dumps(summary), flush=True)

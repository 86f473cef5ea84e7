"""`carechain miner`: run a witness miner (the one entry point; assembled by `chain_miner.assembly`)."""

from __future__ import annotations

import json
from pathlib import Path
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
    from chain_miner.service import WitnessMiner

EPILOG = example("carechain miner --data-dir carechain-data/miner --log-public-key 3b6a…e1 "
                 "--broker 127.0.0.1:1883")


def miner(config: ConfigOpt = None, broker: BrokerOpt = None,
          data_dir: Annotated[Path | None, typer.Option(
              "--data-dir", help="Miner data directory: witness state (witness.json) and by default the key.")] = None,
          key: Annotated[Path | None, typer.Option(
              "--key", help="Miner key file (created with mode 0600 if missing; default DATA_DIR/miner.key).")] = None,
          log_public_key: Annotated[str | None, typer.Option(
              help="Hex Ed25519 public key of the log to witness (`carechain bridge` prints it).")] = None,
          name: Annotated[str | None, typer.Option(
              help="Cosigner key name (default carechain.miner/<miner id>).")] = None,
          genesis: Annotated[Path | None, typer.Option(
              help="Contracts genesis file: re-execute the contracts on every new entry (default: "
                   "BRIDGE_DATA_DIR/contracts/genesis.json if it exists).")] = None,
          entry_verifier: Annotated[str | None, typer.Option(
              metavar="MODULE:FUNCTION", help="Another entry verifier f(old_size, new_size, entries) -> "
                                              "Violation | None, instead of the contracts.")] = None,
          settings: SetOpt = None, log_format: LogFormatOpt = LogFormat.text,
          verbose: VerboseOpt = False) -> None:
    """Run a miner: witness the log's checkpoints and cosign them, or refuse and publish evidence.

    For each checkpoint on cc/v1/log/checkpoint the miner asks the bridge for a consistency proof and the
    new entries, checks them against the last checkpoint it cosigned, re-executes the contracts on them
    and publishes a C2SP cosignature (cc/v1/miner/<id>/cosig) — or evidence of a fork or rule violation
    (cc/v1/miner/<id>/evidence). Prints its cosigner key on stdout (one JSON line) for the bridge's
    `bridge.miners` list; a checkpoint is final when bridge.finality_threshold of them cosigned it.
    With a genesis it also serves the access grants that name it: once a checkpoint covering a grant is
    final (a majority of the registered miners, counted by the miner itself), it re-encrypts the granted
    epochs for the requester (cc/v1/party/<id>/inbox), never for a revoked or expired grant.
    Runs until interrupted (Ctrl-C / SIGTERM), then prints its counters (one JSON line). One miner per
    data directory. Settings: the `miner` config section. See docs/miners.md.
    """
    from carechain.datadir import DataDirLocked
    from chain_miner.assembly import DEFAULT_GENESIS, assemble_miner

    stop = StopSignal()
    setup_logging(verbose, log_format)
    cfg = load(config, broker, settings)
    check_broker_tls(cfg)
    try:
        assembled = assemble_miner(cfg, data_dir=data_dir, key=key, log_public_key=log_public_key, name=name,
                                   genesis=genesis, entry_verifier=entry_verifier)
    except (ValueError, DataDirLocked) as exc:  # ConfigError is a ValueError
        raise fail(str(exc)) from None
    service = assembled.miner
    if not assembled.checks:
        console.print("[yellow]miner: no contracts genesis (--genesis, miner.genesis or "
                      f"{cfg.bridge.data_dir / DEFAULT_GENESIS}): entries are NOT re-executed; only log "
                      "consistency is checked[/]", soft_wrap=True)
    console.print(f"miner {service.id}: data {assembled.data_dir}, broker {cfg.broker.address}, log key "
                  f"{service.witness.log_public_key.hex()}"
                  + (f", {assembled.checks}" if assembled.checks else ""), soft_wrap=True, highlight=False)
    health = None
    watchdog = None
    try:
        if cfg.miner.metrics_listen is not None:
            health = _health_server(cfg.miner.metrics_listen, service)
        service.start()
        if stop.wait_for(service.connected.wait, 30):
            print(json.dumps({"miner": service.id, "name": service.cosigner.name,
                              "public_key": service.cosigner.public_key.hex(), "ready": True}), flush=True)
            sd_notify.ready(f"miner {service.id}: connected to {cfg.broker.address}")
        elif not stop.is_set():
            console.print(f"[yellow]miner: broker {cfg.broker.address} unreachable or refusing; retrying in "
                          "the background[/]")
            # Started all the same: it connects by itself, and a broker outage must not become a restart loop.
            sd_notify.ready(f"miner {service.id}: broker {cfg.broker.address} unreachable; retrying")
        watchdog = sd_notify.Watchdog.from_env(service.alive)  # a dead checkpoint worker stops the pings
        if watchdog is not None:
            watchdog.start()
        stop.wait()
    finally:
        sd_notify.stopping(f"miner {service.id}: stopping")
        if watchdog is not None:
            watchdog.stop()
        if health is not None:
            health.stop()
        service.stop()
        assembled.close()
    if not service.ever_connected.is_set():
        console.print(f"[yellow]miner: never connected to broker {cfg.broker.address}[/]", soft_wrap=True)
    print(json.dumps({"miner": service.id, **service.stats}), flush=True)


def _health_server(listen: str, service: WitnessMiner) -> HealthServer:
    from chain_miner.metrics import miner_ready, miner_registry

    return serve_health("miner.metrics_listen", listen, miner_registry(service), lambda: miner_ready(service))

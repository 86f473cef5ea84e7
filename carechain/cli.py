"""The `carechain` command line. Heavy modules (bridge, agent, broker) are imported only by the command
that needs them, so `carechain verify` stays small and fast on an auditor's laptop."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carechain.config import Config, ConfigError, load_config, parse_address

app = typer.Typer(
    help="carechain: signed health events from edge devices, anchored in a verifiable ledger.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
)
keys_app = typer.Typer(help="Create and inspect Ed25519 key files (mode 0600).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.",
                                                envvar="CARECHAIN_CONFIG")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="MQTT broker HOST:PORT (overrides config).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Bridge data directory (ledger, log key).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    # soft_wrap: never fold a file path or a hex key across lines, whatever the terminal width
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _config(path: Path | None, broker: str | None = None) -> Config:
    try:
        cfg = load_config(path)
        if broker:
            cfg.broker.host, cfg.broker.port = parse_address(broker)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return cfg


def _bridge_dir(cfg: Config, data_dir: Path | None) -> Path:
    return data_dir or cfg.bridge.data_dir


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- keys ---------------------------------------------------------------------------------------------

@keys_app.command("new")
def keys_new(path: Annotated[Path, typer.Argument(help="Where to write the private key (mode 0600).")],
             force: Annotated[bool, typer.Option(help="Overwrite an existing key file.")] = False) -> None:
    """Generate an Ed25519 key; prints its device id and public key (safe to share)."""
    from carechain.identity import Identity, KeyFileError

    ident = Identity.generate()
    try:
        ident.save(path, overwrite=force)
    except KeyFileError as exc:
        raise _fail(str(exc)) from None
    out.print(f"device_id  {ident.device_id}\npublic_key {ident.public_key.hex()}\nkey_file   {path}",
              soft_wrap=True, markup=False, highlight=False)


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="A carechain key file.")]) -> None:
    """Print the device id and public key of a key file (never the private key)."""
    from carechain.identity import Identity, KeyFileError

    try:
        ident = Identity.load(path)
    except KeyFileError as exc:
        raise _fail(str(exc)) from None
    out.print(f"device_id  {ident.device_id}\npublic_key {ident.public_key.hex()}",
              soft_wrap=True, markup=False, highlight=False)


# -- register -----------------------------------------------------------------------------------------

@app.command()
def register(
    inventory: Annotated[Path, typer.Argument(help="Inventory YAML: devices with profile, owner, site, key.")],
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
    profiles_dir: Annotated[Path | None, typer.Option(help="Device profiles folder.")] = None,
) -> None:
    """Register devices from an inventory as operator-signed entries on the ledger.

    Every device gets a registration entry binding its public key to its profile, owner and site; the
    bridge accepts events only from registered, non-revoked devices. All or nothing: one bad line and
    nothing is registered.
    """
    from carechain.inventory import InventoryError, load_inventory
    from carechain.profiles import ProfileError, load_profiles
    from chain_bridge.ledger.store import Ledger, LedgerError
    from chain_bridge.registry import ledger_path, operator_key, register_devices

    cfg = _config(config)
    bdir = _bridge_dir(cfg, data_dir)
    try:
        devices = load_inventory(inventory, load_profiles(profiles_dir))
    except (InventoryError, ProfileError) as exc:
        raise _fail(str(exc)) from None
    ledger = Ledger(ledger_path(bdir))
    known = ledger.devices()
    for d in devices:
        if d.device_id in known:
            raise _fail(f"{inventory}:{d.line}: device {d.name} ({d.device_id}) is already registered "
                        f"at leaf {known[d.device_id].registered_idx}")
    try:
        indexes = register_devices(ledger, operator_key(bdir), devices)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    table = Table("name", "device_id", "profile", "owner", "site", "leaf", title=f"registered in {bdir}")
    for d, idx in zip(devices, indexes, strict=True):
        table.add_row(d.name, d.device_id, d.profile, d.owner, d.site, str(idx))
    out.print(table)


# -- bridge -------------------------------------------------------------------------------------------

@app.command()
def bridge(config: ConfigOpt = None, broker: BrokerOpt = None, data_dir: DataDirOpt = None,
           workers: Annotated[int | None, typer.Option(
               help="Ingest worker processes on an MQTT shared subscription (0: verify in-process). "
                    "Needs a broker with shared subscriptions, e.g. mosquitto.", min=0, max=64)] = None,
           verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every rejection.")] = False) -> None:
    """Run the bridge: verify, deduplicate and anchor device events; receipts; checkpoints every interval.

    Runs until interrupted (Ctrl-C / SIGTERM), then issues a last checkpoint and exits.
    """
    from chain_bridge.bridge import Bridge
    from chain_bridge.ledger.store import Ledger
    from chain_bridge.registry import ledger_path, log_key

    _logging(verbose)
    cfg = _config(config, broker)
    bdir = _bridge_dir(cfg, data_dir)
    cfg.bridge.data_dir = bdir
    if workers is not None:
        cfg.bridge.ingest_workers = workers
    lk = log_key(bdir)
    service = Bridge(cfg.bridge, cfg.broker, lk, Ledger(ledger_path(bdir)))
    console.print(f"bridge: broker {cfg.broker.address}, ledger {ledger_path(bdir)} "
                  f"(size {service.ledger.size}), origin {service.origin}\nlog public key {lk.public_key.hex()}")
    service.start()
    if service.wait_ready(30):
        console.print(f"bridge ready: subscribed with {cfg.bridge.ingest_workers or 'no'} ingest workers")
    else:
        console.print(f"[yellow]bridge: not subscribed yet; broker {cfg.broker.address} unreachable or "
                      "refusing; retrying in the background[/]")
    _wait_for_signal()
    service.stop()
    print(json.dumps(service.stats.as_dict()), flush=True)  # final counters, on stdout for scripts


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass


# -- agent --------------------------------------------------------------------------------------------

@app.command()
def agent(config: ConfigOpt = None, broker: BrokerOpt = None,
          produce_seconds: Annotated[float | None, typer.Option(
              help="Stop sampling the sources after this many seconds; keep forwarding until stopped.",
              min=0)] = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run an edge agent for the devices listed in the config's `agent.devices` (simulated sources).

    Each event is signed with its device's key and stored in the outbox before it is sent; it is
    deleted only when the bridge's signed receipt arrives. Stops cleanly on Ctrl-C / SIGTERM.
    """
    import asyncio
    import random

    from carechain.identity import Identity, KeyFileError
    from carechain.profiles import load_profiles
    from edge_agent.agent import Agent, AgentDevice
    from edge_agent.outbox import Outbox, Quota, QuotaPolicy
    from edge_agent.sources.simulated import SimulatedDevice

    _logging(verbose)
    cfg = _config(config, broker)
    if not cfg.agent.devices:
        raise _fail("no devices: list them under agent.devices (key_file, profile) in the config file")
    if not cfg.agent.bridge_public_key:
        raise _fail("agent.bridge_public_key is required (printed by `carechain bridge`): "
                    "receipts are trusted only when the bridge signed them")
    profiles = load_profiles()
    devices = []
    for d in cfg.agent.devices:
        if d.profile not in profiles:
            raise _fail(f"unknown profile {d.profile!r}; known: {', '.join(sorted(profiles))}")
        try:
            source = SimulatedDevice(profiles[d.profile], random.Random())
            devices.append(AgentDevice(Identity.load(d.key_file), source))
        except KeyFileError as exc:
            raise _fail(str(exc)) from None
    quota = Quota(int(cfg.agent.outbox_quota_mb * (1 << 20)), QuotaPolicy(cfg.agent.on_quota))
    service = Agent(devices, Outbox(cfg.agent.data_dir / "outbox.db", quota), cfg.broker,
                    bytes.fromhex(cfg.agent.bridge_public_key), window=cfg.agent.window,
                    resend_after_s=cfg.agent.resend_after_s, speedup=cfg.agent.speedup)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if produce_seconds is not None:
            loop.call_later(produce_seconds, service.stop_producing)
        await service.run(stop)

    asyncio.run(main())
    print(json.dumps({**service.stats.__dict__, "outbox_left": service.outbox.depth(),
                      "quota_losses": service.outbox.losses()}), flush=True)


# -- proofs -------------------------------------------------------------------------------------------

@app.command()
def proof(
    device_id: Annotated[str | None, typer.Argument(help="Device id of the event.")] = None,
    seq: Annotated[int | None, typer.Argument(help="The event's seq.")] = None,
    consistency: Annotated[str | None, typer.Option(
        help="Instead: a consistency proof OLD[:NEW] between two checkpointed tree sizes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the proof bundle as JSON.")] = False,
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Print an inclusion proof for event (DEVICE_ID, SEQ) — or a consistency proof — checkable offline
    with `carechain verify` (format: docs/proofs.md)."""
    from chain_bridge.ledger.proofs import consistency_bundle, inclusion_bundle
    from chain_bridge.ledger.store import Ledger, LedgerError
    from chain_bridge.registry import ledger_path, log_key

    cfg = _config(config)
    bdir = _bridge_dir(cfg, data_dir)
    if not ledger_path(bdir).exists():
        raise _fail(f"no ledger at {ledger_path(bdir)} (use --data-dir)")
    ledger = Ledger(ledger_path(bdir))
    pk = log_key(bdir).public_key
    try:
        if consistency:
            old, _, new = consistency.partition(":")
            bundle: Any = consistency_bundle(ledger, int(old), int(new) if new else None, pk)
        elif device_id is not None and seq is not None:
            bundle = inclusion_bundle(ledger, device_id, seq, pk)
        else:
            raise _fail("give DEVICE_ID SEQ, or --consistency OLD[:NEW]")
    except (LedgerError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        out.print_json(bundle.model_dump_json())
    else:
        # Plain text, never wrapped: the output is redirected to a file that `verify` must parse.
        out.print(bundle.model_dump_json(indent=2), soft_wrap=True, markup=False, highlight=False)


@app.command()
def verify(
    bundle_file: Annotated[Path | None, typer.Argument(help="A proof bundle JSON file, or - for stdin.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Instead: check a signed checkpoint note file.")] = None,
    log_key_hex: Annotated[str | None, typer.Option("--log-key", help="Trusted log public key (hex). "
                                                    "Without it, the key in the bundle is used.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check a proof offline, from public data alone: an inclusion proof (event → signed checkpoint),
    a consistency proof between two checkpoints, or a checkpoint signature. Exit 1 if it does not hold."""
    from pydantic import ValidationError

    from carechain.proofs import (
        ConsistencyBundle,
        InclusionBundle,
        VerificationError,
        verify_checkpoint,
        verify_consistency_bundle,
        verify_inclusion_bundle,
    )

    result: dict[str, Any]
    try:
        try:
            trusted = bytes.fromhex(log_key_hex) if log_key_hex else None
        except ValueError:
            raise VerificationError(f"--log-key {log_key_hex!r} is not hexadecimal (64 hex digits)") from None
        if checkpoint is not None:
            if trusted is None:
                raise _fail("--log-key is required to check a checkpoint")
            cp = verify_checkpoint(checkpoint.read_text(), trusted)
            result = {"ok": True, "checkpoint": {"origin": cp.origin, "tree_size": cp.tree_size,
                                                 "root_hash": cp.root_hash.hex()}}
        elif bundle_file is not None:
            text = sys.stdin.read() if str(bundle_file) == "-" else bundle_file.read_text()
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise VerificationError("a proof bundle is a JSON object (see docs/proofs.md)")
            if "consistency_path" in raw:
                old, new = verify_consistency_bundle(ConsistencyBundle.model_validate(raw), trusted)
                result = {"ok": True, "consistency": {"old_size": old.tree_size, "new_size": new.tree_size}}
            else:
                v = verify_inclusion_bundle(InclusionBundle.model_validate(raw), trusted)
                result = {"ok": True, "inclusion": {"leaf_index": v.leaf_index, "tree_size": v.checkpoint.tree_size,
                                                    "entry_type": v.entry_type, "device_id": v.device_id,
                                                    "seq": v.seq, "kind": v.kind}}
        else:
            raise _fail("give a proof bundle file (or -), or --checkpoint NOTE --log-key HEX")
    except (VerificationError, ValidationError, json.JSONDecodeError, OSError, ValueError) as exc:
        if as_json:
            out.print_json(data={"ok": False, "error": str(exc)})
        else:
            console.print(f"[bold red]NOT VERIFIED:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(data=result)
    else:
        details = json.dumps({k: v for k, v in result.items() if k != 'ok'})
        out.print(f"[bold green]VERIFIED[/] {escape(details)}", soft_wrap=True)


# -- demo ---------------------------------------------------------------------------------------------

@app.command()
def demo(
    broker: Annotated[str | None, typer.Option(help="Use this MQTT broker HOST:PORT (e.g. a mosquitto) "
                                               "instead of the embedded one.")] = None,
    seconds: Annotated[float, typer.Option(help="How long devices produce readings.", min=1)] = 6.0,
    speedup: Annotated[float, typer.Option(help="Sample simulated devices this many times faster.", min=0.1)] = 20.0,
    data_dir: Annotated[Path | None, typer.Option(help="Keep demo data here (default: a new temp dir).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the summary as one JSON object.")] = False,
) -> None:
    """The whole flow on one machine: 6 BLE health devices + a pharmacy terminal → agent → MQTT → bridge →
    verifiable log, with hostile traffic injected, then one inclusion proof verified end to end."""
    from carechain.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    if as_json:
        summary = run_demo(broker=broker, seconds=seconds, data_dir=data_dir, speedup=speedup)
        out.print_json(data={k: summary[k] for k in ("sent", "anchored", "rejected", "duplicates",
                                                      "checkpoints", "proof_verified")})
        raise typer.Exit(0 if summary["proof_verified"] else 1)
    from rich.live import Live

    def render(s: dict[str, Any]) -> Table:
        t = Table(title=f"carechain demo — {s['phase']}", show_header=False)
        for key in ("signed", "outbox", "received", "anchored", "duplicates", "rejected", "checkpoints", "tree_size"):
            t.add_row(key, str(s[key]))
        return t

    with Live(render({"phase": "starting", "signed": 0, "outbox": 0, "received": 0, "anchored": 0,
                      "duplicates": 0, "rejected": 0, "checkpoints": 0, "tree_size": 0}),
              console=out, refresh_per_second=5) as live:
        summary = run_demo(broker=broker, seconds=seconds, data_dir=data_dir, speedup=speedup,
                           on_tick=lambda s: live.update(render(s)))
    _print_summary(summary)
    raise typer.Exit(0 if summary["proof_verified"] else 1)


def _print_summary(s: dict[str, Any]) -> None:
    t = Table("", "", title="summary")
    t.add_row("broker", s["broker"])
    t.add_row("events signed and sent by agents", str(s["sent"]))
    t.add_row("anchored in the log (exactly once)", str(s["anchored"]))
    t.add_row("rejected", f"{s['rejected']}  {s['rejected_by_reason']}")
    t.add_row("duplicates re-acknowledged", str(s["duplicates"]))
    t.add_row("checkpoints signed", str(s["checkpoints"]))
    t.add_row("outbox left / quarantined", f"{s['outbox_left']} / {s['quarantined']}")
    t.add_row("inclusion proof verified", "[green]yes[/]" if s["proof_verified"] else f"[red]no[/] {s['proof']}")
    out.print(t)
    p = s["proof"] or {}
    if "leaf_index" in p:
        out.print(f"proof: event {p['device_id']}#0 is leaf {p['leaf_index']} of tree {p['tree_size']} "
                  f"(root {p['root_hash'][:16]}…)\ndata: {s['data_dir']}  — try: carechain proof "
                  f"{p['device_id']} 0 --data-dir {s['data_dir']}/bridge --json > p.json && carechain verify p.json")


if __name__ == "__main__":  # pragma: no cover
    app()

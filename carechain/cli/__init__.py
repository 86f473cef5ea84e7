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


def _open_store(opener: Any, path: Path, *args: Any) -> Any:
    """Open a ledger or an outbox; a damaged or unreadable file is a one-line error and exit code 1."""
    from carechain.sqlite_store import StoreError

    try:
        return opener(path, *args)
    except StoreError as exc:
        raise _fail(str(exc), 1) from None


def _broker_login(cfg: Config) -> None:
    """Resolve broker.credentials_file into username/password and check the TLS files, before connecting."""
    from carechain.credentials import CredentialsError, load_mqtt_credentials
    from carechain.transport import tls_context

    b = cfg.broker
    if b.credentials_file is not None:
        try:
            login = load_mqtt_credentials(b.credentials_file)
        except CredentialsError as exc:
            raise _fail(str(exc)) from None
        b.username, b.password, b.credentials_file = login.username, login.password, None
    if b.tls_ca is not None:
        try:
            tls_context(b)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise _fail(f"broker TLS settings (tls_ca {b.tls_ca}, tls_cert {b.tls_cert}, tls_key {b.tls_key}): "
                        f"{exc}") from None
    elif b.tls_cert is not None:
        raise _fail("broker.tls_cert is set but broker.tls_ca is not: TLS needs the CA that signed the broker")


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


ca_app = typer.Typer(
    help="A deployment CA for the broker's TLS listener: CA, server and client certificates (ECDSA P-256; "
         "keys mode 0600). See docs/broker-security.md.", no_args_is_help=True)
keys_app.add_typer(ca_app, name="ca")
CaDirOpt = Annotated[Path, typer.Option("--dir", help="The CA's folder (ca.crt, ca.key).")]
CertOutOpt = Annotated[Path | None, typer.Option("--out", help="Where to write the certificate and key "
                                                 "(default: the CA's folder).")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite existing files.")]
DEFAULT_CA_DIR = Path("carechain-data/ca")


def _issued(what: str, issued: Any) -> None:
    out.print(f"{what}\ncert        {issued.cert}\nkey         {issued.key}   (mode 0600)\n"
              f"sha256      {issued.fingerprint}", soft_wrap=True, markup=False, highlight=False)


@ca_app.command("init")
def ca_init(ca_dir: CaDirOpt = DEFAULT_CA_DIR,
            name: Annotated[str, typer.Option(help="The CA's common name.")] = "carechain deployment CA",
            days: Annotated[int, typer.Option(help="Validity in days.", min=1)] = 3650,
            force: ForceOpt = False) -> None:
    """Create the deployment CA: ca.key (mode 0600, keep it offline) and ca.crt (give it to every client)."""
    from carechain.pki import PkiError, init_ca

    try:
        _issued("CA created", init_ca(ca_dir, name=name, days=days, overwrite=force))
    except (PkiError, OSError) as exc:
        raise _fail(str(exc)) from None


@ca_app.command("server")
def ca_server(host: Annotated[list[str] | None, typer.Option(
                  help="A DNS name clients use to reach the broker; repeatable.")] = None,
              ip: Annotated[list[str] | None, typer.Option(
                  help="An IP address clients use to reach the broker; repeatable.")] = None,
              ca_dir: CaDirOpt = DEFAULT_CA_DIR, out_dir: CertOutOpt = None,
              name: Annotated[str, typer.Option(help="File name stem: NAME.crt, NAME.key.")] = "server",
              days: Annotated[int, typer.Option(help="Validity in days.", min=1)] = 825,
              force: ForceOpt = False) -> None:
    """Issue the broker's certificate for every --host and --ip clients connect to (checked by clients)."""
    from carechain.pki import PkiError, issue_server

    try:
        issued = issue_server(ca_dir, hosts=host or [], ips=ip or [], out_dir=out_dir, name=name, days=days,
                              overwrite=force)
    except (PkiError, OSError) as exc:
        raise _fail(str(exc)) from None
    _issued(f"server certificate for {', '.join([*(host or []), *(ip or [])])}", issued)


@ca_app.command("client")
def ca_client(name: Annotated[str, typer.Argument(help="The certificate's CN: a device id, or e.g. the bridge "
                                                       "user's name.")],
              ca_dir: CaDirOpt = DEFAULT_CA_DIR, out_dir: CertOutOpt = None,
              days: Annotated[int, typer.Option(help="Validity in days.", min=1)] = 825,
              force: ForceOpt = False) -> None:
    """Issue a client certificate (CN = NAME) for a broker that requires one (require_certificate true)."""
    from carechain.pki import PkiError, issue_client

    try:
        _issued(f"client certificate for {name}",
                issue_client(ca_dir, name, out_dir=out_dir, days=days, overwrite=force))
    except (PkiError, OSError) as exc:
        raise _fail(str(exc)) from None


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
    ledger = _open_store(Ledger, ledger_path(bdir))
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

bridge_app = typer.Typer()
app.add_typer(bridge_app, name="bridge")


@bridge_app.callback(invoke_without_command=True)
def bridge(ctx: typer.Context, config: ConfigOpt = None, broker: BrokerOpt = None, data_dir: DataDirOpt = None,
           workers: Annotated[int | None, typer.Option(
               help="Ingest worker processes on an MQTT shared subscription (0: verify in-process). "
                    "Needs a broker with shared subscriptions, e.g. mosquitto.", min=0, max=64)] = None,
           verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every rejection.")] = False) -> None:
    """Run the bridge: verify, deduplicate and anchor device events; receipts; checkpoints every interval.

    Runs until interrupted (Ctrl-C / SIGTERM), then issues a last checkpoint and exits. With a
    subcommand (`carechain bridge acl`), runs that instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from chain_bridge.bridge import Bridge
    from chain_bridge.ledger.store import Ledger
    from chain_bridge.registry import ledger_path, log_key

    _logging(verbose)
    cfg = _config(config, broker)
    _broker_login(cfg)
    bdir = _bridge_dir(cfg, data_dir)
    cfg.bridge.data_dir = bdir
    if workers is not None:
        cfg.bridge.ingest_workers = workers
    lk = log_key(bdir)
    service = Bridge(cfg.bridge, cfg.broker, lk, _open_store(Ledger, ledger_path(bdir)),
                     contracts=_contract_gate(cfg, bdir) if cfg.bridge.contracts else None)
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


@bridge_app.command("acl")
def bridge_acl(
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where to write passwd, acl, bridge.json and devices/<device_id>.json "
                      "(default: DATA_DIR/broker).")] = None,
    bridge_user: Annotated[str, typer.Option(help="MQTT user name of the bridge.")] = "carechain-bridge",
    rotate: Annotated[list[str] | None, typer.Option(
        help="Give this user (a device id, or the bridge user) a new password; repeatable.")] = None,
) -> None:
    """Write a mosquitto password file and ACL from the ledger's registry: least privilege per device.

    Every registered, non-revoked device gets its own MQTT user (user name = device_id) that may only
    publish cc/v1/dev/<its id>/ev and read its own receipts and the checkpoint; the bridge user reads all
    events and writes receipts and checkpoints; revoked devices get no login. Passwords are random, kept
    in DATA_DIR/broker/credentials.json (mode 0600) so re-running keeps them stable, and handed out in one
    provisioning file per party (mode 0600); they are never printed. Re-run after every registration or
    revocation, install passwd and acl for mosquitto and reload it (SIGHUP). See docs/broker-security.md.
    """
    from chain_bridge.broker import SECURE_CONF_TEMPLATE
    from chain_bridge.broker.acl import BrokerAccessError, generate_broker_access, store_path
    from chain_bridge.ledger.store import Ledger
    from chain_bridge.registry import ledger_path

    cfg = _config(config)
    bdir = _bridge_dir(cfg, data_dir)
    if not ledger_path(bdir).exists():
        raise _fail(f"no ledger at {ledger_path(bdir)}: register devices first (`carechain register`), "
                    "or point --data-dir at the bridge's data directory")
    ledger = _open_store(Ledger, ledger_path(bdir))
    try:
        access = generate_broker_access(ledger, bdir, out_dir or bdir / "broker", bridge_user=bridge_user,
                                        rotate=rotate or ())
    except (BrokerAccessError, OSError) as exc:
        raise _fail(str(exc)) from None
    finally:
        ledger.close()
    plan = access.plan
    lines = [
        f"broker access for {len(access.device_credentials)} device(s) and bridge user {bridge_user} "
        f"({access.revoked_left_out} revoked device(s) left out)",
        f"passwd      {access.passwd}",
        f"acl         {access.acl}",
        f"bridge      {access.bridge_credentials}   (broker.credentials_file of `carechain bridge`)",
        f"devices     {access.passwd.parent / 'devices'}/<device_id>.json   "
        "(copy each to its agent: agent.devices[].mqtt_credentials_file)",
        f"passwords   {store_path(bdir)} (mode 0600; never printed)",
    ]
    for label, users in (("new", plan.added), ("rotated", plan.rotated), ("removed", plan.removed)):
        if users:
            lines.append(f"{label:<11} {', '.join(users)}")
    lines += [f"template    {SECURE_CONF_TEMPLATE}",
              "next: install passwd and acl where mosquitto reads them (mode 0600, owner mosquitto), "
              "then reload it: kill -HUP <mosquitto pid>"]
    out.print("\n".join(lines), soft_wrap=True, markup=False, highlight=False)


# -- miner -------------------------------------------------------------------------------------------

@app.command()
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
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every decision.")] = False) -> None:
    """Run a miner: witness the log's checkpoints and cosign them, or refuse and publish evidence.

    For each checkpoint on cc/v1/log/checkpoint the miner asks the bridge for a consistency proof and the
    new entries, checks them against the last checkpoint it cosigned, re-executes the contracts on them
    and publishes a C2SP cosignature (cc/v1/miner/<id>/cosig) — or evidence of a fork or rule violation
    (cc/v1/miner/<id>/evidence). Prints its cosigner key on stdout (one JSON line) for the bridge's
    `bridge.miners` list; a checkpoint is final when bridge.finality_threshold of them cosigned it.
    Runs until interrupted (Ctrl-C / SIGTERM). Settings: the `miner` config section. See docs/miners.md.
    """
    from carechain.identity import Identity, KeyFileError
    from chain_miner.service import (
        Miner,
        StateError,
        contract_verifier,
        load_entry_verifier,
        load_genesis,
    )
    from chain_miner.witness import verify_entries

    _logging(verbose)
    cfg = _config(config, broker)
    _broker_login(cfg)
    mc = cfg.miner
    mdir = data_dir or mc.data_dir
    log_hex = log_public_key or mc.log_public_key
    if not log_hex:
        raise _fail("no log public key: give --log-public-key HEX or miner.log_public_key (the bridge prints "
                    "it on start; `carechain keys show BRIDGE_DATA_DIR/keys/log.key` shows it too)")
    try:
        log_key_bytes = bytes.fromhex(log_hex)
        if len(log_key_bytes) != 32:
            raise ValueError
    except ValueError:
        raise _fail(f"log public key {log_hex!r} must be 64 hex digits (an Ed25519 public key)") from None
    genesis_file = genesis or mc.genesis
    default_genesis = cfg.bridge.data_dir / "contracts" / "genesis.json"
    if genesis_file is None and default_genesis.exists():
        genesis_file = default_genesis
    spec = entry_verifier or mc.entry_verifier
    size_of = None
    try:
        identity = Identity.load_or_create(key or mc.key_file or mdir / "miner.key")
        if spec:
            verifier, what = load_entry_verifier(spec), f"entry verifier {spec}"
        elif genesis_file is not None:
            verifier, size_of = contract_verifier(load_genesis(genesis_file))
            what = f"contracts re-executed from genesis {genesis_file}"
        else:
            verifier, what = verify_entries, ""
        service = Miner(mdir, cfg.broker, log_key_bytes, identity, name=name or mc.name, entry_verifier=verifier,
                        request_timeout_s=mc.request_timeout_s, verifier_size=size_of)
    except (ValueError, KeyFileError, StateError, ImportError, OSError) as exc:
        raise _fail(str(exc)) from None
    if not what:
        console.print("[yellow]miner: no contracts genesis (--genesis, miner.genesis or "
                      f"{default_genesis}): entries are NOT re-executed; only log consistency is checked[/]",
                      soft_wrap=True)
    console.print(f"miner {service.id}: data {mdir}, broker {cfg.broker.address}, log key {log_hex}"
                  + (f", {what}" if what else ""), soft_wrap=True, highlight=False)
    service.start()
    if service.connected.wait(30):
        print(json.dumps({"miner": service.id, "name": service.cosigner.name,
                          "public_key": service.cosigner.public_key.hex(), "ready": True}), flush=True)
    else:
        console.print(f"[yellow]miner: broker {cfg.broker.address} unreachable or refusing; retrying in the "
                      "background[/]")
    _wait_for_signal()
    service.stop()
    print(json.dumps({"miner": service.id, **service.stats}), flush=True)


# -- agent --------------------------------------------------------------------------------------------

@app.command()
def agent(config: ConfigOpt = None, broker: BrokerOpt = None,
          produce_seconds: Annotated[float | None, typer.Option(
              help="Stop sampling the sources after this many seconds; keep forwarding until stopped.",
              min=0)] = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run an edge agent for the devices listed in the config's `agent.devices` (`source: ble` devices
    through bleak/BlueZ, the others simulated from their profile).

    Each event is signed with its device's key and stored in the outbox before it is sent; it is
    deleted only when the bridge's signed receipt arrives. Stops cleanly on Ctrl-C / SIGTERM.
    """
    import asyncio
    import random

    from carechain.credentials import CredentialsError, load_mqtt_credentials
    from carechain.identity import Identity, KeyFileError
    from carechain.profiles import load_profiles
    from edge_agent.agent import Agent, AgentDevice
    from edge_agent.outbox import Outbox, Quota, QuotaPolicy
    from edge_agent.sources.simulated import SimulatedDevice

    _logging(verbose)
    cfg = _config(config, broker)
    _broker_login(cfg)
    if not cfg.agent.devices:
        raise _fail("no devices: list them under agent.devices (key_file, profile) in the config file")
    if not cfg.agent.bridge_public_key:
        raise _fail("agent.bridge_public_key is required (printed by `carechain bridge`): "
                    "receipts are trusted only when the bridge signed them")
    profiles = load_profiles()
    devices = []
    ble: list[tuple[str, Any]] = []  # (device_id, config entry) read over BLE
    logins = {}
    for d in cfg.agent.devices:
        if d.profile not in profiles:
            raise _fail(f"unknown profile {d.profile!r}; known: {', '.join(sorted(profiles))}")
        try:
            ident = Identity.load(d.key_file)
            login = load_mqtt_credentials(d.mqtt_credentials_file) if d.mqtt_credentials_file else None
        except (KeyFileError, CredentialsError) as exc:
            raise _fail(str(exc)) from None
        if login is not None:
            if login.device_id != ident.device_id:
                raise _fail(f"{d.mqtt_credentials_file} is the MQTT login of device {login.device_id}, "
                            f"but {d.key_file} is device {ident.device_id}")
            logins[ident.device_id] = login
        if d.source == "ble":
            if profiles[d.profile].gatt is None:
                raise _fail(f"{d.key_file}: profile {d.profile!r} is not a BLE device (no gatt section)")
            ble.append((ident.device_id, d))
            devices.append(AgentDevice(ident, None))
        else:
            devices.append(AgentDevice(ident, SimulatedDevice(profiles[d.profile], random.Random())))
    quota = Quota(int(cfg.agent.outbox_quota_mb * (1 << 20)), QuotaPolicy(cfg.agent.on_quota))
    service = Agent(devices, _open_store(Outbox, cfg.agent.data_dir / "outbox.db", quota), cfg.broker,
                    bytes.fromhex(cfg.agent.bridge_public_key), window=cfg.agent.window,
                    resend_after_s=cfg.agent.resend_after_s, speedup=cfg.agent.speedup, credentials=logins)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ble_stop = asyncio.Event()  # BLE sources stop sampling with the others, or at shutdown

        def stop_producing() -> None:
            service.stop_producing()
            ble_stop.set()
            console.print("agent: stopped producing; forwarding what is in the outbox")

        if produce_seconds == 0:
            stop_producing()  # forward the backlog only: not one reading sampled
        elif produce_seconds is not None:
            loop.call_later(produce_seconds, stop_producing)
        if not ble:
            await service.run(stop)
            return
        from functools import partial

        from edge_agent.paired_devices import PairedDevices
        from edge_agent.sources.ble import BleSource, run_sources

        registry = PairedDevices.in_dir(cfg.agent.data_dir)
        sources = [BleSource(profiles[d.profile], partial(service.record, dev_id), address=d.address,
                             registry=registry, pair=d.pair) for dev_id, d in ble]
        async def until_stopped() -> None:
            await stop.wait()
            ble_stop.set()

        await asyncio.gather(service.run(stop), run_sources(sources, ble_stop), until_stopped())

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
    ledger = _open_store(Ledger, ledger_path(bdir))
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
    full: Annotated[bool, typer.Option("--full", help="Instead: audit a whole ledger (--data-dir): every leaf "
                                       "hash, tree head, checkpoint, consistency and event signature.")] = False,
    data_dir: DataDirOpt = None,
    operator_keys: Annotated[list[str] | None, typer.Option("--operator-key", help="With --full: an operator "
                             "public key (hex) trusted for registrations; repeatable.")] = None,
) -> None:
    """Check a proof offline, from public data alone: an inclusion proof (event → signed checkpoint),
    a consistency proof between two checkpoints, or a checkpoint signature. Exit 1 if it does not hold.
    With --full, audit a whole ledger store instead (docs/proofs.md)."""
    from pydantic import ValidationError

    if full:
        _verify_full(data_dir, log_key_hex, operator_keys, as_json)
        return

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


def _verify_full(data_dir: Path | None, log_key_hex: str | None, operator_hex: list[str] | None,
                 as_json: bool) -> None:
    """`verify --full`: audit a whole ledger store (chain_bridge.ledger.integrity), progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from carechain.identity import Identity, KeyFileError, device_id_for
    from carechain.sqlite_store import StoreError
    from chain_bridge.ledger.integrity import AuditFailure, audit_ledger
    from chain_bridge.registry import LOG_KEY_FILE, OPERATOR_KEY_FILE, ledger_path

    if data_dir is None:
        raise _fail("--full needs --data-dir: the bridge data directory that holds ledger.db")
    try:
        if log_key_hex:
            log_key = bytes.fromhex(log_key_hex)
        elif (data_dir / LOG_KEY_FILE).exists():
            log_key = Identity.load(data_dir / LOG_KEY_FILE).public_key
        else:
            raise _fail(f"no log key: pass --log-key HEX (the log's public key, from its operator), or a "
                        f"--data-dir with {LOG_KEY_FILE}")
        operators: dict[str, bytes] | None = None
        if operator_hex:
            operators = {device_id_for(k): k for k in map(bytes.fromhex, operator_hex)}
        elif (data_dir / OPERATOR_KEY_FILE).exists():
            op = Identity.load(data_dir / OPERATOR_KEY_FILE)
            operators = {op.device_id: op.public_key}
        if len(log_key) != 32:
            raise ValueError("the log key must be 32 bytes (64 hex digits)")
    except KeyFileError as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:
        raise _fail(f"--log-key/--operator-key: {exc}") from None

    bar: Progress | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total >= 20_000:  # small logs verify in well under a second
            bar = Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TextColumn("entries"),
                           TimeRemainingColumn(), console=console, transient=True)
            bar.start()
            bar.add_task("entries", total=total)
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done)

    path = ledger_path(data_dir)
    try:
        report = audit_ledger(path, log_key, operator_keys=operators, on_progress=on_progress)
    except (AuditFailure, StoreError) as exc:
        if bar is not None:
            bar.stop()
        if as_json:
            out.print_json(data={"ok": False, "error": str(exc), "where": getattr(exc, "where", "store"),
                                 "index": getattr(exc, "index", None)})
        else:
            console.print(f"[bold red]NOT VERIFIED:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if bar is not None:
        bar.stop()
    if as_json:
        out.print_json(data={"ok": True, "full": report.as_dict()})
        return
    r = report
    notes = [f"root {r.root.hex()} at size {r.entries}"]
    if r.uncovered:
        notes.append(f"{r.uncovered} entries after the last checkpoint are not yet covered by a signed one")
    if not r.operator_signatures_checked:
        notes.append("registration signers not checked (give --operator-key HEX)")
    contract = f", {r.contract_entries} contract entries" if r.contract_entries else ""
    out.print(f"[bold green]VERIFIED[/] {escape(str(path))}: {r.entries} entries ({r.events} events, "
              f"{r.registrations} registrations, {r.revocations} revocations{contract}), {r.checkpoints} checkpoints "
              f"signed by the log key, {r.consistency_proofs} consistency proofs; {escape('; '.join(notes))}",
              soft_wrap=True, highlight=False)


# -- demo ---------------------------------------------------------------------------------------------

@app.command()
def demo(
    broker: Annotated[str | None, typer.Option(help="Use this MQTT broker HOST:PORT (e.g. a mosquitto) "
                                               "instead of the embedded one.")] = None,
    seconds: Annotated[float, typer.Option(help="How long devices produce readings.", min=1)] = 6.0,
    speedup: Annotated[float, typer.Option(help="Sample simulated devices this many times faster.", min=0.1)] = 20.0,
    data_dir: Annotated[Path | None, typer.Option(help="Keep demo data here (default: a new temp dir).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the summary as one JSON object.")] = False,
    ble: Annotated[bool, typer.Option("--ble", help="The health devices are virtual BLE peripherals (bumble) "
                                      "reached through the agent's bleak code, as on a Raspberry Pi.")] = False,
) -> None:
    """The whole flow on one machine: 6 BLE health devices + a pharmacy terminal → agent → MQTT → bridge →
    verifiable log, with hostile traffic injected, then one inclusion proof verified end to end."""
    from carechain.demo.pipeline import run_demo

    logging.basicConfig(level=logging.ERROR)
    if as_json:
        summary = run_demo(broker=broker, seconds=seconds, data_dir=data_dir, speedup=speedup, ble=ble)
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
        summary = run_demo(broker=broker, seconds=seconds, data_dir=data_dir, speedup=speedup, ble=ble,
                           on_tick=lambda s: live.update(render(s)))
    _print_summary(summary)
    raise typer.Exit(0 if summary["proof_verified"] else 1)


def _print_summary(s: dict[str, Any]) -> None:
    t = Table("", "", title="summary")
    t.add_row("broker", s["broker"])
    t.add_row("events signed and sent by agents", str(s["sent"]))
    t.add_row("anchored in the log (exactly once)", str(s["anchored"]))
    t.add_row("  by kind", ", ".join(f"{k} {n}" for k, n in sorted(s["anchored_by_kind"].items())))
    if s["ble"]:
        t.add_row("  read over BLE (bleak → bumble)", ", ".join(s["ble"]))
    t.add_row("rejected", f"{s['rejected']}  {s['rejected_by_reason']}")
    t.add_row("duplicates re-acknowledged", str(s["duplicates"]))
    t.add_row("checkpoints signed", str(s["checkpoints"]))
    t.add_row("outbox left / quarantined", f"{s['outbox_left']} / {s['quarantined']}")
    t.add_row("inclusion proof verified", "[green]yes[/]" if s["proof_verified"] else f"[red]no[/] {s['proof']}")
    out.print(t)
    if s.get("pharmacy"):
        _print_pharmacy_day(s["pharmacy"], s["rejected_by_reason"])
    p = s["proof"] or {}
    if "leaf_index" in p:
        out.print(f"proof: event {p['device_id']}#0 is leaf {p['leaf_index']} of tree {p['tree_size']} "
                  f"(root {p['root_hash'][:16]}…)\ndata: {s['data_dir']}  — try: carechain proof "
                  f"{p['device_id']} 0 --data-dir {s['data_dir']}/bridge --json > p.json && carechain verify p.json")


def _print_pharmacy_day(day: dict[str, Any], reasons: dict[str, int]) -> None:
    refused = {r.removeprefix("contract:"): n for r, n in reasons.items() if r.startswith("contract:")}
    t = Table("", "", title="pharmacy day (contracts)")
    t.add_row("sales refused by the contracts", f"{sum(refused.values())}  {refused}")
    t.add_row("violations counted against the pharmacy", str(day["pharmacy_violations"]))
    for c in day["claims"]:
        t.add_row(f"  claim: {c['category']} for {c['patient']}",
                  f"insurer pays {c['insurer_share']} of {c['price']} (copay {c['copay']})")
    for account, minor in day["balances"].items():
        t.add_row(f"  balance {account}", f"{minor / 100:,.2f}")
    t.add_row("contract state root", day["state_root"][:32] + "…")
    out.print(t)


# -- contracts (carechain/cli/contracts.py; imported last: it builds on the helpers above) --------------

from carechain.cli import contracts as cli_contracts  # noqa: E402

cli_contracts.attach(app, sys.modules[__name__])
_contract_gate = cli_contracts.contract_gate

from carechain.cli import store as cli_store  # noqa: E402

cli_store.attach(app, sys.modules[__name__])

if __name__ == "__main__":  # pragma: no cover
    app()

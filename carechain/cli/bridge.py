"""`carechain bridge` (run the bridge) and `carechain bridge acl` (broker access from the registry)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carechain import sd_notify
from carechain.cli._options import (
    BrokerOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    LogFormat,
    LogFormatOpt,
    SetOpt,
    StopSignal,
    VerboseOpt,
    bridge_dir,
    check_broker_tls,
    console,
    example,
    fail,
    load,
    out,
    setup_logging,
)

if TYPE_CHECKING:
    from carechain.config import Config
    from chain_bridge.bridge import Bridge
    from chain_bridge.console.server import ConsoleServer

bridge_app = typer.Typer(no_args_is_help=False)


@bridge_app.callback(invoke_without_command=True,
                     epilog=example("carechain bridge --config carechain.yaml",
                                    "carechain bridge --broker 127.0.0.1:1883 --data-dir carechain-data/bridge",
                                    "carechain bridge -c carechain.yaml --http 127.0.0.1:8080 --log-format json",
                                    "carechain bridge -c carechain.yaml --set bridge.batch_max=500"))
def bridge(ctx: typer.Context, config: ConfigOpt = None, broker: BrokerOpt = None, data_dir: DataDirOpt = None,
           workers: Annotated[int | None, typer.Option(
               help="Ingest worker processes on an MQTT shared subscription (0: verify in-process). "
                    "Needs a broker with shared subscriptions, e.g. mosquitto.", min=0, max=64)] = None,
           http: Annotated[str | None, typer.Option(
               "--http", metavar="HOST:PORT",
               help="Serve the operator's web console, /metrics, /healthz and /readyz here (overrides "
                    "bridge.console.listen; keep it on loopback or a management network). Accounts: "
                    "`carechain console user add`.")] = None,
           settings: SetOpt = None, log_format: LogFormatOpt = LogFormat.text,
           verbose: VerboseOpt = False) -> None:
    """Run the bridge: verify, deduplicate and anchor device events; receipts; checkpoints every interval.

    Runs until interrupted (Ctrl-C / SIGTERM), then issues a last checkpoint, prints its counters as one
    JSON line on stdout and exits. One bridge per data directory: a second one is refused (exit 2). With a
    subcommand (`carechain bridge acl`), runs that instead. With --http (or bridge.console.listen) it also
    serves the read-only web console (docs/console.md).
    """
    if ctx.invoked_subcommand is not None:
        return
    from carechain.datadir import DataDirLocked
    from carechain.sqlite_store import StoreError
    from chain_bridge.assembly import assemble_bridge

    stop = StopSignal()
    setup_logging(verbose, log_format)
    cfg = load(config, broker, settings)
    check_broker_tls(cfg)
    try:
        assembled = assemble_bridge(cfg, data_dir=bridge_dir(cfg, data_dir), workers=workers)
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    except (ValueError, DataDirLocked) as exc:  # ConfigError is a ValueError
        raise fail(str(exc)) from None
    service = assembled.bridge
    listen = http or cfg.bridge.console.listen
    if listen is not None:
        from chain_bridge.console.serve import listen_address

        try:
            listen_address(listen)
        except ValueError as exc:
            assembled.close()
            raise fail(str(exc)) from None
    console.print(f"bridge: broker {cfg.broker.address}, ledger {assembled.ledger_location()} "
                  f"(size {service.ledger.size}), origin {service.origin}\n"
                  f"log public key {service.log_key.public_key.hex()}", soft_wrap=True, highlight=False)
    web: ConsoleServer | None = None
    watchdog = None
    try:
        # Several bridge hosts on one PostgreSQL ledger: all ingest and append, the lease holder leads; or,
        # without bridge.store.standby_ingest, one is active and the others wait idle.
        if service.ingests_without_lease:
            if not service.try_lead():
                console.print("bridge: ingest host (verifies, appends, receipts); leads once it holds the "
                              "sequencer lease", highlight=False)
        elif service.lease is not None:
            console.print("bridge: standby until it holds the sequencer lease", highlight=False)
            sd_notify.ready("bridge: standby until it holds the sequencer lease")  # standing by is started
        # Pings only while the sequencer thread lives and turns (a standby is healthy until it starts).
        watchdog = sd_notify.Watchdog.from_env(service.healthy)
        if watchdog is not None:
            watchdog.start()
        if service.ingests_without_lease or service.await_lease(stop.is_set):  # stopped while standing by: done
            if service.lease is not None and service.lease.held:
                console.print("bridge: holds the sequencer lease; active", highlight=False)
            # Ingest workers, if any, are spawned in start(): they must inherit an ignored SIGINT. Without
            # workers there is nothing to spawn, and no window in which a Ctrl-C would be lost.
            with stop.children_ignore_sigint() if service.cfg.ingest_workers else contextlib.nullcontext():
                service.start()
            if listen is not None:
                web = _start_console(service, cfg, assembled.data_dir, listen)
            if stop.wait_for(service.wait_ready, 30):
                console.print(f"bridge ready: subscribed with {service.cfg.ingest_workers or 'no'} ingest workers")
                sd_notify.ready(f"bridge: subscribed to {cfg.broker.address}, tree size {service.ledger.size}")
            elif not stop.is_set():
                console.print(f"[yellow]bridge: not subscribed yet; broker {cfg.broker.address} unreachable or "
                              "refusing; retrying in the background[/]")
                # Started all the same: it subscribes by itself, and a broker outage must not become a restart loop.
                sd_notify.ready(f"bridge: broker {cfg.broker.address} unreachable; retrying")
            stop.wait()
    finally:
        sd_notify.stopping("bridge: stopping; issuing a last checkpoint")
        if watchdog is not None:
            watchdog.stop()
        if web is not None:
            web.stop()  # before the bridge: no page reads a ledger being closed
        service.stop()
        assembled.close()
    if not service.ever_connected.is_set():
        console.print(f"[yellow]bridge: never connected to broker {cfg.broker.address}; nothing was received[/]",
                      soft_wrap=True)
    print(json.dumps(service.stats.as_dict()), flush=True)  # final counters, on stdout for scripts


def _start_console(service: Bridge, cfg: Config, data_dir: Path, listen: str) -> ConsoleServer:
    """Serve the console of the running bridge on `listen`; print its URL, or fail (exit 2) if it cannot."""
    from chain_bridge.console.accounts import accounts_path
    from chain_bridge.console.serve import serve_console
    from chain_bridge.console.server import ConsoleError

    accounts = accounts_path(cfg.bridge, data_dir)
    try:
        web = serve_console(service, cfg.bridge.console, listen, accounts)
    except (ConsoleError, ValueError, OSError) as exc:  # a damaged or too open pseudonym key: the message says
        raise fail(str(exc)) from None
    console.print(f"console: {web.url}  (accounts: {accounts}"
                  + ("" if accounts.exists() else "; none yet: carechain console user add NAME --role operator")
                  + ")", soft_wrap=True, highlight=False)
    return web


@bridge_app.command("acl", epilog=example("carechain bridge acl --data-dir carechain-data/bridge",
                                          "carechain bridge acl --workers 4 --miner MINER_ID",
                                          "carechain bridge acl --hosts 2",
                                          "carechain bridge acl --rotate carechain-bridge"))
def bridge_acl(
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where to write passwd, acl, nats-authorization.conf, bridge.json and devices/<device_id>.json "
                      "(default: DATA_DIR/broker).")] = None,
    bridge_user: Annotated[str, typer.Option(help="MQTT user name of the bridge.")] = "carechain-bridge",
    rotate: Annotated[list[str] | None, typer.Option(
        help="Give this user (a device id, the bridge user or carechain-miner-<id>) a new password; "
             "repeatable.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Logins for this many bridge ingest workers, <bridge user>-w0 … (default: bridge.ingest_workers "
             "of the config). The broker ties client ids to logins, so each worker needs its own.",
        min=0, max=64)] = None,
    hosts: Annotated[int | None, typer.Option(
        help="Logins for this many bridge hosts sharing one PostgreSQL ledger, <bridge user>-h0 … "
             "(hosts/<login>.json, with the bridge's password and rights): each host needs its own client id. "
             "Default: as many as the previous run wrote.", min=0, max=16)] = None,
    miner: Annotated[list[str] | None, typer.Option(
        help="Add a login for the witness miner with this id (`carechain keys show MINER_KEY`); repeatable. "
             "Miners' logins are kept across runs.")] = None,
    remove_miner: Annotated[list[str] | None, typer.Option(
        help="Drop the login of this miner; repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a mosquitto password file and ACL from the ledger's registry: least privilege per device.

    Every registered, non-revoked device gets its own MQTT user (user name = device_id) that may only
    publish cc/v1/dev/<its id>/ev and read its own receipts and the checkpoint; the bridge user reads all
    events and writes receipts and checkpoints, and so does each bridge host of a shared PostgreSQL ledger
    (--hosts: <bridge user>-h<i>, hosts/<login>.json); each ingest worker (<bridge user>-w<i>, sharing
    bridge.json's password) only reads events; each witness miner (carechain-miner-<id>, miners/<id>.json) its own miner
    topics and the checkpoints; revoked devices get no login. The shipped mosquitto template ties every
    client id to its login, so no login can take over another client. Passwords are random, kept
    in DATA_DIR/broker/credentials.json (mode 0600) so re-running keeps them stable, and handed out in one
    provisioning file per party (mode 0600); they are never printed. Re-run after every registration or
    revocation, install passwd and acl for mosquitto and reload it (SIGHUP). The same logins, with the same
    rights, are written for a NATS cluster too (nats-authorization.conf, mode 0600: each node's config includes
    it; reload with nats-server --signal reload). See docs/broker-security.md and docs/nats.md.
    """
    from carechain.cli._ledger import open_bridge_ledger
    from chain_bridge.broker import SECURE_CONF_TEMPLATE
    from chain_bridge.broker.acl import NATS_AUTHORIZATION_FILE, BrokerAccessError, generate_broker_access, store_path

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, bdir, missing="register devices first (`carechain register`), or point "
                                "--data-dir at the bridge's data directory")
    try:
        access = generate_broker_access(
            ledger, bdir, out_dir or bdir / "broker", bridge_user=bridge_user, rotate=rotate or (),
            workers=cfg.bridge.ingest_workers if workers is None else workers, add_miners=miner or (),
            remove_miners=remove_miner or (), hosts=hosts)
    except (BrokerAccessError, OSError) as exc:
        raise fail(str(exc)) from None
    finally:
        ledger.close()
    plan = access.plan
    devices_dir = access.passwd.parent / "devices"
    if as_json:
        print(json.dumps({
            "devices": len(access.device_credentials), "bridge_user": bridge_user,
            "revoked_left_out": access.revoked_left_out, "passwd": str(access.passwd), "acl": str(access.acl),
            "bridge_credentials": str(access.bridge_credentials), "devices_dir": str(devices_dir),
            "workers": access.workers, "hosts": [str(p) for p in access.host_credentials],
            "miners": sorted(access.miner_credentials),
            "miners_dir": str(access.passwd.parent / "miners"),
            "stores_dir": str(access.passwd.parent / "stores"),
            "aggregators_dir": str(access.passwd.parent / "aggregators"),
            "nats_authorization": str(access.nats_authorization),
            "passwords": str(store_path(bdir)), "added": list(plan.added), "rotated": list(plan.rotated),
            "removed": list(plan.removed), "template": str(SECURE_CONF_TEMPLATE)}), flush=True)
        return
    lines = [
        f"broker access for {len(access.device_credentials)} device(s) and bridge user {bridge_user} "
        f"({access.revoked_left_out} revoked device(s) left out)",
        f"passwd      {access.passwd}",
        f"acl         {access.acl}",
        f"bridge      {access.bridge_credentials}   (broker.credentials_file of `carechain bridge`)",
        f"devices     {devices_dir}/<device_id>.json   (copy each to its agent: agent.devices[].mqtt_credentials_file)",
        f"workers     {access.workers} ingest worker login(s), {bridge_user}-w<i>, from bridge.json "
        "(run the bridge with at most that many --workers)",
        *([f"hosts       {access.passwd.parent / 'hosts'}/{bridge_user}-h<i>.json   ({len(access.host_credentials)} "
           "bridge host(s) on the shared PostgreSQL ledger: broker.credentials_file of each)"]
          if access.host_credentials else []),
        f"passwords   {store_path(bdir)} (mode 0600; never printed)",
    ]
    if access.miner_credentials:
        lines.insert(5, f"miners      {access.passwd.parent / 'miners'}/<miner_id>.json   (copy each to its miner: "
                        f"broker.credentials_file; {len(access.miner_credentials)} miner(s))")
        lines.insert(6, f"stores      {access.passwd.parent / 'stores'}/<miner_id>.json   (each miner's storage "
                        "server: --credentials)")
        lines.insert(7, f"aggregators {access.passwd.parent / 'aggregators'}/<miner_id>.json   (each miner's "
                        "study aggregator: --publish --credentials)")
    for label, users in (("new", plan.added), ("rotated", plan.rotated), ("removed", plan.removed)):
        if users:
            lines.append(f"{label:<11} {', '.join(users)}")
    lines += [f"nats        {access.nats_authorization}   (the same logins for a NATS cluster: see below)",
              f"template    {SECURE_CONF_TEMPLATE}",
              "next: install passwd and acl where mosquitto reads them (mode 0600, owner mosquitto), "
              "then reload it: kill -HUP <mosquitto pid>",
              f"      or, on a NATS cluster: install {NATS_AUTHORIZATION_FILE} next to each node's config (mode 0600, "
              f"owner nats), include it there (include \"{NATS_AUTHORIZATION_FILE}\") and reload every node: "
              "nats-server --signal reload (or kill -HUP <nats-server pid>)"]
    out.print("\n".join(lines), soft_wrap=True, markup=False, highlight=False)

"""A bridge assembled from config: data-dir lock, log and operator keys, ledger, contract gate, `Bridge`.

One place for what `carechain bridge`, the demo and the test harnesses would otherwise each wire by hand.
Failures are `ConfigError` (a setting or file the user must fix), `DataDirLocked` (another process runs on
this data directory) or `StoreError` (the ledger file is damaged, or its database cannot be reached); every
message names what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from carechain.config import Config, ConfigError
from carechain.credentials import CredentialsError, resolve_broker_login
from carechain.datadir import DataDirLock, instance_id, lock_data_dir
from carechain.files import make_private
from chain_bridge.bridge import Bridge
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.sql import SqliteLocation
from chain_bridge.ledger.store import open_ledger
from chain_bridge.registry import contract_genesis, log_key, operator_key


def contract_gate(cfg: Config, data_dir: Path) -> ContractGate:
    """The bridge's contract gate: the deployment genesis (written on first use) and the operator key."""
    try:
        genesis = contract_genesis(data_dir, cfg.bridge.genesis_allocations or None, cfg.bridge.operator_keys)
        return ContractGate(genesis, operator_key(data_dir))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class AssembledBridge:
    """A bridge ready to `start()`, holding its data directory until `close()` (or process exit)."""

    bridge: Bridge
    data_dir: Path
    lock: DataDirLock

    def ledger_location(self) -> str:
        """Where the ledger is, for the start-up line: its file, or its database (without a password)."""
        return self.bridge.ledger.describe()

    def close(self) -> None:
        """After `bridge.stop()` (or if it never started): close the ledger and release the data directory."""
        self.bridge.ledger.close()
        self.lock.release()


def default_client_id(username: str | None, data_dir: Path) -> str:
    """The bridge's MQTT client id: its login when it has one, else `carechain-bridge-<instance>`.

    A broker locked down by `carechain bridge acl` ties client ids to logins (`use_username_as_clientid`):
    it replaces whatever id a client sends by its user name, so the bridge's id is its login there anyway,
    and its ingest workers (`<id>-w<i>`) get the ids of their own logins `<bridge user>-w<i>`. Without a
    login (an open test broker) the data directory's instance id keeps two bridges apart.
    """
    return username or f"carechain-bridge-{instance_id(data_dir)}"


def assemble_bridge(cfg: Config, *, data_dir: Path | None = None, workers: int | None = None,
                    client_id: str | None = None) -> AssembledBridge:
    """Lock `data_dir` (default `cfg.bridge.data_dir`) and build the bridge it holds; nothing connects yet.

    `broker.credentials_file`, if set, is resolved (`resolve_broker_login`). The MQTT client id is
    `client_id`, default `default_client_id` (the bridge's login, or `carechain-bridge-<instance>` with the
    data directory's instance id, so two bridges never take over each other's session); ingest workers add
    `-w<i>`. The data directory is made 0700 and a SQLite ledger 0600 (with its WAL and SHM). With
    `bridge.store` PostgreSQL the bridge gets a sequencer lease: it starts at once as an ingest host and leads
    once it holds the lease (`store.standby_ingest`, the default), or must `await_lease` before `start`.
    """
    bdir = Path(data_dir or cfg.bridge.data_dir)
    bridge_cfg = cfg.bridge.model_copy(update={"data_dir": bdir})
    if workers is not None:
        bridge_cfg.ingest_workers = workers
    try:
        broker = resolve_broker_login(cfg.broker)
    except CredentialsError as exc:
        raise ConfigError(str(exc)) from None
    lock = lock_data_dir(bdir, "bridge")
    try:
        gate = contract_gate(cfg, bdir) if bridge_cfg.contracts else None
        ledger = open_ledger(bridge_cfg, bdir, role=f"carechain-bridge {instance_id(bdir)}")
        lease = None
        try:
            if isinstance(ledger.location, SqliteLocation):
                make_private(ledger.path)  # 0600 with its WAL and SHM: health data (the dir is 0700 already)
            else:
                from chain_bridge.lease import SequencerLease
                from chain_bridge.ledger.postgres import PostgresLocation

                lease = SequencerLease(cast(PostgresLocation, ledger.location), poll_s=bridge_cfg.store.lease_poll_s)
            bridge = Bridge(bridge_cfg, broker, log_key(bdir), ledger,
                            client_id=client_id or default_client_id(broker.username, bdir), contracts=gate,
                            lease=lease)
        except BaseException:
            if lease is not None:
                lease.release()
            ledger.close()
            raise
    except BaseException:
        lock.release()
        raise
    return AssembledBridge(bridge, bdir, lock)

"""The bridge data dir's fixed parts (ledger, keys, contract genesis) and device registration from an inventory."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from carechain.entries import Registration, registration_entry
from carechain.files import write_atomic
from carechain.identity import Identity, parse_public_key_hex
from carechain.inventory import InventoryDevice
from chain_bridge.ledger.store import Ledger
from contract_rules import Genesis
from contract_rules.genesis import genesis_to_json, new_genesis, read_genesis

LEDGER_FILE = "ledger.db"
LOG_KEY_FILE = "keys/log.key"
OPERATOR_KEY_FILE = "keys/operator.key"
GENESIS_FILE = "contracts/genesis.json"
# A demo's token supply when the config sets none (bridge.genesis_allocations): the miners' pool only.
# A real deployment lists its insurers' opening balances there before the bridge first starts.
DEFAULT_ALLOCATIONS: Mapping[str, int] = {"pool:miners": 500_000}


def ledger_path(data_dir: Path) -> Path:
    return Path(data_dir) / LEDGER_FILE


def log_key(data_dir: Path) -> Identity:
    """The bridge's log key (signs checkpoints and receipts); created on first use, mode 0600."""
    return Identity.load_or_create(Path(data_dir) / LOG_KEY_FILE)


def operator_key(data_dir: Path) -> Identity:
    """The operator key that signs registrations and revocations; created on first use, mode 0600."""
    return Identity.load_or_create(Path(data_dir) / OPERATOR_KEY_FILE)


def register_devices(ledger: Ledger, operator: Identity, devices: Sequence[InventoryDevice]) -> list[int]:
    """Append one signed registration per device, all in one transaction; returns their leaf indexes."""
    now = int(time.time() * 1000)
    items = []
    for d in devices:
        reg = Registration(dev=d.device_id, pk=d.public_key, profile=d.profile, owner=d.owner, site=d.site, ts=now)
        items.append((registration_entry(operator, reg), reg))
    return ledger.append_registrations(items)


def contract_genesis(data_dir: Path, allocations: Mapping[str, int] | None = None,
                     operator_keys: Sequence[str] = ()) -> Genesis:
    """The deployment's contract genesis, `<data_dir>/contracts/genesis.json`.

    Written on first use: the operator and log keys (plus `operator_keys`, hex), `allocations` (or
    DEFAULT_ALLOCATIONS) and the code hashes of the builtin contracts. Once written it is only ever read:
    every replica must replay the ledger from the same genesis, so changing it means a new ledger.
    """
    path = Path(data_dir) / GENESIS_FILE
    if not path.exists():
        # The log key signs checkpoints, which an access grant's seed checkpoint must carry (docs/access.md).
        keys = [operator_key(data_dir).public_key, log_key(data_dir).public_key,
                *(parse_public_key_hex(k, "bridge.operator_keys") for k in operator_keys)]
        write_genesis(path, new_genesis(keys, allocations or DEFAULT_ALLOCATIONS))
    try:
        return read_genesis(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; restore it from a backup: every replica must use the same one") from None


def write_genesis(path: Path, genesis: Genesis) -> None:
    """Write `genesis` as JSON, atomically and fsynced: a crash never leaves half a genesis. Not secret: 0644."""
    write_atomic(Path(path), genesis_to_json(genesis), mode=0o644)

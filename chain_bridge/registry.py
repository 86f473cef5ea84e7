"""The bridge data dir's fixed parts (ledger, keys, contract genesis) and device registration from an inventory."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from carechain.entries import Registration, registration_entry
from carechain.identity import Identity, device_id_for
from carechain.inventory import InventoryDevice
from chain_bridge.ledger.store import Ledger
from contract_rules import Genesis, builtin_hashes

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

    Written on first use: the operator key (plus `operator_keys`, hex), `allocations` (or
    DEFAULT_ALLOCATIONS) and the code hashes of the builtin contracts. Once written it is only ever read:
    every replica must replay the ledger from the same genesis, so changing it means a new ledger.
    """
    path = Path(data_dir) / GENESIS_FILE
    if not path.exists():
        keys = [operator_key(data_dir).public_key, *(bytes.fromhex(k) for k in operator_keys)]
        doc = {"operators": {device_id_for(k): k.hex() for k in keys},
               "allocations": dict(sorted((allocations or DEFAULT_ALLOCATIONS).items())),
               "contracts": builtin_hashes()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)  # a crash never leaves half a genesis
    try:
        doc = json.loads(path.read_text())
        return Genesis(operators={kid: bytes.fromhex(pk) for kid, pk in doc["operators"].items()},
                       allocations=dict(doc["allocations"]), contracts=dict(doc["contracts"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable contract genesis ({exc}); restore it from a backup: every "
                         "replica must use the same one") from None

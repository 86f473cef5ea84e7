"""Device registration from an inventory: operator-signed registration entries appended to the ledger."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from carechain.entries import Registration, registration_entry
from carechain.identity import Identity
from carechain.inventory import InventoryDevice
from chain_bridge.ledger.store import Ledger

LEDGER_FILE = "ledger.db"
LOG_KEY_FILE = "keys/log.key"
OPERATOR_KEY_FILE = "keys/operator.key"


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

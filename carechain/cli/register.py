"""`carechain register`: devices from an inventory become operator-signed registrations on the ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, bridge_dir, example, fail, load, out

EPILOG = example("carechain register devices.yaml --data-dir carechain-data/bridge")


def register(
    inventory: Annotated[Path, typer.Argument(help="Inventory YAML: devices with profile, owner, site, key.")],
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
    profiles_dir: Annotated[Path | None, typer.Option(help="Device profiles folder.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register devices from an inventory as operator-signed entries on the ledger.

    Every device gets a registration entry binding its public key to its profile, owner and site; the
    bridge accepts events only from registered, non-revoked devices. All or nothing: one bad line and
    nothing is registered.
    """
    from carechain.cli._ledger import open_bridge_ledger
    from carechain.inventory import InventoryError, load_inventory
    from carechain.profiles import ProfileError, load_profiles
    from chain_bridge.contract_admin import replay_ledger
    from chain_bridge.ledger.store import LedgerError
    from chain_bridge.registry import GENESIS_FILE, operator_key, register_devices
    from contract_rules.genesis import read_genesis

    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    ledger = open_bridge_ledger(cfg, bdir)
    try:
        # With contracts, an owner is a registered party's id (a patient for a health device), not a label.
        parties = None
        if (bdir / GENESIS_FILE).exists():
            state = replay_ledger(ledger, read_genesis(bdir / GENESIS_FILE)).state
            parties = {pid: str(p["role"]) for pid, p in state.table("parties").items()}
        try:
            devices = load_inventory(inventory, load_profiles(profiles_dir), parties)
        except (InventoryError, ProfileError) as exc:
            raise fail(str(exc)) from None
        known = ledger.devices()
        for d in devices:
            if d.device_id in known:
                raise fail(f"{inventory}:{d.line}: device {d.name} ({d.device_id}) is already registered "
                           f"at leaf {known[d.device_id].registered_idx}")
        try:
            indexes = register_devices(ledger, operator_key(bdir), devices)
        except LedgerError as exc:
            raise fail(str(exc)) from None
    finally:
        ledger.close()
    rows = [{"name": d.name, "device_id": d.device_id, "profile": d.profile, "owner": d.owner, "site": d.site,
             "leaf": idx} for d, idx in zip(devices, indexes, strict=True)]
    if as_json:
        print(json.dumps({"data_dir": str(bdir), "registered": rows}), flush=True)
        return
    table = Table("name", "device_id", "profile", "owner", "site", "leaf", title=f"registered in {bdir}")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    out.print(table)


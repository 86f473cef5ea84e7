"""The contract genesis as bytes: what the bridge writes once and every replica (bridge, tools, miners) reads.

Pure: bytes in, `Genesis` out, and back; files are the callers' (chain_bridge.registry, the miner). Two
forms are read: JSON `{"operators": {kid: hex key}, "allocations": {account: int}, "contracts": {name:
code hash}}` (what the bridge writes, indented, keys sorted) and the CBOR of `Genesis.to_cbor`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from carechain.identity import device_id_for, parse_public_key_hex
from contract_rules.runtime import Genesis, builtin_hashes

__all__ = ["GenesisError", "genesis_from_bytes", "genesis_to_json", "new_genesis"]


class GenesisError(ValueError):
    """Bytes that are not a contract genesis; the message says what is wrong."""


def new_genesis(operator_keys: Sequence[bytes], allocations: Mapping[str, int],
                contracts: Mapping[str, str] | None = None) -> Genesis:
    """A genesis for these operator public keys and opening balances, pinning the builtin contracts' code."""
    return Genesis(operators={device_id_for(k): bytes(k) for k in operator_keys},
                   allocations=dict(sorted(allocations.items())),
                   contracts=dict(builtin_hashes() if contracts is None else contracts))


def genesis_to_json(genesis: Genesis) -> bytes:
    """The JSON form, as the bridge writes it to `contracts/genesis.json`."""
    doc = {"operators": {kid: pk.hex() for kid, pk in genesis.operators.items()},
           "allocations": dict(genesis.allocations), "contracts": dict(genesis.contracts)}
    return (json.dumps(doc, indent=2) + "\n").encode()


def genesis_from_bytes(data: bytes) -> Genesis:
    """Read either form (JSON if it starts with "{", else CBOR); GenesisError if it is neither."""
    try:
        if data.lstrip()[:1] == b"{":
            raw = json.loads(data)
            return Genesis(operators={kid: parse_public_key_hex(pk, f"genesis operator {kid}")
                                      for kid, pk in raw["operators"].items()},
                           allocations={account: _amount(account, n) for account, n in raw["allocations"].items()},
                           contracts=dict(raw["contracts"]))
        return Genesis.from_cbor(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GenesisError(f"not a contract genesis (JSON with operators, allocations, contracts; or its CBOR): "
                           f"{exc}") from None


def read_genesis(path: Path) -> Genesis:
    """The genesis in the file at `path` (JSON or CBOR); a ValueError naming the file otherwise. (Written by
    `chain_bridge.registry.write_genesis`, atomically; read by the bridge and by every miner.)"""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GenesisError(f"{path}: cannot read the contract genesis: {exc.strerror}") from None
    try:
        return genesis_from_bytes(data)
    except GenesisError as exc:
        raise GenesisError(f"{path}: {exc}") from None


def _amount(account: str, n: object) -> int:
    if type(n) is not int:
        raise ValueError(f"allocation for {account!r} must be an integer, got {n!r:.40}")
    return n

"""The contract genesis: one pure reader/writer, one file form, the same genesis for the bridge and the miners."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from carechain.identity import Identity
from chain_bridge.registry import GENESIS_FILE, contract_genesis, log_key, operator_key, write_genesis
from contract_rules import Genesis, builtin_hashes
from contract_rules.genesis import GenesisError, genesis_from_bytes, genesis_to_json, new_genesis, read_genesis

OP = Identity.from_seed(b"\x31" * 32)
OTHER = Identity.from_seed(b"\x32" * 32)


def test_json_and_cbor_forms_read_back_to_the_same_genesis() -> None:
    genesis = new_genesis([OP.public_key, OTHER.public_key], {"pool:miners": 5, "insurer:a": 7})
    assert list(genesis.allocations) == ["insurer:a", "pool:miners"] and genesis.contracts == builtin_hashes()
    assert genesis_from_bytes(genesis_to_json(genesis)) == genesis
    assert genesis_from_bytes(genesis.to_cbor()) == genesis


@pytest.mark.parametrize(("data", "says"), [
    (b"{not json", "not a contract genesis"),
    (b'{"operators": {}, "allocations": {}}', "contracts"),
    (b'{"operators": {"x": "abcd"}, "allocations": {}, "contracts": {}}', "genesis operator x"),
    (b'{"operators": {}, "allocations": {"pool:m": 1.5}, "contracts": {}}', "must be an integer"),
    (b"\xff\x00", "not a contract genesis"),
])
def test_bytes_that_are_not_a_genesis_are_refused_saying_why(data: bytes, says: str) -> None:
    with pytest.raises(GenesisError, match=says):
        genesis_from_bytes(data)


def test_the_bridge_writes_its_genesis_once_atomically_and_miners_read_the_same_file(tmp_path: Path) -> None:
    genesis = contract_genesis(tmp_path, {"insurer:x": 5}, operator_keys=[OTHER.public_key.hex()])
    path = tmp_path / GENESIS_FILE
    doc = json.loads(path.read_text())
    assert list(doc) == ["operators", "allocations", "contracts"]
    assert list(doc["operators"].values()) == [operator_key(tmp_path).public_key.hex(),
                                             log_key(tmp_path).public_key.hex(), OTHER.public_key.hex()]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # public: every miner needs a copy
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind
    assert read_genesis(path) == genesis == contract_genesis(tmp_path, {"insurer:x": 999})


def test_a_damaged_genesis_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "genesis.json"
    write_genesis(path, Genesis({}, {}, {}))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=f"{path.name}: not a contract genesis"):
        read_genesis(path)
    with pytest.raises(ValueError, match="cannot read the contract genesis"):
        read_genesis(tmp_path / "missing.json")

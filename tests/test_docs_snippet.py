"""The auditor's scripts in docs/proofs.md work on real bundles, with no carechain code.

The scripts are extracted from the document itself (the fenced block after each `<!-- snippet: NAME -->`
marker), so the page cannot drift from what is tested. They run in a subprocess from an empty folder, and
their RFC 9162 functions are also cross-checked against the ledger's proof generator.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from carechain import envelope
from carechain.config import BridgeConfig, BrokerConfig
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.proofs import consistency_bundle, inclusion_bundle
from chain_bridge.ledger.store import Ledger

DOC = Path(__file__).resolve().parent.parent / "docs" / "proofs.md"
OPERATOR = Identity.from_seed(b"\x11" * 32)
LOG_KEY = Identity.from_seed(b"\x12" * 32)
DEVICE = Identity.from_seed(b"\x13" * 32)


def snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)^```", DOC.read_text(),
                      re.DOTALL | re.MULTILINE)
    assert found, f"docs/proofs.md has no snippet {name}"
    return found.group(1)


@dataclass(frozen=True)
class Scripts:
    folder: Path

    def run(self, script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        # carechain is installed in this venv: block its packages so the script must do without them.
        return subprocess.run([sys.executable, "-I", "-c", _NO_CARECHAIN, script, *map(str, args)],
                              cwd=self.folder, capture_output=True, text=True, timeout=60)


_NO_CARECHAIN = """
import runpy, sys
for name in ("carechain", "chain_bridge", "edge_agent", "simulators"):
    sys.modules[name] = None  # any import of them raises ImportError
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Scripts:
    folder = tmp_path_factory.mktemp("auditor")
    for name in ("verify_bundle.py", "show_event.py"):
        (folder / name).write_text(snippet(name))
    return Scripts(folder)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """Leaf 0 registers DEVICE; leaves 1-10 are its events seq 0-9; checkpoints at sizes 3, 4 and 11."""
    ledger = Ledger(tmp_path_factory.mktemp("ledger") / "ledger.db")
    reg = Registration(dev=DEVICE.device_id, pk=DEVICE.public_key, profile="heart_rate_band",
                       owner="patient:a", site="ward", ts=int(time.time() * 1000))
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])
    bridge = Bridge(BridgeConfig(), BrokerConfig(), LOG_KEY, ledger)  # never started: fed directly
    now = int(time.time() * 1000)
    for seqs in (range(2), range(2, 3), range(3, 10)):
        payloads = [make_payload(DEVICE.device_id, s, now, "heart_rate", {"bpm": 70}) for s in seqs]
        bridge.process([(f"cc/v1/dev/{DEVICE.device_id}/ev", envelope.sign(DEVICE, p)) for p in payloads])
        bridge.maybe_checkpoint()
    assert ledger.size == 11 and ledger.checkpoint_count() == 3
    return ledger


def write(tmp_path: Path, bundle: object, name: str = "bundle.json") -> Path:
    path = tmp_path / name
    data = bundle.model_dump() if hasattr(bundle, "model_dump") else bundle
    path.write_text(json.dumps(data))
    return path


LOG_HEX = LOG_KEY.public_key.hex()


@pytest.mark.parametrize("seq", range(10))
def test_script_1_verifies_every_inclusion_bundle(scripts: Scripts, ledger: Ledger, tmp_path: Path,
                                                  seq: int) -> None:
    bundle = inclusion_bundle(ledger, DEVICE.device_id, seq, LOG_KEY.public_key)
    done = scripts.run("verify_bundle.py", write(tmp_path, bundle), LOG_HEX)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: entry is leaf {seq + 1} of the 11-leaf tree")


@pytest.mark.parametrize(("old", "new"), [(3, 4), (3, 11), (4, 11), (11, 11)])
def test_script_1_verifies_consistency_bundles(scripts: Scripts, ledger: Ledger, tmp_path: Path,
                                               old: int, new: int) -> None:
    bundle = consistency_bundle(ledger, old, new, LOG_KEY.public_key)
    done = scripts.run("verify_bundle.py", write(tmp_path, bundle), LOG_HEX)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"OK: tree {new} extends tree {old}"


def _flip(hex_text: str) -> str:
    return ("1" if hex_text[0] == "0" else "0") + hex_text[1:]


def _tamper_leaf(b: dict) -> None:
    leaf = bytearray(base64.b64decode(b["entry"]))
    leaf[-5] ^= 0x40
    b["entry"] = base64.b64encode(bytes(leaf)).decode()


INCLUSION_TAMPERS = {
    "path": lambda b: b["inclusion_path"].__setitem__(0, _flip(b["inclusion_path"][0])),
    "short path": lambda b: b["inclusion_path"].pop(),
    "root": lambda b: b.__setitem__("root_hash", _flip(b["root_hash"])),
    "entry": _tamper_leaf,
    "index": lambda b: b.__setitem__("leaf_index", b["leaf_index"] ^ 1),
    "size": lambda b: b.__setitem__("tree_size", b["tree_size"] - 1),
    "note": lambda b: b.__setitem__("checkpoint", b["checkpoint"].replace("\n11\n", "\n12\n")),
    "key": lambda b: b.__setitem__("log_public_key", Identity.generate().public_key.hex()),
}


@pytest.mark.parametrize("what", sorted(INCLUSION_TAMPERS))
def test_script_1_rejects_a_tampered_inclusion_bundle(scripts: Scripts, ledger: Ledger, tmp_path: Path,
                                                      what: str) -> None:
    bundle = inclusion_bundle(ledger, DEVICE.device_id, 4, LOG_KEY.public_key).model_dump()
    INCLUSION_TAMPERS[what](bundle)
    done = scripts.run("verify_bundle.py", write(tmp_path, bundle), LOG_HEX)
    assert done.returncode != 0 and "OK" not in done.stdout


CONSISTENCY_TAMPERS = {
    "swapped": lambda b: b.update(old_checkpoint=b["new_checkpoint"], new_checkpoint=b["old_checkpoint"]),
    "path": lambda b: b["consistency_path"].__setitem__(-1, _flip(b["consistency_path"][-1])),
    "empty path": lambda b: b["consistency_path"].clear(),
    "note": lambda b: b.__setitem__("new_checkpoint", b["new_checkpoint"].replace("\n11\n", "\n10\n")),
}


@pytest.mark.parametrize("what", sorted(CONSISTENCY_TAMPERS))
def test_script_1_rejects_a_tampered_consistency_bundle(scripts: Scripts, ledger: Ledger, tmp_path: Path,
                                                        what: str) -> None:
    bundle = consistency_bundle(ledger, 3, 11, LOG_KEY.public_key).model_dump()
    CONSISTENCY_TAMPERS[what](bundle)
    done = scripts.run("verify_bundle.py", write(tmp_path, bundle), LOG_HEX)
    assert done.returncode != 0 and "OK" not in done.stdout


def test_script_1_refuses_a_log_key_other_than_the_trusted_one(scripts: Scripts, ledger: Ledger,
                                                               tmp_path: Path) -> None:
    bundle = inclusion_bundle(ledger, DEVICE.device_id, 0, LOG_KEY.public_key)
    done = scripts.run("verify_bundle.py", write(tmp_path, bundle), Identity.generate().public_key.hex())
    assert done.returncode != 0 and "another log key" in done.stderr


def test_script_1_ignores_a_witness_cosignature_and_still_checks_the_log_signature(
        scripts: Scripts, ledger: Ledger, tmp_path: Path) -> None:
    from carechain.checkpoint import add_signature

    witness = Identity.from_seed(b"\x14" * 32)
    bundle = inclusion_bundle(ledger, DEVICE.device_id, 0, LOG_KEY.public_key).model_dump()
    bundle["checkpoint"] = add_signature(bundle["checkpoint"], "witness.example", witness.public_key,
                                         witness.sign)
    assert scripts.run("verify_bundle.py", write(tmp_path, bundle), LOG_HEX).returncode == 0
    # A note carrying only the witness's signature is not the log's checkpoint.
    body, _, _ = bundle["checkpoint"].partition("\n\n")
    witness_line = bundle["checkpoint"].rstrip("\n").split("\n")[-1]
    bundle["checkpoint"] = f"{body}\n\n{witness_line}\n"
    done = scripts.run("verify_bundle.py", write(tmp_path, bundle), LOG_HEX)
    assert done.returncode != 0 and "no signature by the log key" in done.stderr


def test_script_2_checks_the_devices_signature_on_the_event(scripts: Scripts, ledger: Ledger,
                                                            tmp_path: Path) -> None:
    path = write(tmp_path, inclusion_bundle(ledger, DEVICE.device_id, 7, LOG_KEY.public_key))
    done = scripts.run("show_event.py", path, DEVICE.public_key.hex())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: {DEVICE.device_id} seq 7 at ")
    assert "heart_rate {'bpm': 70}" in done.stdout
    other = scripts.run("show_event.py", path, Identity.generate().public_key.hex())
    assert other.returncode != 0 and "not an EdDSA COSE_Sign1 by this device" in other.stderr


# -- the scripts' RFC 9162 functions agree with the ledger's proof generator ----------------------------

@pytest.fixture(scope="module")
def rfc9162() -> SimpleNamespace:
    namespace: dict[str, object] = {"__name__": "verify_bundle"}
    exec(compile(snippet("verify_bundle.py"), "verify_bundle.py", "exec"), namespace)  # noqa: S102
    return SimpleNamespace(**namespace)


def test_script_1_inclusion_walk_matches_the_tree_for_every_index_up_to_40(rfc9162: SimpleNamespace) -> None:
    tree = MerkleTree()
    tree.extend([leaf_hash(i.to_bytes(2, "big")) for i in range(40)])
    for size in range(1, 41):
        root = tree.root(size)
        for index in range(size):
            path = tree.inclusion_proof(index, size)
            assert rfc9162.root_from_inclusion(index, size, leaf_hash(index.to_bytes(2, "big")), path) == root
            if path:
                with pytest.raises(ValueError):
                    rfc9162.root_from_inclusion(index, size, leaf_hash(b"x"), path[:-1])


def test_script_1_consistency_check_matches_the_tree_for_every_pair_up_to_40(rfc9162: SimpleNamespace
                                                                            ) -> None:
    tree = MerkleTree()
    tree.extend([leaf_hash(i.to_bytes(2, "big")) for i in range(40)])
    other = MerkleTree()
    other.extend([leaf_hash(b"other" + i.to_bytes(2, "big")) for i in range(40)])
    assert rfc9162.consistent(0, 5, tree.root(0), tree.root(5), [])
    for size2 in range(1, 41):
        for size1 in range(1, size2 + 1):
            path = tree.consistency_proof(size1, size2)
            r1, r2 = tree.root(size1), tree.root(size2)
            assert rfc9162.consistent(size1, size2, r1, r2, path), (size1, size2)
            if size1 < size2:
                assert not rfc9162.consistent(size1, size2, other.root(size1), r2, path)
                assert not rfc9162.consistent(size1, size2, r1, other.root(size2), path)
                assert not rfc9162.consistent(size2, size1, r2, r1, path)

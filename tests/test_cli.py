"""The `carechain` command line, driven through typer's CliRunner on real files (no broker, no mocks).

The proof tests build a real ledger: a device registered with `carechain register`, events appended by a
`Bridge` that is never started (its `process` is fed directly), checkpoints at tree sizes 4 and 8.
"""

from __future__ import annotations

import base64
import json
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carechain import envelope
from carechain.cli import app
from carechain.cli.demo import JSON_KEYS as DEMO_JSON_KEYS
from carechain.config import BridgeConfig, BrokerConfig
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path, log_key

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(*args: str | Path, columns: int = 80, stdin: str | None = None):  # noqa: ANN201 - click Result
    """Invoke the CLI; COLUMNS pins rich's width so the tests see what a narrow terminal or pipe sees."""
    runner = CliRunner(env={"COLUMNS": str(columns)})
    return runner.invoke(app, [str(a) for a in args], input=stdin, catch_exceptions=False)


def text(result) -> str:  # noqa: ANN001
    """stdout + stderr without colour codes (present only when the test run has a terminal)."""
    return _ANSI.sub("", result.output)


def new_key(path: Path) -> str:
    """`carechain keys new PATH`; returns the device id it printed."""
    result = run("keys", "new", path)
    assert result.exit_code == 0, text(result)
    return re.search(r"device_id\s+([a-z2-7]{16})", text(result)).group(1)


def write_inventory(path: Path, devices: list[dict[str, str]]) -> Path:
    lines = ["site: ward-3", "devices:"]
    for d in devices:
        lines.append(f"  - name: {d['name']}")
        lines += [f"    {k}: {v}" for k, v in d.items() if k != "name"]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- keys ---------------------------------------------------------------------------------------------

def test_keys_new_writes_a_0600_key_file_and_prints_its_identity(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "dev.key"
    result = run("keys", "new", key)
    assert result.exit_code == 0, text(result)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ident = Identity.load(key)
    out = text(result)
    assert f"device_id  {ident.device_id}" in out
    assert f"public_key {ident.public_key.hex()}" in out
    assert key.read_text().split()[-1] not in out  # the private seed is never printed


def test_keys_new_refuses_to_overwrite_a_key_without_force(tmp_path: Path) -> None:
    key = tmp_path / "dev.key"
    first = new_key(key)
    before = key.read_bytes()
    result = run("keys", "new", key)
    assert result.exit_code == 2
    assert "already exists" in text(result)
    assert key.read_bytes() == before
    forced = run("keys", "new", key, "--force")
    assert forced.exit_code == 0, text(forced)
    assert Identity.load(key).device_id != first
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_keys_show_prints_the_same_device_id_as_keys_new(tmp_path: Path) -> None:
    key = tmp_path / "dev.key"
    device_id = new_key(key)
    result = run("keys", "show", key)
    assert result.exit_code == 0, text(result)
    assert f"device_id  {device_id}" in text(result)
    assert f"public_key {Identity.load(key).public_key.hex()}" in text(result)


def test_a_key_file_others_can_read_is_refused_with_the_chmod_hint(tmp_path: Path) -> None:
    key = tmp_path / "dev.key"
    new_key(key)
    key.chmod(0o644)
    result = run("keys", "show", key)
    assert result.exit_code == 2
    assert "permissions 0644 are too open" in text(result)
    assert f"chmod 600 {key}" in text(result)


def test_keys_show_of_a_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    result = run("keys", "show", tmp_path / "nope.key")
    assert result.exit_code == 2
    assert "carechain keys new" in text(result)


# -- register -----------------------------------------------------------------------------------------

def test_register_registers_every_device_and_names_them(tmp_path: Path) -> None:
    ids = {name: new_key(tmp_path / f"{name}.key") for name in ("hr-1", "scale-1")}
    inv = write_inventory(tmp_path / "inventory.yaml", [
        {"name": "hr-1", "profile": "heart_rate_band", "owner": "patient:alice", "key_file": "hr-1.key"},
        {"name": "scale-1", "profile": "scale", "owner": "patient:bob", "key_file": "scale-1.key"},
    ])
    data = tmp_path / "bridge"
    result = run("register", inv, "--data-dir", data, columns=200)
    assert result.exit_code == 0, text(result)
    out = text(result)
    for name, device_id in ids.items():
        assert name in out and device_id in out
    ledger = Ledger(ledger_path(data))
    assert ledger.size == 2
    assert set(ledger.devices()) == set(ids.values())
    assert ledger.devices()[ids["scale-1"]].profile == "scale"


def test_registering_the_same_inventory_twice_fails_naming_the_line(tmp_path: Path) -> None:
    device_id = new_key(tmp_path / "hr.key")
    inv = write_inventory(tmp_path / "inventory.yaml", [
        {"name": "hr-1", "profile": "heart_rate_band", "owner": "patient:alice", "key_file": "hr.key"},
    ])
    data = tmp_path / "bridge"
    assert run("register", inv, "--data-dir", data).exit_code == 0
    again = run("register", inv, "--data-dir", data)
    assert again.exit_code == 2
    assert f"{inv}:3: device hr-1 ({device_id}) is already registered at leaf 0" in text(again)
    assert Ledger(ledger_path(data)).size == 1


def test_adding_a_device_to_a_registered_inventory_registers_nothing(tmp_path: Path) -> None:
    new_key(tmp_path / "hr.key")
    new_key(tmp_path / "scale.key")
    hr = {"name": "hr-1", "profile": "heart_rate_band", "owner": "patient:alice", "key_file": "hr.key"}
    data = tmp_path / "bridge"
    assert run("register", write_inventory(tmp_path / "a.yaml", [hr]), "--data-dir", data).exit_code == 0
    both = write_inventory(tmp_path / "b.yaml", [
        {"name": "scale-1", "profile": "scale", "owner": "patient:bob", "key_file": "scale.key"}, hr])
    result = run("register", both, "--data-dir", data)
    assert result.exit_code == 2
    assert f"{both}:7: device hr-1" in text(result) and "already registered" in text(result)
    assert Ledger(ledger_path(data)).size == 1  # scale-1 was not registered either: all or nothing


def test_an_unknown_profile_fails_with_exit_2_and_names_the_line(tmp_path: Path) -> None:
    new_key(tmp_path / "hr.key")
    inv = write_inventory(tmp_path / "inventory.yaml", [
        {"name": "hr-1", "profile": "heart_rate_bnad", "owner": "patient:alice", "key_file": "hr.key"},
    ])
    result = run("register", inv, "--data-dir", tmp_path / "bridge")
    assert result.exit_code == 2
    out = text(result)
    assert f"{inv}:4:" in out  # the `profile:` line
    assert "unknown profile 'heart_rate_bnad'" in out and "did you mean 'heart_rate_band'" in out


def test_nothing_is_registered_when_any_line_is_bad(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        new_key(tmp_path / f"{name}.key")
    inv = write_inventory(tmp_path / "inventory.yaml", [
        {"name": "a", "profile": "thermometer", "owner": "patient:alice", "key_file": "a.key"},
        {"name": "b", "profile": "thermometer", "owner": "patient:bob", "key_file": "missing.key"},
        {"name": "c", "profile": "scale", "owner": "patient:carol", "key_file": "c.key"},
    ])
    data = tmp_path / "bridge"
    result = run("register", inv, "--data-dir", data)
    assert result.exit_code == 2
    assert f"{inv}:10:" in text(result) and "missing.key" in text(result)
    assert Ledger(ledger_path(data)).size == 0
    assert Ledger(ledger_path(data)).devices() == {}


# -- proof and verify ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Log:
    data_dir: Path
    device_id: str
    log_key_hex: str
    key_file: Path


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    """Leaf 0 registers the device (via the CLI), leaves 1-7 are its events seq 0-6; checkpoints at 4, 8."""
    root = tmp_path_factory.mktemp("log")
    key_file = root / "hr.key"
    device_id = new_key(key_file)
    inv = write_inventory(root / "inventory.yaml", [
        {"name": "hr-1", "profile": "heart_rate_band", "owner": "patient:alice", "key_file": "hr.key"},
    ])
    data = root / "bridge"
    assert run("register", inv, "--data-dir", data).exit_code == 0
    device, lk = Identity.load(key_file), log_key(data)
    bridge = Bridge(BridgeConfig(data_dir=data), BrokerConfig(), lk, Ledger(ledger_path(data)))
    now = int(time.time() * 1000)

    def events(seqs: range) -> list[tuple[str, bytes]]:
        return [(f"cc/v1/dev/{device_id}/ev",
                 envelope.sign(device, make_payload(device_id, s, now, "heart_rate", {"bpm": 60 + s})))
                for s in seqs]

    bridge.process(events(range(3)))
    assert bridge.maybe_checkpoint() is not None
    bridge.process(events(range(3, 7)))
    assert bridge.maybe_checkpoint() is not None
    assert bridge.stats.anchored == 7 and bridge.ledger.size == 8
    bridge.ledger.close()
    return Log(data, device_id, lk.public_key.hex(), key_file)


def proof_file(log: Log, tmp_path: Path, *args: str, name: str = "proof.json") -> Path:
    result = run("proof", *args, "--data-dir", log.data_dir)
    assert result.exit_code == 0, text(result)
    path = tmp_path / name
    path.write_text(result.stdout)
    return path


def flip_hex(value: str, i: int = 10) -> str:
    return value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1:]


def test_an_inclusion_proof_verifies_offline(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    raw = json.loads(bundle.read_text())
    assert set(raw) == {"leaf_index", "tree_size", "root_hash", "inclusion_path", "entry", "checkpoint",
                        "log_public_key"}
    assert (raw["leaf_index"], raw["tree_size"], raw["log_public_key"]) == (2, 8, log.log_key_hex)
    result = run("verify", bundle)
    assert result.exit_code == 0, text(result)
    assert "VERIFIED" in text(result) and "NOT VERIFIED" not in text(result)
    assert log.device_id in text(result) and '"seq": 1' in text(result)


def test_the_plain_proof_output_is_valid_json_however_narrow_the_terminal(log: Log, tmp_path: Path) -> None:
    result = run("proof", log.device_id, "6", "--data-dir", log.data_dir, columns=40)
    assert result.exit_code == 0, text(result)
    bundle = tmp_path / "p.json"
    bundle.write_text(result.stdout)
    assert json.loads(result.stdout)["leaf_index"] == 7
    assert run("verify", bundle).exit_code == 0


def test_verify_reads_a_bundle_from_stdin(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "0", "--json")
    result = run("verify", "-", stdin=bundle.read_text())
    assert result.exit_code == 0, text(result)
    assert "VERIFIED" in text(result)


def test_verify_with_the_trusted_log_key_passes_and_with_another_key_fails(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    assert run("verify", bundle, "--log-key", log.log_key_hex).exit_code == 0
    other = Identity.generate().public_key.hex()
    result = run("verify", bundle, "--log-key", other)
    assert result.exit_code == 1
    assert "NOT VERIFIED" in text(result) and "not the trusted log key" in text(result)


def test_a_log_key_that_is_not_hex_is_a_usage_error_not_a_crash(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    result = run("verify", bundle, "--log-key", "not-hex")
    assert result.exit_code == 2  # docs/proofs.md: 2 on a usage error, 1 only when the proof does not hold
    assert "--log-key: 'not-hex' is not hex" in text(result) and "VERIFIED" not in text(result)


def test_a_bundle_whose_key_is_swapped_for_the_attackers_fails(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    raw = json.loads(bundle.read_text())
    raw["log_public_key"] = Identity.generate().public_key.hex()
    bundle.write_text(json.dumps(raw))
    result = run("verify", bundle)
    assert result.exit_code == 1
    assert "NOT VERIFIED" in text(result) and "checkpoint" in text(result)


def _tamper_entry(raw: dict) -> None:
    leaf = bytearray(base64.b64decode(raw["entry"]))
    leaf[len(leaf) // 2] ^= 0x01
    raw["entry"] = base64.b64encode(bytes(leaf)).decode()


@pytest.mark.parametrize(("field", "tamper"), [
    ("inclusion_path", lambda raw: raw["inclusion_path"].__setitem__(1, flip_hex(raw["inclusion_path"][1]))),
    ("root_hash", lambda raw: raw.__setitem__("root_hash", flip_hex(raw["root_hash"]))),
    ("entry", _tamper_entry),
    ("leaf_index", lambda raw: raw.__setitem__("leaf_index", raw["leaf_index"] + 1)),
    ("checkpoint", lambda raw: raw.__setitem__("checkpoint", raw["checkpoint"].replace("\n8\n", "\n9\n"))),
])
def test_a_tampered_inclusion_bundle_is_not_verified(log: Log, tmp_path: Path, field: str, tamper) -> None:  # noqa: ANN001
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    raw = json.loads(bundle.read_text())
    tamper(raw)
    bundle.write_text(json.dumps(raw))
    result = run("verify", bundle)
    assert result.exit_code == 1, f"tampered {field} verified: {text(result)}"
    assert "NOT VERIFIED" in text(result)


def test_verify_json_prints_ok_false_with_the_reason(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "1", "--json")
    raw = json.loads(bundle.read_text())
    raw["root_hash"] = flip_hex(raw["root_hash"])
    bundle.write_text(json.dumps(raw))
    result = run("verify", bundle, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and "root_hash" in report["error"]


def test_verify_json_prints_ok_true_with_what_was_proved(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, log.device_id, "2", "--json")
    result = run("verify", bundle, "--json")
    assert result.exit_code == 0, text(result)
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["inclusion"] == {"leaf_index": 3, "tree_size": 8, "entry_type": "event",
                                   "device_id": log.device_id, "seq": 2, "kind": "heart_rate"}


@pytest.mark.parametrize("bad", ["[1, 2]", "5", "not json", "{}"])
def test_verify_refuses_a_file_that_is_no_bundle(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(bad)
    result = run("verify", path)
    assert result.exit_code == 1
    assert "NOT VERIFIED" in text(result)


def test_a_consistency_proof_between_two_checkpoints_verifies(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, "--consistency", "4:8", "--json")
    raw = json.loads(bundle.read_text())
    assert set(raw) == {"old_checkpoint", "new_checkpoint", "consistency_path", "log_public_key"}
    result = run("verify", bundle, "--log-key", log.log_key_hex, "--json")
    assert result.exit_code == 0, text(result)
    assert json.loads(result.stdout) == {"ok": True, "consistency": {"old_size": 4, "new_size": 8}}
    latest = proof_file(log, tmp_path, "--consistency", "4", "--json", name="latest.json")  # NEW: latest
    assert json.loads(latest.read_text()) == raw


def test_a_consistency_proof_with_swapped_checkpoints_fails(log: Log, tmp_path: Path) -> None:
    bundle = proof_file(log, tmp_path, "--consistency", "4:8", "--json")
    raw = json.loads(bundle.read_text())
    raw["old_checkpoint"], raw["new_checkpoint"] = raw["new_checkpoint"], raw["old_checkpoint"]
    bundle.write_text(json.dumps(raw))
    result = run("verify", bundle)
    assert result.exit_code == 1
    assert "NOT VERIFIED" in text(result) and "rollback" in text(result)


@pytest.mark.parametrize("tamper", [
    lambda raw: raw["consistency_path"].__setitem__(0, flip_hex(raw["consistency_path"][0])),
    lambda raw: raw["consistency_path"].pop(),
    lambda raw: raw.__setitem__("new_checkpoint", raw["new_checkpoint"].replace("\n8\n", "\n7\n")),
])
def test_a_tampered_consistency_proof_fails(log: Log, tmp_path: Path, tamper) -> None:  # noqa: ANN001
    bundle = proof_file(log, tmp_path, "--consistency", "4:8", "--json")
    raw = json.loads(bundle.read_text())
    tamper(raw)
    bundle.write_text(json.dumps(raw))
    result = run("verify", bundle)
    assert result.exit_code == 1
    assert "NOT VERIFIED" in text(result)


def test_a_consistency_proof_needs_checkpointed_sizes(log: Log) -> None:
    result = run("proof", "--consistency", "5:8", "--data-dir", log.data_dir)
    assert result.exit_code == 2
    assert "no checkpoint was issued at tree size 5" in text(result)


def test_a_checkpoint_note_verifies_with_the_log_key_only(log: Log, tmp_path: Path) -> None:
    note = tmp_path / "checkpoint.txt"
    note.write_text(Ledger(ledger_path(log.data_dir)).checkpoint_at(8))
    result = run("verify", "--checkpoint", note, "--log-key", log.log_key_hex, "--json")
    assert result.exit_code == 0, text(result)
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["checkpoint"]["tree_size"] == 8
    wrong = run("verify", "--checkpoint", note, "--log-key", Identity.generate().public_key.hex())
    assert wrong.exit_code == 1
    assert "NOT VERIFIED" in text(wrong)
    missing_key = run("verify", "--checkpoint", note)
    assert missing_key.exit_code == 2
    assert "--log-key is required" in text(missing_key)


def test_a_proof_for_an_unknown_seq_fails_clearly(log: Log) -> None:
    result = run("proof", log.device_id, "99", "--data-dir", log.data_dir)
    assert result.exit_code == 2
    assert f"no event from device {log.device_id} with seq 99 is in the log" in text(result)


def test_a_proof_without_a_ledger_points_at_data_dir(tmp_path: Path) -> None:
    result = run("proof", "aaaaaaaaaaaaaaaa", "0", "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "no ledger at" in text(result) and "--data-dir" in text(result)


def test_proof_without_arguments_says_what_to_give(log: Log) -> None:
    result = run("proof", "--data-dir", log.data_dir)
    assert result.exit_code == 2
    assert "give DEVICE_ID SEQ, or --consistency" in text(result)


# -- help ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["demo"], ["agent"], ["bridge"], ["register"], ["keys"], ["keys", "new"], ["keys", "show"], ["proof"],
    ["verify"], [],
])
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, text(result)
    assert "Usage" in text(result) and len(text(result).strip()) > 100


# -- demo ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_demo_json_summarizes_the_whole_flow(full_demo: tuple[dict[str, Any], Path]) -> None:
    # The session's one whole demo run (tests/conftest.py), as `carechain demo --json` prints it (the CLI's own
    # --json path is run by tests/test_cli_shutdown.py).
    summary = json.loads(json.dumps({k: full_demo[0][k] for k in DEMO_JSON_KEYS}))
    assert set(summary) == {"sent", "anchored", "rejected", "duplicates", "checkpoints", "proof_verified",
                            "access_opened", "access_logged", "access_refused_without_grant", "miners",
                            "final_checkpoints", "formulary_refusals", "study_result", "study_contributors",
                            "study_verified", "trial_certificate", "trial_verified"}
    # Everything anchored but the pharmacy day's two refused sales: an Rx-only sale without a prescription, and
    # amoxicillin rung up as over the counter although the authority's formulary lists it as Rx-only.
    assert summary["sent"] - 2 == summary["anchored"] > 0
    assert summary["formulary_refusals"] == 1
    assert summary["rejected"] >= 6  # those sales, forged signature, reused seq, garbage, oversized
    assert summary["miners"] == 5  # registered and bonded on the ledger: the active miner set
    assert 1 <= summary["final_checkpoints"] <= summary["checkpoints"]
    assert summary["duplicates"] >= 1  # the replay
    assert summary["checkpoints"] >= 1
    assert summary["proof_verified"] is True
    assert summary["access_opened"] is True and summary["access_refused_without_grant"] is True
    assert summary["access_logged"] == 1  # the doctor's one access record of this run
    # The data market: 21 of 22 patients included (one asks for a larger cohort), checked from the log alone.
    assert summary["study_verified"] is True and summary["study_contributors"] == 21
    assert 30 <= summary["study_result"] <= 200  # a mean resting heart rate, bpm


def test_agent_refuses_ble_for_a_profile_without_gatt(tmp_path: Path) -> None:
    key = tmp_path / "terminal.key"
    assert run("keys", "new", key).exit_code == 0
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"agent:\n  bridge_public_key: '{'ab' * 32}'\n  devices:\n"
                   f"    - {{key_file: '{key}', profile: pharmacy_terminal, source: ble}}\n")
    result = run("agent", "--config", cfg)
    assert result.exit_code == 2  # a configuration error, like the CLI's other usage errors
    assert "pharmacy_terminal" in text(result) and "not a BLE device" in text(result)


def test_demo_skips_only_the_live_scenarios_it_knows() -> None:
    result = run("demo", "--json", "--skip", "pharmacy")
    assert result.exit_code == 2 and "--skip takes market or trial, not pharmacy" in text(result)

"""`carechain token transfer`, `bond post|unbond|withdraw`, `balance` and `policy consent|register` on a real
bridge data dir (CliRunner, no broker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_cli import run, text
from test_contracts_world import FLU_SHOT, ident

from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path, operator_key
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND, UNBONDING_MS

PHARMACY, INSURER, ALICE = ident(4), ident(6), ident(20)
PHARMACY_FUNDS, INSURER_FUNDS, ALICE_FUNDS = 200_000, 1_000_000, 50_000


def out_json(result) -> dict:  # noqa: ANN001
    assert result.exit_code == 0, text(result)
    return json.loads(result.stdout)


def setup(tmp_path: Path) -> tuple[Path, list[str]]:
    """A deployment whose genesis funds a pharmacy, an insurer and a patient, all three registered."""
    for name, who in (("pharmacy", PHARMACY), ("insurer", INSURER), ("alice", ALICE)):
        who.save(tmp_path / f"{name}.key")
    config = tmp_path / "carechain.yaml"
    config.write_text("bridge:\n  genesis_allocations:\n"
                      f"    'pharmacy:{PHARMACY.device_id}': {PHARMACY_FUNDS}\n"
                      f"    'insurer:{INSURER.device_id}': {INSURER_FUNDS}\n"
                      f"    'patient:{ALICE.device_id}': {ALICE_FUNDS}\n")
    opts = ["--config", str(config), "--data-dir", str(tmp_path / "bridge")]
    for role, name in (("pharmacy", "pharmacy"), ("insurer", "insurer"), ("patient", "alice")):
        out_json(run("party", "register", role, tmp_path / f"{name}.key", "--name", name, *opts, "--json"))
    return tmp_path / "bridge", opts


def attest(data: Path, ms: int) -> None:
    """What the bridge's gate does before time-based entries: an operator-signed `clock.attest`."""
    ledger = Ledger(ledger_path(data))
    try:
        ledger.append_entries([ce.clock_attest_entry(operator_key(data), ms)])
    finally:
        ledger.close()


def test_a_patient_transfers_tokens_and_balance_says_it_is_not_final_yet(tmp_path: Path) -> None:
    _, opts = setup(tmp_path)
    to = f"pharmacy:{PHARMACY.device_id}"
    sent = out_json(run("token", "transfer", to, "2500", "--key", tmp_path / "alice.key", "--memo", "flu shot",
                        *opts, "--json"))
    assert sent["from"] == f"patient:{ALICE.device_id}" and sent["amount"] == 2500
    balances = out_json(run("balance", *opts, "--json"))
    assert balances["balances"][to] == PHARMACY_FUNDS + 2500
    assert balances["balances"][f"patient:{ALICE.device_id}"] == ALICE_FUNDS - 2500
    # No final checkpoint is recorded on this ledger: nothing it reports is final yet.
    assert (balances["final"], balances["final_size"], balances["final_balances"]) == (False, 0, {})
    one = run("balance", to, *opts)
    assert one.exit_code == 0 and str(PHARMACY_FUNDS + 2500) in text(one) and "not final" in text(one)

    too_much = run("token", "transfer", to, str(10**9), "--key", tmp_path / "alice.key", *opts)
    assert too_much.exit_code == 1 and "insufficient_funds" in text(too_much)
    bad = run("token", "transfer", "nowhere", "1", "--key", tmp_path / "alice.key", *opts)
    assert bad.exit_code == 2 and "pharmacy:<party id>" in text(bad)


def test_bond_post_unbond_and_withdraw(tmp_path: Path) -> None:
    start = int(time.time() * 1000)
    data, opts = setup(tmp_path)
    key = ["--key", tmp_path / "pharmacy.key"]
    posted = out_json(run("bond", "post", str(MIN_BOND["pharmacy"] + 1000), *key, *opts, "--json"))
    assert posted["admitted"] and posted["bond"] == MIN_BOND["pharmacy"] + 1000
    unbonding = out_json(run("bond", "unbond", "1000", *key, *opts, "--json"))  # on the time the commands attest
    after = int(time.time() * 1000)
    assert unbonding["unbonding"] == 1000 and unbonding["admitted"]
    assert start + UNBONDING_MS <= unbonding["release_ms"] <= after + UNBONDING_MS
    early = run("bond", "withdraw", *key, *opts)
    assert early.exit_code == 1 and "bond_not_released" in text(early)
    attest(data, unbonding["release_ms"])  # a week later, by the bridge's clock
    done = out_json(run("bond", "withdraw", *key, *opts, "--json"))
    assert (done["bond"], done["unbonding"]) == (MIN_BOND["pharmacy"], 0)
    balances = out_json(run("balance", f"pharmacy:{PHARMACY.device_id}", *opts, "--json"))
    assert balances["balances"] == {f"pharmacy:{PHARMACY.device_id}": PHARMACY_FUNDS - MIN_BOND["pharmacy"]}
    patient_bond = run("bond", "post", "10", "--key", tmp_path / "alice.key", *opts)
    assert patient_bond.exit_code == 1 and "signer_not_allowed" in text(patient_bond)


def test_a_policy_is_registered_only_with_the_patients_consent(tmp_path: Path) -> None:
    _, opts = setup(tmp_path)
    out_json(run("bond", "post", str(MIN_BOND["insurer"]), "--key", tmp_path / "insurer.key", *opts, "--json"))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"policy_id": "p1", "patient": ALICE.device_id,
                                  "coverage": [{"category": "immunization", "bp": 10000,
                                                "caps": {f"ndc:{FLU_SHOT}": 2500}}],
                                  "wellness": {"min_active_minutes": 150, "rebate_minor": 2500}}))
    insurer_key = ["--key", tmp_path / "insurer.key"]
    unsigned = run("policy", "register", policy, *insurer_key, *opts)
    assert unsigned.exit_code == 2 and "consent" in text(unsigned)
    wrong = run("policy", "consent", policy, "--key", tmp_path / "pharmacy.key", "--insurer", INSURER.device_id)
    assert wrong.exit_code == 2 and ALICE.device_id in text(wrong)
    consented = out_json(run("policy", "consent", policy, "--key", tmp_path / "alice.key", "--insurer",
                             tmp_path / "insurer.key", "--json"))
    signed = Path(consented["consented_policy"])
    assert consented["insurer"] == INSURER.device_id and signed == tmp_path / "policy.consented.json"
    tampered = tmp_path / "tampered.json"
    doc = json.loads(signed.read_text())
    doc["coverage"][0]["caps"][f"ndc:{FLU_SHOT}"] = 900_000
    tampered.write_text(json.dumps(doc))
    refused = run("policy", "register", tampered, *insurer_key, *opts)
    assert refused.exit_code == 1 and "no_patient_consent" in text(refused)
    registered = out_json(run("policy", "register", signed, *insurer_key, *opts, "--json"))
    assert registered["patient"] == ALICE.device_id and registered["leaf"] > 0
    again = run("policy", "register", policy, *insurer_key, "--patient-key", tmp_path / "alice.key", *opts)
    assert again.exit_code == 1 and "patient_has_policy" in text(again)


def test_balance_is_final_only_up_to_the_latest_final_checkpoint(tmp_path: Path) -> None:
    """A checkpoint.final the bridge records (log-signed, cosigned by the one active miner) makes the balances it
    covers final; a transfer after it is reported, but not as final."""
    from carechain.checkpoint import Checkpoint, sign_note
    from carechain.cosignature import Cosigner, add_cosignature, cosign
    from carechain.merkle import leaf_hash
    from carechain.merkle_tree import MerkleTree
    from chain_bridge.registry import log_key

    data, opts = setup(tmp_path)
    miner = ident(10)
    miner.save(tmp_path / "miner.key")
    out_json(run("party", "register", "miner", tmp_path / "miner.key", "--name", "m", *opts, "--json"))
    out_json(run("token", "transfer", f"miner:{miner.device_id}", str(MIN_BOND["miner"]), "--key",
                 tmp_path / "insurer.key", *opts, "--json"))
    out_json(run("bond", "post", str(MIN_BOND["miner"]), "--key", tmp_path / "miner.key", *opts, "--json"))
    ledger = Ledger(ledger_path(data))
    try:
        size = ledger.size
        root = MerkleTree(leaf_hash(leaf) for leaf in ledger.leaves(0, size)).root()
        body = Checkpoint("carechain.test/log", size, root).body()
        log = log_key(data)
        note = sign_note(body, "carechain.test/log", log.public_key, log.sign)
        note = add_cosignature(note, cosign(body, Cosigner("miner", miner.public_key), miner.sign, 1))
        ledger.append_entries([ce.checkpoint_final_entry(operator_key(data), note)])
    finally:
        ledger.close()
    final = out_json(run("balance", *opts, "--json"))
    assert final["final"] and final["final_size"] == size and final["final_balances"] == final["balances"]
    pharmacy, alice = f"pharmacy:{PHARMACY.device_id}", f"patient:{ALICE.device_id}"
    out_json(run("token", "transfer", pharmacy, "100", "--key", tmp_path / "alice.key", *opts, "--json"))
    after = out_json(run("balance", *opts, "--json"))
    assert not after["final"] and after["final_size"] == size
    assert after["balances"][alice] == ALICE_FUNDS - 100 and after["final_balances"][alice] == ALICE_FUNDS
    untouched = out_json(run("balance", f"insurer:{INSURER.device_id}", *opts, "--json"))
    assert untouched["final"]  # nothing since the final checkpoint changed this account

"""`carechain party|rx|policy|balance` round trips on a real bridge data dir (CliRunner, no broker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from carechain import envelope, topics
from carechain.config import BridgeConfig, BrokerConfig, load_config
from carechain.entries import CLOCK_ATTEST, Entry, Registration, registration_entry
from carechain.events import Purchase, authorize_payment, make_payload
from chain_bridge.assembly import contract_gate
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path, log_key, operator_key
from contract_rules.bonds import MIN_BOND
from tests.test_cli import run, text
from tests.test_contracts_world import AMOXICILLIN, FLU_SHOT, ident

PRESCRIBER, PHARMACY, INSURER, TERMINAL, ALICE, AUTHORITY = ident(2), ident(4), ident(6), ident(7), ident(20), ident(11)
INSURER_ACCOUNT = f"insurer:{INSURER.device_id}"
INSURER_BOND, PHARMACY_BOND = MIN_BOND["insurer"], MIN_BOND["pharmacy"]


def out_json(result) -> dict:  # noqa: ANN001
    assert result.exit_code == 0, text(result)
    return json.loads(result.stdout)


def setup(tmp_path: Path) -> tuple[Path, list[str]]:
    for name, who in (("prescriber", PRESCRIBER), ("insurer", INSURER), ("alice", ALICE), ("pharmacy", PHARMACY),
                      ("authority", AUTHORITY)):
        who.save(tmp_path / f"{name}.key")
    config = tmp_path / "carechain.yaml"
    config.write_text(f"bridge:\n  genesis_allocations:\n    '{INSURER_ACCOUNT}': 1000000\n"
                      f"    'pharmacy:{PHARMACY.device_id}': {PHARMACY_BOND}\n")
    return tmp_path / "bridge", ["--config", str(config), "--data-dir", str(tmp_path / "bridge")]


def issue_amoxicillin(tmp_path: Path, opts: list[str], refills: int) -> dict:
    """`carechain rx issue` of an amoxicillin Rx (expires 2099-01-01) by the registered prescriber."""
    draft = tmp_path / "amox.json"
    draft.write_text(json.dumps({"patient_token": "pt-a", "drug_code": AMOXICILLIN, "code_system": "ndc",
                                 "quantity": 1, "refills": refills, "expires": "2099-01-01", "controlled": False,
                                 "sig_text": "1 capsule 3x daily"}))
    return out_json(run("rx", "issue", draft, "--key", tmp_path / "prescriber.key", *opts, "--json"))


def test_party_rx_policy_and_balance_round_trip(tmp_path: Path) -> None:
    data, opts = setup(tmp_path)
    party = out_json(run("party", "register", "prescriber", tmp_path / "prescriber.key", "--name", "Dr A", *opts,
                         "--json"))
    assert party["party_id"] == PRESCRIBER.device_id and party["leaf"] == 1  # after the first clock.attest
    assert out_json(run("party", "register", "pharmacy", PHARMACY.public_key.hex(), "--name", "Main St", *opts,
                        "--json"))["account"] == f"pharmacy:{PHARMACY.device_id}"
    out_json(run("party", "register", "insurer", tmp_path / "insurer.key", "--name", "Ins", *opts, "--json"))
    again = run("party", "register", "insurer", tmp_path / "insurer.key", "--name", "Ins", *opts)
    assert again.exit_code == 1 and "party_already_registered" in text(again) and "nothing appended" in text(again)
    assert run("party", "register", "janitor", "00" * 32, "--name", "x", *opts).exit_code == 2

    issued = issue_amoxicillin(tmp_path, opts, refills=1)
    rx_file = Path(issued["rx_file"])
    assert rx_file == tmp_path / "amox.rx.json" and rx_file.exists()
    shown = out_json(run("rx", "show", rx_file, "--json"))
    assert shown["signature"] == "valid" and shown["rx_ref"] == issued["rx_ref"] and shown["refills"] == 1
    status = out_json(run("rx", "verify", rx_file, *opts, "--json"))
    assert status["ok"] and status["fills_left"] == 2 and status["anchor_leaf"] == issued["anchor_leaf"]
    # An Rx altered after signing is caught offline and against the ledger.
    forged = tmp_path / "forged.rx.json"
    doc = json.loads(rx_file.read_text())
    doc["rx"]["refills"] = 9
    forged.write_text(json.dumps(doc))
    assert run("rx", "show", forged).exit_code == 1
    bad = run("rx", "verify", forged, *opts, "--json")
    assert bad.exit_code == 1 and "rx_unknown" in json.loads(bad.stdout)["problem"]

    # The sale below needs a bonded pharmacy and a formulary that lists the flu shot as over the counter.
    out_json(run("bond", "post", str(PHARMACY_BOND), "--key", tmp_path / "pharmacy.key", *opts, "--json"))
    out_json(run("party", "register", "authority", tmp_path / "authority.key", "--name", "Board", *opts, "--json"))
    formulary = tmp_path / "formulary.json"
    formulary.write_text(json.dumps({"items": [{"item": f"ndc:{FLU_SHOT}", "rx_only": False, "schedule": 0,
                                                "max_quantity": 20}]}))
    out_json(run("formulary", "set", formulary, "--key", tmp_path / "authority.key", *opts, "--json"))
    # Insurance v3: a bonded insurer, a registered patient who consents, a price cap per item.
    out_json(run("party", "register", "patient", tmp_path / "alice.key", "--name", "Alice", *opts, "--json"))
    out_json(run("bond", "post", str(INSURER_BOND), "--key", tmp_path / "insurer.key", *opts, "--json"))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"policy_id": "p1", "patient": ALICE.device_id,
                                  "coverage": [{"category": "immunization", "bp": 10000,
                                                "caps": {f"ndc:{FLU_SHOT}": 3_000}}],
                                  "wellness": {"min_active_minutes": 150, "rebate_minor": 2500}}))
    assert out_json(run("policy", "register", policy, "--key", tmp_path / "insurer.key", "--patient-key",
                        tmp_path / "alice.key", *opts, "--json"))["leaf"]
    settled = out_json(run("policy", "settle", ALICE.device_id, "2026-W01", "--key", tmp_path / "alice.key", *opts,
                           "--json"))
    assert (settled["minutes"], settled["amount"]) == (0, 0)
    assert run("policy", "settle", ALICE.device_id, "week 1", "--key", tmp_path / "alice.key", *opts).exit_code == 2

    # A sale through the bridge, then `carechain balance` agrees with the bridge's own runtime.
    ledger = Ledger(ledger_path(data))
    now = int(time.time() * 1000)
    reg = Registration(dev=TERMINAL.device_id, pk=TERMINAL.public_key, profile="pharmacy_terminal",
                       owner=PHARMACY.device_id, site="s", ts=now)
    ledger.append_registrations([(registration_entry(operator_key(data), reg), reg)])
    bridge = Bridge(BridgeConfig(data_dir=data), BrokerConfig(), log_key(data), ledger,
                    contracts=contract_gate(load_config(Path(opts[1])), data))
    claim = authorize_payment(ALICE, TERMINAL.device_id, f"ndc:{FLU_SHOT}", 1, 3_000, pay_minor=0, claim_minor=3_000,
                              policy_id="p1", nonce=1)
    sale = Purchase(item_code=FLU_SHOT, code_system="ndc", rx_only=False, quantity=1, price_minor=3_000,
                    currency="USD", patient_token=ALICE.device_id, payment_method="insurance", payment=claim)
    bridge.process([(topics.events(TERMINAL.device_id),
                     envelope.sign(TERMINAL, make_payload(TERMINAL.device_id, 0, now, "purchase", sale)))])
    balances = out_json(run("balance", *opts, "--json"))
    assert balances["balances"] == {INSURER_ACCOUNT: 997_000 - INSURER_BOND, f"bond:{INSURER.device_id}": INSURER_BOND,
                                    f"pharmacy:{PHARMACY.device_id}": 3_000,
                                    f"bond:{PHARMACY.device_id}": PHARMACY_BOND}
    assert balances["state_root"] == bridge.contracts.state.root().hex()
    assert balances["supply"] == 1_000_000 + PHARMACY_BOND
    one = run("balance", INSURER_ACCOUNT, *opts)
    assert one.exit_code == 0 and str(997_000 - INSURER_BOND) in text(one)

    revoked = out_json(run("rx", "revoke", rx_file, "--key", tmp_path / "prescriber.key", "--reason", "allergy", *opts,
                           "--json"))
    assert revoked["rx_ref"] == issued["rx_ref"]
    after = run("rx", "verify", rx_file, *opts, "--json")
    assert after.exit_code == 1 and "rx_revoked" in json.loads(after.stdout)["problem"]
    full = run("verify", "--full", "--data-dir", data, "--json")
    assert full.exit_code == 0, text(full)
    # 5 parties, anchor, 2 bonds, formulary, policy, settle, revoke, and the clock attestations (each command and
    # the bridge attest the time first when the last attestation is stale).
    ledger.refresh()  # the commands appended through their own connections (a clock.attest when the time was stale)
    clocks = sum(Entry.decode(leaf).type == CLOCK_ATTEST for leaf in ledger.leaves(0, ledger.size))
    assert clocks >= 1 and json.loads(full.stdout)["full"]["contract_entries"] == 12 + clocks


def test_contract_commands_explain_their_inputs(tmp_path: Path) -> None:
    _, opts = setup(tmp_path)
    for args in (["party", "register"], ["rx", "issue"], ["rx", "verify"], ["policy", "register"], ["balance"]):
        assert run(*args, "--help").exit_code == 0
    missing = run("balance", *opts)
    assert missing.exit_code == 2 and "no ledger" in text(missing)
    not_rx = tmp_path / "x.json"
    not_rx.write_text("{}")
    result = run("rx", "show", not_rx)
    assert result.exit_code == 2 and "not a signed Rx file" in text(result)
    draft = tmp_path / "d.json"
    draft.write_text(json.dumps({"patient_token": "pt"}))
    result = run("rx", "issue", draft, "--key", tmp_path / "prescriber.key", *opts)
    assert result.exit_code == 2 and "drug_code" in text(result)


def test_rx_status_decides_expiry_and_ok_at_the_time_it_is_given(tmp_path: Path) -> None:
    from carechain.cli._ledger import replay
    from chain_bridge.contract_admin import read_rx_file, rx_status

    data, opts = setup(tmp_path)
    out_json(run("party", "register", "prescriber", tmp_path / "prescriber.key", "--name", "Dr A", *opts, "--json"))
    rx_file = Path(issue_amoxicillin(tmp_path, opts, refills=0)["rx_file"])
    runtime, signed = replay(Path(opts[1]), data), read_rx_file(rx_file)
    expires = signed.rx.expires_ms
    before = rx_status(runtime, signed, expires - 1)
    assert before["ok"] is True and "problem" not in before and before["fills_left"] == 1
    at = rx_status(runtime, signed, expires)
    assert at["ok"] is False and at["problem"] == "rx_expired" and at["fills_left"] == 1


def test_a_party_key_that_is_neither_hex_nor_a_file_names_the_argument(tmp_path: Path) -> None:
    _, opts = setup(tmp_path)
    short = run("party", "register", "pharmacy", "ab" * 31, "--name", "x", *opts)
    assert short.exit_code == 2 and "PUBLIC_KEY (not a key file either)" in text(short)
    assert "got 31" in text(short)
    not_hex = run("party", "register", "pharmacy", "not-a-key", "--name", "x", *opts)
    assert not_hex.exit_code == 2 and "'not-a-key' is not hex" in text(not_hex)

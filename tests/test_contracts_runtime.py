"""The contract runtime: independent replays agree on the state root; upgrades never rewrite history."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bonded_world import BondedWorld
from hypothesis import given, settings
from hypothesis import strategies as st
from test_contracts_world import AMOXICILLIN, DAY, FLU_SHOT, T0, WEEK, World, ident

from carechain import cbor, envelope
from carechain.entries import Entry
from carechain.identity import Identity
from contract_rules import CodeBook, MissingContractCode, Runtime, builtin_hashes, load_rule_source, replay
from contract_rules import transactions as ce

REPO = Path(__file__).resolve().parent.parent
PRESCRIPTIONS_SRC = (REPO / "contract_rules/prescriptions_v2.py").read_bytes()  # the newest shipped version
# A next version of the prescription rules (3, after the shipped 2), made from v1's source for a visible
# difference at anchoring: no refills at all for controlled substances.
PRESCRIPTIONS_V2_SRC = (REPO / "contract_rules/prescriptions.py").read_bytes().replace(
    b"VERSION = 1", b"VERSION = 3").replace(b"MAX_CONTROLLED_REFILLS = 5", b"MAX_CONTROLLED_REFILLS = 0")

_CHILD = """
import sys
from carechain import cbor
from carechain.entries import Entry
from contract_rules import Genesis, replay
raw = cbor.decode(open(sys.argv[1], "rb").read(), max_depth=4)
state = replay(Genesis.from_cbor(raw["genesis"]), [Entry(t, c) for t, c in raw["entries"]])
print(state.root().hex(), state.size)
"""


def pharmacy_day() -> World:
    """Every kind of entry, accepted and rejected: parties, bonds, devices, Rx, sales, patient-signed payments and
    claims, telemetry, a payout the patient settles herself."""
    w = BondedWorld()
    w.standard_parties()
    alice = w.alice.device_id
    w.add(w.consented(w.offer()))
    w.register_device(w.wearable, "heart_rate_band", alice)
    rx, _ = w.prescribe(patient=alice, quantity=1, refills=1)
    w.sale(rx_ref=rx.rx_ref(), patient=alice)
    w.sale(rx_ref=rx.rx_ref(), patient=alice, terminal=w.terminal2, ts=T0 + 2 * DAY)
    w.sale(rx_ref=rx.rx_ref(), patient=alice, ts=T0 + 2 * DAY)  # loses the race
    w.sale(rx_ref=None, ts=T0 + 2 * DAY)  # no Rx
    w.paid_sale(FLU_SHOT, price=4500, claim=2500, pay=2000, method="insurance", ts=T0 + 2 * DAY)
    for day in range(7):
        w.activity(25 + day, T0 + day * DAY + 60_000)
    w.attest(T0 + 8 * DAY)
    w.add(ce.signed(w.alice, ce.WELLNESS_SETTLE, ce.WellnessSettle(patient_token=alice, week=WEEK, ts=T0 + 8 * DAY)))
    w.transfer(w.insurer, w.pharmacy_account(), 100)
    w.transfer(w.pharmacy, f"patient:{alice}", 10**9)  # overdraft: rejected
    return w


def test_two_independent_processes_reach_the_same_state_root(tmp_path: Path) -> None:
    w = pharmacy_day()
    log = tmp_path / "log.cbor"
    log.write_bytes(cbor.encode({"genesis": w.genesis.to_cbor(), "entries": [[e.type, e.cose] for e in w.entries]}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Different hash seeds: any dependence on set or str-hash order would show up as different roots.
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(log)], cwd=REPO, stdout=subprocess.PIPE,
                              env={**env, "PYTHONHASHSEED": seed}, text=True) for seed in ("1", "2")]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    expected = [w.state.root().hex(), str(len(w.entries))]
    assert outputs == [expected, expected]
    # The day really exercised the rules: accepted and rejected outcomes, money moved, a payout.
    results = {r for _, r in w.state.results}
    assert {"ok", "rx_no_fills_left", "rx_missing", "insufficient_funds"} <= results
    assert w.state.table("wellness") and w.state.table("claims") and w.state.table("payment_nonces")


def test_the_root_commits_to_every_outcome() -> None:
    a, b = pharmacy_day(), pharmacy_day()
    assert a.state.root() == b.state.root()
    b.sale(AMOXICILLIN, rx_ref=None)  # one more rejected sale changes the root
    assert a.state.root() != b.state.root()


def upgrade_log(from_offset: int = 3) -> tuple[World, int]:
    """Controlled Rx anchored before, between and after an upgrade to prescriptions v2."""
    code = CodeBook.builtin()
    v2 = load_rule_source(PRESCRIPTIONS_V2_SRC, "prescriptions_v2.py")
    code.add(v2)
    w = World(code=code)
    w.standard_parties()
    rx_before, result = w.prescribe(controlled=True, refills=3, nonce=1)
    assert result == "ok"
    assert w.sale(rx_ref=rx_before.rx_ref(), quantity=2) == "ok"
    upgrade_at = len(w.entries)
    up = ce.ContractUpgrade(name="prescriptions", version=3, code_hash=v2.code_hash,
                            from_size=upgrade_at + from_offset, ts=T0)
    assert w.add(ce.signed(w.operator, ce.CONTRACT_UPGRADE, up)) == "ok"
    return w, upgrade_at


def test_an_upgrade_applies_from_the_named_tree_size_and_leaves_history_alone() -> None:
    w, upgrade_at = upgrade_log(from_offset=3)
    # Between the upgrade entry and its tree size, v1 still rules.
    assert w.prescribe(controlled=True, refills=3, nonce=2)[1] == "ok"
    assert w.prescribe(controlled=True, refills=3, nonce=3)[1] == "ok"
    assert len(w.entries) == upgrade_at + 3
    assert w.prescribe(controlled=True, refills=3, nonce=4)[1] == "controlled_too_many_refills"
    assert w.prescribe(controlled=True, refills=0, nonce=5)[1] == "ok"
    # Past outcomes are unchanged: the prefix replays identically with no upgrade in sight.
    prefix = replay(w.genesis, w.entries[:upgrade_at])
    assert w.state.results[:upgrade_at] == prefix.results
    # A fresh replica holding both versions replays the whole log to the same root.
    code = CodeBook.builtin()
    code.add(load_rule_source(PRESCRIPTIONS_V2_SRC))
    assert replay(w.genesis, w.entries, code).root() == w.state.root()


def test_a_replica_without_the_pinned_code_stops_instead_of_diverging() -> None:
    w, upgrade_at = upgrade_log(from_offset=1)
    w.prescribe(controlled=True, refills=0, nonce=9)
    runtime = Runtime(w.genesis)  # builtin code only: no v2
    for entry in w.entries[:upgrade_at + 1]:
        runtime.apply(entry)  # the upgrade entry itself is accepted without the code
    with pytest.raises(MissingContractCode, match=load_rule_source(PRESCRIPTIONS_V2_SRC).code_hash):
        runtime.apply(w.entries[upgrade_at + 1])


def test_code_hash_is_the_sha256_of_the_module_source() -> None:
    import hashlib

    assert builtin_hashes()["prescriptions"] == hashlib.sha256(PRESCRIPTIONS_SRC).hexdigest()
    v2 = load_rule_source(PRESCRIPTIONS_V2_SRC)
    assert (v2.name, v2.version, v2.code_hash) == ("prescriptions", 3, hashlib.sha256(PRESCRIPTIONS_V2_SRC).hexdigest())


@pytest.mark.parametrize(("fields", "reason"), [
    ({"from_size": 1}, "upgrade_is_retroactive"),
    ({"version": 1}, "upgrade_not_newer"),
    ({"name": "nonexistent"}, "unknown_contract"),
])
def test_invalid_upgrades_are_rejected(fields: dict, reason: str) -> None:
    w = World()
    w.standard_parties()
    up = {"name": "prescriptions", "version": 3, "code_hash": "00" * 32, "from_size": 100, "ts": T0, **fields}
    assert w.add(ce.signed(w.operator, ce.CONTRACT_UPGRADE, ce.ContractUpgrade(**up))) == reason
    assert len(w.state.versions["prescriptions"]) == 1


def test_only_operators_upgrade() -> None:
    w = World()
    w.standard_parties()
    up = ce.ContractUpgrade(name="tokens", version=2, code_hash="00" * 32, from_size=100, ts=T0)
    assert w.add(ce.signed(w.insurer, ce.CONTRACT_UPGRADE, up)) == "signer_not_allowed"


def test_forged_and_malformed_entries_are_rejected_without_effects() -> None:
    w = World()
    w.standard_parties()
    root, balances = w.state.root(), dict(w.state.balances)
    good = ce.signed(w.insurer, ce.TOKEN_TRANSFER, ce.TokenTransfer(to="patient:pt-x", amount=5, nonce=1))
    forged = bytearray(good.cose)
    forged[-1] ^= 1
    assert w.add(Entry(ce.TOKEN_TRANSFER, bytes(forged))) == "bad_signature"
    assert w.add(Entry(ce.TOKEN_TRANSFER, b"\x00garbage")).startswith("bad_envelope:")
    assert w.add(Entry("mystery.type", good.cose)) == "unknown_entry_type"
    assert w.add(ce.signed(ident(0x60), ce.TOKEN_TRANSFER, ce.TokenTransfer(to="patient:x", amount=5, nonce=1))) \
        == "unknown_signer"
    assert w.state.balances == balances
    assert w.state.root() != root  # outcomes are recorded, but nothing else moved
    assert all(r != "ok" for _, r in w.state.results[-4:])


def test_only_an_event_the_caller_verified_skips_the_signature_check_and_its_signer_is_still_checked() -> None:
    """The bridge replays its own ledger with `event_signature_checked` (its ingest verified each event with
    the registered key); a miner never does, and a forged event is then void. Contract entries are always
    verified, and a vouched-for event from an unregistered or revoked signer is still refused."""
    w = World()
    w.standard_parties()
    sale = w.sale_entry()
    forged = bytearray(sale.cose)
    forged[-1] ^= 1
    event = Entry(sale.type, bytes(forged))
    assert w.runtime.check(event) == "bad_signature"  # a miner's replay
    assert w.runtime.check(event, event_signature_checked=True) != "bad_signature"
    transfer = ce.signed(w.insurer, ce.TOKEN_TRANSFER, ce.TokenTransfer(to="patient:pt-x", amount=5, nonce=1))
    forged_transfer = bytearray(transfer.cose)
    forged_transfer[-1] ^= 1
    assert w.runtime.check(Entry(ce.TOKEN_TRANSFER, bytes(forged_transfer)), event_signature_checked=True) \
        == "bad_signature"
    stranger = w.event(ident(0x61), "purchase", envelope.parse(sale.cose).payload["body"], T0 + DAY)
    assert w.runtime.check(stranger, event_signature_checked=True) == "unknown_signer"


def test_an_ingested_event_taken_from_its_fields_comes_to_what_apply_gives_it() -> None:
    """The bridge's gate follows its batches with `apply_ingested` (no leaf decode for a kind no contract reads);
    a miner applies every leaf in full. Entry by entry they must agree — result and state root — whatever the kind,
    the protocol version and the signer (registered, revoked, unknown)."""
    from carechain.entries import event_entry
    from carechain.events import make_sealed_payload

    full, fast = World(), World()
    for w in (full, fast):
        w.standard_parties()
        assert w.register_device(w.wearable, "activity_tracker", "patient:pt-alice") == "ok"
        assert w.register_device(ident(0x71), "heart_rate_band", "patient:pt-bob") == "ok"
        assert w.revoke_device(ident(0x71)) == "ok"

    def sealed(dev: Identity, seq: int, kind: str) -> Entry:
        return event_entry(envelope.sign(dev, make_sealed_payload(dev.device_id, seq, T0, kind, 7, bytes(32))))

    events = [
        full.event(full.wearable, "heart_rate", {"bpm": 61}, T0),  # v1 reading: no contract reads it
        full.event(full.wearable, "activity", {"steps": 10, "active_minutes": 3}, T0),  # read by wellness
        full.sale_entry(),  # a purchase: routed to the prescription and insurance rules
        sealed(full.wearable, 40, "heart_rate"),  # v2: anchored as a ciphertext hash
        sealed(full.wearable, 41, "trial_measure"),  # v2: its leaf is remembered
        full.event(ident(0x71), "heart_rate", {"bpm": 70}, T0),  # revoked device
        full.event(ident(0x72), "heart_rate", {"bpm": 70}, T0),  # never registered
    ]
    results = []
    for entry in events:
        p = envelope.parse(entry.cose).payload
        expected = full.runtime.apply(entry, event_signature_checked=True)
        got = fast.runtime.apply_ingested(p["dev"], p["seq"], p["kind"], p["v"], lambda e=entry: e)
        results.append(got)
        assert got == expected and fast.state.root() == full.state.root(), p["kind"]
    assert results[0] == results[3] == results[4] == "ok" and results[5:] == ["device_revoked", "unknown_signer"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ok", "ok", "ok", "bad_signature", "rx_missing", "pop"]), max_size=40))
def test_results_read_like_the_list_of_outcomes_they_replace(steps: list[str]) -> None:
    from contract_rules.runtime import Results

    results, reference = Results(), []
    for step in steps:
        if step == "pop":
            if reference:
                assert results.pop() == reference.pop()
            continue
        results.append([len(reference), step])
        reference.append([len(reference), step])
    assert list(results) == reference and results == reference and len(results) == len(reference)
    assert results[:3] == reference[:3] and results[-2:] == reference[-2:]
    if reference:
        assert results[-1] == reference[-1] and results[0] == reference[0]
    assert results.refused() == [pair for pair in reference if pair[1] != "ok"]
    assert Results(len(reference), dict(results.refused())) == results


def test_a_snapshot_of_a_billion_leaves_restores_without_a_pair_per_leaf() -> None:
    """The outcomes are kept as the refusals: restoring a snapshot costs what its tables and refusals cost, not
    its leaves (a list of [index, outcome] pairs took 615 MB at 5 M leaves; at 10⁹ it could not be built)."""
    from contract_rules import Replica
    from contract_rules.runtime import Results

    w = World()
    w.standard_parties()
    replica = Replica(w.genesis)
    replica.apply_entries(w.entries)
    state = replica.state
    size = 1_000_000_000
    state.results = Results(size, {**dict(state.results.refused()), size - 1: "bad_signature"})
    state.size = size
    again = Replica(w.genesis)
    again.restore(replica.snapshot())
    assert again.state.size == size and len(again.state.results) == size
    assert again.state.results[-1] == [size - 1, "bad_signature"] and again.state.results[5] == [5, "ok"]
    assert again.state.root() == state.root()

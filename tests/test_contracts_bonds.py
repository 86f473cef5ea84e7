"""Bonds: posting, admission, unbonding on attested time, the slash schedule, and the miner.fork proof."""

from __future__ import annotations

import base64
import hashlib

import pytest
from bonded_world import T0, BondedWorld, ident

from carechain.checkpoint import Checkpoint, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.entries import Entry
from carechain.identity import Identity
from contract_rules import bonds
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND, SLASH, UNBONDING_MS, is_admitted, slash
from contract_rules.clock import attested_ms
from contract_rules.runtime import Effect, Put, Transfer, _apply_effects

LOG_ORIGIN = "carechain.example/log"


@pytest.fixture
def w() -> BondedWorld:
    world = BondedWorld()
    world.standard_parties()
    return world


def test_posting_a_bond_locks_tokens_and_admits_the_party(w: BondedWorld) -> None:
    pid = w.miner.device_id
    assert not is_admitted(w.state, pid)
    before = w.state.balance(f"miner:{pid}")
    assert w.post_bond(w.miner, MIN_BOND["miner"] - 1) == "ok"
    assert not is_admitted(w.state, pid)  # below the minimum
    assert w.post_bond(w.miner, 1) == "ok"
    assert is_admitted(w.state, pid)
    assert w.state.balance(f"bond:{pid}") == MIN_BOND["miner"] == w.state.table("bonds")[pid]["amount"]
    assert w.state.balance(f"miner:{pid}") == before - MIN_BOND["miner"]


def test_a_bond_needs_the_funds_and_a_bondable_role(w: BondedWorld) -> None:
    assert w.post_bond(w.miner, 10**9) == "insufficient_funds"
    assert w.add(w.bond_entry(w.alice, 1)) == "signer_not_allowed"  # patients post no bond
    entry = w.bond_entry(w.miner, 10)
    assert w.add(entry) == "ok"
    assert w.add(entry) == "nonce_reused"


def test_unbonding_waits_for_attested_time_and_stays_slashable(w: BondedWorld) -> None:
    pid = w.miner.device_id
    assert w.post_bond(w.miner, MIN_BOND["miner"] + 10_000) == "ok"
    if attested_ms(w.state) is None:
        assert w.unbond(w.miner, 10_000) == "no_attested_time"
    assert w.attest(T0) == "ok"
    assert w.unbond(w.miner, 10**6) == "unbond_exceeds_bond"
    assert w.unbond(w.miner, 10_000) == "ok"
    assert is_admitted(w.state, pid)
    assert w.withdraw(w.miner) == "bond_not_released"
    _apply(w, slash(w.state, pid, "failed_audit", 77))  # still slashable while unbonding
    assert w.state.table("bonds")[pid]["offences"] == [[77, "failed_audit"]]
    assert w.attest(T0 + UNBONDING_MS - 1) == "ok"
    assert w.withdraw(w.miner) == "bond_not_released"
    assert w.attest(T0 + UNBONDING_MS) == "ok"
    before = w.state.balance(f"miner:{pid}")
    assert w.withdraw(w.miner) == "ok"
    assert w.state.balance(f"miner:{pid}") == before + 10_000
    assert w.state.balance(f"bond:{pid}") == MIN_BOND["miner"] - SLASH["failed_audit"]
    assert w.withdraw(w.miner) == "nothing_unbonding"


def test_unbonding_below_the_minimum_ends_admission(w: BondedWorld) -> None:
    assert w.post_bond(w.miner, MIN_BOND["miner"]) == "ok"
    assert w.attest(T0) == "ok"
    assert w.unbond(w.miner, 1) == "ok"
    assert not is_admitted(w.state, w.miner.device_id)


def _apply(w: BondedWorld, effects: tuple[Effect, ...]) -> None:
    """Apply a slash's effects as the runtime applies a rule's."""
    assert _apply_effects(w.state, effects)


def test_slash_takes_the_scheduled_amount_cites_evidence_and_suspends_below_minimum(w: BondedWorld) -> None:
    pid = w.miner.device_id
    assert w.post_bond(w.miner, MIN_BOND["miner"] + SLASH["failed_audit"]) == "ok"
    pool = w.state.balance("pool:miners")
    effects = slash(w.state, pid, "failed_audit", 42)
    assert effects[0] == Transfer(f"bond:{pid}", "pool:miners", SLASH["failed_audit"], "slash:failed_audit:42")
    _apply(w, effects)
    record = w.state.table("bonds")[pid]
    assert record["offences"] == [[42, "failed_audit"]] and record["suspended_at"] is None
    assert w.state.balance("pool:miners") == pool + SLASH["failed_audit"]
    assert is_admitted(w.state, pid)
    _apply(w, slash(w.state, pid, "failed_audit", 43))  # now below the minimum: suspended
    record = w.state.table("bonds")[pid]
    assert record["suspended_at"] == 43 and not is_admitted(w.state, pid)
    assert w.state.balance(f"bond:{pid}") == record["amount"]
    assert w.post_bond(w.miner, SLASH["failed_audit"]) == "ok"  # topping up reinstates it
    assert is_admitted(w.state, pid)


def test_slash_never_takes_more_than_is_left_and_records_unbonded_parties(w: BondedWorld) -> None:
    pid = w.miner.device_id
    assert w.post_bond(w.miner, 100) == "ok"
    effects = slash(w.state, pid, "void_sale", 7)
    assert isinstance(effects[0], Transfer) and effects[0].amount == 100
    _apply(w, effects)
    assert [e for e in slash(w.state, pid, "void_sale", 8) if isinstance(e, Transfer)] == []  # nothing left
    assert slash(w.state, w.miner2.device_id, "failed_audit", 9) == (
        Put("offences", w.miner2.device_id, [[9, "failed_audit"]]),)
    with pytest.raises(ValueError, match="unknown offence"):
        slash(w.state, pid, "rudeness", 1)


# -- miner.fork -----------------------------------------------------------------------------------------

def _note(w: BondedWorld, size: int, leaf: bytes, cosigners: list[Identity], log: Identity | None = None) -> str:
    root = hashlib.sha256(leaf).digest()
    body = Checkpoint(LOG_ORIGIN, size, root).body()
    signer = log or w.operator
    note = sign_note(body, LOG_ORIGIN, signer.public_key, signer.sign)
    for miner in cosigners:
        line = cosign(body, Cosigner(f"miner-{miner.device_id}", miner.public_key), miner.sign, T0 // 1000)
        note = add_cosignature(note, line)
    return note


def _fork_entry(w: BondedWorld, miner: Identity, a: str, b: str, filer: Identity | None = None) -> Entry:
    return ce.signed(filer or w.miner2, ce.MINER_FORK, ce.MinerFork(miner=miner.device_id, note_a=a, note_b=b, ts=T0))


def test_a_fork_cosignature_slashes_the_whole_bond_and_suspends_the_miner(w: BondedWorld) -> None:
    pid = w.miner.device_id
    assert w.post_bond(w.miner, 3 * MIN_BOND["miner"]) == "ok"
    assert is_admitted(w.state, pid)
    pool = w.state.balance("pool:miners")
    a = _note(w, 10, b"one history", [w.miner, w.miner2])
    b = _note(w, 10, b"another history", [w.miner])
    assert w.add(_fork_entry(w, w.miner, a, b)) == "ok"
    record = w.state.table("bonds")[pid]
    assert record["amount"] == 0 and record["suspended_at"] == w.last_index
    assert record["offences"] == [[w.last_index, "fork_cosignature"]]
    assert w.state.balance("pool:miners") == pool + 3 * MIN_BOND["miner"]
    assert not is_admitted(w.state, pid)
    assert sum(w.state.balances.values()) == w.state.supply  # a slash moves tokens, it never burns or mints them
    assert w.add(_fork_entry(w, w.miner, a, b)) == "fork_already_proven"
    assert w.post_bond(w.miner, MIN_BOND["miner"]) == "ok"
    assert not is_admitted(w.state, pid)  # a fork suspends for good


def test_a_fork_needs_log_signed_contradicting_notes_cosigned_by_that_miner(w: BondedWorld) -> None:
    assert w.post_bond(w.miner, MIN_BOND["miner"]) == "ok"
    a = _note(w, 10, b"one history", [w.miner])
    same = _note(w, 10, b"one history", [w.miner])
    other_size = _note(w, 11, b"another history", [w.miner])
    not_cosigned = _note(w, 10, b"another history", [w.miner2])
    forged_log = _note(w, 10, b"another history", [w.miner], log=ident(99))
    garbage = "not a note\n"
    assert w.add(_fork_entry(w, w.miner, a, same)) == "no_fork"
    assert w.add(_fork_entry(w, w.miner, a, other_size)) == "checkpoints_not_comparable"
    assert w.add(_fork_entry(w, w.miner, a, not_cosigned)) == "checkpoint_not_cosigned_by_the_miner"
    assert w.add(_fork_entry(w, w.miner, a, forged_log)) == "checkpoint_not_signed_by_the_log"
    assert w.add(_fork_entry(w, w.miner, a, garbage)) == "bad_checkpoint_note"
    assert w.add(_fork_entry(w, w.alice, a, a)) == "unknown_miner"
    assert is_admitted(w.state, w.miner.device_id)


def test_a_log_signature_line_under_another_key_does_not_count(w: BondedWorld) -> None:
    """A note whose log-named line carries made-up signature bytes proves nothing, whoever cosigned it."""
    assert w.post_bond(w.miner, MIN_BOND["miner"]) == "ok"
    a = _note(w, 10, b"one history", [w.miner])
    body = Checkpoint(LOG_ORIGIN, 10, hashlib.sha256(b"x").digest()).body()
    fake = body + "\n" + f"\u2014 {LOG_ORIGIN} " + base64.b64encode(b"\0" * 68).decode() + "\n"
    cos = cosign(body, Cosigner("m", w.miner.public_key), w.miner.sign, 1)
    assert w.add(_fork_entry(w, w.miner, a, add_cosignature(fake, cos))) == "checkpoint_not_signed_by_the_log"


def test_bond_contract_is_addable_and_in_a_new_genesis() -> None:
    from contract_rules.runtime import ADDABLE, builtin_hashes

    assert "bonds" in ADDABLE and "bonds" in builtin_hashes()
    assert bonds.NAME == "bonds"


# -- access v2: a proven bad capsule fragment slashes the miner ----------------------------------------------

def test_a_proven_bad_capsule_fragment_slashes_the_miners_bond() -> None:
    from test_contracts_access import HOUR, AccessWorld

    from carechain.access import GrantProof, sign_capsule_fragments
    from carechain.reencryption import encapsulate, make_kfrags, reencrypt, verify_kfrag
    from contract_rules import access as access_rules

    world = AccessWorld()
    assert world.register_party("insurer", world.insurer) == "ok"
    for miner in world.miners:  # bonded at the minimum by the world; the insurer funds a second minimum
        assert world.transfer(world.insurer, f"miner:{miner.device_id}", MIN_BOND["miner"]) == "ok"
        assert world.post_bond(miner, MIN_BOND["miner"]) == "ok"
    world.epoch_key(T0 // HOUR)
    _, at = world.grant(world.request()[1])
    record = access_rules.access_record(world.state, at)
    assert record is not None
    miner = next(m for m in world.miners if m.device_id == record["miners"][0])
    [(dev, epoch, _, _)] = access_rules.granted_epochs(world.state, record)
    kfrag = verify_kfrag(make_kfrags(world.patient_pre, world.doctor_pre.public_key, 3, 5)[0],
                         world.patient_pre.public_key, world.patient_pre.verifying_key, world.doctor_pre.public_key)
    other_capsule, _ = encapsulate(world.patient_pre.public_key, b"\x01" * 32)
    garbage = reencrypt(other_capsule, kfrag)  # signed by the miner, but not this epoch's re-encryption
    proof = GrantProof(size=at + 1, path=[], checkpoint=world.final_checkpoint())
    bad = sign_capsule_fragments(miner, at, [(dev, epoch, garbage)], proof)
    pool = world.state.balance("pool:miners")
    fault = ce.AccessFault(grant_index=at, message=bad, ts=T0 + 2 * HOUR)
    assert world.add(ce.access_fault_entry(world.doctor, fault)) == "ok"
    bond = world.state.table("bonds")[miner.device_id]
    assert bond["offences"] == [[world.last_index, "bad_capsule_fragment"]]
    assert bond["amount"] == 2 * MIN_BOND["miner"] - SLASH["bad_capsule_fragment"]
    assert world.state.balance("pool:miners") == pool + SLASH["bad_capsule_fragment"]
    assert world.state.table("access_faults") == {miner.device_id: 1}  # v1's count is kept

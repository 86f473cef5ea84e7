"""Miners as witnesses, sans-IO: cosign consistent checkpoints, refuse forks with verifiable evidence,
count t-of-n finality over distinct registered keys."""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

import pytest

from carechain import miner_messages as messages
from carechain.checkpoint import Checkpoint, NoteSignature, parse_note, sign_note
from carechain.cosignature import (
    ALG_COSIGNATURE_V1,
    Cosigner,
    add_cosignature,
    cosign,
    cosignature_timestamp,
    signed_message,
)
from carechain.evidence import Evidence, EvidenceError, EvidenceKind, verify_evidence
from carechain.identity import Identity
from carechain.merkle import extend_frontier, frontier_root, leaf_hash
from carechain.merkle_tree import MerkleTree
from chain_bridge.finality import FinalityPolicy, FinalityTracker, is_final, is_final_note
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.proof_responder import ProofResponder
from chain_miner.service import StateError, load_state, save_state
from chain_miner.witness import (
    Cosigned,
    CosignRefused,
    ProofRequest,
    RefusalReason,
    Violation,
    Witness,
    WitnessState,
)

ORIGIN = "carechain.log/test"
NOW = 1_700_000_000


class Log:
    """A log (honest or not): leaves, a tree, and the log key signing its checkpoints."""

    def __init__(self, key: Identity, leaves: list[bytes] | None = None) -> None:
        self.key = key
        self.leaves = list(leaves or [])
        self.tree = MerkleTree(leaf_hash(e) for e in self.leaves)

    def append(self, *entries: bytes) -> None:
        for e in entries:
            self.leaves.append(e)
            self.tree.append(leaf_hash(e))

    def note(self, size: int | None = None) -> str:
        size = self.tree.size if size is None else size
        body = Checkpoint(ORIGIN, size, self.tree.root(size)).body()
        return sign_note(body, ORIGIN, self.key.public_key, self.key.sign)

    def proof(self, old: int, new: int) -> list[bytes]:
        lo, hi = sorted((old, new))
        return self.tree.consistency_proof(lo, hi)

    def attest(self, old: int, new: int, path: list[bytes] | None = None,
               key: Identity | None = None) -> messages.ProofAttestation:
        """What this log's responder signs for a request old → new (by default its own proof, no entries)."""
        path = self.proof(old, new) if path is None else path
        resp = messages.ProofResponseMessage(id="r", old_size=old, new_size=new,
                                             consistency_path=[h.hex() for h in path])
        return resp.signed((key or self.key).sign).attestation()

    def fork(self, keep: int) -> Log:
        return Log(self.key, self.leaves[:keep])


def entries(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


@pytest.fixture
def log_key() -> Identity:
    return Identity.from_seed(b"L" * 32)


def make_witness(log_key: Identity, seed: bytes = b"M" * 32, **kw: object) -> Witness:
    miner = Identity.from_seed(seed)
    return Witness(Cosigner(f"miner.test/{seed[:1].hex()}", miner.public_key), miner.sign, log_key.public_key,
                   WitnessState(origin=None), **kw)  # type: ignore[arg-type]


def step(w: Witness, log: Log, now: int = NOW) -> Cosigned | CosignRefused:
    """What a miner does with the log's latest checkpoint: plan, fetch from this log, observe."""
    note = log.note()
    plan = w.plan(note)
    if isinstance(plan, CosignRefused):
        return plan
    assert isinstance(plan, ProofRequest)
    new_entries = log.leaves[plan.old_size:plan.new_size] if plan.new_size > plan.old_size else []
    return w.observe(note, log.proof(plan.old_size, plan.new_size), new_entries, now,
                     log.attest(plan.old_size, plan.new_size))


# -- cosignature format (c2sp.org/tlog-cosignature) ------------------------------------------------------


def test_cosignature_v1_signs_header_time_and_body_with_key_id_alg_0x04() -> None:
    body = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert signed_message(body, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
        b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")
    key = Identity.from_seed(b"W" * 32)
    c = Cosigner("witness.example.com/w1", key.public_key)
    assert c.key_id == hashlib.sha256(b"witness.example.com/w1\n\x04" + key.public_key).digest()[:4]
    sig = cosign(body, c, key.sign, 1679315147)
    blob = base64.b64decode(sig.line().split(" ")[2])
    assert len(blob) == 4 + 8 + 64 and blob[:4] == c.key_id
    assert struct.unpack(">Q", blob[4:12]) == (1679315147,)
    assert cosignature_timestamp(body, sig, c) == 1679315147
    assert cosignature_timestamp(body.replace("20852163", "20852164"), sig, c) is None
    assert ALG_COSIGNATURE_V1 == 0x04


def test_cosignature_line_parses_as_a_signed_note_line(log_key: Identity) -> None:
    log = Log(log_key, entries("a", 3))
    w = make_witness(log_key)
    d = step(w, log)
    assert isinstance(d, Cosigned)
    cosigned = add_cosignature(d.note, d.cosignature)
    body, sigs = parse_note(cosigned)
    assert body == d.checkpoint.body() and sigs[-1] == d.cosignature


# -- the witness decision ----------------------------------------------------------------------------------


def test_consistent_growing_log_is_cosigned_at_every_checkpoint(log_key: Identity) -> None:
    log, w = Log(log_key), make_witness(log_key)
    for n in (1, 2, 5, 0, 16, 1):
        log.append(*entries(f"batch{log.tree.size}", n))
        d = step(w, log)
        assert isinstance(d, Cosigned), d
        assert w.state.tree_size == log.tree.size and w.state.root_hash == log.tree.root()
        assert cosignature_timestamp(d.checkpoint.body(), d.cosignature, w.cosigner) == NOW
    assert w.state.origin == ORIGIN


def test_older_checkpoint_of_the_same_log_is_stale_not_evidence(log_key: Identity) -> None:
    log, w = Log(log_key, entries("a", 4)), make_witness(log_key)
    old_note = log.note(2)
    assert isinstance(step(w, log), Cosigned)
    d = w.observe(old_note, log.proof(2, 4), [], NOW)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.STALE and d.evidence is None
    assert w.state.tree_size == 4


def test_forked_checkpoint_is_refused_with_evidence_an_auditor_verifies(log_key: Identity) -> None:
    honest, w = Log(log_key, entries("a", 6)), make_witness(log_key)
    assert isinstance(step(w, honest), Cosigned)
    forked = honest.fork(3)
    forked.append(*entries("evil", 5))  # 8 leaves, leaves 3..5 rewritten
    d = step(w, forked)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.FORK
    assert d.evidence is not None and d.evidence.kind is EvidenceKind.FORK
    assert w.state.tree_size == 6 and w.state.root_hash == honest.tree.root()  # nothing moved
    assert "inconsistent" in verify_evidence(d.evidence, log_key.public_key)
    # The fork stays refused, however it grows.
    forked.append(*entries("more", 3))
    again = step(w, forked)
    assert isinstance(again, CosignRefused) and again.reason is RefusalReason.FORK


def test_rollback_to_a_rewritten_smaller_tree_is_refused_with_evidence(log_key: Identity) -> None:
    honest, w = Log(log_key, entries("a", 6)), make_witness(log_key)
    assert isinstance(step(w, honest), Cosigned)
    rolled = honest.fork(2)
    rolled.append(b"rewritten")
    note = rolled.note()  # size 3, not a prefix of the cosigned 6
    d = w.observe(note, honest.proof(3, 6), [], NOW, honest.attest(6, 3))
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.FORK and d.evidence is not None
    assert d.evidence.old_checkpoint == note  # smaller first
    verify_evidence(d.evidence, log_key.public_key)


def test_two_roots_for_one_size_is_a_self_contained_split_view(log_key: Identity) -> None:
    honest, w = Log(log_key, entries("a", 4)), make_witness(log_key)
    assert isinstance(step(w, honest), Cosigned)
    other = Log(log_key, entries("b", 4))
    d = step(w, other)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.SPLIT_VIEW and d.evidence is not None
    assert d.evidence.consistency_path == []
    assert "split_view" in verify_evidence(d.evidence, log_key.public_key)


def test_evidence_that_proves_nothing_is_rejected(log_key: Identity) -> None:
    honest, w = Log(log_key, entries("a", 6)), make_witness(log_key)
    assert isinstance(step(w, honest), Cosigned)
    forked = honest.fork(3)
    forked.append(*entries("evil", 5))
    d = step(w, forked)
    assert isinstance(d, CosignRefused) and d.evidence is not None
    with pytest.raises(EvidenceError, match="another log key"):
        verify_evidence(d.evidence, Identity.generate().public_key)
    honest.append(*entries("b", 2))  # a genuine, consistent pair framed as a fork
    framed = d.evidence.model_copy(update={"new_checkpoint": honest.note(), "proof": honest.attest(6, 8)})
    with pytest.raises(EvidenceError, match="consistent"):
        verify_evidence(framed, log_key.public_key)
    forged = d.evidence.model_copy(update={"new_checkpoint": d.evidence.new_checkpoint.replace("8\n", "9\n", 1)})
    with pytest.raises(EvidenceError, match="new_checkpoint"):
        verify_evidence(forged, log_key.public_key)


def test_two_genuine_checkpoints_and_random_bytes_are_not_fork_evidence(log_key: Identity) -> None:
    """Regression: fork evidence used to be two signed checkpoints plus any consistency path that failed —
    random bytes "proved" an honest log forked. Now only a path the log itself signed counts."""
    honest = Log(log_key, entries("a", 6))
    old_note = honest.note()
    honest.append(*entries("b", 3))
    new_note = honest.note()
    junk = [bytes(range(i, i + 32)) for i in range(len(honest.proof(6, 9)))]
    bare = Evidence(kind=EvidenceKind.FORK, miner="miner.test/x", observed=NOW, log_public_key=log_key.public_key.hex(),
                    old_checkpoint=old_note, new_checkpoint=new_note, consistency_path=[h.hex() for h in junk])
    with pytest.raises(EvidenceError, match="signed proof"):
        verify_evidence(bare, log_key.public_key)
    forged = honest.attest(6, 9, junk, key=Identity.generate())  # the junk path, signed by someone else
    with pytest.raises(EvidenceError, match="not signed by the log key"):
        verify_evidence(bare.model_copy(update={"proof": forged}), log_key.public_key)
    tampered = honest.attest(6, 9).model_copy(update={"consistency_path": [h.hex() for h in junk]})
    with pytest.raises(EvidenceError, match="not signed by the log key"):
        verify_evidence(bare.model_copy(update={"proof": tampered}), log_key.public_key)
    with pytest.raises(EvidenceError, match="consistent"):  # the log's own answer proves the opposite
        verify_evidence(bare.model_copy(update={"proof": honest.attest(6, 9)}), log_key.public_key)
    with pytest.raises(EvidenceError, match="sizes"):  # a signed answer about other trees
        verify_evidence(bare.model_copy(update={"proof": honest.attest(5, 9, junk)}), log_key.public_key)
    # A witness handed the junk path without the log's signature refuses, but has no evidence to publish.
    w = make_witness(log_key)
    w.state = WitnessState(ORIGIN, 6, Log(log_key, entries("a", 6)).tree.root(), old_note,
                           tuple(extend_frontier(0, (), [leaf_hash(e) for e in entries("a", 6)])))
    d = w.observe(new_note, junk, [], NOW, forged)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.FORK and d.evidence is None


def test_a_proof_response_is_valid_only_as_the_log_signed_it(log_key: Identity) -> None:
    resp = messages.ProofResponseMessage(id="x", old_size=1, new_size=3, consistency_path=["ab" * 32],
                                         entries=[b"e1".hex(), b"e2".hex()])
    signed = resp.signed(log_key.sign)
    assert signed.signed_by(log_key.public_key) and not resp.signed_by(log_key.public_key)
    assert not signed.signed_by(Identity.generate().public_key)
    for change in ({"entries": [b"e1".hex(), b"eX".hex()]}, {"id": "y"}, {"new_size": 4}, {"consistency_path": []},
                   {"error": "rate_limited: retry in 1 s"}):
        assert not signed.model_copy(update=change).signed_by(log_key.public_key), change
    assert signed.attestation().signed_by(log_key.public_key)  # what fork evidence carries: no entries


def test_miner_messages_are_signed_by_the_miner_whose_topic_they_are_on() -> None:
    key, other = Identity.from_seed(b"A" * 32), Identity.from_seed(b"B" * 32)
    hello = messages.MinerHello(miner=key.device_id, name="carechain.miner/a", public_key=key.public_key.hex(),
                                ts=1).signed(key)
    assert messages.from_miner(hello, key.device_id)
    assert not messages.from_miner(hello, other.device_id)  # republished on another miner's topic
    assert not messages.from_miner(hello.model_copy(update={"name": "x"}), key.device_id)
    assert not messages.from_miner(hello.model_copy(update={"sig": None}), key.device_id)
    stolen = hello.model_copy(update={"public_key": other.public_key.hex(), "miner": other.device_id})
    assert not messages.from_miner(stolen, other.device_id)  # another's key, not its signature
    cosig = messages.CosignatureMessage(miner="carechain.miner/a", public_key=key.public_key.hex(), tree_size=3,
                                        checkpoint="c\n", cosignature="— a x\n").signed(key)
    assert messages.from_miner(cosig, key.device_id)
    assert not messages.from_miner(cosig.model_copy(update={"tree_size": 4}), key.device_id)
    # a signature of one kind never passes as another: the domain is signed
    as_hello = messages.MinerHello(miner=key.device_id, name="n", public_key=key.public_key.hex(), ts=1)
    assert not as_hello.model_copy(update={"sig": cosig.sig}).signed_by(key.public_key)


def test_checkpoint_not_signed_by_the_log_key_is_refused(log_key: Identity) -> None:
    w = make_witness(log_key)
    impostor = Log(Identity.from_seed(b"X" * 32), entries("a", 3))
    d = step(w, impostor)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.BAD_SIGNATURE and d.evidence is None
    honest = Log(log_key, entries("a", 3))
    tampered = honest.note().replace("\n3\n", "\n4\n", 1)
    d2 = w.observe(tampered, [], entries("a", 4), NOW)
    assert isinstance(d2, CosignRefused) and d2.reason is RefusalReason.BAD_SIGNATURE
    assert w.state == WitnessState(origin=None)


def test_entries_that_are_not_the_signed_leaves_are_refused_without_blaming_the_log(log_key: Identity) -> None:
    log, w = Log(log_key, entries("a", 5)), make_witness(log_key)
    note = log.note()
    d = w.observe(note, [], entries("x", 5), NOW)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.BAD_ENTRIES and d.evidence is None
    d = w.observe(note, [], entries("a", 4), NOW)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.BAD_ENTRIES
    assert isinstance(w.observe(note, [], entries("a", 5), NOW), Cosigned)


def test_a_bad_proof_for_a_log_its_entries_show_consistent_is_not_evidence(log_key: Identity) -> None:
    log, w = Log(log_key, entries("a", 5)), make_witness(log_key)
    assert isinstance(step(w, log), Cosigned)
    log.append(*entries("b", 4))
    note = log.note()
    wrong = [bytes(32)] * len(log.proof(5, 9))
    d = w.observe(note, wrong, log.leaves[5:], NOW)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.BAD_RESPONSE and d.evidence is None
    d = w.observe(note, [b"short"], log.leaves[5:], NOW)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.BAD_RESPONSE
    d = w.observe(note, [bytes(32)] * 65, log.leaves[5:], NOW)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.BAD_RESPONSE
    assert w.state.tree_size == 5
    assert isinstance(w.observe(note, log.proof(5, 9), log.leaves[5:], NOW), Cosigned)


def test_contract_hook_violation_is_refused_with_evidence_that_replays(log_key: Identity) -> None:
    def no_evil(old: int, new: int, batch: object) -> Violation | None:
        for i, e in enumerate(batch):  # type: ignore[arg-type]
            if e.startswith(b"evil"):
                return Violation(old + i, "no-evil-sale", "an Rx-only sale without a valid Rx")
        return None

    log, w = Log(log_key, entries("a", 3)), make_witness(log_key, entry_verifier=no_evil)
    assert isinstance(step(w, log), Cosigned)
    log.append(b"ok", b"evil sale", b"ok2")
    d = step(w, log)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.VIOLATION and d.evidence is not None
    assert d.evidence.violation_leaf == 4 and w.state.tree_size == 3
    assert "leaf 4" in verify_evidence(d.evidence, log_key.public_key, no_evil)
    assert "re-execute" in verify_evidence(d.evidence, log_key.public_key)
    with pytest.raises(EvidenceError, match="no violation"):
        verify_evidence(d.evidence, log_key.public_key, lambda *_: None)
    swapped = d.evidence.model_copy(update={"entries": [b"ok".hex(), b"evil other".hex(), b"ok2".hex()]})
    with pytest.raises(EvidenceError, match="not the leaves"):
        verify_evidence(swapped, log_key.public_key, no_evil)


def test_same_checkpoint_seen_again_is_cosigned_again_with_a_fresh_timestamp(log_key: Identity) -> None:
    log, w = Log(log_key, entries("a", 3)), make_witness(log_key)
    assert isinstance(step(w, log, NOW), Cosigned)
    d = step(w, log, NOW + 5)
    assert isinstance(d, Cosigned) and cosignature_timestamp(d.checkpoint.body(), d.cosignature, w.cosigner) == NOW + 5


@pytest.mark.parametrize("size", [*range(0, 40), 1023, 1024, 1025])
def test_frontier_root_is_the_rfc9162_root(size: int) -> None:
    hashes = [leaf_hash(b"%d" % i) for i in range(size)]
    tree = MerkleTree(hashes)
    half = size // 3
    front = extend_frontier(half, extend_frontier(0, (), hashes[:half]), hashes[half:])
    assert len(front) == size.bit_count()
    assert frontier_root(front) == tree.root()


# -- finality ------------------------------------------------------------------------------------------------


def miners(n: int) -> list[tuple[Identity, Cosigner]]:
    out = []
    for i in range(n):
        key = Identity.from_seed(bytes([i + 1]) * 32)
        out.append((key, Cosigner(f"miner.test/{i}", key.public_key)))
    return out


def test_final_at_t_of_n_distinct_registered_keys_only() -> None:
    ms = miners(5)
    policy = FinalityPolicy(tuple(c for _, c in ms), threshold=3)
    body = Checkpoint(ORIGIN, 7, b"\x07" * 32).body()
    sig = [cosign(body, c, k.sign, NOW) for k, c in ms]
    assert not is_final(body, sig[:2], policy)
    assert not is_final(body, [sig[0], sig[0], sig[1], cosign(body, ms[0][1], ms[0][0].sign, NOW + 1)], policy)
    stranger = Identity.generate()
    unknown = cosign(body, Cosigner("miner.test/x", stranger.public_key), stranger.sign, NOW)
    assert not is_final(body, [sig[0], sig[1], unknown], policy)
    other_body = Checkpoint(ORIGIN, 8, b"\x08" * 32).body()
    assert not is_final(body, [sig[0], sig[1], cosign(other_body, ms[2][1], ms[2][0].sign, NOW)], policy)
    broken = NoteSignature(sig[2].name, sig[2].key_hash, sig[2].signature[:-1] + b"\x00")
    assert not is_final(body, [sig[0], sig[1], broken], policy)
    assert is_final(body, [sig[4], unknown, sig[0], sig[2]], policy)


def test_one_key_registered_under_two_names_counts_once() -> None:
    (k0, c0), (k1, c1) = miners(2)
    alias = Cosigner("miner.test/alias", k0.public_key)
    policy = FinalityPolicy((c0, alias, c1), threshold=2)
    body = Checkpoint(ORIGIN, 1, b"\x01" * 32).body()
    assert not is_final(body, [cosign(body, c0, k0.sign, NOW), cosign(body, alias, k0.sign, NOW)], policy)
    assert is_final(body, [cosign(body, alias, k0.sign, NOW), cosign(body, c1, k1.sign, NOW)], policy)
    with pytest.raises(ValueError, match="threshold"):
        FinalityPolicy((c0, alias, c1), threshold=3)  # only 2 distinct keys


def test_tracker_reports_finality_once_and_builds_the_final_note(log_key: Identity) -> None:
    ms = miners(5)
    policy = FinalityPolicy(tuple(c for _, c in ms), threshold=3)
    log = Log(log_key, entries("a", 2))
    note = log.note()
    body, _ = parse_note(note)
    tracker = FinalityTracker(policy)
    results = [tracker.add(body, cosign(body, c, k.sign, NOW)) for k, c in [ms[0], ms[0], ms[1], ms[2], ms[3]]]
    assert results == [False, False, False, True, False]
    final = tracker.final_note(note)
    assert final is not None and is_final_note(final, policy)
    assert len(tracker.cosigners(body)) == 4  # still counted after finality


# -- persistence and the responder --------------------------------------------------------------------------


def test_state_survives_a_restart_and_a_damaged_file_is_refused(tmp_path: Path, log_key: Identity) -> None:
    log, w = Log(log_key, entries("a", 11)), make_witness(log_key)
    d = step(w, log)
    assert isinstance(d, Cosigned)
    path = tmp_path / "witness.json"
    save_state(path, d.state)
    assert load_state(path) == d.state
    assert load_state(tmp_path / "missing.json") == WitnessState(origin=None)
    restarted = make_witness(log_key)
    restarted.state = load_state(path)
    forked = log.fork(5)
    forked.append(*entries("evil", 8))
    assert isinstance(step(restarted, forked), CosignRefused)
    path.write_text('{"v": 1, "tree_size": "x"}')
    with pytest.raises(StateError, match="damaged"):
        load_state(path)


def test_responder_answers_from_the_ledger(tmp_path: Path, log_key: Identity) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        ledger.append_events([EventCandidate("dev", i, b"leaf %d" % i) for i in range(7)])
        r = ProofResponder(ledger, log_key=log_key)
        resp = r.answer(messages.ProofRequestMessage(id="1", old_size=3, new_size=7))
        assert resp.error is None and resp.signed_by(log_key.public_key)
        assert [bytes.fromhex(e) for e in resp.entries] == [b"leaf %d" % i for i in range(3, 7)]
        assert [bytes.fromhex(h) for h in resp.consistency_path] == ledger.tree.consistency_proof(3, 7)
        back = r.answer(messages.ProofRequestMessage(id="2", old_size=7, new_size=3))
        assert back.entries == [] and back.consistency_path == resp.consistency_path
        refused = r.answer(messages.ProofRequestMessage(id="3", old_size=0, new_size=9))
        assert refused.error and refused.signed_by(log_key.public_key)  # refusals are signed too
    finally:
        ledger.close()


def test_miner_topics() -> None:
    mid = Identity.from_seed(b"M" * 32).device_id
    assert messages.cosignature(mid) == f"cc/v1/miner/{mid}/cosig"
    assert messages.miner_of_topic(messages.request(mid)) == (mid, "req")
    assert messages.miner_of_topic(messages.hello(mid)) == (mid, "hello") and messages.hello(mid).endswith("/hello")
    assert messages.miner_of_topic("cc/v1/miner/UPPER/req") is None
    with pytest.raises(ValueError):
        messages.evidence("a/b")

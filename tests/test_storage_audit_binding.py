"""An audit answer binds the challenges it answers, so whoever asks the questions cannot frame an honest miner.

The rules derive each miner's challenges from the ledger and a final checkpoint's seed. Before the binding, a
client could ask an honest storage miner other challenges (chunks of shares it never held, or other chunks
of its own shares), file the miner's honest, signed answers, and the rules judged them against *their*
challenges: a failed audit and a slash for a miner that did nothing wrong. Now the signed `AuditAnswer`
carries the digest of the challenges asked, and an answer to other challenges is evidence of nothing: the
entry is refused and the miner keeps its bond. Real miner code (`StorageServer.handle`, shares on disk),
real keys and checkpoint notes (`tests/storage_world.py`), the real rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from carechain.checkpoint import Checkpoint, parse_note
from carechain.identity import Identity
from carechain.storage.attestations import AuditChallenge, WireChallenge, challenges_for, wire_challenges
from carechain.storage.audit import Challenge
from chain_miner.storage_server import ShareStore, StorageServer
from contract_rules import bonds, miners
from tests.storage_world import StorageWorld


@pytest.fixture
def w() -> StorageWorld:
    world = StorageWorld()
    world.bonded_miners()
    _, commit = world.put()
    assert world.add(commit) == "ok"
    return world


def honest_server(w: StorageWorld, miner: Identity, root: Path) -> StorageServer:
    """The miner's storage server holding on disk exactly the shares the ledger gives it."""
    server = StorageServer(miner, ShareStore(root))
    for row in w.state.table("storage_shares").values():
        for share, holder in enumerate(row["miners"]):
            if holder == miner.device_id:
                ref = (row["dataset"], row["segment"], row["version"], share)
                server.store.put(ref, w.shares[ref])
    return server


def ask(server: StorageServer, seed: bytes, challenges: list[WireChallenge]) -> bytes:
    answer = server.handle({"op": "audit", "chunk_size": 1, "epoch": 0, "seed": seed,
                            "challenges": [list(c) for c in challenges]})
    assert answer is not None and answer["ok"] is True, answer
    return bytes(answer["attestation"])


def derived(w: StorageWorld, note: str, miner: str) -> list[AuditChallenge]:
    size = Checkpoint.parse(parse_note(note)[0]).tree_size
    return challenges_for(w.state, w.seed(note), miner, as_of=size)


def holders(w: StorageWorld) -> list[str]:
    return sorted({m for row in w.state.table("storage_shares").values() for m in row["miners"]})


def test_an_honest_answer_to_other_challenges_cannot_fail_the_miner(w: StorageWorld, tmp_path: Path) -> None:
    note = w.note()
    seed = w.seed(note)
    victim_id, other_id = holders(w)[:2]
    victim = w.by_id(victim_id)
    server = honest_server(w, victim, tmp_path / "shares")
    bond_before = bonds.bond_of(w.state, victim_id)

    # Chunks of shares the victim never held (another miner's challenges): it honestly answers "not held".
    not_held = ask(server, seed, wire_challenges(derived(w, note, other_id)))
    # Its own shares, but other chunks than the rules draw: valid proofs, for chunks nobody should judge.
    shifted = [AuditChallenge(Challenge(c.challenge.ref, (c.challenge.chunk + 1) % -(-c.challenge.ref.length
                                                                                    // c.chunk_size)), c.chunk_size)
               for c in derived(w, note, victim_id)]
    other_chunks = ask(server, seed, wire_challenges(shifted))
    for framed in (not_held, other_chunks):
        assert w.add(w.audit_entry(note, {victim_id: framed})) == "answer_to_other_challenges"
    assert miners.count(w.state, 0, "audit_failed", victim_id) == 0
    assert bonds.bond_of(w.state, victim_id) == bond_before and victim_id in miners.active_miners(w.state)

    # Asked what the rules draw, the same miner passes.
    honest = ask(server, seed, wire_challenges(derived(w, note, victim_id)))
    assert w.add(w.audit_entry(note, {victim_id: honest})) == "ok"
    assert miners.count(w.state, 0, "audit_passed", victim_id) == 1


def test_a_miner_that_lost_a_share_still_fails_when_asked_the_right_challenges(w: StorageWorld,
                                                                               tmp_path: Path) -> None:
    note = w.note()
    seed = w.seed(note)
    victim = w.by_id(holders(w)[0])
    server = honest_server(w, victim, tmp_path / "shares")
    challenges = derived(w, note, victim.device_id)
    ref = challenges[0].challenge.ref
    server.store.delete((ref.dataset_id, ref.segment, ref.version, ref.share))
    answer = ask(server, seed, wire_challenges(challenges))
    assert w.add(w.audit_entry(note, {victim.device_id: answer})) == "ok"
    assert miners.count(w.state, 0, "audit_failed", victim.device_id) == 1
    assert victim.device_id not in miners.active_miners(w.state)

"""A chosen miner's release of capsule fragments (chain_miner.reencryptor): only under a final checkpoint it
counted itself, only for a usable grant naming it, exactly the granted epochs, with a proof that verifies.

The contract state is built through the real runtime (registrations, epoch keys, request, grant, revoke)
and the cryptography is real (umbral, sealed boxes, Ed25519); no broker here (see the integration test).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from carechain import access, envelope, topics
from carechain.checkpoint import Checkpoint, parse_note, sign_note
from carechain.cosignature import Cosigner, cosign
from carechain.entries import ENTRY_REGISTER, Entry, Registration, event_entry
from carechain.events import PROTOCOL_V2, EpochKey, make_payload
from carechain.identity import Identity
from carechain.merkle import leaf_hash, verify_inclusion
from carechain.merkle_tree import MerkleTree
from carechain.reencryption import PreKey, ReencryptionError, encapsulate, make_kfrags, open_data_key, verify_cfrag
from carechain.seed import checkpoint_seed
from chain_miner.reencryptor import (
    EXPIRED,
    RELEASED,
    REVOKED,
    AccessReleaser,
    FetchLeaves,
    Reencryptor,
    Refusal,
    Release,
    inclusion_path,
    load_done,
)
from contract_rules import transactions as ce
from contract_rules.access import registered_miners
from contract_rules.runtime import OK, Genesis, Runtime, builtin_hashes
from simulators.miners import garbage_reencrypt

T0 = 1_780_000_000_000
HOUR = 3_600_000
ORIGIN = "carechain.test/log"


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


class AccessWorld:
    """A log with five registered miners, a patient with a device and three hourly epochs, and a doctor."""

    def __init__(self) -> None:
        self.log = ident(1)  # the bridge's log key, a genesis operator (it signs checkpoints and registrations)
        self.miners = [ident(10 + i) for i in range(5)]
        self.patient, self.doctor, self.device = ident(2), ident(3), ident(4)
        self.patient_pre, self.doctor_pre = PreKey.from_seed(b"p" * 32), PreKey.from_seed(b"d" * 32)
        self.genesis = Genesis(operators={self.log.device_id: self.log.public_key}, allocations={},
                               contracts=builtin_hashes())
        self.runtime = Runtime(self.genesis)
        self.leaves: list[bytes] = []
        self.data_keys: dict[int, bytes] = {}
        for m in self.miners:
            self.party("miner", m)
        self.party("patient", self.patient, self.patient_pre)
        self.party("doctor", self.doctor, self.doctor_pre)
        reg = Registration(dev=self.device.device_id, pk=self.device.public_key, profile="heart_rate_band",
                           owner=self.patient.device_id, site="home", ts=T0)
        self.add(Entry(ENTRY_REGISTER, envelope.sign(self.log, reg.model_dump())))
        for seq, epoch in enumerate(range(T0 // HOUR, T0 // HOUR + 3), start=1):
            self.data_keys[epoch] = os.urandom(32)
            capsule, key_ct = encapsulate(self.patient_pre.public_key, self.data_keys[epoch])
            body = EpochKey(epoch=epoch, epoch_ms=HOUR, owner=self.patient.device_id, capsule=capsule, key_ct=key_ct)
            payload = make_payload(self.device.device_id, seq, epoch * HOUR, "epoch_key", body, v=PROTOCOL_V2)
            self.add(event_entry(envelope.sign(self.device, payload)))

    @property
    def state(self):  # noqa: ANN201
        return self.runtime.state

    @property
    def size(self) -> int:
        return len(self.leaves)

    def add(self, entry: Entry) -> int:
        result = self.runtime.apply(entry)
        assert result == OK, result
        self.leaves.append(entry.encode())
        return self.size - 1

    def party(self, role: str, who: Identity, pre: PreKey | None = None) -> None:
        reg = ce.PartyRegistration(role=role, pk=who.public_key, name=role, ts=T0,
                                   pre_pk=pre.public_key if pre else None, pre_vk=pre.verifying_key if pre else None)
        self.add(ce.party_registration_entry(self.log, reg))

    def note(self, size: int | None = None, cosigners: list[Identity] | None = None) -> str:
        """The log's signed checkpoint of the first `size` leaves, cosigned by `cosigners`."""
        size = self.size if size is None else size
        body = Checkpoint(ORIGIN, size, MerkleTree(leaf_hash(leaf) for leaf in self.leaves[:size]).root()).body()
        note = sign_note(body, ORIGIN, self.log.public_key, self.log.sign)
        for m in cosigners or []:
            note += cosign(body, Cosigner(f"carechain.miner/{m.device_id}", m.public_key), m.sign, 1).line()
        return note

    def grant(self, *, expires_ms: int = T0 + 10 * HOUR, threshold: int = 3,
              from_ms: int = T0 - HOUR, to_ms: int = T0 + HOUR) -> int:
        """The doctor asks for an hour around T0; the patient grants it to the miners the seed chooses."""
        req = ce.AccessRequest(owner=self.patient.device_id, from_ms=from_ms, to_ms=to_ms, purpose="consultation",
                               expires_ms=expires_ms, nonce=self.size, ts=T0)
        index = self.add(ce.access_request_entry(self.doctor, req))
        request_hash = access.request_hash(self.leaves[index])
        seed_note = self.note(cosigners=self.miners[:3])
        body, sigs = parse_note(seed_note)
        seed = checkpoint_seed(body, [s.signature for s in sigs])
        chosen = access.choose_miners(seed, registered_miners(self.state), 5, request_hash)
        keys = {m.device_id: m.public_key for m in self.miners}
        kfrags = make_kfrags(self.patient_pre, self.doctor_pre.public_key, threshold, 5)
        grant = ce.AccessGrant(request=request_hash.hex(), requester=self.doctor.device_id, threshold=threshold,
                               miners=chosen,
                               kfrags=[access.seal_to_miner(keys[m], k) for m, k in zip(chosen, kfrags, strict=True)],
                               seed_checkpoint=seed_note, expires_ms=expires_ms, ts=T0)
        return self.add(ce.access_grant_entry(self.patient, grant))

    def revoke(self, grant_index: int) -> int:
        return self.add(ce.access_revoke_entry(self.patient, ce.AccessRevoke(grant_index=grant_index, reason="done",
                                                                             ts=T0)))

    def filler(self, count: int) -> None:
        """Unrelated leaves (parties registered) after the grant."""
        for _ in range(count):
            self.party("researcher", Identity.generate())

    def core(self, miner: Identity, **kwargs) -> Reencryptor:  # noqa: ANN003
        return Reencryptor(miner, self.log.public_key, **kwargs)


def fresh() -> AccessWorld:
    return AccessWorld()


def follow(core: Reencryptor, w: AccessWorld) -> None:
    """The miner replayed (and cosigned) the whole log so far."""
    core.observe(0, (), w.leaves, w.state)


def released(core: Reencryptor, w: AccessWorld, now_ms: int = T0) -> Release | Refusal:
    (grant,) = core.due(w.state)
    step = core.check(grant, w.state, now_ms)
    if isinstance(step, Refusal):
        return step
    assert isinstance(step, FetchLeaves)
    return core.release(grant, w.state, w.leaves[step.old_size:step.new_size])


def open_epochs(w: AccessWorld, grant_index: int, messages: list[bytes]) -> dict[int, bytes]:
    """What the requester does: check each miner's signature, the proof, every fragment; open each epoch."""
    keys = {m.device_id: m.public_key for m in w.miners}
    epochs = {int(k.rpartition(":")[2]): v for k, v in w.state.table("epochs").items()}
    frags: dict[int, list] = {}
    for raw in messages:
        msg = access.parse_capsule_fragments(raw, keys[access.signer_of(raw)])
        assert msg.access == grant_index
        root = Checkpoint.parse(msg.proof.checkpoint.split("\n\n")[0] + "\n").root_hash
        verify_inclusion(grant_index, msg.proof.size, leaf_hash(w.leaves[grant_index]), msg.proof.path, root)
        for f in msg.frags:
            capsule = epochs[f.epoch]["capsule"]
            frags.setdefault(f.epoch, []).append(verify_cfrag(f.cfrag, capsule, w.patient_pre.public_key,
                                                              w.patient_pre.verifying_key, w.doctor_pre.public_key))
    return {e: open_data_key(w.doctor_pre, w.patient_pre.public_key, epochs[e]["capsule"], cf, epochs[e]["key_ct"])
            for e, cf in frags.items()}


def chosen(w: AccessWorld, grant_index: int) -> list[Identity]:
    names = w.state.table("access")[str(grant_index)]["miners"]
    by_id = {m.device_id: m for m in w.miners}
    return [by_id[n] for n in names]


# -- the inclusion proof ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 100])
def test_the_inclusion_path_from_a_frontier_and_the_later_leaves_is_the_trees(size: int) -> None:
    from carechain.merkle import extend_frontier

    hashes = [leaf_hash(bytes([i % 256, i // 256])) for i in range(size)]
    tree = MerkleTree(hashes)
    for index in {0, size // 3, size // 2, size - 1}:
        frontier = extend_frontier(0, (), hashes[:index])
        path = inclusion_path(index, size, frontier, hashes[index:])
        assert path == tree.inclusion_proof(index, size)
        verify_inclusion(index, size, hashes[index], path, tree.root())


# -- releasing -------------------------------------------------------------------------------------------


def test_three_of_the_five_chosen_miners_open_exactly_the_granted_epochs() -> None:
    w = fresh()
    g = w.grant()
    w.filler(3)
    final = w.note(cosigners=w.miners[:3])
    messages: list[bytes] = []
    for miner in chosen(w, g):
        core = w.core(miner)
        follow(core, w)
        assert core.add_cosignatures(final, w.state)
        decision = released(core, w)
        assert isinstance(decision, Release), decision
        assert decision.requester == w.doctor.device_id and core.done == {g: RELEASED}
        messages += decision.messages
    opened = open_epochs(w, g, messages[:3])
    # [T0 - 1 h, T0 + 1 h] overlaps T0's epoch and the next, not the third anchored one (it starts later).
    first = T0 // HOUR
    assert opened == {first: w.data_keys[first], first + 1: w.data_keys[first + 1]}
    with pytest.raises(ReencryptionError):  # two miners' fragments are not enough
        open_epochs(w, g, messages[:2])


def test_nothing_is_released_before_a_checkpoint_covering_the_grant_is_final() -> None:
    w = fresh()
    g = w.grant()
    miner = chosen(w, g)[0]
    core = w.core(miner)
    follow(core, w)
    assert core.pending and core.due(w.state) == []  # no final checkpoint seen at all
    assert not core.add_cosignatures(w.note(cosigners=w.miners[:2]), w.state)  # 2 of 5: not a majority
    assert core.due(w.state) == []
    core.add_cosignatures(w.note(size=g, cosigners=w.miners), w.state)  # final, but before the grant
    assert core.due(w.state) == []
    outsider = Identity.generate()  # a cosignature by an unregistered key counts for nothing
    body = w.note().split("\n\n")[0] + "\n"
    note = w.note(cosigners=w.miners[:2]) + cosign(body, Cosigner("x", outsider.public_key), outsider.sign, 1).line()
    assert not core.add_cosignatures(note, w.state)
    assert core.due(w.state) == []


def test_cosignatures_collected_one_by_one_make_the_checkpoint_final() -> None:
    w = fresh()
    g = w.grant()
    core = w.core(chosen(w, g)[0])
    follow(core, w)
    body = w.note().split("\n\n")[0] + "\n"
    for m in w.miners[:2]:  # as each miner publishes its own line
        assert not core.add_cosignatures(w.note() + cosign(body, Cosigner("carechain.miner/" + m.device_id,
                                                                          m.public_key), m.sign, 1).line(), w.state)
    m = w.miners[2]
    line = cosign(body, Cosigner("carechain.miner/" + m.device_id, m.public_key), m.sign, 1).line()
    assert core.add_cosignatures(w.note() + line, w.state)
    assert isinstance(released(core, w), Release)


def test_a_checkpoint_not_signed_by_the_log_is_not_final() -> None:
    w = fresh()
    g = w.grant()
    core = w.core(chosen(w, g)[0])
    follow(core, w)
    forger = Identity.generate()
    body = w.note().split("\n\n")[0] + "\n"
    note = sign_note(body, ORIGIN, forger.public_key, forger.sign)
    for m in w.miners:
        note += cosign(body, Cosigner("carechain.miner/" + m.device_id, m.public_key), m.sign, 1).line()
    assert not core.add_cosignatures(note, w.state)
    assert core.due(w.state) == []


def test_a_final_checkpoint_beyond_the_miners_replica_waits_for_the_replica() -> None:
    w = fresh()
    g = w.grant()
    core = w.core(chosen(w, g)[0])
    follow(core, w)
    replayed = w.size
    w.revoke(g)  # in the log, not yet replayed by this miner
    assert core.add_cosignatures(w.note(cosigners=w.miners[:3]), _state_at(w, replayed))
    assert core.due(_state_at(w, replayed)) == []  # would miss the revocation: wait
    core.observe(replayed, _frontier(w, replayed), w.leaves[replayed:], w.state)
    refusal = released(core, w)
    assert isinstance(refusal, Refusal) and refusal.reason == REVOKED and core.done == {g: REVOKED}


def test_a_revoked_grant_is_refused_for_good() -> None:
    w = fresh()
    g = w.grant()
    w.revoke(g)
    core = w.core(chosen(w, g)[0])
    follow(core, w)
    assert core.add_cosignatures(w.note(cosigners=w.miners[:3]), w.state)
    refusal = released(core, w)
    assert isinstance(refusal, Refusal) and refusal.reason == REVOKED and refusal.final
    assert core.due(w.state) == []


def test_an_expired_grant_is_refused() -> None:
    w = fresh()
    g = w.grant(expires_ms=T0 + HOUR)
    core = w.core(chosen(w, g)[0])
    follow(core, w)
    core.add_cosignatures(w.note(cosigners=w.miners[:3]), w.state)
    refusal = released(core, w, now_ms=T0 + HOUR)
    assert isinstance(refusal, Refusal) and refusal.reason == EXPIRED


def test_a_miner_not_chosen_holds_nothing_to_release() -> None:
    w = fresh()
    g = w.grant()
    core = w.core(Identity.generate())
    follow(core, w)
    core.add_cosignatures(w.note(cosigners=w.miners[:3]), w.state)
    assert not core.pending and core.due(w.state) == [] and g not in core.done


def test_leaves_that_are_not_the_final_trees_give_no_release_and_are_asked_again() -> None:
    w = fresh()
    g = w.grant()
    w.filler(2)
    core = w.core(chosen(w, g)[0])
    follow(core, w)
    core.add_cosignatures(w.note(cosigners=w.miners[:3]), w.state)
    (grant,) = core.due(w.state)
    step = core.check(grant, w.state, T0)
    assert isinstance(step, FetchLeaves) and (step.old_size, step.new_size) == (g + 1, w.size)
    lie = core.release(grant, w.state, [b"not the leaf"] + w.leaves[g + 2:])
    assert isinstance(lie, Refusal) and not lie.final and g not in core.done
    assert isinstance(core.release(grant, w.state, w.leaves[g + 1:]), Release)


def test_a_garbage_miner_is_caught_by_the_requesters_check() -> None:
    w = fresh()
    g = w.grant()
    core = w.core(chosen(w, g)[0], reencrypt=garbage_reencrypt)
    follow(core, w)
    core.add_cosignatures(w.note(cosigners=w.miners[:3]), w.state)
    decision = released(core, w)
    assert isinstance(decision, Release)
    with pytest.raises(ReencryptionError):
        open_epochs(w, g, list(decision.messages))


def test_a_large_release_is_split_into_messages_under_the_size_limit() -> None:
    w = fresh()
    g = w.grant()
    core = w.core(chosen(w, g)[0], max_message_bytes=1300)
    follow(core, w)
    core.add_cosignatures(w.note(cosigners=w.miners[:3]), w.state)
    decision = released(core, w)
    assert isinstance(decision, Release) and len(decision.messages) > 1
    assert all(len(m) <= 1300 for m in decision.messages)
    frags = [f for m in decision.messages for f in access.parse_capsule_fragments(m, core.miner.public_key).frags]
    assert len(frags) == decision.epochs == 2


# -- the shell: once per grant, across restarts ----------------------------------------------------------


def test_the_releaser_publishes_once_to_the_requesters_inbox_and_remembers_it_across_a_restart(tmp_path: Path) -> None:
    w = fresh()
    g = w.grant()
    w.filler(2)
    miner = chosen(w, g)[0]
    sent: list[tuple[str, bytes]] = []
    asked: list[tuple[int, int]] = []

    def fetch(lo: int, hi: int) -> list[bytes]:
        asked.append((lo, hi))
        return w.leaves[lo:hi]

    def releaser() -> AccessReleaser:
        core = Reencryptor(miner, w.log.public_key, load_done(tmp_path / "access.json"))
        return AccessReleaser(core, tmp_path, lambda: w.state, fetch, lambda t, p: sent.append((t, p)),
                              clock=lambda: T0 / 1000)

    first = releaser()
    first.after_cosign(0, (), w.leaves)
    assert sent == []  # not final yet
    final = w.note(cosigners=w.miners[:3])
    first.on_note(final)
    assert [t for t, _ in sent] == [topics.party_inbox(w.doctor.device_id)]
    assert asked == [(g + 1, w.size)] and first.stats["access_released"] == 1
    assert json.loads((tmp_path / "access.json").read_text())["done"] == {str(g): RELEASED}
    first.on_note(final)  # the same final checkpoint again
    again = releaser()  # a restart replays the log and sees the final checkpoint again
    again.after_cosign(0, (), w.leaves)
    again.on_note(final)
    assert len(sent) == 1


def test_a_final_checkpoint_seen_before_the_replica_was_replayed_still_counts(tmp_path: Path) -> None:
    """A restarted miner gets the retained final checkpoint before it has replayed its log."""
    w = fresh()
    g = w.grant()
    sent: list[tuple[str, bytes]] = []
    replica = _state_at(w, 0)
    shell = AccessReleaser(Reencryptor(chosen(w, g)[0], w.log.public_key), tmp_path, lambda: replica,
                           lambda lo, hi: w.leaves[lo:hi], lambda t, p: sent.append((t, p)),
                           clock=lambda: T0 / 1000)
    shell.on_note(w.note(cosigners=w.miners[:3]))
    assert sent == []
    replica = w.state
    shell.after_cosign(0, (), w.leaves)
    assert len(sent) == 1


def test_the_releaser_counts_a_refusal_once(tmp_path: Path) -> None:
    w = fresh()
    g = w.grant()
    w.revoke(g)
    stats: Counter[str] = Counter()
    core = Reencryptor(chosen(w, g)[0], w.log.public_key, stats=stats)
    shell = AccessReleaser(core, tmp_path, lambda: w.state, lambda lo, hi: w.leaves[lo:hi],
                           lambda t, p: pytest.fail("published for a revoked grant"), clock=lambda: T0 / 1000)
    shell.after_cosign(0, (), w.leaves)
    shell.on_note(w.note(cosigners=w.miners[:3]))
    shell.on_note(w.note(cosigners=w.miners))
    assert stats["access_refused"] == 1 and stats["access_refused_revoked"] == 1


def _state_at(w: AccessWorld, size: int):  # noqa: ANN202
    """The contract state after the first `size` leaves (a replica that lags)."""
    from contract_rules.replay import Replica

    replica = Replica(w.genesis)
    replica.apply_leaves(w.leaves[:size])
    return replica.state


def _frontier(w: AccessWorld, size: int) -> tuple[bytes, ...]:
    from carechain.merkle import extend_frontier

    return extend_frontier(0, (), [leaf_hash(leaf) for leaf in w.leaves[:size]])



# -- with real processes: a bridge, five `carechain miner` processes (one sending garbage), mosquitto --------


@pytest.mark.integration
def test_miner_processes_release_to_the_requesters_inbox_only_under_finality_and_refuse_a_revoked_grant(
        tmp_path: Path, broker: Any) -> None:  # conftest's TestBroker
    import queue
    import threading
    import time

    from carechain.config import BridgeConfig
    from carechain.transport import connect_client
    from chain_bridge.bridge import Bridge
    from chain_bridge.ledger.store import EventCandidate, Ledger
    from simulators.miners import CosignatureWatch, MinerProcess, clear_retained
    from tests.test_miners_integration import wait_for

    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    log = Identity.generate()  # the bridge's log key, also the genesis operator that signs registrations
    genesis = tmp_path / "bridge" / "contracts" / "genesis.json"
    genesis.parent.mkdir(parents=True)
    genesis.write_text(json.dumps({"operators": {log.device_id: log.public_key.hex()}, "allocations": {},
                                   "contracts": builtin_hashes()}))
    miners = [MinerProcess(tmp_path / f"miner{i}", broker.config, log.public_key, "--genesis", str(genesis),
                           garbage_cfrags=(i == 4)) for i in range(5)]
    garbage_id = miners[4].key.device_id
    bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3,
                                 miners=[m.registered for m in miners], finality_threshold=3),
                    broker.config, log, Ledger(tmp_path / "bridge" / "ledger.db"), client_id=f"bridge-{tmp_path.name}")
    watch = CosignatureWatch(broker.config, f"watch-{tmp_path.name}", origin=bridge.origin)
    patient, doctor, device = Identity.generate(), Identity.generate(), Identity.generate()
    patient_pre, doctor_pre = PreKey.generate(), PreKey.generate()
    inbox: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
    ready = threading.Event()
    requester = connect_client(broker.config, f"doctor-{tmp_path.name}", connected=ready,
                               on_message=lambda _c, _u, m: inbox.put((time.monotonic(), bytes(m.payload))),
                               subscriptions=[(topics.party_inbox(doctor.device_id), 1)])
    # The same contract state the miners replay, kept beside the ledger to build the owner's grant.
    replica = Runtime(Genesis(operators={log.device_id: log.public_key}, allocations={}, contracts=builtin_hashes()))

    def append(*entries: Entry) -> list[int]:
        for e in entries:
            assert replica.apply(e) == OK
        with bridge.ledger_lock:
            return bridge.ledger.append_entries(list(entries))

    def party(role: str, who: Identity, pre: PreKey | None = None) -> Entry:
        return ce.party_registration_entry(log, ce.PartyRegistration(
            role=role, pk=who.public_key, name=role, ts=T0, pre_pk=pre.public_key if pre else None,
            pre_vk=pre.verifying_key if pre else None))

    def final_covering(index: int) -> str:
        wait_for(f"a final checkpoint covering leaf {index}", lambda: any(s > index for s in watch.final_sizes()))
        return next(note for _, size, note in watch.finals if size > index)

    def grant(nonce: int, *, revoke: bool = False) -> tuple[int, float]:
        """A request, then its grant (and, with `revoke`, its revocation in the same commit: never final alone)."""
        (req_index,) = append(ce.access_request_entry(doctor, ce.AccessRequest(
            owner=patient.device_id, from_ms=T0 - HOUR, to_ms=T0 + HOUR, purpose="consultation",
            expires_ms=int(time.time() * 1000) + 3_600_000, nonce=nonce, ts=T0)))
        seed_note = final_covering(req_index - 1)
        body, sigs = parse_note(seed_note)
        request_hash = access.request_hash(bridge.ledger.entry(req_index))
        chosen = access.choose_miners(checkpoint_seed(body, [s.signature for s in sigs]),
                                      registered_miners(replica.state), 5, request_hash)
        keys = {m.key.device_id: m.key.public_key for m in miners}
        kfrags = make_kfrags(patient_pre, doctor_pre.public_key, 3, 5)
        entry = ce.access_grant_entry(patient, ce.AccessGrant(
            request=request_hash.hex(), requester=doctor.device_id, threshold=3, miners=chosen,
            kfrags=[access.seal_to_miner(keys[m], k) for m, k in zip(chosen, kfrags, strict=True)],
            seed_checkpoint=seed_note, expires_ms=int(time.time() * 1000) + 3_600_000, ts=T0))
        if not revoke:
            (index,) = append(entry)
            return index, time.monotonic()
        index = bridge.ledger.size
        append(entry, ce.access_revoke_entry(patient, ce.AccessRevoke(grant_index=index, reason="changed my mind",
                                                                      ts=T0)))
        return index, time.monotonic()

    try:
        bridge.start()
        assert bridge.wait_ready(30) and watch.connected.wait(30) and ready.wait(30)
        for m in miners:
            m.start()
        for m in miners:
            m.wait_ready()
        append(*(party("miner", m.key) for m in miners), party("patient", patient, patient_pre),
               party("doctor", doctor, doctor_pre))
        reg = Registration(dev=device.device_id, pk=device.public_key, profile="heart_rate_band",
                           owner=patient.device_id, site="home", ts=T0)
        reg_entry = Entry(ENTRY_REGISTER, envelope.sign(log, reg.model_dump()))
        assert replica.apply(reg_entry) == OK
        with bridge.ledger_lock:
            bridge.ledger.append_registrations([(reg_entry, reg)])
        data_keys = {}
        epoch_entries = []
        for seq, epoch in enumerate((T0 // HOUR, T0 // HOUR + 1), start=1):
            data_keys[epoch] = os.urandom(32)
            capsule, key_ct = encapsulate(patient_pre.public_key, data_keys[epoch])
            payload = make_payload(device.device_id, seq, epoch * HOUR, "epoch_key", EpochKey(
                epoch=epoch, epoch_ms=HOUR, owner=patient.device_id, capsule=capsule, key_ct=key_ct), v=PROTOCOL_V2)
            epoch_entries.append(event_entry(envelope.sign(device, payload)))
        for e in epoch_entries:  # as the bridge would anchor them (its ingest is not under test here)
            assert replica.apply(e) == OK
        with bridge.ledger_lock:
            bridge.ledger.append_events([EventCandidate(device.device_id, seq, e.encode(), kind="epoch_key", version=2)
                                         for seq, e in enumerate(epoch_entries, start=1)])

        granted, granted_at = grant(1)
        revoked, _ = grant(2, revoke=True)
        got: list[tuple[float, bytes]] = []

        def arrived() -> set[str]:
            while not inbox.empty():
                got.append(inbox.get())
            return {access.signer_of(p) for _, p in got}

        wait_for("capsule fragments from the five miners", lambda: len(arrived()) == 5)
        final_seen = min(t for t, size, _ in watch.finals if size > granted)
        assert all(t >= final_seen for t, _ in got), "a capsule fragment arrived before its grant was final"
        by_miner = {access.signer_of(p): p for _, p in got}
        epochs = {int(k.rpartition(":")[2]): v for k, v in replica.state.table("epochs").items()}
        keys = {m.key.device_id: m.key.public_key for m in miners}
        verified: dict[int, list] = {}
        for miner_id, raw in by_miner.items():
            msg = access.parse_capsule_fragments(raw, keys[miner_id])
            assert msg.access == granted and msg.proof.size > granted
            for f in msg.frags:
                try:
                    cf = verify_cfrag(f.cfrag, epochs[f.epoch]["capsule"], patient_pre.public_key,
                                      patient_pre.verifying_key, doctor_pre.public_key)
                except ReencryptionError:
                    assert miner_id == garbage_id  # detected, and the signed message names its miner
                    continue
                verified.setdefault(f.epoch, []).append(cf)
        assert {epoch: len(v) for epoch, v in verified.items()} == {epoch: 4 for epoch in data_keys}
        for epoch, cfrags in verified.items():
            assert open_data_key(doctor_pre, patient_pre.public_key, epochs[epoch]["capsule"], cfrags[:3],
                                 epochs[epoch]["key_ct"]) == data_keys[epoch]
        final_covering(revoked + 1)  # the revocation is final too: the miners refuse, nothing more arrives
        time.sleep(1)
        arrived()
        assert {access.parse_capsule_fragments(p, keys[access.signer_of(p)]).access for _, p in got} == {granted}
        assert granted_at <= final_seen
        for m in miners:
            stats = m.stop()
            assert stats is not None, m.stderr()[-2000:]
            assert stats.get("access_released") == 1 and stats.get("access_refused") == 1, stats
    finally:
        for m in miners:
            m.stop()
        bridge.stop()
        bridge.ledger.close()
        watch.stop()
        requester.disconnect()
        requester.loop_stop()
        clear_retained(broker.config, f"clear-{tmp_path.name}", [topics.CHECKPOINT, topics.FINAL_CHECKPOINT] +
                       [topics.miner_cosignature(m.key.device_id) for m in miners])

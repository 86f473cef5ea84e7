"""Opening granted records (record_access): capsule fragments, record pages, and every reading's checks.

A whole access flow on a contract replica, with real crypto end to end: parties with re-encryption keys, a
device sealing readings per epoch, a request, a grant drawn from a hand-made final checkpoint, the chosen
miners opening their sealed key fragments and re-encrypting, the bridge's page — and the requester's
`Opening`, fed the same bytes the MQTT shell would give it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from carechain import access, envelope, events, reencryption, sealed
from carechain.checkpoint import Checkpoint, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.entries import Entry, Registration, registration_entry
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from contract_rules import transactions as ce
from contract_rules.access import granted_epochs
from contract_rules.genesis import new_genesis
from contract_rules.runtime import OK, Runtime
from record_access import Fault, Opening, OpeningError, access_context, build_grant, build_request, open_records
from record_access.client import fault_entry, verify_and_decrypt
from record_access.ledger_view import registered_miners

OPERATOR = Identity.from_seed(b"\x01" * 32)
OWNER, OWNER_PRE = Identity.from_seed(b"\x02" * 32), reencryption.PreKey.from_seed(b"\x12" * 32)
DOCTOR, DOCTOR_PRE = Identity.from_seed(b"\x03" * 32), reencryption.PreKey.from_seed(b"\x13" * 32)
DEVICE = Identity.from_seed(b"\x04" * 32)
MINERS = [Identity.from_seed(bytes([0x20 + i]) * 32) for i in range(6)]
EPOCH_MS = 60_000
T0 = 1_765_000_000_000 // EPOCH_MS * EPOCH_MS  # an epoch boundary


@dataclass
class World:
    """A contract replica and the leaves it applied (every entry must be accepted)."""

    runtime: Runtime = field(default_factory=lambda: Runtime(new_genesis([OPERATOR.public_key], {"pool:miners": 1})))
    leaves: list[bytes] = field(default_factory=list)
    records: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (index, cose, ct) of sealed readings
    epoch_events: list[bytes] = field(default_factory=list)
    registration: bytes = b""
    readings: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0

    def append(self, entry: Entry) -> int:
        result = self.runtime.apply(entry)
        assert result == OK, result
        self.leaves.append(entry.encode())
        return len(self.leaves) - 1

    def final_note(self, cosigners: int = 4) -> str:
        body = Checkpoint("carechain.test/log", len(self.leaves),
                          MerkleTree(leaf_hash(leaf) for leaf in self.leaves).root()).body()
        note = sign_note(body, "carechain.test/log", OPERATOR.public_key, OPERATOR.sign)
        for i, miner in enumerate(MINERS[:cosigners]):
            note = add_cosignature(note, cosign(body, Cosigner(f"miner-{i}", miner.public_key), miner.sign, T0))
        return note

    def seal_epoch(self, epoch: int, readings: int, device: Identity = DEVICE) -> None:
        """One epoch_key event, then `readings` sealed heart-rate readings of that epoch."""
        key = os.urandom(sealed.DATA_KEY_SIZE)
        capsule, key_ct = reencryption.encapsulate(OWNER_PRE.public_key, key)
        body = events.EpochKey(epoch=epoch, epoch_ms=EPOCH_MS, owner=OWNER.device_id, capsule=capsule, key_ct=key_ct)
        cose = envelope.sign(device, events.make_payload(device.device_id, self.seq, epoch * EPOCH_MS, "epoch_key",
                                                         body, v=events.PROTOCOL_V2))
        self.seq += 1
        self.append(Entry("event", cose))
        self.epoch_events.append(cose)
        for i in range(readings):
            ts = epoch * EPOCH_MS + i * (EPOCH_MS // max(readings, 1))
            reading = {"bpm": 60 + i % 40}
            ct = sealed.seal_body(key, os.urandom(sealed.NONCE_SIZE), device.device_id, self.seq, ts, "heart_rate",
                                  epoch, reading)
            cose = envelope.sign(device, events.make_sealed_payload(device.device_id, self.seq, ts, "heart_rate",
                                                                    epoch, sealed.ciphertext_hash(ct)))
            index = self.append(Entry("event", cose))
            self.records.append((index, cose, ct))
            self.readings.append({"index": index, "dev": device.device_id, "seq": self.seq, "ts": ts,
                                  "kind": "heart_rate", **reading})
            self.seq += 1


def register_parties(world: World) -> None:
    for role, who, pre in (("patient", OWNER, OWNER_PRE), ("doctor", DOCTOR, DOCTOR_PRE)):
        world.append(ce.party_registration_entry(OPERATOR, ce.PartyRegistration(
            role=role, pk=who.public_key, name=role.title(), ts=T0, pre_pk=pre.public_key, pre_vk=pre.verifying_key)))
    for i, miner in enumerate(MINERS):
        world.append(ce.party_registration_entry(OPERATOR, ce.PartyRegistration(
            role="miner", pk=miner.public_key, name=f"miner-{i}", ts=T0)))
    reg = Registration(dev=DEVICE.device_id, pk=DEVICE.public_key, profile="heart_rate_band", owner=OWNER.device_id,
                       site="home", ts=T0)
    entry = registration_entry(OPERATOR, reg)
    world.append(entry)
    world.registration = entry.encode()


def granted_world(epochs: int = 2, readings: int = 5, threshold: int = 3, shares: int = 5) -> tuple[World, int]:
    """Parties, a device with `epochs` sealed epochs, and a granted request; (world, access index)."""
    world = World()
    register_parties(world)
    for e in range(epochs):
        world.seal_epoch(T0 // EPOCH_MS + e, readings)
    request = build_request(DOCTOR, owner=OWNER.device_id, devices=[], kinds=["heart_rate"], from_ms=T0,
                            to_ms=T0 + epochs * EPOCH_MS, purpose="follow-up", expires_ms=T0 + 86_400_000, nonce=7,
                            ts=T0)
    world.append(request.entry)
    grant = build_grant(OWNER, OWNER_PRE, request, requester_pre_pk=DOCTOR_PRE.public_key,
                        miners=registered_miners(world.runtime.state), final_note=world.final_note(),
                        threshold=threshold, shares=shares, expires_ms=T0 + 3_600_000, ts=T0 + 1)
    return world, world.append(grant.entry)


def miner_messages(world: World, index: int, garbage: set[str] = frozenset()) -> dict[str, bytes]:  # type: ignore[assignment]
    """What each chosen miner publishes: its kfrag opened and verified, every granted capsule re-encrypted."""
    state = world.runtime.state
    record = state.table("access")[str(index)]
    by_id = {m.device_id: m for m in MINERS}
    out = {}
    for miner_id, sealed_kfrag in zip(record["miners"], record["kfrags"], strict=True):
        kfrag = reencryption.verify_kfrag(access.open_sealed_kfrag(by_id[miner_id], sealed_kfrag), OWNER_PRE.public_key,
                                          OWNER_PRE.verifying_key, DOCTOR_PRE.public_key)
        frags = []
        for dev, epoch, capsule, _key_ct in granted_epochs(state, record):
            cfrag = reencryption.reencrypt(capsule, kfrag)
            if miner_id in garbage:  # a cfrag for another capsule: well-formed, but it does not verify
                other, _ = reencryption.encapsulate(OWNER_PRE.public_key, b"\x00" * 32)
                cfrag = reencryption.reencrypt(other, kfrag)
            frags.append((dev, epoch, cfrag))
        proof = access.GrantProof(size=len(world.leaves), path=[], checkpoint=world.final_note())
        out[miner_id] = access.sign_capsule_fragments(by_id[miner_id], index, frags, proof)
    return out


def page(world: World, index: int, records: list[tuple[int, bytes, bytes]] | None = None,
         registrations: list[bytes] | None = None, epochs: list[bytes] | None = None) -> bytes:
    return access.sign_records_page(OPERATOR, access.RecordsPage(
        v=1, access=index, page=0, pages=1, last=True, epochs=world.epoch_events if epochs is None else epochs,
        registrations=[world.registration] if registrations is None else registrations,
        records=[access.Record(index=i, cose=c, ct=ct)
                 for i, c, ct in (world.records if records is None else records)]))


def opening(world: World, index: int) -> Opening:
    return Opening(access_context(world.runtime.state, index), DOCTOR_PRE.public_key)


def test_three_of_five_miners_open_every_reading_of_the_granted_epochs() -> None:
    world, index = granted_world()
    o = opening(world, index)
    messages = list(miner_messages(world, index).values())
    for raw in messages[:2]:  # fragments may arrive before the page with their capsules
        assert o.on_fragments(raw) is not None
    assert o.on_page(page(world, index)) is None and o.complete_pages()
    assert not o.ready() and set(o.missing_fragments().values()) == {1}  # two of three per epoch
    o.on_fragments(messages[2])
    assert o.ready() and not o.faults
    keys = o.data_keys(DOCTOR_PRE)
    assert len(keys) == 2
    readings, problems = open_records(o.records, o.device_keys, keys)
    assert problems == [] and readings == world.readings


def test_two_miners_cannot_open_a_data_key() -> None:
    world, index = granted_world(epochs=1)
    o = opening(world, index)
    o.on_page(page(world, index))
    for raw in list(miner_messages(world, index).values())[:2]:
        o.on_fragments(raw)
    assert not o.ready() and o.data_keys(DOCTOR_PRE) == {}
    # The two cooperating miners' verified fragments, straight into umbral: still not enough.
    state = world.runtime.state
    dev, epoch, capsule, key_ct = granted_epochs(state, state.table("access")[str(index)])[0]
    two = [reencryption.verify_cfrag(f.cfrag, capsule, OWNER_PRE.public_key, OWNER_PRE.verifying_key,
                                     DOCTOR_PRE.public_key)
           for raw in list(miner_messages(world, index).values())[:2]
           for f in access.parse_capsule_fragments(raw,
                                                   access_context(state, index).miners[access.signer_of(raw)]).frags]
    with pytest.raises(reencryption.ReencryptionError):
        reencryption.open_data_key(DOCTOR_PRE, OWNER_PRE.public_key, capsule, two, key_ct)


def test_a_garbage_capsule_fragment_is_attributed_and_the_open_goes_on_with_the_others() -> None:
    world, index = granted_world()
    liar = world.runtime.state.table("access")[str(index)]["miners"][0]
    o = opening(world, index)
    o.on_page(page(world, index))
    for raw in miner_messages(world, index, garbage={liar}).values():
        o.on_fragments(raw)
    assert [f.miner for f in o.faults] == [liar] and o.ready()
    readings, problems = open_records(o.records, o.device_keys, o.data_keys(DOCTOR_PRE))
    assert not problems and len(readings) == 10
    # The evidence holds on the ledger: the rules re-verify the fragments and count the fault against the liar.
    world.append(fault_entry(DOCTOR, index, o.faults[0], T0 + 2))
    assert world.runtime.state.table("access_faults") == {liar: 1}


def test_an_honest_miners_fragments_are_no_evidence_against_it() -> None:
    world, index = granted_world(epochs=1)
    o = opening(world, index)
    o.on_page(page(world, index))
    honest, raw = next(iter(miner_messages(world, index).items()))
    o.on_fragments(raw)
    assert not o.faults
    false_accusation = fault_entry(DOCTOR, index, Fault(honest, raw, "made up"), T0 + 2)
    assert world.runtime.check(false_accusation) == "no_fault_found"


def test_fragments_from_a_miner_outside_the_grant_or_for_another_access_count_for_nothing() -> None:
    world, index = granted_world(epochs=1)
    chosen = set(world.runtime.state.table("access")[str(index)]["miners"])
    outsider = next(m for m in MINERS if m.device_id not in chosen)
    proof = access.GrantProof(size=1, path=[], checkpoint=world.final_note())
    o = opening(world, index)
    assert o.on_fragments(access.sign_capsule_fragments(outsider, index, [(DEVICE.device_id, 1, b"x")], proof)) is None
    insider = next(m for m in MINERS if m.device_id in chosen)
    assert o.on_fragments(access.sign_capsule_fragments(insider, index + 1, [(DEVICE.device_id, 1, b"x")],
                                                        proof)) is None
    assert o.on_fragments(b"\xd2garbage") is None and o.answered_by() == [] and not o.faults


def test_each_reading_is_checked_against_its_anchored_hash_and_its_device_signature() -> None:
    world, index = granted_world(epochs=1, readings=3)
    o = opening(world, index)
    o.on_page(page(world, index))
    for raw in miner_messages(world, index).values():
        o.on_fragments(raw)
    keys = o.data_keys(DOCTOR_PRE)
    (i0, cose0, ct0), (i1, cose1, ct1), (i2, cose2, ct2) = world.records
    flipped = ct0[:-1] + bytes([ct0[-1] ^ 1])
    other_device = Identity.from_seed(b"\x05" * 32)
    forged = envelope.sign(other_device, envelope.parse(cose1).payload, kid=DEVICE.device_id)
    readings, problems = open_records([(i0, cose0, flipped), (i1, forged, ct1), (i2, cose2, ct1)], o.device_keys, keys)
    assert readings == []
    assert [p.reason.split(":")[0] for p in problems] == ["ciphertext_mismatch", "bad_signature", "ciphertext_mismatch"]


def test_a_page_without_operator_signed_registrations_or_with_another_owners_epoch_is_refused() -> None:
    world, index = granted_world(epochs=1, readings=1)
    rogue = Identity.from_seed(b"\x06" * 32)
    self_signed = registration_entry(rogue, Registration(dev=DEVICE.device_id, pk=DEVICE.public_key,
                                                         profile="heart_rate_band", owner=OWNER.device_id, site="x",
                                                         ts=T0)).encode()
    with pytest.raises(OpeningError, match="not operator-signed"):
        opening(world, index).on_page(page(world, index, registrations=[self_signed]))
    with pytest.raises(OpeningError, match="not signed by a registered device key"):
        opening(world, index).on_page(page(world, index, registrations=[]))
    # An epoch_key the device signed for someone else: never the grant's owner's capsule.
    key_body = events.EpochKey(epoch=1, epoch_ms=EPOCH_MS, owner=DOCTOR.device_id, capsule=b"c", key_ct=b"k")
    elsewhere = envelope.sign(DEVICE, events.make_payload(DEVICE.device_id, 99, T0, "epoch_key", key_body,
                                                          v=events.PROTOCOL_V2))
    with pytest.raises(OpeningError, match="not to the grant's owner"):
        opening(world, index).on_page(page(world, index, epochs=[elsewhere]))


def test_a_large_open_is_verified_in_worker_processes_in_leaf_order() -> None:
    world, index = granted_world(epochs=1, readings=0)
    world.seal_epoch(T0 // EPOCH_MS + 1, 8300)  # above client.POOL_FROM
    o = opening(world, index)
    o.records = list(reversed(world.records))  # pages may arrive in any order
    o.device_keys = {DEVICE.device_id: DEVICE.public_key}
    # This epoch was sealed after the grant (the miners would not release it): take its key as the owner can.
    epoch = world.runtime.state.table("epochs")[f"{DEVICE.device_id}:{T0 // EPOCH_MS + 1}"]
    keys = {(DEVICE.device_id, T0 // EPOCH_MS + 1): reencryption.owner_decrypt(OWNER_PRE, epoch["capsule"],
                                                                                 epoch["key_ct"])}
    readings, problems = verify_and_decrypt(o, keys, workers=2)
    assert not problems and readings == world.readings


def test_a_page_not_signed_by_the_bridge_is_refused_so_nobody_can_cut_an_open_short() -> None:
    """Anyone may write to an inbox: an empty 'last' page from a stranger must not end the open."""
    world, index = granted_world(epochs=1, readings=3)
    o = opening(world, index)
    forged = access.sign_records_page(Identity.from_seed(b"\x07" * 32), access.RecordsPage(
        v=1, access=index, page=0, pages=1, last=True, epochs=[], registrations=[], records=[]))
    with pytest.raises(OpeningError, match="not the bridge's"):
        o.on_page(forged)
    assert o.last_page is None and o.records == []
    o.on_page(page(world, index))  # the bridge's own page still counts
    assert o.last_page == 0 and len(o.records) == 3

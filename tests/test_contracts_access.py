"""The access contract: request → grant (seeded miners, final checkpoint) → access record; revoke; faults.

Real crypto throughout: umbral capsules and key fragments, sealed boxes to the miners' keys, C2SP
checkpoint notes signed by the bridge's key and cosigned by the miners.
"""

from __future__ import annotations

import os

import pytest
from test_contracts_world import DAY, T0, World, ident

from carechain import envelope
from carechain.access import GrantProof, choose_miners, seal_to_miner, sign_capsule_fragments
from carechain.checkpoint import Checkpoint, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.entries import Entry, event_entry
from carechain.events import PROTOCOL_V2, EpochKey, make_payload, make_sealed_payload
from carechain.identity import Identity
from carechain.reencryption import (
    PreKey,
    encapsulate,
    make_kfrags,
    open_data_key,
    reencrypt,
    verify_cfrag,
    verify_kfrag,
)
from carechain.seed import checkpoint_seed
from contract_rules import Genesis, Runtime
from contract_rules import access as rules
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND

HOUR = 3_600_000
N_MINERS = 5


class AccessWorld(World):
    """The contract world plus a patient, a doctor, a researcher with re-encryption keys, and five miners."""

    def __init__(self) -> None:
        super().__init__()
        self.miners = [ident(30 + i) for i in range(N_MINERS)]
        # The miners' bonds (the active miner set, and so finality, counts bonded miners only).
        self.genesis = Genesis(operators=self.genesis.operators, contracts=self.genesis.contracts,
                               allocations={**self.genesis.allocations,
                                            **{f"miner:{m.device_id}": MIN_BOND["miner"] for m in self.miners}})
        self.runtime = Runtime(self.genesis)
        self.patient, self.patient_pre = ident(20), PreKey.from_seed(b"\x20" * 32)
        self.doctor, self.doctor_pre = ident(21), PreKey.from_seed(b"\x21" * 32)
        self.other_patient, self.other_pre = ident(22), PreKey.from_seed(b"\x22" * 32)
        self.band = ident(23)
        self.data_keys: dict[tuple[str, int], bytes] = {}
        results = [self.register_party("patient", self.patient, pre=self.patient_pre),
                   self.register_party("doctor", self.doctor, pre=self.doctor_pre),
                   self.register_party("patient", self.other_patient, pre=self.other_pre),
                   *(self.register_party("miner", m) for m in self.miners),
                   *(self.post_bond(m, MIN_BOND["miner"]) for m in self.miners),
                   self.register_device(self.band, "heart_rate_band", self.patient.device_id)]
        assert results == ["ok"] * len(results)

    def register_party(self, role: str, who: Identity, name: str = "x", pre: PreKey | None = None) -> str:
        reg = ce.PartyRegistration(role=role, pk=who.public_key, name=name, ts=T0,
                                   pre_pk=pre.public_key if pre else None, pre_vk=pre.verifying_key if pre else None)
        return self.add(ce.party_registration_entry(self.operator, reg))

    def v2_event(self, dev: Identity, payload: dict) -> Entry:  # noqa: ANN001
        return event_entry(envelope.sign(dev, payload))

    def epoch_key(self, epoch: int, owner: Identity | None = None, owner_pre: PreKey | None = None,
                  dev: Identity | None = None) -> str:
        dev = dev or self.band
        key = os.urandom(32)
        capsule, key_ct = encapsulate((owner_pre or self.patient_pre).public_key, key)
        self.data_keys[(dev.device_id, epoch)] = key
        body = EpochKey(epoch=epoch, epoch_ms=HOUR, owner=(owner or self.patient).device_id, capsule=capsule,
                        key_ct=key_ct)
        seq = self._seq[dev.device_id]
        self._seq[dev.device_id] += 1
        return self.add(self.v2_event(dev, make_payload(dev.device_id, seq, epoch * HOUR, "epoch_key", body,
                                                        v=PROTOCOL_V2)))

    def request(self, *, requester: Identity | None = None, owner: Identity | None = None,
                from_ms: int = T0, to_ms: int = T0 + 3 * HOUR, expires_ms: int = T0 + 30 * DAY,
                devices: list[str] | None = None, nonce: int = 0) -> tuple[str, str]:
        req = ce.AccessRequest(owner=(owner or self.patient).device_id, devices=devices or [], kinds=["heart_rate"],
                               from_ms=from_ms, to_ms=to_ms, purpose="follow-up consultation",
                               expires_ms=expires_ms, nonce=nonce, ts=T0)
        entry = ce.access_request_entry(requester or self.doctor, req)
        return self.add(entry), rules.request_key_of(entry)

    def final_checkpoint(self, cosigners: list[Identity] | None = None, size: int | None = None,
                         signer: Identity | None = None) -> str:
        """A checkpoint of this log signed by the bridge's key (a genesis operator) and cosigned by miners."""
        bridge = signer or self.operator
        body = Checkpoint("carechain.log/test", len(self.entries) if size is None else size, b"\x07" * 32).body()
        note = sign_note(body, "carechain.log/test", bridge.public_key, bridge.sign)
        for m in self.miners[:3] if cosigners is None else cosigners:
            line = cosign(body, Cosigner(f"carechain.miner/{m.device_id}", m.public_key), m.sign, T0)
            note = add_cosignature(note, line)
        return note

    def grant(self, request: str, *, note: str | None = None, miners: list[str] | None = None, threshold: int = 3,
              n: int = N_MINERS, expires_ms: int = T0 + 7 * DAY, owner: Identity | None = None,
              requester_pre: PreKey | None = None, ts: int = T0 + HOUR) -> tuple[str, int]:
        note = note or self.final_checkpoint()
        miners = miners if miners is not None else rules_choose(self, note, request, n)
        by_id = {m.device_id: m for m in self.miners}
        # Well-formed kfrags even when the grant's threshold is not (the rules must refuse it themselves).
        kfrags = make_kfrags(self.patient_pre, (requester_pre or self.doctor_pre).public_key, min(threshold, n), n)
        sealed = [seal_to_miner(by_id[m].public_key, k) if m in by_id else b"\x00" * 64
                  for m, k in zip(miners, kfrags, strict=False)]
        grant = ce.AccessGrant(request=request, requester=self.doctor.device_id, threshold=threshold, miners=miners,
                               kfrags=sealed, seed_checkpoint=note, expires_ms=expires_ms, ts=ts)
        result = self.add(ce.access_grant_entry(owner or self.patient, grant))
        return result, self.last_index


def rules_choose(w: World, note: str, request: str, n: int) -> list[str]:
    from carechain.checkpoint import parse_note
    body, sigs = parse_note(note)
    seed = checkpoint_seed(body, [s.signature for s in sigs])
    return choose_miners(seed, rules.registered_miners(w.state), n, bytes.fromhex(request))


@pytest.fixture
def world() -> AccessWorld:
    return AccessWorld()


def test_a_grant_for_seeded_miners_under_a_final_checkpoint_becomes_the_access_record(world: AccessWorld) -> None:
    for epoch in range(T0 // HOUR - 1, T0 // HOUR + 4):
        assert world.epoch_key(epoch) == "ok"
    assert world.request()[0] == "ok"
    request = world.request(nonce=1)[1]
    result, at = world.grant(request)
    assert result == "ok"
    record = rules.access_record(world.state, at)
    assert record is not None and record["owner"] == world.patient.device_id
    assert record["requester"] == world.doctor.device_id and record["purpose"] == "follow-up consultation"
    assert record["threshold"] == 3 and len(record["miners"]) == N_MINERS and record["revoked_at"] is None
    assert world.state.table("access_requests")[request]["granted"] == at
    assert rules.is_usable(record, T0 + 2 * HOUR) and not rules.is_usable(record, T0 + 7 * DAY)
    # Epochs overlapping [T0, T0 + 3h]: T0's hour and the next three; not the hour before T0.
    granted = rules.granted_epochs(world.state, record)
    assert [(d, e) for d, e, _, _ in granted] == [(world.band.device_id, T0 // HOUR + i) for i in range(4)]
    # An epoch anchored after the grant is not granted, even inside the range.
    assert world.epoch_key(T0 // HOUR + 5) == "ok"
    assert len(rules.granted_epochs(world.state, record)) == 4


def test_the_granted_epochs_open_with_m_verified_capsule_fragments_and_not_with_fewer(world: AccessWorld) -> None:
    epoch = T0 // HOUR
    world.epoch_key(epoch)
    request = world.request()[1]
    result, at = world.grant(request)
    assert result == "ok"
    record = rules.access_record(world.state, at)
    assert record is not None
    [(dev, e, capsule, key_ct)] = rules.granted_epochs(world.state, record)
    kfrags = make_kfrags(world.patient_pre, world.doctor_pre.public_key, 3, N_MINERS)
    cfrags = [verify_cfrag(reencrypt(capsule, verify_kfrag(k, world.patient_pre.public_key,
                                                           world.patient_pre.verifying_key,
                                                           world.doctor_pre.public_key)),
                           capsule, world.patient_pre.public_key, world.patient_pre.verifying_key,
                           world.doctor_pre.public_key) for k in kfrags[:3]]
    assert open_data_key(world.doctor_pre, world.patient_pre.public_key, capsule, cfrags, key_ct) == \
        world.data_keys[(dev, e)]
    with pytest.raises(ValueError):
        open_data_key(world.doctor_pre, world.patient_pre.public_key, capsule, cfrags[:2], key_ct)


@pytest.mark.parametrize(("change", "reason"), [
    ("owner", "signer_not_allowed"),  # a doctor cannot grant
    ("other_owner", "not_the_owner"),
    ("unknown_request", "unknown_request"),
    ("threshold", "bad_threshold"),
    ("miners_not_seeded", "miners_not_chosen_by_seed"),
    ("duplicate_miners", "duplicate_miners"),
    ("unknown_miner", "unknown_miner"),
    ("two_cosigners", "seed_checkpoint_not_final"),
    ("not_bridge_signed", "seed_checkpoint_not_signed_by_the_bridge"),
    ("future_checkpoint", "seed_checkpoint_from_the_future"),
    ("expired", "grant_expired"),
    ("request_expired", "request_expired"),
])
def test_a_grant_is_refused_saying_why(world: AccessWorld, change: str, reason: str) -> None:
    request = world.request(expires_ms=T0 + 2 * HOUR if change == "request_expired" else T0 + 30 * DAY)[1]
    note = world.final_checkpoint()
    miners = rules_choose(world, note, request, N_MINERS)
    kwargs: dict = {}
    if change == "owner":
        kwargs["owner"] = world.doctor
    elif change == "other_owner":
        kwargs["owner"] = world.other_patient
    elif change == "unknown_request":
        request = "ab" * 32
        kwargs["miners"] = miners
    elif change == "threshold":
        kwargs["threshold"] = 6
    elif change == "miners_not_seeded":
        kwargs["miners"] = sorted(miners)[::-1] if sorted(miners)[::-1] != miners else sorted(miners)
    elif change == "duplicate_miners":
        kwargs["miners"] = [miners[0], *miners[:-1]]
    elif change == "unknown_miner":
        kwargs["miners"] = [*miners[:-1], world.doctor.device_id]
    elif change == "two_cosigners":
        kwargs["note"] = world.final_checkpoint(world.miners[:2])
    elif change == "not_bridge_signed":
        kwargs["note"] = world.final_checkpoint(signer=world.miners[4])
    elif change == "future_checkpoint":
        kwargs["note"] = world.final_checkpoint(size=len(world.entries) + 1)
    elif change == "expired":
        kwargs["expires_ms"] = T0
    elif change == "request_expired":
        kwargs["ts"] = T0 + 3 * HOUR
    result, at = world.grant(request, note=kwargs.pop("note", note), **kwargs)
    assert result == reason
    assert rules.access_record(world.state, at) is None


def test_a_request_is_refused_without_keys_an_owner_or_her_devices(world: AccessWorld) -> None:
    world.register_party("insurer", world.insurer)  # registered without a re-encryption key
    assert world.request(requester=world.insurer)[0] == "requester_has_no_pre_key"
    assert world.request(owner=world.doctor)[0] == "unknown_owner"  # a doctor owns no records
    assert world.request(devices=[world.terminal.device_id])[0] == "device_not_owned"
    assert world.request(from_ms=T0 + DAY, to_ms=T0)[0] == "bad_time_range"
    assert world.request(expires_ms=T0)[0] == "request_expired"
    result, request = world.request(devices=[world.band.device_id])
    assert result == "ok" and world.state.table("access_requests")[request]["requester"] == world.doctor.device_id
    assert world.add(world.entries[-1]) == "duplicate_request"  # the same leaf bytes appended twice


def test_only_the_owner_revokes_once_and_a_revoked_record_is_not_usable(world: AccessWorld) -> None:
    request = world.request()[1]
    _, at = world.grant(request)
    revoke = ce.AccessRevoke(grant_index=at, reason="second opinion done", ts=T0 + 2 * HOUR)
    assert world.add(ce.access_revoke_entry(world.other_patient, revoke)) == "not_the_owner"
    assert world.add(ce.access_revoke_entry(world.doctor, revoke)) == "signer_not_allowed"
    assert world.add(ce.access_revoke_entry(world.patient, revoke)) == "ok"
    record = rules.access_record(world.state, at)
    assert record is not None and record["revoked_at"] == world.last_index
    assert not rules.is_usable(record, T0 + 2 * HOUR)
    assert world.add(ce.access_revoke_entry(world.patient, revoke)) == "grant_already_revoked"
    gone = ce.AccessRevoke(grant_index=at - 1, reason="x", ts=T0)
    assert world.add(ce.access_revoke_entry(world.patient, gone)) == "unknown_grant"


def test_a_garbage_capsule_fragment_is_counted_against_its_miner_once(world: AccessWorld) -> None:
    epoch = T0 // HOUR
    world.epoch_key(epoch)
    request = world.request()[1]
    _, at = world.grant(request)
    record = rules.access_record(world.state, at)
    assert record is not None
    miner = next(m for m in world.miners if m.device_id == record["miners"][0])
    [(dev, e, capsule, _)] = rules.granted_epochs(world.state, record)
    kfrag = verify_kfrag(make_kfrags(world.patient_pre, world.doctor_pre.public_key, 3, 5)[0],
                         world.patient_pre.public_key, world.patient_pre.verifying_key, world.doctor_pre.public_key)
    good = reencrypt(capsule, kfrag)
    # A cfrag of another capsule: well-formed, signed by the miner, but not this epoch's re-encryption.
    other_capsule, _ = encapsulate(world.patient_pre.public_key, b"\x01" * 32)
    garbage = reencrypt(other_capsule, kfrag)
    proof = GrantProof(size=at + 1, path=[], checkpoint=world.final_checkpoint())

    def fault(message: bytes, reporter: Identity | None = None) -> str:
        return world.add(ce.access_fault_entry(reporter or world.doctor,
                                               ce.AccessFault(grant_index=at, message=message, ts=T0 + 2 * HOUR)))

    honest = sign_capsule_fragments(miner, at, [(dev, e, good)], proof)
    assert fault(honest) == "no_fault_found"
    forged = sign_capsule_fragments(world.doctor, at, [(dev, e, garbage)], proof)  # not the miner's signature
    assert fault(forged) == "miner_not_in_grant"
    bad = sign_capsule_fragments(miner, at, [(dev, e, garbage)], proof)
    tampered = bad[:-1] + bytes([bad[-1] ^ 1])  # the miner's signature no longer verifies
    assert fault(tampered) == "bad_fragments_message"
    assert fault(bad) == "ok"
    assert world.state.table("access_faults") == {miner.device_id: 1}
    assert fault(bad, reporter=world.patient) == "fault_already_recorded"
    assert world.state.table("access_faults") == {miner.device_id: 1}


def test_epoch_keys_belong_to_the_devices_registered_owner_once_per_epoch(world: AccessWorld) -> None:
    epoch = T0 // HOUR
    assert world.epoch_key(epoch, owner=world.other_patient, owner_pre=world.other_pre) == "unknown_owner"
    assert world.epoch_key(epoch) == "ok"
    assert world.epoch_key(epoch) == "epoch_key_exists"
    anchored = world.state.table("epochs")[f"{world.band.device_id}:{epoch}"]
    assert anchored["owner"] == world.patient.device_id and anchored["epoch_ms"] == HOUR
    # A device registered to a label (the v1 style) has no key to encapsulate to.
    labelled = ident(40)
    assert world.register_device(labelled, "heart_rate_band", "patient:alice") == "ok"
    assert world.epoch_key(epoch, dev=labelled) == "unknown_owner"


def test_sealed_v2_readings_are_anchored_but_read_by_no_contract(world: AccessWorld) -> None:
    payload = make_sealed_payload(world.band.device_id, 0, T0, "heart_rate", T0 // HOUR, b"\x05" * 32)
    assert world.add(world.v2_event(world.band, payload)) == "ok"
    activity = make_sealed_payload(world.band.device_id, 1, T0, "activity", T0 // HOUR, b"\x06" * 32)
    assert world.add(world.v2_event(world.band, activity)) == "ok"
    assert not world.state.table("activity")


def test_party_registrations_without_re_encryption_keys_keep_their_bytes() -> None:
    reg = ce.PartyRegistration(role="pharmacy", pk=ident(4).public_key, name="x", ts=T0)
    assert "pre_pk" not in envelope.parse(ce.party_registration_entry(ident(1), reg).cose).payload
    w = AccessWorld()
    incomplete = ce.PartyRegistration(role="patient", pk=ident(50).public_key, name="x", ts=T0,
                                      pre_pk=w.patient_pre.public_key)
    assert w.add(ce.party_registration_entry(w.operator, incomplete)) == "incomplete_pre_key"


def test_the_access_contract_is_added_to_an_older_ledger_by_an_upgrade() -> None:
    from contract_rules import builtin_hashes
    hashes = builtin_hashes()
    old = World(contracts={k: v for k, v in hashes.items() if k != "access"})
    pre = PreKey.from_seed(b"\x20" * 32)
    patient, doctor = ident(20), ident(21)
    for role, who in (("patient", patient), ("doctor", doctor)):
        reg = ce.PartyRegistration(role=role, pk=who.public_key, name="x", ts=T0, pre_pk=pre.public_key,
                                   pre_vk=pre.verifying_key)
        assert old.add(ce.party_registration_entry(old.operator, reg)) == "ok"
    req = ce.AccessRequest(owner=patient.device_id, from_ms=T0, to_ms=T0 + HOUR, purpose="p",
                           expires_ms=T0 + DAY, nonce=0, ts=T0)
    assert old.add(ce.access_request_entry(doctor, req)) == "contract_not_in_genesis"
    up = ce.ContractUpgrade(name="access", version=1, code_hash=hashes["access"], from_size=len(old.entries) + 3,
                            ts=T0)
    assert old.add(ce.signed(old.operator, ce.CONTRACT_UPGRADE, up)) == "ok"
    assert old.add(ce.access_request_entry(doctor, req.model_copy(update={"nonce": 1}))) == "contract_not_in_force"
    old.add(ce.access_request_entry(doctor, req.model_copy(update={"nonce": 2})))  # index from_size - 1
    assert old.add(ce.access_request_entry(doctor, req.model_copy(update={"nonce": 3}))) == "ok"

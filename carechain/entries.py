"""Ledger entries: the exact bytes that become Merkle leaves.

A leaf is a deterministic CBOR map `{"t": type, "cose": COSE_Sign1 bytes}`. The type separates domains
(an event can never be replayed as a registration), and the signed COSE message is kept byte-for-byte
so anyone can re-verify it from the leaf alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from carechain import cbor, envelope
from carechain.errors import FixedReasonError
from carechain.identity import Identity, device_id_for

ENTRY_EVENT = "event"
ENTRY_REGISTER = "device.register"
ENTRY_REVOKE = "device.revoke"
ENTRY_TYPES = frozenset({ENTRY_EVENT, ENTRY_REGISTER, ENTRY_REVOKE})
# Contract entries (payload models and rules in contract_rules): named here because every reader
# of leaves (proofs, `verify --full`, miners) must accept them, and these readers do not import the bridge.
PARTY_REGISTER = "party.register"
CONTRACT_UPGRADE = "contract.upgrade"
TOKEN_TRANSFER = "token.transfer"
RX_ANCHOR = "rx.anchor"
RX_REVOKE = "rx.revoke"
POLICY_REGISTER = "policy.register"
WELLNESS_SETTLE = "wellness.settle"
SALE_REFUSED = "sale.refused"
STORAGE_COMMIT = "storage.commit"
STORAGE_AUDIT = "storage.audit"
ACCESS_REQUEST = "access.request"
ACCESS_GRANT = "access.grant"
ACCESS_REVOKE = "access.revoke"
ACCESS_FAULT = "access.fault"
PROTOCOL_CUTOVER = "protocol.cutover"
FORMULARY_SET = "formulary.set"  # an authority's signed formulary entries (drug code -> Rx-only, schedule, limits)
CLOCK_ATTEST = "clock.attest"  # the bridge's attested time, which time-based rules judge on
BOND_POST = "bond.post"  # a party locks tokens as its bond
BOND_UNBOND = "bond.unbond"  # a party asks for part of its bond back (released after a delay)
BOND_WITHDRAW = "bond.withdraw"  # the released part moves back to the party's account
MINER_FORK = "miner.fork"  # proof that a miner cosigned two contradicting checkpoints
STORAGE_RETRIEVAL = "storage.retrieval"  # a signed retrieval request and the miner's signed answer (or none)
STORAGE_SETTLE = "storage.settle"  # closes a storage epoch: rewards and cosigning weight from ledger evidence
CHECKPOINT_FINAL = "checkpoint.final"  # a final checkpoint note with its cosignatures, recorded for rewards
CONSENT_GIVE = "consent.give"  # an owner's signed consent: which data, which questions, cohort size, price
CONSENT_REVOKE = "consent.revoke"
STUDY_POST = "study.post"  # a researcher's study: query, period, filter, price, deposit; aggregators fixed
STUDY_CONTRIBUTE = "study.contribute"  # an owner's commitment and shares sealed to the study's aggregators
STUDY_RESULT = "study.result"  # one aggregator's signed result of the study's MPC
STUDY_SAMPLE = "study.sample"  # fixes a decided study's audit sample from the latest final checkpoint's seed
STUDY_DISCLOSE = "study.disclose"  # a sampled contributor's opening, sealed to the aggregators (a logged access)
STUDY_AUDIT = "study.audit"  # one aggregator's verdict on a sampled contribution it recomputed
STUDY_CLOSE = "study.close"  # closes a study: pays contributors and aggregators, or refunds the deposit
TRIAL_REGISTER = "trial.register"  # a sponsor anchors a trial protocol (its hash and design) before any enrolment
TRIAL_COMMIT = "trial.commit"  # the sponsor's or a labelling miner's seed commitment, with its escrow shares
TRIAL_ENROLL = "trial.enroll"  # an investigator enrols a consenting participant into a stratum's next slot
TRIAL_DISPENSE = "trial.dispense"  # a pharmacy's sale of a participant's labelled kit, signed by its terminal
TRIAL_WITHDRAW = "trial.withdraw"  # a participant leaves the trial (by herself or her investigator)
TRIAL_UNBLIND = "trial.unblind"  # an investigator's logged emergency unblinding of one participant
TRIAL_UNBLIND_KEY = "trial.unblind_key"  # a committer's answer to an emergency unblinding, sealed to the investigator
TRIAL_LOCK = "trial.lock"  # the sponsor's database lock: outcomes anchored after it do not count
TRIAL_REVEAL = "trial.reveal"  # a committer reveals its seed after the lock
TRIAL_RECOVER = "trial.recover"  # an escrow share of a seed its committer did not reveal, opened by its holder
TRIAL_OUTCOME = "trial.outcome"  # a participant discloses her device-signed primary-outcome measure after the lock
TRIAL_CERTIFY = "trial.certify"  # the certificate of the pre-registered result, recomputed by the rules
CONTRACT_ENTRY_TYPES = frozenset({PARTY_REGISTER, CONTRACT_UPGRADE, TOKEN_TRANSFER, RX_ANCHOR, RX_REVOKE,
                                  POLICY_REGISTER, WELLNESS_SETTLE, SALE_REFUSED, STORAGE_COMMIT, STORAGE_AUDIT,
                                  ACCESS_REQUEST, ACCESS_GRANT, ACCESS_REVOKE, ACCESS_FAULT, PROTOCOL_CUTOVER,
                                  FORMULARY_SET, CLOCK_ATTEST, BOND_POST, BOND_UNBOND, BOND_WITHDRAW, MINER_FORK,
                                  STORAGE_RETRIEVAL, STORAGE_SETTLE, CHECKPOINT_FINAL, CONSENT_GIVE, CONSENT_REVOKE,
                                  STUDY_POST, STUDY_CONTRIBUTE, STUDY_RESULT, STUDY_SAMPLE, STUDY_DISCLOSE,
                                  STUDY_AUDIT, STUDY_CLOSE, TRIAL_REGISTER, TRIAL_COMMIT, TRIAL_ENROLL,
                                  TRIAL_DISPENSE, TRIAL_WITHDRAW, TRIAL_UNBLIND, TRIAL_UNBLIND_KEY, TRIAL_LOCK,
                                  TRIAL_REVEAL, TRIAL_RECOVER, TRIAL_OUTCOME, TRIAL_CERTIFY})
LEDGER_ENTRY_TYPES = ENTRY_TYPES | CONTRACT_ENTRY_TYPES


class EntryError(FixedReasonError):
    """A ledger leaf that is not a well-formed entry of a known type."""

    REASON = "bad_entry"


@dataclass(frozen=True)
class Entry:
    type: str
    cose: bytes

    def encode(self) -> bytes:
        # Deterministic CBOR of {"t": type, "cose": bytes}: "t" sorts before "cose" (shorter key first
        # bytewise: 0x61 < 0x64). Built directly on the hot path; tested equal to cbor2's encoding.
        t = self.type.encode()
        return b"".join((b"\xa2\x61t", cbor.tstr_header(len(t)), t, b"\x64cose",
                         cbor.bstr_header(len(self.cose)), self.cose))

    @classmethod
    def decode(cls, data: bytes, types: frozenset[str] = LEDGER_ENTRY_TYPES) -> Entry:
        """Strict decode of a leaf of any ledger entry type; `types` narrows the accepted ones."""
        fast = cls._decode_layout(data)
        if fast is not None and fast.type in types:
            return fast
        try:
            raw = cbor.decode(data, max_depth=2)
        except cbor.CBORError as exc:
            raise EntryError(f"leaf is not valid CBOR: {exc}") from None
        if not (isinstance(raw, dict) and set(raw) == {"t", "cose"}):
            raise EntryError("leaf must be a map with exactly the keys 't' and 'cose'")
        if not isinstance(raw["t"], str) or raw["t"] not in types:  # a list "t" is unhashable
            raise EntryError(f"unknown entry type {raw['t']!r:.80}")
        if not isinstance(raw["cose"], bytes):
            raise EntryError("leaf 'cose' must be a byte string")
        entry = cls(raw["t"], raw["cose"])
        if entry.encode() != data:
            raise EntryError("leaf is not deterministically encoded")
        return entry


    @classmethod
    def _decode_layout(cls, data: bytes) -> Entry | None:
        """The entry of a leaf laid out exactly as `encode` writes it, else None (then the general decode says
        what is wrong). Byte positions, no CBOR decoder: the contracts' replay decodes every leaf of the log."""
        if type(data) is not bytes or not data.startswith(b"\xa2\x61t"):
            return None
        got = cbor.tstr_at(data, 3)
        if got is None:
            return None
        type_bytes, pos = got
        if data[pos:pos + 5] != b"\x64cose":
            return None
        got = cbor.bstr_at(data, pos + 5)
        if got is None or got[1] != len(data):
            return None
        try:
            entry = cls(type_bytes.decode("utf-8"), got[0])
        except UnicodeDecodeError:
            return None
        return entry if entry.encode() == data else None  # shortest-form lengths only


class Registration(BaseModel):
    """Signed by an operator key the bridge trusts: binds a public key to a profile, owner and site."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    v: int = 1
    dev: str = Field(pattern=r"^[a-z2-7]{16}$")
    pk: bytes = Field(min_length=32, max_length=32)
    profile: str = Field(min_length=1, max_length=64)
    owner: str = Field(min_length=1, max_length=128)
    site: str = Field(min_length=1, max_length=128)
    ts: int = Field(ge=0)


class Revocation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    v: int = 1
    dev: str = Field(pattern=r"^[a-z2-7]{16}$")
    reason: str = Field(min_length=1, max_length=256)
    ts: int = Field(ge=0)


def registration_entry(operator: Identity, reg: Registration) -> Entry:
    if device_id_for(reg.pk) != reg.dev:
        raise EntryError(f"device id {reg.dev} does not match its public key")
    return Entry(ENTRY_REGISTER, envelope.sign(operator, reg.model_dump()))


def revocation_entry(operator: Identity, rev: Revocation) -> Entry:
    return Entry(ENTRY_REVOKE, envelope.sign(operator, rev.model_dump()))


def event_entry(cose: bytes) -> Entry:
    return Entry(ENTRY_EVENT, cose)


def open_operator_entry(entry: Entry, operator_keys: dict[str, bytes]) -> Any:
    """Verify a registration/revocation against trusted operator keys (kid → public key)."""
    msg = envelope.parse(entry.cose)
    key = operator_keys.get(msg.kid)
    if key is None or not msg.verify(key):
        raise EntryError(f"{entry.type} is not signed by a trusted operator key (kid {msg.kid})")
    model = Registration if entry.type == ENTRY_REGISTER else Revocation
    try:
        return model.model_validate(msg.payload)
    except ValueError as exc:
        raise EntryError(f"invalid {entry.type}: {exc}") from None

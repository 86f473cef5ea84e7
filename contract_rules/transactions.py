"""Contract-level ledger entries: their type names, payload models and signed constructors.

Each is a ledger `Entry(type, cose)` like the device entries in `carechain.entries`: the payload below,
deterministic CBOR inside a COSE_Sign1 signed by the acting party (`kid` = its id). The runtime checks
the signature against the key registered on the ledger and the signer's role before any rule runs.
The off-ledger prescription body (`Prescription`, `SignedRx`) also lives here: only its hash is anchored.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from carechain import cbor, entries, envelope
from carechain import market as market_core
from carechain.entries import Entry
from carechain.identity import Identity, verify_signature

# The entry type names live with the leaf format (carechain.entries); the rule modules take them from here.
ACCESS_FAULT = entries.ACCESS_FAULT
ACCESS_GRANT = entries.ACCESS_GRANT
ACCESS_REQUEST = entries.ACCESS_REQUEST
ACCESS_REVOKE = entries.ACCESS_REVOKE
CONTRACT_ENTRY_TYPES = entries.CONTRACT_ENTRY_TYPES
CONTRACT_UPGRADE = entries.CONTRACT_UPGRADE
PARTY_REGISTER = entries.PARTY_REGISTER
POLICY_REGISTER = entries.POLICY_REGISTER
PROTOCOL_CUTOVER = entries.PROTOCOL_CUTOVER
RX_ANCHOR = entries.RX_ANCHOR
RX_REVOKE = entries.RX_REVOKE
SALE_REFUSED = entries.SALE_REFUSED
STORAGE_AUDIT = entries.STORAGE_AUDIT
STORAGE_COMMIT = entries.STORAGE_COMMIT
TOKEN_TRANSFER = entries.TOKEN_TRANSFER
WELLNESS_SETTLE = entries.WELLNESS_SETTLE
FORMULARY_SET = entries.FORMULARY_SET
CLOCK_ATTEST = entries.CLOCK_ATTEST
BOND_POST = entries.BOND_POST
BOND_UNBOND = entries.BOND_UNBOND
BOND_WITHDRAW = entries.BOND_WITHDRAW
MINER_FORK = entries.MINER_FORK
STORAGE_RETRIEVAL = entries.STORAGE_RETRIEVAL
STORAGE_SETTLE = entries.STORAGE_SETTLE
CHECKPOINT_FINAL = entries.CHECKPOINT_FINAL
CONSENT_GIVE = entries.CONSENT_GIVE
CONSENT_REVOKE = entries.CONSENT_REVOKE
STUDY_POST = entries.STUDY_POST
STUDY_CONTRIBUTE = entries.STUDY_CONTRIBUTE
STUDY_RESULT = entries.STUDY_RESULT
STUDY_SAMPLE = entries.STUDY_SAMPLE
STUDY_DISCLOSE = entries.STUDY_DISCLOSE
STUDY_AUDIT = entries.STUDY_AUDIT
STUDY_CLOSE = entries.STUDY_CLOSE
TRIAL_REGISTER = entries.TRIAL_REGISTER
TRIAL_COMMIT = entries.TRIAL_COMMIT
TRIAL_ENROLL = entries.TRIAL_ENROLL
TRIAL_DISPENSE = entries.TRIAL_DISPENSE
TRIAL_WITHDRAW = entries.TRIAL_WITHDRAW
TRIAL_UNBLIND = entries.TRIAL_UNBLIND
TRIAL_UNBLIND_KEY = entries.TRIAL_UNBLIND_KEY
TRIAL_LOCK = entries.TRIAL_LOCK
TRIAL_REVEAL = entries.TRIAL_REVEAL
TRIAL_RECOVER = entries.TRIAL_RECOVER
TRIAL_OUTCOME = entries.TRIAL_OUTCOME
TRIAL_CERTIFY = entries.TRIAL_CERTIFY

PARTY_ROLES = ("prescriber", "pharmacy", "insurer", "miner", "patient", "doctor", "researcher", "authority",
               "sponsor", "investigator")
PreKeyBytes = Annotated[bytes, Field(min_length=33, max_length=33)]  # a compressed secp256k1 point (umbral)
# Domain tags of the Rx hashes and signature: one per purpose, so no hash or signature of one can pass as another.
RX_DOMAIN = b"carechain/rx/v1\x00"  # the body: the prescriber's signature and rx_ref
RX_PATIENT_DOMAIN = b"carechain/rx/patient\x00"  # the patient commitment anchored on the ledger
RX_DRUG_DOMAIN = b"carechain/rx/drug\x00"  # the drug commitment anchored on the ledger

_strict = ConfigDict(extra="forbid", frozen=True, strict=True)
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PartyId = Annotated[str, Field(pattern=r"^[a-z2-7]{16}$")]
Minor = Annotated[int, Field(ge=0, le=2**62)]
IsoWeek = Annotated[str, Field(pattern=r"^[0-9]{4}-W[0-9]{2}$")]
ItemKey = Annotated[str, Field(pattern=r"^(ndc|rxnorm|gtin):[A-Za-z0-9-]{1,32}$")]  # "system:code"


class _Payload(BaseModel):
    model_config = _strict

    def wire(self) -> dict[str, Any]:
        """The dict that is signed: every field, as entries of this type have always been signed."""
        return self.model_dump()


class PartyRegistration(_Payload):
    """Operator-signed: binds a key to a role. Its account is "<role>:<party id>"."""

    v: int = 1
    role: Literal["prescriber", "pharmacy", "insurer", "miner", "patient", "doctor", "researcher", "authority",
                  "sponsor", "investigator"]
    pk: bytes = Field(min_length=32, max_length=32)
    name: str = Field(min_length=1, max_length=128)
    ts: int = Field(ge=0)
    # The party's re-encryption keys (carechain.reencryption.PreKey): records are encapsulated to an owner's
    # `pre_pk`, whose kfrags are checked with `pre_vk`; a requester receives capsule fragments for its `pre_pk`.
    pre_pk: PreKeyBytes | None = None
    pre_vk: PreKeyBytes | None = None

    def wire(self) -> dict[str, Any]:
        # Absent keys stay absent, so a registration without re-encryption keys has the bytes it always had.
        return self.model_dump(exclude_none=True)


class ContractUpgrade(_Payload):
    """Operator-signed: from tree size `from_size` on (a checkpoint's size), `name` runs `code_hash`."""

    v: int = 1
    name: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=1)
    code_hash: Hex32
    from_size: int = Field(ge=1)
    ts: int = Field(ge=0)


class TokenTransfer(_Payload):
    """Signed by a registered party: move minor units from its own account."""

    v: int = 1
    to: str = Field(min_length=3, max_length=128, pattern=r"^[a-z]+:[A-Za-z0-9_.-]+$")
    amount: int = Field(ge=1, le=2**62)
    nonce: int = Field(ge=0, le=2**63 - 1)  # makes every transfer a distinct entry; reuse is rejected
    memo: str = Field(default="", max_length=128)


class RxAnchor(_Payload):
    """Prescriber-signed: the public terms of one prescription, bound to its off-ledger body by `rx_ref`.

    The patient and drug appear only as commitments salted with `rx_ref` (see `patient_commitment`).
    """

    v: int = 1
    rx_ref: Hex32
    patient_c: Hex32
    drug_c: Hex32
    quantity: int = Field(ge=1, le=10_000)  # packages per fill, the unit of Purchase.quantity
    refills: int = Field(ge=0, le=99)
    expires_ms: int = Field(ge=0)
    controlled: bool
    ts: int = Field(ge=0)


class RxRevoke(_Payload):
    v: int = 1
    rx_ref: Hex32
    reason: str = Field(min_length=1, max_length=256)
    ts: int = Field(ge=0)


class CoverageRule(_Payload):
    category: str = Field(min_length=1, max_length=32)  # e.g. "immunization", "generic"
    bp: int = Field(ge=0, le=10_000)  # basis points of the sale price billed to the insurer
    items: list[ItemKey] = Field(min_length=1, max_length=1024)


class Wellness(_Payload):
    min_active_minutes: int = Field(ge=1, le=7 * 1440)  # per ISO week
    rebate_minor: Minor


class PolicyRegistration(_Payload):
    """Insurer-signed: a policy for one patient; sales are billed to "insurer:<insurer id>"."""

    v: int = 1
    policy_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    patient_token: str = Field(min_length=1, max_length=64)
    coverage: list[CoverageRule] = Field(max_length=32)
    wellness: Wellness | None = None
    ts: int = Field(ge=0)


class WellnessSettle(_Payload):
    """Insurer-signed: evaluate one ISO week (UTC) of a patient's telemetry and pay the rebate if earned."""

    v: int = 1
    patient_token: str = Field(min_length=1, max_length=64)
    week: IsoWeek
    ts: int = Field(ge=0)


class SaleRefusal(_Payload):
    """Bridge-signed: a terminal's signed sale that the contracts refused, kept so it counts.

    An honest log holds only entries the contracts accept; a refused Rx-only sale still has to be on the
    ledger to count against the pharmacy, so the bridge wraps the terminal's COSE_Sign1 in this entry.
    The contract re-runs the sale and accepts the refusal only if the rules refuse it for `reason`.
    """

    v: int = 1
    event: bytes = Field(min_length=1, max_length=16 * 1024)  # the terminal's COSE_Sign1, byte for byte
    reason: str = Field(min_length=1, max_length=64)
    ts: int = Field(ge=0)


MinerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]  # also the tail of "miner:<id>"
StorageCount = Annotated[int, Field(ge=0, le=100_000)]


class StorageShare(_Payload):
    index: int = Field(ge=0, le=255)
    miner: MinerId
    root: Hex32  # the share's Merkle root over its chunks (what audits check answers against)


class StorageSegment(_Payload):
    index: int = Field(ge=0, le=2**32)
    version: int = Field(ge=1)
    shares: list[StorageShare] = Field(min_length=1, max_length=256)


class StorageCommit(_Payload):
    """Signed by the dataset's owner key: the share roots of one revision of a dataset (from its Manifest).

    Any Ed25519 key may commit (a patient is not a registered party): `pk` is carried in the payload and
    must be the key whose id signs it. The first commit of a `dataset_id` binds it to that key; later
    revisions must come from the same key with a higher `revision`.
    """

    v: int = 1
    pk: bytes = Field(min_length=32, max_length=32)
    dataset_id: str = Field(min_length=1, max_length=256)
    revision: int = Field(ge=1)
    k: int = Field(ge=1, le=256)
    n: int = Field(ge=1, le=256)
    length: int = Field(ge=0)
    segments: list[StorageSegment] = Field(max_length=1_000_000)
    ts: int = Field(ge=0)


class MinerEpoch(_Payload):
    """One miner's counts in one epoch; an unanswered retrieval counts as a failed audit."""

    miner: MinerId
    passed: StorageCount = 0
    failed: StorageCount = 0
    answered: StorageCount = 0
    unanswered: StorageCount = 0


class StorageAudit(_Payload):
    """Operator-signed: one epoch's audit and retrieval results and the payouts from "pool:miners".

    `payouts` (miner id → minor units, non-zero ones only) and `carry` must be exactly what
    `contract_rules.rewards.settle_epoch` computes from the counts, `pool`, the carry of the previous
    epoch and the reputations on the ledger; the rule recomputes them and rejects any difference.
    """

    v: int = 1
    epoch: int = Field(ge=0)
    pool: Minor
    miners: list[MinerEpoch] = Field(max_length=4096)
    payouts: dict[MinerId, Minor]
    carry: Minor
    ts: int = Field(ge=0)


DevId = Annotated[str, Field(pattern=r"^[a-z2-7]{16}$")]
TimeMs = Annotated[int, Field(ge=0, le=2**63 - 1)]
MAX_ACCESS_MINERS = 16
MAX_SEALED_KFRAG = 2048  # carechain.access.MAX_SEALED_KFRAG_BYTES: a sealed box around one kfrag (~360 bytes)
MAX_SEED_CHECKPOINT = 16 * 1024  # a checkpoint note with the bridge's and up to ~100 cosignature lines
MAX_FAULT_MESSAGE = 1024 * 1024  # a miner's signed capsule-fragments message (carechain.access's limit)


class AccessRequest(_Payload):
    """Requester-signed: which of an owner's sealed records it asks to read, for what, until when.

    Empty `devices` means all the owner's devices, empty `kinds` all sealed kinds. The rules keep it in table
    `access_requests` under the hex `request_hash` of its leaf, which the owner's grant names.
    """

    v: int = 1
    owner: PartyId
    devices: list[DevId] = Field(default_factory=list, max_length=64)
    kinds: list[str] = Field(default_factory=list, max_length=16)
    from_ms: TimeMs
    to_ms: TimeMs
    purpose: str = Field(min_length=1, max_length=256)
    expires_ms: TimeMs
    nonce: int = Field(ge=0, le=2**63 - 1)  # makes two otherwise equal requests distinct entries
    ts: TimeMs


class AccessGrant(_Payload):
    """Owner-signed: the authorization of one request, carrying m-of-n kfrags each sealed to one chosen miner.

    `miners` must be exactly `carechain.access.choose_miners(seed, registered miners, n, request)` for the seed
    of `seed_checkpoint` (a final checkpoint note: the bridge's signature and a majority of the registered
    miners' cosignatures), so neither the owner's client nor the bridge picks who holds the fragments.
    """

    v: int = 1
    request: Hex32
    requester: PartyId
    threshold: int = Field(ge=1, le=MAX_ACCESS_MINERS)
    miners: list[PartyId] = Field(min_length=1, max_length=MAX_ACCESS_MINERS)
    kfrags: list[Annotated[bytes, Field(min_length=1, max_length=MAX_SEALED_KFRAG)]] = Field(
        min_length=1, max_length=MAX_ACCESS_MINERS)
    seed_checkpoint: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)
    expires_ms: TimeMs
    ts: TimeMs


class AccessRevoke(_Payload):
    """Owner-signed: ends a grant (the `access` record at leaf `grant_index`); miners then refuse it."""

    v: int = 1
    grant_index: int = Field(ge=0, le=2**63 - 1)
    reason: str = Field(min_length=1, max_length=256)
    ts: TimeMs


class AccessFault(_Payload):
    """Signed by a registered party (usually the requester): a miner's signed capsule fragments, as evidence.

    Accepted only when the miner's signature verifies and at least one fragment fails verification against
    the capsule anchored for its (device, epoch); it then counts against the miner (`access_faults`).
    """

    v: int = 1
    grant_index: int = Field(ge=0, le=2**63 - 1)
    message: bytes = Field(min_length=1, max_length=MAX_FAULT_MESSAGE)
    ts: TimeMs


class ProtocolCutover(_Payload):
    """Operator-signed: from tree size `retire_v1_after` on, v1 (plain-text) readings of sealed kinds are refused."""

    v: int = 1
    retire_v1_after: int = Field(ge=1, le=2**63 - 1)
    ts: TimeMs


class Prescription(_Payload):
    """The Rx body: held off-ledger by patient and pharmacy; the ledger sees only its hash and terms."""

    v: int = 1
    prescriber: PartyId
    patient_token: str = Field(min_length=1, max_length=64)
    drug_code: str = Field(min_length=1, max_length=32)
    code_system: Literal["ndc", "rxnorm", "gtin"]
    quantity: int = Field(ge=1, le=10_000)
    refills: int = Field(ge=0, le=99)
    expires_ms: int = Field(ge=0)
    controlled: bool
    issued_ms: int = Field(ge=0)
    nonce: bytes = Field(min_length=16, max_length=16)  # makes rx_ref unguessable from the terms
    sig_text: str = Field(default="", max_length=512)  # directions for use ("1 tablet twice daily")

    def encode(self) -> bytes:
        return cbor.encode(self.model_dump())

    def signed_bytes(self) -> bytes:
        """What the prescriber signs and what `rx_ref` hashes: the Rx domain tag, then the body."""
        return RX_DOMAIN + self.encode()

    def rx_ref(self) -> str:
        return hashlib.sha256(self.signed_bytes()).hexdigest()


P = TypeVar("P", bound=_Payload)


def parse(model: type[P], payload: Any) -> P | None:
    try:
        return model.model_validate(payload)
    except ValidationError:
        return None


def patient_commitment(rx_ref: str, patient_token: str) -> str:
    return hashlib.sha256(RX_PATIENT_DOMAIN + bytes.fromhex(rx_ref) + patient_token.encode()).hexdigest()


def drug_commitment(rx_ref: str, code_system: str, drug_code: str) -> str:
    data = RX_DRUG_DOMAIN + bytes.fromhex(rx_ref) + f"{code_system}:{drug_code}".encode()
    return hashlib.sha256(data).hexdigest()


# -- building signed entries -------------------------------------------------------------------------

def signed(identity: Identity, entry_type: str, payload: _Payload) -> Entry:
    return Entry(entry_type, envelope.sign(identity, payload.wire()))


def party_registration_entry(operator: Identity, reg: PartyRegistration) -> Entry:
    return signed(operator, PARTY_REGISTER, reg)


def access_request_entry(requester: Identity, req: AccessRequest) -> Entry:
    return signed(requester, ACCESS_REQUEST, req)


def access_grant_entry(owner: Identity, grant: AccessGrant) -> Entry:
    if len(grant.kfrags) != len(grant.miners):
        raise ValueError(f"a grant needs one sealed kfrag per miner: {len(grant.kfrags)} for {len(grant.miners)}")
    return signed(owner, ACCESS_GRANT, grant)


def access_revoke_entry(owner: Identity, revoke: AccessRevoke) -> Entry:
    return signed(owner, ACCESS_REVOKE, revoke)


def access_fault_entry(reporter: Identity, fault: AccessFault) -> Entry:
    return signed(reporter, ACCESS_FAULT, fault)


def protocol_cutover_entry(operator: Identity, cutover: ProtocolCutover) -> Entry:
    return signed(operator, PROTOCOL_CUTOVER, cutover)


def sign_prescription(prescriber: Identity, rx: Prescription) -> bytes:
    """The prescriber's detached signature over the Rx body (kept with the body, off-ledger)."""
    return prescriber.sign(rx.signed_bytes())


def verify_prescription(prescriber_pk: bytes, rx: Prescription, signature: bytes) -> bool:
    """Whether `signature` is the prescriber's over this Rx body."""
    return verify_signature(prescriber_pk, rx.signed_bytes(), signature)


def rx_anchor_for(rx: Prescription, ts: int) -> RxAnchor:
    ref = rx.rx_ref()
    return RxAnchor(rx_ref=ref, patient_c=patient_commitment(ref, rx.patient_token),
                    drug_c=drug_commitment(ref, rx.code_system, rx.drug_code), quantity=rx.quantity,
                    refills=rx.refills, expires_ms=rx.expires_ms, controlled=rx.controlled, ts=ts)


def check_rx_against_anchor(rx: Prescription, signature: bytes, prescriber_pk: bytes, anchor: RxAnchor) -> str | None:
    """Off-ledger check a pharmacy (or `carechain rx verify`) runs on the body it holds: None if it matches."""
    if not verify_prescription(prescriber_pk, rx, signature):
        return "bad_rx_signature"
    if rx_anchor_for(rx, anchor.ts) != anchor:
        return "rx_does_not_match_anchor"
    return None


# -- formulary and attested time ---------------------------------------------------------------------

MAX_SCHEDULE = 5  # US controlled-substance schedules I-V; 0 = not controlled


class FormularyItem(_Payload):
    """One drug's terms on the formulary: whether a sale needs an Rx, its schedule, how much one fill may hold."""

    item: ItemKey  # "system:code", as a sale names it ("ndc:70882-114-20")
    rx_only: bool
    schedule: int = Field(ge=0, le=MAX_SCHEDULE)
    max_quantity: int = Field(ge=1, le=10_000)  # packages per sale (the unit of Purchase.quantity)


class FormularySet(_Payload):
    """Authority-signed: set (add or replace) formulary items; the rules decide Rx-only from these, never a
    terminal. An item not on the formulary is Rx-only."""

    v: int = 1
    items: list[FormularyItem] = Field(min_length=1, max_length=1024)
    ts: TimeMs


class ClockAttest(_Payload):
    """Operator-signed (the bridge): the time, in ms since the epoch, that time-based rules judge on from
    this leaf on. Each attestation must be later than the one before."""

    v: int = 1
    ms: TimeMs


def formulary_set_entry(authority: Identity, formulary: FormularySet) -> Entry:
    return signed(authority, FORMULARY_SET, formulary)


def clock_attest_entry(operator: Identity, ms: int) -> Entry:
    return signed(operator, CLOCK_ATTEST, ClockAttest(ms=ms))



# -- bonds, slashing, patient payments and policies --------------------------------------------------

POLICY_CONSENT_DOMAIN = b"carechain/policy/consent/v1\x00"  # what a patient signs to accept a policy
BOND_ROLES = ("pharmacy", "insurer", "miner")
MAX_FORK_NOTE = 16 * 1024  # a checkpoint note with the bridge's and up to ~100 cosignature lines


class BondPost(_Payload):
    """Signed by a pharmacy, insurer or miner: lock `amount` from its own account in "bond:<party id>"."""

    v: int = 1
    amount: int = Field(ge=1, le=2**62)
    nonce: int = Field(ge=0, le=2**63 - 1)  # makes two equal posts distinct entries; reuse is rejected
    ts: TimeMs


class BondUnbond(_Payload):
    """Ask for `amount` of the bond back: it stays slashable until released (`bonds.UNBONDING_MS` later)."""

    v: int = 1
    amount: int = Field(ge=1, le=2**62)
    nonce: int = Field(ge=0, le=2**63 - 1)
    ts: TimeMs


class BondWithdraw(_Payload):
    """Move the released unbonding amount back to the party's own account."""

    v: int = 1
    nonce: int = Field(ge=0, le=2**63 - 1)
    ts: TimeMs


class MinerFork(_Payload):
    """Proof that `miner` cosigned two log-signed checkpoints of one size with different roots.

    Any registered party (or the operator) may file it; the rule verifies both notes and slashes the miner's
    whole bond ("fork_cosignature"). The notes are the evidence: the log's signature and the miner's
    cosignature on each, nothing the filer could make up.
    """

    v: int = 1
    miner: PartyId
    note_a: str = Field(min_length=1, max_length=MAX_FORK_NOTE)
    note_b: str = Field(min_length=1, max_length=MAX_FORK_NOTE)
    ts: TimeMs


class CappedCoverage(_Payload):
    """A coverage rule with a price cap per item: the insurer's share is `bp` of at most `cap` per package."""

    category: str = Field(min_length=1, max_length=32)
    bp: int = Field(ge=0, le=10_000)
    caps: dict[ItemKey, Minor] = Field(min_length=1, max_length=1024)  # "system:code" → cap per package


class PolicyOffer(_Payload):
    """A policy's terms as the insurer offers them to one patient (her party id), before she consents."""

    v: Literal[2] = 2
    policy_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    patient: PartyId
    coverage: list[CappedCoverage] = Field(max_length=32)
    wellness: Wellness | None = None
    ts: TimeMs

    def consent_bytes(self, insurer: str) -> bytes:
        """What the patient signs: the domain tag, then the insurer's party id and the terms, as CBOR."""
        terms = self.model_dump(exclude={"consent"})
        return POLICY_CONSENT_DOMAIN + cbor.encode({"insurer": insurer, "terms": terms})


class ConsentedPolicy(PolicyOffer):
    """Insurer-signed `policy.register` (insurance v3): the offer plus the patient's consent signature."""

    consent: bytes = Field(min_length=64, max_length=64)


def sign_policy_consent(patient: Identity, insurer: str, offer: PolicyOffer) -> bytes:
    """The patient's signature accepting `offer` from the insurer with party id `insurer`."""
    return patient.sign(offer.consent_bytes(insurer))


def consented_policy(offer: PolicyOffer, consent: bytes) -> ConsentedPolicy:
    return ConsentedPolicy(**offer.model_dump(), consent=consent)


def policy_consent_holds(patient_pk: bytes, insurer: str, policy: ConsentedPolicy) -> bool:
    """Whether `policy.consent` is the patient's signature over these terms offered by `insurer`."""
    return verify_signature(patient_pk, policy.consent_bytes(insurer), policy.consent)



# -- storage audits, retrievals and epochs -----------------------------------------------------------

MAX_AUDIT_ANSWER = 14 * 1024  # one miner's signed AuditAnswer (`carechain.storage.attestations`)
MAX_RETRIEVAL_MESSAGE = 1024  # a signed RetrievalRequest or RetrievalAnswer


class StorageShareV2(_Payload):
    index: int = Field(ge=0, le=255)
    miner: MinerId
    root: Hex32
    # The miner's store receipt (`attestations.store_receipt`): required for a share this commit places
    # (a new version, or a repair); None for a share kept as the ledger already has it.
    receipt: bytes | None = Field(default=None, min_length=64, max_length=64)


class StorageSegmentV2(_Payload):
    index: int = Field(ge=0, le=2**32)
    version: int = Field(ge=1)
    share_length: int = Field(ge=1, le=2**40)  # bytes per share: with the chunk size, what audits draw from
    shares: list[StorageShareV2] = Field(min_length=1, max_length=256)


class StorageCommitV2(_Payload):
    """Signed by the dataset's owner key (storage v2): share roots, placed by the seed of a final checkpoint.

    The segments written by this revision (version == revision) must sit exactly on
    `carechain.storage.placement.place_shares(seed, dataset, segment, version, active miners, n)`; older
    segments must match the ledger, except repaired shares (same root, new miner), which must sit on the
    miners `place_shares` picks with the segment's old holders excluded. Every share this commit places carries
    its miner's store receipt. `seed_checkpoint` is that final note.
    """

    v: Literal[2] = 2
    pk: bytes = Field(min_length=32, max_length=32)
    dataset_id: str = Field(min_length=1, max_length=256)
    revision: int = Field(ge=1)
    k: int = Field(ge=1, le=256)
    n: int = Field(ge=1, le=256)
    length: int = Field(ge=0)
    chunk_size: int = Field(ge=1, le=1 << 20)
    segments: list[StorageSegmentV2] = Field(max_length=1_000_000)
    seed_checkpoint: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)
    ts: TimeMs


class StorageAuditV2(_Payload):
    """One audit round of the current storage epoch: each audited miner's signed answers (or null).

    Signed by the operator or any registered party. The rules derive every miner's challenges from the ledger
    and the seed of `seed_checkpoint` (`attestations.challenges_for`) and recompute each verdict; null (the
    miner did not answer) counts as a failed audit only when the operator files it.
    """

    v: Literal[2] = 2
    epoch: int = Field(ge=0)
    seed_checkpoint: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)
    answers: dict[MinerId, Annotated[bytes, Field(min_length=1, max_length=MAX_AUDIT_ANSWER)] | None] = Field(
        min_length=1, max_length=64)


class StorageRetrieval(_Payload):
    """A signed retrieval request, with the miner's signed answer or null.

    Filed by the requester (null: not answered yet; the miner may still file its answer until the epoch is
    settled) or by the miner itself with its answer. `pk` is present only when the requester is a dataset
    owner's key rather than a registered party (as in `storage.commit`).
    """

    v: int = 1
    request: bytes = Field(min_length=1, max_length=MAX_RETRIEVAL_MESSAGE)
    answer: bytes | None = Field(default=None, min_length=1, max_length=MAX_RETRIEVAL_MESSAGE)
    pk: bytes | None = Field(default=None, min_length=32, max_length=32)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude={"pk"} if self.pk is None else set())


class StorageSettle(_Payload):
    """Close storage epoch `epoch`: pay `pool` from "pool:miners" by the evidence of the epoch on the ledger."""

    v: int = 1
    epoch: int = Field(ge=0)
    pool: Minor


class CheckpointFinal(_Payload):
    """Operator-signed: a final checkpoint note with its cosignatures (the bridge records them for rewards)."""

    v: int = 1
    note: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)


def storage_audit_entry(signer: Identity, audit: StorageAuditV2) -> Entry:
    return signed(signer, STORAGE_AUDIT, audit)


def storage_retrieval_entry(signer: Identity, retrieval: StorageRetrieval) -> Entry:
    return signed(signer, STORAGE_RETRIEVAL, retrieval)


def storage_settle_entry(signer: Identity, settle: StorageSettle) -> Entry:
    return signed(signer, STORAGE_SETTLE, settle)


def checkpoint_final_entry(operator: Identity, note: str) -> Entry:
    return signed(operator, CHECKPOINT_FINAL, CheckpointFinal(note=note))


# -- the data market: consents, studies, contributions, results --------------------------------------
# A patient's consent says which of her sealed kinds may be used, by which query types, for whom, at what price
# and above which cohort size; a researcher's study says what it asks and what it pays; its aggregators (miners
# drawn from a final checkpoint's seed) answer it by MPC over the contributors' Shamir shares (docs/market.md).

QUERY_TYPES = ("count", "sum", "mean", "histogram", "resting_heart_rate", "time_in_range")
QueryType = Literal["count", "sum", "mean", "histogram", "resting_heart_rate", "time_in_range"]
AgeBand = Literal["18-29", "30-44", "45-64", "65+"]
LeafIndex = Annotated[int, Field(ge=0, le=2**63 - 1)]
StudyId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]  # also the tail of "study:<id>"
# One contributor's value bound, in the measure's unit: what the aggregators' 32-bit secints compare exactly.
MeasureValue = Annotated[int, Field(ge=-market_core.VALUE_BOUND, le=market_core.VALUE_BOUND)]
MIN_COHORT_LIMIT = 100_000
MAX_CONTRIBUTORS = 100_000
MIN_AGGREGATORS, MAX_AGGREGATORS = 3, 7
MAX_HISTOGRAM_EDGES = 33  # 32 bins
MAX_CONTRIBUTION_LEAVES = 4096
MAX_SEALED_SHARE = 4096  # a sealed box around one aggregator's CBOR row (≤ 32 field elements)
MAX_DISCLOSED_EPOCHS = 4096  # at most one epoch per cited reading (MAX_CONTRIBUTION_LEAVES)
MAX_SEALED_DISCLOSURE_KEY = 256  # a sealed box around one 32-byte disclosure key (48 bytes of overhead)
MAX_DISCLOSURE_BLOB = 524_288  # the AEAD-sealed opening: salt, data keys and up to 4096 cited ciphertexts
AuditReason = Annotated[str, Field(max_length=64, pattern=r"^[a-z_]*$")]


class CohortAttributes(_Payload):
    """Coarse attributes: what a consent discloses about its owner, and what a study's filter asks for.

    In a consent an unset attribute is undisclosed; in a filter it is not asked for. A consent matches a
    filter when every attribute the filter sets is disclosed with that value.
    """

    age_band: AgeBand | None = None
    sex: Literal["f", "m", "x"] | None = None
    region: str | None = Field(default=None, min_length=1, max_length=16)


class ConsentGive(_Payload):
    """Patient-signed: the terms under which her sealed readings may feed studies (table `consents`).

    Empty `buyers` means any registered researcher. Kept under the leaf index of this entry, which names it.
    """

    v: int = 1
    kinds: list[str] = Field(min_length=1, max_length=16)
    queries: list[QueryType] = Field(min_length=1, max_length=len(QUERY_TYPES))
    min_cohort: int = Field(ge=2, le=MIN_COHORT_LIMIT)
    price_minor: Minor
    buyers: list[PartyId] = Field(default_factory=list, max_length=64)
    expires_ms: TimeMs
    attributes: CohortAttributes = Field(default_factory=CohortAttributes)
    nonce: int = Field(ge=0, le=2**63 - 1)  # makes two otherwise equal consents distinct entries
    ts: TimeMs


class ConsentRevoke(_Payload):
    """Owner-signed: ends the consent given at leaf `consent`; no later contribution may use it."""

    v: int = 1
    consent: LeafIndex
    ts: TimeMs


class StudyQuery(_Payload):
    """What a study computes over one sealed `kind`: each contributor's value lies in [lo, hi]; a histogram
    counts values into the bins between its ascending `bins` edges (2..33 edges → 1..32 bins)."""

    type: QueryType
    kind: str = Field(min_length=1, max_length=32)
    lo: MeasureValue
    hi: MeasureValue
    bins: list[MeasureValue] | None = Field(default=None, min_length=2, max_length=MAX_HISTOGRAM_EDGES)


class StudyPost(_Payload):
    """Researcher-signed: opens study `study_id` and locks its deposit in "study:<study_id>".

    deposit = price_minor × max_contributors + aggregator_fee_minor × aggregators. The aggregators are
    `contract_rules.market.choose_aggregators` of the seed of `seed_checkpoint` (a final checkpoint note).
    """

    v: int = 1
    study_id: StudyId
    query: StudyQuery
    from_ms: TimeMs
    to_ms: TimeMs
    filter: CohortAttributes = Field(default_factory=CohortAttributes)
    price_minor: Minor
    max_contributors: int = Field(ge=1, le=MAX_CONTRIBUTORS)
    aggregator_fee_minor: Minor
    epsilon_milli: int = Field(ge=0, le=2**31)  # 0: no DP noise
    aggregators: int = Field(ge=MIN_AGGREGATORS, le=MAX_AGGREGATORS)
    seed_checkpoint: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)
    closes_ms: TimeMs
    ts: TimeMs


class StudyContribute(_Payload):
    """Patient-signed: one contribution, under her consent at leaf `consent`.

    `shares[i]` is her Shamir share row sealed to the study's i-th aggregator; `commitment` binds the
    contribution vector (an audit opens it); `leaves` are the anchored readings it was computed from.
    """

    v: int = 1
    study_id: StudyId
    consent: LeafIndex
    commitment: Hex32
    shares: list[Annotated[bytes, Field(min_length=1, max_length=MAX_SEALED_SHARE)]] = Field(
        min_length=MIN_AGGREGATORS, max_length=MAX_AGGREGATORS)
    leaves: list[LeafIndex] = Field(default_factory=list, max_length=MAX_CONTRIBUTION_LEAVES)
    ts: TimeMs


class StudyNoise(_Payload):
    """The DP noise an answer carries: the study's epsilon (milli-units; 0 = none) and the MPC's public seed."""

    epsilon_milli: int = Field(ge=0, le=2**31)
    seed: bytes | None = Field(default=None, max_length=64)


class StudyResult(_Payload):
    """Aggregator-signed: its result for a study. A majority of the study's aggregators posting equal
    results (`result_body`) decides the study.

    `answer` is None (unanswered) or, by query type: count {"count"}, sum {"sum"}, mean and the derived
    measures {"sum", "n"}, histogram {"histogram": one count per bin}.
    """

    v: int = 1
    study_id: StudyId
    valid: list[LeafIndex] = Field(max_length=MAX_CONTRIBUTORS)
    invalid: int = Field(ge=0, le=MAX_CONTRIBUTORS)
    included: list[LeafIndex] = Field(max_length=MAX_CONTRIBUTORS)
    answer: dict[str, int | list[int]] | None
    noise: StudyNoise
    ts: TimeMs

    def result_body(self) -> bytes:
        """The canonical CBOR aggregators must agree on: every field but `v` and their own `ts`."""
        return cbor.encode(self.model_dump(exclude={"v", "ts"}))


class StudyClose(_Payload):
    """Signed by anyone: pays out a decided study — an answered one once its audit is over, withholding the
    forfeited contributions' prices — or refunds one undecided past its close plus the grace."""

    v: int = 1
    study_id: StudyId
    ts: TimeMs


class StudySample(_Payload):
    """Signed by anyone: fixes an answered study's audit sample from `seed_checkpoint`, which must be the latest
    final checkpoint recorded on the ledger and newer than the decision (`contract_rules.market.audit_sample`)."""

    v: int = 1
    study_id: StudyId
    seed_checkpoint: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)
    ts: TimeMs


class DisclosedEpoch(_Payload):
    """One (device, epoch) data key a disclosure gives the study's aggregators."""

    dev: str = Field(pattern=r"^[a-z2-7]{16}$")
    epoch: int = Field(ge=0, le=2**63 - 1)


class StudyDisclose(_Payload):
    """Signed by a sampled contribution's owner: her opening, for the study's aggregators only.

    This entry is the logged access record of the audit: who (the study's aggregators: `keys[i]` is the
    disclosure key sealed to the i-th), what (`epochs`, the data keys inside `blob`), why (the audit of
    `study_id`). `blob` is the AEAD-sealed opening (`carechain.contribution_audit`): salt, data keys, and the
    cited ciphertexts.
    """

    v: int = 1
    study_id: StudyId
    contribution: LeafIndex
    epochs: list[DisclosedEpoch] = Field(min_length=1, max_length=MAX_DISCLOSED_EPOCHS)
    keys: list[Annotated[bytes, Field(min_length=1, max_length=MAX_SEALED_DISCLOSURE_KEY)]] = Field(
        min_length=MIN_AGGREGATORS, max_length=MAX_AGGREGATORS)
    blob: bytes = Field(min_length=1, max_length=MAX_DISCLOSURE_BLOB)
    ts: TimeMs


class StudyAudit(_Payload):
    """Signed by one of the study's aggregators: its verdict on a sampled, disclosed contribution it recomputed.

    `reason` names what did not hold for a "mismatch" (e.g. "commitment_mismatch"); it is "" for a "match".
    """

    v: int = 1
    study_id: StudyId
    contribution: LeafIndex
    verdict: Literal["match", "mismatch"]
    reason: AuditReason = ""
    ts: TimeMs


def consent_give_entry(owner: Identity, consent: ConsentGive) -> Entry:
    return signed(owner, CONSENT_GIVE, consent)


def consent_revoke_entry(owner: Identity, revoke: ConsentRevoke) -> Entry:
    return signed(owner, CONSENT_REVOKE, revoke)


def study_post_entry(researcher: Identity, post: StudyPost) -> Entry:
    return signed(researcher, STUDY_POST, post)


def study_contribute_entry(owner: Identity, contribution: StudyContribute) -> Entry:
    return signed(owner, STUDY_CONTRIBUTE, contribution)


def study_result_entry(aggregator: Identity, result: StudyResult) -> Entry:
    return signed(aggregator, STUDY_RESULT, result)


def study_sample_entry(signer: Identity, sample: StudySample) -> Entry:
    return signed(signer, STUDY_SAMPLE, sample)


def study_disclose_entry(owner: Identity, disclose: StudyDisclose) -> Entry:
    return signed(owner, STUDY_DISCLOSE, disclose)


def study_audit_entry(aggregator: Identity, audit: StudyAudit) -> Entry:
    return signed(aggregator, STUDY_AUDIT, audit)


def study_close_entry(signer: Identity, close: StudyClose) -> Entry:
    return signed(signer, STUDY_CLOSE, close)

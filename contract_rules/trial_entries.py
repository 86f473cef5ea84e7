"""The trial contract's ledger entries: payload models, the signed messages they carry, and their constructors.

Kept apart from `contract_rules.transactions` (one module per contract's entries would be the next step for the
others too); the field types shared by every contract (`Hex32`, `PartyId`, `LeafIndex`, `TimeMs`) come from
there. The rules are in `contract_rules.trials`, the design in docs/trials.md.

Besides the payloads this module holds the three things a client and the rules must compute identically:
the participant's consent message (`consent_message`), an escrow share as bytes (`share_bytes`), and what a
committer seals to an investigator after an emergency unblinding (`UnblindKeys`, `candidate_blocks`,
`release_unblind_keys`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from carechain import cbor
from carechain.access import _open_sealed_box, _seal_to_ed25519
from carechain.entries import Entry
from carechain.identity import Identity, verify_signature
from carechain.trial_allocation import FIELD_PRIME, SEED_BYTES, Design, party_block_key, party_sizes_key
from contract_rules.transactions import (
    MAX_SEED_CHECKPOINT,
    TRIAL_CERTIFY,
    TRIAL_COMMIT,
    TRIAL_DISPENSE,
    TRIAL_ENROLL,
    TRIAL_LOCK,
    TRIAL_OUTCOME,
    TRIAL_RECOVER,
    TRIAL_REGISTER,
    TRIAL_REVEAL,
    TRIAL_UNBLIND,
    TRIAL_UNBLIND_KEY,
    TRIAL_WITHDRAW,
    Hex32,
    LeafIndex,
    PartyId,
    TimeMs,
    _Payload,
    signed,
)

__all__ = ["CONSENT_DOMAIN", "KIT_SYSTEM", "MAX_UNBLIND_BLOCKS", "SHARE_BYTES", "TrialAnalysis", "TrialCertify",
           "TrialCommit", "TrialDispense", "TrialEnroll", "TrialLock", "TrialOutcome", "TrialOutcomeSpec",
           "TrialRecover", "TrialRegister", "TrialResult", "TrialReveal", "TrialUnblind", "TrialUnblindKey",
           "TrialWithdraw", "UnblindKeys", "candidate_blocks", "consent_holds", "consent_message", "open_share",
           "open_unblind_keys", "release_unblind_keys", "seal_share", "seal_unblind_keys", "share_bytes",
           "share_value", "sign_consent", "trial_entry"]

CONSENT_DOMAIN = b"carechain/trial/consent/v1\x00"
# A kit is sold as item "trialkit:<label>": code_system "trialkit", item_code the public kit label.
KIT_SYSTEM = "trialkit"
SHARE_BYTES = 66  # a Shamir share y < 2**521 - 1, big-endian: what each sealed escrow box holds
MIN_LABELLERS, MAX_LABELLERS = 3, 7
MAX_PARTICIPANTS = 100_000
MAX_INVESTIGATORS = 64
MAX_REVEAL_WINDOW_MS = 90 * 86_400_000
MAX_SEALED_SHARE = 256  # a sealed box (48 bytes of overhead) around 66 bytes
# An emergency unblinding releases one key per candidate block (`candidate_blocks`); a registration whose design
# could need more for its last slot is refused, so every answer fits an entry.
MAX_UNBLIND_BLOCKS = 256
# A sealed box (48 bytes of overhead) around CBOR of a stratum key (≤ 263 characters), a block number, the sizes
# key and up to MAX_UNBLIND_BLOCKS block keys (34 bytes each in CBOR).
MAX_SEALED_UNBLIND = 512 + 34 * MAX_UNBLIND_BLOCKS
# ≤ 20 characters: a kit label "<trial>-<stratum index>-<position>" then fits a purchase's 32-character item code.
TrialId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,20}$")]
Measure = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]
ReasonCode = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]
DecimalText = Annotated[str, Field(pattern=r"^(-?[0-9]{1,40}(\.[0-9]{1,12})?|-?Infinity)$")]
Attribute = Annotated[str, Field(min_length=1, max_length=32)]


class TrialOutcomeSpec(_Payload):
    """The primary outcome: `measure` of the sealed `kind`, from a baseline and a follow-up window, expected to
    go in `direction` in the treatment arm. Participants' devices sign it as a sealed `trial_measure` event."""

    kind: str = Field(min_length=1, max_length=32)
    measure: Measure
    baseline_from_ms: TimeMs
    baseline_to_ms: TimeMs
    followup_from_ms: TimeMs
    followup_to_ms: TimeMs
    direction: Literal["decrease", "increase"]


class TrialAnalysis(_Payload):
    """The pre-registered analysis (`contract_rules.trial_analysis`): pooled-variance Student t, two-sided."""

    method: Literal["difference_in_means"] = "difference_in_means"
    alpha_milli: int = Field(default=50, ge=1, le=999)


class TrialRegister(_Payload):
    """Sponsor-signed: registers trial `trial_id` before any enrolment.

    `protocol_hash` is the hex SHA-256 of the full protocol document; `design` the allocation
    (`carechain.trial_allocation.Design`; arms[0] is the treatment, arms[1] the control); `labellers` miners are
    drawn from `seed_checkpoint` (a final checkpoint note), whose cosignature seed also keys the allocation.
    """

    v: int = 1
    trial_id: TrialId
    protocol_hash: Hex32
    design: Design
    outcome: TrialOutcomeSpec
    analysis: TrialAnalysis = Field(default_factory=TrialAnalysis)
    investigators: list[PartyId] = Field(min_length=1, max_length=MAX_INVESTIGATORS)
    labellers: int = Field(ge=MIN_LABELLERS, le=MAX_LABELLERS)
    seed_checkpoint: str = Field(min_length=1, max_length=MAX_SEED_CHECKPOINT)
    enrol_closes_ms: TimeMs
    max_participants: int = Field(ge=4, le=MAX_PARTICIPANTS)
    reveal_window_ms: int = Field(ge=60_000, le=MAX_REVEAL_WINDOW_MS)
    ts: TimeMs


class TrialCommit(_Payload):
    """Signed by the sponsor or one of the trial's labellers: its seed commitment
    (`trial_allocation.seed_commitment`) and `escrow`: committer → its Shamir share of the seed (`share_bytes`)
    sealed to that committer's key (`seal_share`), one for every other committer."""

    v: int = 1
    trial_id: TrialId
    commitment: Hex32
    escrow: dict[PartyId, Annotated[bytes, Field(min_length=1, max_length=MAX_SEALED_SHARE)]] = Field(
        min_length=1, max_length=MAX_LABELLERS)
    ts: TimeMs


class TrialEnroll(_Payload):
    """Signed by one of the trial's investigators: `participant` (a registered patient) into the next slot of
    her stratum (`attributes` give the design's factors), with her `consent` signature (`sign_consent`)."""

    v: int = 1
    trial_id: TrialId
    participant: PartyId
    attributes: dict[Attribute, Attribute] = Field(default_factory=dict, max_length=4)
    consent: bytes = Field(min_length=64, max_length=64)
    ts: TimeMs


class TrialDispense(_Payload):
    """Signed by a bonded pharmacy: `event` is its terminal's signed purchase (COSE_Sign1, byte for byte) of item
    "trialkit:<label>" for `participant` (the purchase's patient token), the label her slot was given."""

    v: int = 1
    trial_id: TrialId
    participant: PartyId
    event: bytes = Field(min_length=1, max_length=16 * 1024)
    ts: TimeMs


class TrialWithdraw(_Payload):
    """Signed by the participant or one of the trial's investigators: she leaves the trial; her outcome is not
    analysed (complete-case analysis)."""

    v: int = 1
    trial_id: TrialId
    participant: PartyId
    reason: ReasonCode
    ts: TimeMs


class TrialUnblind(_Payload):
    """Signed by one of the trial's investigators: the logged emergency unblinding of one participant."""

    v: int = 1
    trial_id: TrialId
    participant: PartyId
    reason: ReasonCode
    ts: TimeMs


class TrialUnblindKey(_Payload):
    """Signed by a committer: its per-party keys of the unblinded participant's block and stratum sizes
    (`UnblindKeys`), sealed to the investigator who asked at leaf `unblinding`."""

    v: int = 1
    trial_id: TrialId
    unblinding: LeafIndex
    sealed: bytes = Field(min_length=1, max_length=MAX_SEALED_UNBLIND)
    ts: TimeMs


class TrialLock(_Payload):
    """Sponsor-signed: the database lock. Readings anchored at or after this leaf do not count."""

    v: int = 1
    trial_id: TrialId
    ts: TimeMs


class TrialReveal(_Payload):
    """Signed by a committer after the lock: the seed it committed to."""

    v: int = 1
    trial_id: TrialId
    seed: bytes = Field(min_length=SEED_BYTES, max_length=SEED_BYTES)
    ts: TimeMs


class TrialRecover(_Payload):
    """Signed by a committer after the reveal window: its opened escrow share (x, y as `share_bytes`) of the seed
    of `party`, a committer that did not reveal."""

    v: int = 1
    trial_id: TrialId
    party: PartyId
    x: int = Field(ge=1, le=MAX_LABELLERS + 1)
    y: bytes = Field(min_length=SHARE_BYTES, max_length=SHARE_BYTES)
    ts: TimeMs


class TrialOutcome(_Payload):
    """Signed by a participant after the lock: her sealed `trial_measure` reading anchored at leaf `leaf`
    (`event` its COSE_Sign1, byte for byte), its ciphertext `ct` and the epoch data `key` that opens it."""

    v: int = 1
    trial_id: TrialId
    leaf: LeafIndex
    event: bytes = Field(min_length=1, max_length=16 * 1024)
    ct: bytes = Field(min_length=28, max_length=4096)
    key: bytes = Field(min_length=32, max_length=32)
    ts: TimeMs


class TrialResult(_Payload):
    """`contract_rules.trial_analysis.Result.as_dict()`, as a certificate states it."""

    n_treatment: int = Field(ge=0)
    n_control: int = Field(ge=0)
    mean_treatment: DecimalText
    mean_control: DecimalText
    effect: DecimalText
    ci_low: DecimalText
    ci_high: DecimalText
    t: DecimalText
    df: int = Field(ge=0)
    p_value: DecimalText
    met: bool


class TrialCertify(_Payload):
    """Signed by anyone once every seed is revealed or recovered: the claimed result and allocation summary
    (stratum → arm → participants analysed). The rules recompute both and accept only an exact match."""

    v: int = 1
    trial_id: TrialId
    result: TrialResult
    allocation: dict[str, dict[str, int]]
    ts: TimeMs


# -- what clients and rules compute alike --------------------------------------------------------------

def consent_message(trial_id: str, protocol_hash: str, participant: str) -> bytes:
    """What a participant signs with her party key: she consents to this protocol, including the disclosure of
    her primary-outcome measure to the trial at unblinding."""
    return CONSENT_DOMAIN + cbor.encode([trial_id, protocol_hash, participant])


def sign_consent(participant: Identity, trial_id: str, protocol_hash: str) -> bytes:
    return participant.sign(consent_message(trial_id, protocol_hash, participant.device_id))


def consent_holds(participant_pk: bytes, trial_id: str, protocol_hash: str, participant: str,
                  signature: bytes) -> bool:
    return verify_signature(participant_pk, consent_message(trial_id, protocol_hash, participant), signature)


def share_bytes(y: int) -> bytes:
    """A Shamir share's y as SHARE_BYTES big-endian bytes."""
    if not 0 <= y < FIELD_PRIME:
        raise ValueError("a share is an element of GF(2**521 - 1)")
    return y.to_bytes(SHARE_BYTES, "big")


def share_value(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share has {SHARE_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def seal_share(holder_pk: bytes, y: int) -> bytes:
    """An escrow share sealed to its holder's Ed25519 key (libsodium sealed box, as `carechain.access`)."""
    return _seal_to_ed25519(holder_pk, share_bytes(y))


def open_share(holder: Identity, sealed: bytes) -> int:
    """The share sealed to `holder`; ValueError when it was sealed to another key or altered."""
    opened = _open_sealed_box(holder, sealed)
    if opened is None:
        raise ValueError(f"the escrow share does not open with {holder.device_id}'s key (sealed to another party, "
                         "or altered)")
    return share_value(opened)


def candidate_blocks(design: Design, position: int) -> range:
    """The blocks that may hold a stratum's `position`-th slot, as any one committer can name them alone.

    Block j starts at or after j · min(block_sizes) and ends before (j + 1) · max(block_sizes), so the slot lies
    in a block from position // max to position // min. Which one follows from every committer's sizes key
    together, which no committer holds alone. With one block size the range is exactly one block.
    """
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"a stratum position is a non-negative integer, got {position!r}")
    return range(position // max(design.block_sizes), position // min(design.block_sizes) + 1)


class UnblindKeys(_Payload):
    """What a committer releases for one emergency unblinding: its `party_sizes_key` of the participant's stratum
    and its `party_block_key` of every candidate block (`candidate_blocks`), `first_block` onwards. The
    investigator combines every committer's sizes keys to find her real block, then that block's keys."""

    stratum: str
    first_block: int = Field(ge=0)
    sizes_key: bytes = Field(min_length=32, max_length=32)
    block_keys: list[Annotated[bytes, Field(min_length=32, max_length=32)]] = Field(
        min_length=1, max_length=MAX_UNBLIND_BLOCKS)

    def blocks(self) -> range:
        return range(self.first_block, self.first_block + len(self.block_keys))

    def block_key(self, block: int) -> bytes:
        """This committer's key of `block`; ValueError when the block is not among those it released."""
        if block not in self.blocks():
            raise ValueError(f"block {block} is not among the released blocks {self.first_block}–"
                             f"{self.blocks()[-1]}")
        return self.block_keys[block - self.first_block]


def release_unblind_keys(seed: bytes, trial_id: str, design: Design, stratum: str, position: int) -> UnblindKeys:
    """A committer's keys for the emergency unblinding of `stratum`'s `position`-th slot: from its seed, its
    sizes key of the stratum and its block key of every candidate block; nothing else of its seed."""
    blocks = candidate_blocks(design, position)
    if len(blocks) > MAX_UNBLIND_BLOCKS:
        raise ValueError(f"position {position} has {len(blocks)} candidate blocks, more than {MAX_UNBLIND_BLOCKS}")
    return UnblindKeys(stratum=stratum, first_block=blocks.start, sizes_key=party_sizes_key(seed, trial_id, stratum),
                       block_keys=[party_block_key(seed, trial_id, stratum, j) for j in blocks])


def seal_unblind_keys(investigator_pk: bytes, keys: UnblindKeys) -> bytes:
    return _seal_to_ed25519(investigator_pk, cbor.encode(keys.wire()))


def open_unblind_keys(investigator: Identity, sealed: bytes) -> UnblindKeys:
    opened = _open_sealed_box(investigator, sealed)
    if opened is None:
        raise ValueError(f"the unblinding keys do not open with {investigator.device_id}'s key")
    return UnblindKeys.model_validate(cbor.decode(opened))


_TYPES: dict[type[_Payload], str] = {
    TrialRegister: TRIAL_REGISTER, TrialCommit: TRIAL_COMMIT, TrialEnroll: TRIAL_ENROLL,
    TrialDispense: TRIAL_DISPENSE, TrialWithdraw: TRIAL_WITHDRAW, TrialUnblind: TRIAL_UNBLIND,
    TrialUnblindKey: TRIAL_UNBLIND_KEY, TrialLock: TRIAL_LOCK, TrialReveal: TRIAL_REVEAL,
    TrialRecover: TRIAL_RECOVER, TrialOutcome: TRIAL_OUTCOME, TrialCertify: TRIAL_CERTIFY,
}


def trial_entry(signer: Identity, payload: _Payload) -> Entry:
    """The signed ledger entry of any trial payload (its type follows from the payload's model)."""
    try:
        entry_type = _TYPES[type(payload)]
    except KeyError:
        raise ValueError(f"{type(payload).__name__} is not a trial payload") from None
    return signed(signer, entry_type, payload)

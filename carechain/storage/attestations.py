"""Signed storage attestations: audit answers, retrieval requests and answers, as every miner re-checks them.

Sans-IO: builders sign with `carechain.envelope.sign` (COSE_Sign1 over deterministic CBOR), parsers take the
bytes and the public key the caller trusts (the ledger's registered key) and raise `AttestationError`.
Nothing here trusts the party that relays the bytes: a storage client or the bridge files what miners signed,
and the rules recompute every verdict from it.

- `AuditAnswer` {"v": 1, "epoch", "miner", "seed" (hex), "challenges" (hex digest of the challenges it
  answers, `challenges_digest`), "answers": [[chunk | None, [proof hash, …]], …]}, signed by the miner,
  answers in the order of the challenges asked. The rules derive the challenges themselves
  (`challenges_for`: from the ledger's `storage_shares` table and the seed of a final checkpoint) and take an
  answer as evidence only if its digest is theirs: a client that asked other challenges (chunks of shares the
  miner never held, say) gets answers that prove nothing, and cannot make an honest miner fail.
- `RetrievalRequest` {"v": 1, "dataset", "segment", "version", "share", "miner", "nonce", "ts"}, signed by
  the requester (a registered party, or the dataset owner's key).
- `RetrievalAnswer` {"v": 1, "request": hex SHA-256 of the request's COSE bytes, "root": hex root of the
  share served, "data_hash": hex SHA-256 of the share bytes}, signed by the miner.
- A store receipt: the miner's Ed25519 signature over a domain tag and the CBOR of [dataset, segment, version,
  share, root hex, share length, chunk size], returned when it stores a share; `storage.commit` v2 carries one
  for every share it places, so nobody can commit roots a miner never received and have it fail audits.

Which shares a miner holds, as the audit sees it: table `storage_shares` (written by `contract_rules.storage_v2`)
maps one segment version of a dataset to {"dataset", "segment", "version", "miners", "roots", "length" (share
bytes), "chunk_size", "at" (leaf index of the commit), "dropped_at" (leaf index of the commit that replaced
it, or None)}. An audit seeded by a checkpoint of tree size S challenges the rows committed before S and
not dropped before S, so the challenges depend only on the ledger up to that checkpoint: the client that
asks and every miner that re-checks derive the same ones, whatever was committed meanwhile.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from carechain import cbor, envelope
from carechain.errors import ProtocolError
from carechain.identity import Identity, device_id_for, verify_signature
from carechain.merkle import HASH_SIZE
from carechain.storage.audit import Answer, Challenge, ShareRef, Verdict, draw_challenges, verify_answer

__all__ = [
    "AUDIT_CHALLENGES", "MAX_ATTESTATION_BYTES", "SHARES_TABLE", "AttestationError", "AuditAnswer",
    "AuditChallenge", "HeldShare", "RetrievalAnswer", "RetrievalRequest", "answers_challenges", "audit_answer",
    "audit_verdict", "challenges_digest", "challenges_for", "ledger_holdings", "parse_audit_answer",
    "parse_retrieval_answer", "parse_retrieval_request", "request_id", "retrieval_answer", "retrieval_request",
    "signer_of", "store_receipt", "verify_store_receipt", "wire_challenges",
]

AUDIT_CHALLENGES = 8  # chunks per miner per ledger audit: keeps one miner's answer well under an entry's 16 KiB
MAX_ATTESTATION_BYTES = 64 * 1024
SHARES_TABLE = "storage_shares"


class AttestationError(ProtocolError):
    """A storage attestation that is malformed, not signed by the expected key, or not for what it claims."""


class _Tables(Protocol):
    def table(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True, order=True)
class HeldShare:
    """One share on the ledger, with the chunk size its dataset was committed with."""

    ref: ShareRef
    chunk_size: int


@dataclass(frozen=True)
class AuditChallenge:
    challenge: Challenge
    chunk_size: int


@dataclass(frozen=True)
class AuditAnswer:
    epoch: int
    miner: str
    seed: bytes
    challenges: str  # hex digest of the challenges answered (`challenges_digest`)
    answers: tuple[Answer | None, ...]


@dataclass(frozen=True)
class RetrievalRequest:
    requester: str  # the kid that signed it (checked against the key the caller passed)
    dataset: str
    segment: int
    version: int
    share: int
    miner: str
    nonce: int
    ts: int


@dataclass(frozen=True)
class RetrievalAnswer:
    miner: str
    request: str  # hex SHA-256 of the request's COSE bytes
    root: str
    data_hash: str


# -- which shares the ledger says a miner holds, and the challenges the rules derive ------------------

def ledger_holdings(source: _Tables | Mapping[str, Any], as_of: int) -> dict[str, list[HeldShare]]:
    """Miner id → the shares the ledger's `storage_shares` rows give it, as of tree size `as_of`.

    `source` is a contract `State` (anything with `.table(name)`) or the `storage_shares` table itself.
    """
    rows = source if isinstance(source, Mapping) else source.table(SHARES_TABLE)
    out: dict[str, list[HeldShare]] = {}
    for row in rows.values():
        if row["at"] >= as_of or (row["dropped_at"] is not None and row["dropped_at"] < as_of):
            continue
        for share, (miner, root) in enumerate(zip(row["miners"], row["roots"], strict=True)):
            ref = ShareRef(row["dataset"], row["segment"], row["version"], share, bytes.fromhex(root), row["length"])
            out.setdefault(miner, []).append(HeldShare(ref, row["chunk_size"]))
    for held in out.values():
        held.sort()
    return out


def challenges_for(source: _Tables | Mapping[str, Any] | Sequence[HeldShare], seed: bytes, miner: str,
                   count: int = AUDIT_CHALLENGES, *, as_of: int | None = None) -> list[AuditChallenge]:
    """The `count` challenges of `miner` for `seed`: uniform over every chunk of the shares it holds.

    `source`: a `State` or the `storage_shares` table (then `as_of`, the tree size of the seed's checkpoint,
    is required), or the miner's `HeldShare`s already selected. Datasets may use different chunk sizes, so
    the draw is `audit.draw_challenges` over chunk indexes (each share's length given in chunks, chunk size
    1) and each challenge is mapped back to its share's byte length and chunk size.
    """
    if isinstance(source, Sequence):
        held = list(source)
    else:
        if as_of is None:
            raise ValueError("challenges_for a ledger table needs as_of, the tree size of the seed's checkpoint")
        held = ledger_holdings(source, as_of).get(miner, [])
    by_chunks: dict[ShareRef, HeldShare] = {}
    for h in held:
        chunks = -(-h.ref.length // h.chunk_size)
        counted = ShareRef(h.ref.dataset_id, h.ref.segment, h.ref.version, h.ref.share, h.ref.root, chunks)
        by_chunks[counted] = h
    drawn = draw_challenges(seed, miner, list(by_chunks), count, 1)
    return [AuditChallenge(Challenge(by_chunks[c.ref].ref, c.chunk), by_chunks[c.ref].chunk_size) for c in drawn]


WireChallenge = tuple[str, int, int, int, int, int]  # dataset, segment, version, share, chunk, chunk size
CHALLENGES_DOMAIN = b"carechain/storage/challenges/v1\x00"


def wire_challenges(challenges: Sequence[AuditChallenge]) -> list[WireChallenge]:
    """The challenges as a storage miner is asked them (the `audit` request's `challenges` field)."""
    return [(c.challenge.ref.dataset_id, c.challenge.ref.segment, c.challenge.ref.version, c.challenge.ref.share,
             c.challenge.chunk, c.chunk_size) for c in challenges]


def challenges_digest(challenges: Sequence[WireChallenge]) -> str:
    """Hex SHA-256 of a domain tag and the CBOR of the challenges, in order: what an AuditAnswer binds."""
    return hashlib.sha256(CHALLENGES_DOMAIN + cbor.encode([list(c) for c in challenges])).hexdigest()


def answers_challenges(challenges: Sequence[AuditChallenge], answer: AuditAnswer) -> bool:
    """Whether `answer` answers exactly `challenges` (its signed digest is theirs)."""
    return answer.challenges == challenges_digest(wire_challenges(challenges))


def audit_verdict(challenges: Sequence[AuditChallenge], answer: AuditAnswer) -> Verdict:
    """Passed only if there is one valid answer per challenge, in order (`audit.verify_answer` for each).

    Judge only an answer to these challenges (`answers_challenges`): one to others is evidence of nothing."""
    if len(answer.answers) != len(challenges):
        return Verdict(False, f"{len(answer.answers)} answers for {len(challenges)} challenges")
    for c, a in zip(challenges, answer.answers, strict=True):
        verdict = verify_answer(c.challenge, a, c.chunk_size)
        if not verdict.passed:
            return verdict
    return Verdict(True, f"{len(challenges)} challenges answered")


# -- audit answers ----------------------------------------------------------------------------------

def audit_answer(miner: Identity, epoch: int, seed: bytes, challenges: Sequence[WireChallenge],
                 answers: Sequence[Answer | None]) -> bytes:
    """The miner's signed answers to `challenges` for `epoch` and `seed` (None: a chunk it cannot serve)."""
    if len(answers) != len(challenges):
        raise ValueError(f"{len(answers)} answers for {len(challenges)} challenges")
    wire: list[list[Any]] = [[None, []] if a is None else [a.chunk, list(a.proof)] for a in answers]
    payload = {"v": 1, "epoch": epoch, "miner": miner.device_id, "seed": seed.hex(),
               "challenges": challenges_digest(challenges), "answers": wire}
    return envelope.sign(miner, payload)


def parse_audit_answer(data: bytes, public_key: bytes) -> AuditAnswer:
    """An `AuditAnswer` whose signature verifies with `public_key` (the miner's registered key)."""
    msg = _verified(data, public_key, "audit answer")
    p = msg.payload
    _fields(p, {"v", "epoch", "miner", "seed", "challenges", "answers"}, "audit answer")
    if p["miner"] != msg.kid:
        raise AttestationError("not_signed_by_the_miner", f"an audit answer for {p['miner']!r} signed by {msg.kid!r}")
    if not (_uint(p["epoch"]) and _hex32(p["seed"]) and _hex32(p["challenges"]) and isinstance(p["answers"], list)):
        raise AttestationError("bad_audit_answer", "epoch, seed, challenges (64 hex digits) or answers of the wrong "
                               "type")
    answers: list[Answer | None] = []
    for item in p["answers"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)
                and all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in item[1])):
            raise AttestationError("bad_audit_answer", "each answer is [chunk or null, [32-byte proof hashes]]")
        if item[0] is None:
            answers.append(None)
        elif isinstance(item[0], bytes):
            answers.append(Answer(item[0], tuple(item[1])))
        else:
            raise AttestationError("bad_audit_answer", "a chunk must be bytes or null")
    return AuditAnswer(p["epoch"], p["miner"], bytes.fromhex(p["seed"]), p["challenges"], tuple(answers))


# -- store receipts ---------------------------------------------------------------------------------

RECEIPT_DOMAIN = b"carechain/storage/receipt/v1\x00"


def _receipt_message(dataset: str, segment: int, version: int, share: int, root: str, length: int,
                     chunk_size: int) -> bytes:
    return RECEIPT_DOMAIN + cbor.encode([dataset, segment, version, share, root, length, chunk_size])


def store_receipt(miner: Identity, dataset: str, segment: int, version: int, share: int, root: str, length: int,
                  chunk_size: int) -> bytes:
    """The miner's signature that it stored this share (root hex, `length` bytes, audited in `chunk_size`
    chunks). A commit must carry it for every share it places, so a key that commits roots it never uploaded
    cannot make miners fail audits for data they were never given."""
    return miner.sign(_receipt_message(dataset, segment, version, share, root, length, chunk_size))


def verify_store_receipt(public_key: bytes, receipt: bytes, dataset: str, segment: int, version: int, share: int,
                         root: str, length: int, chunk_size: int) -> bool:
    message = _receipt_message(dataset, segment, version, share, root, length, chunk_size)
    return verify_signature(public_key, message, receipt)


# -- retrievals -------------------------------------------------------------------------------------

def retrieval_request(requester: Identity, dataset: str, segment: int, version: int, share: int, miner: str,
                      nonce: int, ts: int) -> bytes:
    """A signed request for one share (the miner answers it with `retrieval_answer`)."""
    payload = {"v": 1, "dataset": dataset, "segment": segment, "version": version, "share": share,
               "miner": miner, "nonce": nonce, "ts": ts}
    return envelope.sign(requester, payload)


def signer_of(data: bytes) -> str:
    """The kid a signed attestation claims (unverified: look its key up, then parse with it)."""
    try:
        return envelope.parse(data, max_bytes=MAX_ATTESTATION_BYTES).kid
    except envelope.EnvelopeError as exc:
        raise AttestationError("bad_attestation", f"not a COSE_Sign1 attestation: {exc}") from None


def parse_retrieval_request(data: bytes, public_key: bytes) -> RetrievalRequest:
    """A `RetrievalRequest` whose signature verifies with `public_key` (the requester's key)."""
    msg = _verified(data, public_key, "retrieval request")
    p = msg.payload
    _fields(p, {"v", "dataset", "segment", "version", "share", "miner", "nonce", "ts"}, "retrieval request")
    if not (isinstance(p["dataset"], str) and isinstance(p["miner"], str)
            and all(_uint(p[k]) for k in ("segment", "version", "share", "nonce", "ts"))):
        raise AttestationError("bad_retrieval_request", "a field of a retrieval request has the wrong type")
    return RetrievalRequest(msg.kid, p["dataset"], p["segment"], p["version"], p["share"], p["miner"], p["nonce"],
                            p["ts"])


def request_id(request: bytes) -> str:
    """What a retrieval answer names its request by: hex SHA-256 of the request's COSE bytes."""
    return hashlib.sha256(request).hexdigest()


def retrieval_answer(miner: Identity, request: bytes, root: str, share: bytes) -> bytes:
    """The miner's signed statement that it served `share` (whose Merkle root is `root`) for `request`."""
    payload = {"v": 1, "request": request_id(request), "root": root, "data_hash": hashlib.sha256(share).hexdigest()}
    return envelope.sign(miner, payload)


def parse_retrieval_answer(data: bytes, public_key: bytes) -> RetrievalAnswer:
    """A `RetrievalAnswer` whose signature verifies with `public_key` (the miner's registered key)."""
    msg = _verified(data, public_key, "retrieval answer")
    p = msg.payload
    _fields(p, {"v", "request", "root", "data_hash"}, "retrieval answer")
    if not all(_hex32(p[k]) for k in ("request", "root", "data_hash")):
        raise AttestationError("bad_retrieval_answer", "request, root and data_hash must be 64 hex digits")
    return RetrievalAnswer(msg.kid, p["request"], p["root"], p["data_hash"])


# -- helpers ----------------------------------------------------------------------------------------

def _verified(data: bytes, public_key: bytes, what: str) -> envelope.Sign1:
    try:
        msg = envelope.parse(data, max_bytes=MAX_ATTESTATION_BYTES)
    except envelope.EnvelopeError as exc:
        raise AttestationError("bad_attestation", f"{what} is not a COSE_Sign1: {exc}") from None
    if device_id_for(public_key) != msg.kid or not msg.verify(public_key):
        raise AttestationError("bad_signature", f"{what} signed by {msg.kid!r} does not verify with the expected key")
    return msg


def _fields(payload: Any, keys: set[str], what: str) -> None:
    if not isinstance(payload, dict) or set(payload) != keys or payload["v"] != 1:
        raise AttestationError("bad_attestation", f"{what} must be a v1 map of exactly {sorted(keys)}")


def _uint(x: Any) -> bool:
    return type(x) is int and 0 <= x < 2**63


def _hex32(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)

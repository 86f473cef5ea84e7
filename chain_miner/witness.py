"""The witness decision, sans-IO: given a new signed checkpoint, a consistency proof from the last one it
cosigned and the new entries, a miner either cosigns or refuses — with evidence when the log misbehaved.

State is the last cosigned tree head (size, root, the log's note) plus its *frontier*: the roots of the
perfect subtrees that make up the tree (at most 64 hashes, RFC 9162 §2.1.1 split). Folding the frontier
gives the root, so the new entries are checked exactly: frontier + leaf hashes of the new entries must
fold to the new root. The consistency proof is checked too, because that is what makes a refusal
verifiable by anyone (see `evidence`).

Never cosigned: a tree smaller than the last cosigned one, a different root for the same size, a tree the
proof does not link to the last one, entries that are not the new leaves, or entries the contract hook
(`verify_entries`) rejects. Fork evidence needs the log's *signed* proof response (`observe(..., proof=)`):
without it the miner still refuses, but has nothing an auditor could check.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from carechain.checkpoint import Checkpoint, NoteSignature
from carechain.cosignature import Cosigner, cosign
from carechain.evidence import Evidence, EvidenceKind, Violation
from carechain.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MAX_PROOF_LENGTH,
    ProofError,
    extend_frontier,
    frontier_root,
    leaf_hash,
    verify_consistency,
)
from carechain.miner_messages import ProofAttestation
from carechain.proofs import VerificationError, verify_checkpoint

# (old_size, new_size, entries old_size..new_size-1) -> a Violation, or None to accept.
EntryVerifier = Callable[[int, int, Sequence[bytes]], Violation | None]


def verify_entries(old_size: int, new_size: int, entries: Sequence[bytes]) -> Violation | None:
    """Default contract hook: accept. Contract re-execution (contract_rules) plugs in here."""
    return None


class RefusalReason(enum.StrEnum):
    """Why a miner did not cosign; stable values for logs, metrics and the evidence topic."""

    BAD_SIGNATURE = "bad_signature"  # not signed by the log key: proves nothing, no evidence
    WRONG_LOG = "wrong_log"  # another origin than the one this miner follows
    STALE = "stale"  # smaller than the last cosigned tree but consistent with it: an old checkpoint
    SPLIT_VIEW = "split_view"  # same size, another root: evidence
    FORK = "fork"  # the proof does not link it to the last cosigned tree: evidence
    BAD_ENTRIES = "bad_entries"  # the served entries are not the new leaves (the responder's fault)
    BAD_RESPONSE = "bad_response"  # a malformed proof, or a wrong one for a log its entries show consistent
    VIOLATION = "violation"  # a contract rule is broken by a new entry: evidence


@dataclass(frozen=True)
class WitnessState:
    """What a miner must remember: the last tree head it cosigned and that tree's frontier."""

    origin: str | None  # None until the first checkpoint pins it
    tree_size: int = 0
    root_hash: bytes = EMPTY_ROOT
    note: str | None = None  # the log-signed checkpoint note last cosigned
    frontier: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ProofRequest:
    """What the miner needs from the log to judge a checkpoint: a proof between the two sizes and, when
    the log grew, the entries `old_size`..`new_size - 1`."""

    old_size: int
    new_size: int


@dataclass(frozen=True)
class Cosigned:
    checkpoint: Checkpoint
    note: str  # the log's note, as received
    cosignature: NoteSignature
    state: WitnessState  # to persist before publishing the cosignature


@dataclass(frozen=True)
class CosignRefused:
    """The miner does not cosign this checkpoint: why, and the evidence when the log misbehaved."""

    reason: RefusalReason
    detail: str
    evidence: Evidence | None = None


class Witness:
    """One miner's witness logic for one log. Pure: no clock, no I/O; the caller persists `state`."""

    def __init__(self, cosigner: Cosigner, sign: Callable[[bytes], bytes], log_public_key: bytes,
                 state: WitnessState, entry_verifier: EntryVerifier = verify_entries) -> None:
        self.cosigner = cosigner
        self._sign = sign
        self.log_public_key = log_public_key
        self.state = state
        self._verify_entries = entry_verifier

    def plan(self, note: str) -> ProofRequest | CosignRefused:
        """Check the log's signature and origin; say which proof and entries to fetch to judge `note`."""
        checked = self._check_note(note)
        if isinstance(checked, CosignRefused):
            return checked
        return ProofRequest(self.state.tree_size, checked.tree_size)

    def observe(self, note: str, consistency_path: Sequence[bytes], entries: Sequence[bytes],
                now: int, proof: ProofAttestation | None = None) -> Cosigned | CosignRefused:
        """Judge `note`. The path proves min(old, new) → max(old, new); `entries` are the new leaves.
        `proof`: the log's signed answer that served the path; fork evidence carries it.

        On `Cosigned`, `self.state` is already the new state: persist it before publishing.
        """
        checked = self._check_note(note)
        if isinstance(checked, CosignRefused):
            return checked
        if len(consistency_path) > MAX_PROOF_LENGTH or any(len(h) != HASH_SIZE for h in consistency_path):
            return CosignRefused(RefusalReason.BAD_RESPONSE, "the consistency proof is malformed")
        cp, st = checked, self.state
        if cp.tree_size == st.tree_size:
            if hmac.compare_digest(cp.root_hash, st.root_hash):
                # Again, with a fresh timestamp; the first checkpoint may be of the empty tree.
                again = WitnessState(cp.origin, st.tree_size, st.root_hash, st.note or note, st.frontier)
                return self._cosign(cp, note, again, now)
            if st.note is None:
                return CosignRefused(RefusalReason.SPLIT_VIEW, "a size-0 checkpoint with a non-empty root")
            return self._evidence(RefusalReason.SPLIT_VIEW, EvidenceKind.SPLIT_VIEW, st.note, note, None, now,
                                  f"two roots signed for tree size {cp.tree_size}")
        if cp.tree_size < st.tree_size:
            try:
                verify_consistency(cp.tree_size, st.tree_size, cp.root_hash, st.root_hash, consistency_path)
            except ProofError as exc:
                assert st.note is not None  # size > 0 means something was cosigned
                return self._fork(note, st.note, consistency_path, proof, now,
                                  f"rollback to {cp.tree_size} is not a prefix of {st.tree_size}: {exc}")
            return CosignRefused(RefusalReason.STALE,
                           f"checkpoint {cp.tree_size} is older than the cosigned {st.tree_size}; nothing to do")
        try:
            verify_consistency(st.tree_size, cp.tree_size, st.root_hash, cp.root_hash, consistency_path)
        except ProofError as exc:
            if st.note is None or self._entries_reach(cp, entries):
                # Nothing to be inconsistent with, or the entries prove the log consistent: a bad proof
                # is then the responder's error, not evidence against the log.
                return CosignRefused(RefusalReason.BAD_RESPONSE, f"consistency proof does not verify: {exc}")
            return self._fork(st.note, note, consistency_path, proof, now, f"{st.tree_size} → {cp.tree_size}: {exc}")
        want = cp.tree_size - st.tree_size
        if len(entries) != want:
            return CosignRefused(RefusalReason.BAD_ENTRIES, f"needed {want} entries, got {len(entries)}")
        frontier = extend_frontier(st.tree_size, st.frontier, [leaf_hash(e) for e in entries])
        if not hmac.compare_digest(frontier_root(frontier), cp.root_hash):
            return CosignRefused(RefusalReason.BAD_ENTRIES,
                           f"entries {st.tree_size}..{cp.tree_size - 1} do not hash to the checkpoint's root")
        violation = self._verify_entries(st.tree_size, cp.tree_size, entries)
        if violation is not None:
            ev = Evidence(kind=EvidenceKind.VIOLATION, miner=self.cosigner.name, observed=now,
                          log_public_key=self.log_public_key.hex(), old_checkpoint=st.note,
                          new_checkpoint=note, old_frontier=[h.hex() for h in st.frontier],
                          entries=[e.hex() for e in entries], violation_leaf=violation.leaf_index,
                          violation_rule=violation.rule, detail=violation.detail)
            return CosignRefused(RefusalReason.VIOLATION, f"leaf {violation.leaf_index}: {violation.rule}: "
                           f"{violation.detail}", ev)
        new_state = WitnessState(cp.origin, cp.tree_size, cp.root_hash, note, frontier)
        return self._cosign(cp, note, new_state, now)

    # -- internals ------------------------------------------------------------------------------------

    def _check_note(self, note: str) -> Checkpoint | CosignRefused:
        try:
            cp = verify_checkpoint(note, self.log_public_key)
        except VerificationError as exc:
            return CosignRefused(RefusalReason.BAD_SIGNATURE, str(exc))
        if self.state.origin is not None and cp.origin != self.state.origin:
            return CosignRefused(RefusalReason.WRONG_LOG, f"origin {cp.origin!r}, this miner follows "
                           f"{self.state.origin!r}")
        return cp

    def _entries_reach(self, cp: Checkpoint, entries: Sequence[bytes]) -> bool:
        st = self.state
        if len(entries) != cp.tree_size - st.tree_size:
            return False
        grown = extend_frontier(st.tree_size, st.frontier, [leaf_hash(e) for e in entries])
        return hmac.compare_digest(frontier_root(grown), cp.root_hash)

    def _cosign(self, cp: Checkpoint, note: str, state: WitnessState, now: int) -> Cosigned:
        line = cosign(cp.body(), self.cosigner, self._sign, now)
        self.state = state
        return Cosigned(cp, note, line, state)

    def _fork(self, old_note: str, new_note: str, path: Sequence[bytes], proof: ProofAttestation | None,
              now: int, detail: str) -> CosignRefused:
        """Refuse a fork; with evidence only when the failing path is the one the log signed."""
        if (proof is None or proof.error is not None or proof.consistency_path != [h.hex() for h in path]
                or not proof.signed_by(self.log_public_key)):
            return CosignRefused(RefusalReason.FORK, f"{detail} (no log-signed proof: no evidence)")
        return self._evidence(RefusalReason.FORK, EvidenceKind.FORK, old_note, new_note, proof, now, detail)

    def _evidence(self, reason: RefusalReason, kind: EvidenceKind, old_note: str, new_note: str,
                  proof: ProofAttestation | None, now: int, detail: str) -> CosignRefused:
        ev = Evidence(kind=kind, miner=self.cosigner.name, observed=now, log_public_key=self.log_public_key.hex(),
                      old_checkpoint=old_note, new_checkpoint=new_note, proof=proof, detail=detail)
        return CosignRefused(reason, detail, ev)

    def void_evidence(self, before: WitnessState, note: str, entries: Sequence[bytes], void: Violation,
                      now: int) -> Evidence:
        """Evidence of a void leaf in a range this miner cosigned (from `before` to `note`, `entries` its
        leaves): the operator appended an entry the contracts record as void."""
        return Evidence(kind=EvidenceKind.VOID, miner=self.cosigner.name, observed=now,
                        log_public_key=self.log_public_key.hex(), old_checkpoint=before.note, new_checkpoint=note,
                        old_frontier=[h.hex() for h in before.frontier], entries=[e.hex() for e in entries],
                        violation_leaf=void.leaf_index, violation_rule=void.rule, detail=void.detail)

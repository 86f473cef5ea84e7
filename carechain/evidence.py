"""Evidence a miner publishes when the log misbehaved, and the check any auditor runs on it.

All evidence rests on material the log key signed, so the log cannot deny it and nobody else can make it:

- `split_view`: two signed checkpoints of the same size with different roots. Self-contained proof.
- `fork`: two signed checkpoints (smaller first) and the log's *signed* answer to a proof request between
  their sizes (`proof`, a `ProofAttestation`), whose consistency path fails. An honest log always proves
  one of its trees extends another, and it never signs a path that does not: random bytes in a path the
  log did not sign prove nothing.
- `violation`: the new checkpoint, the previous one, the previous tree's frontier and the new entries.
  The auditor checks that the frontier folds to the old root and, with the entries appended, to the new
  root — so the entries are exactly the leaves the log signed — then re-executes the contract rules.
  Evidence must fit one MQTT packet, so when all the new entries would not, it carries them only up to
  the violating leaf (`v` 2) plus a consistency proof from that prefix's tree to the new checkpoint.
- `void`: the same material as a violation, for a leaf the contracts record as *void* (docs/contracts.md):
  miners cosign past it, since the leaf changes no contract state, and publish this so that everyone
  sees the operator appended an entry its own gate should have refused.

The miner that found it signs the evidence (`miner_key`, `sig`): that says who reports, not whether it is
true — `verify_evidence` judges the content alone.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from carechain.checkpoint import Checkpoint
from carechain.errors import FixedReasonError
from carechain.identity import PublicKeyError, parse_public_key_hex
from carechain.merkle import EMPTY_ROOT, ProofError, extend_frontier, frontier_root, leaf_hash, verify_consistency
from carechain.miner_messages import ProofAttestation, SignedMessage
from carechain.proofs import VerificationError, verify_checkpoint

_Hex32 = Field(pattern=r"^[0-9a-f]{64}$")
PREFIX_VERSION = 2  # evidence `v` from which a violation may carry a prefix of the new entries


class EvidenceError(FixedReasonError):
    """The evidence does not show what it claims; the message says which check failed."""

    REASON = "bad_evidence"


@dataclass(frozen=True)
class Violation:
    """The first leaf of a range that the contract rules do not accept: what `violation` evidence names.

    Miners' entry verifiers return it (contract_rules.replay.ContractWitness is the standard one).
    """

    leaf_index: int
    rule: str  # the contracts' rejection reason, e.g. "rx_missing"
    detail: str


class EvidenceKind(enum.StrEnum):
    SPLIT_VIEW = "split_view"
    FORK = "fork"
    VIOLATION = "violation"
    VOID = "void"


class Evidence(SignedMessage):
    """JSON on `cc/v1/miner/{id}/evidence` (docs/miners.md), signed by the reporting miner's key."""

    DOMAIN: ClassVar[str] = "carechain/v1/miner-evidence"
    v: int = 1  # 2: a violation's entries stop after the violating leaf (see `verify_evidence`)
    kind: EvidenceKind
    miner: str  # the cosigner name of the miner that found it
    observed: int  # POSIX seconds
    log_public_key: str = _Hex32
    old_checkpoint: str | None  # None only for a violation in the log's first range
    new_checkpoint: str
    consistency_path: list[str] = Field(default_factory=list, max_length=64)  # violation/void prefix (v2) only
    proof: ProofAttestation | None = None  # fork only: the log's signed answer whose path fails
    old_frontier: list[str] = Field(default_factory=list, max_length=64)  # violation only
    entries: list[str] = Field(default_factory=list)  # violation only: hex of leaves old..new-1
    violation_leaf: int | None = None
    violation_rule: str | None = None
    detail: str = ""
    miner_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # the reporting miner's public key


def verify_evidence(ev: Evidence, trusted_log_key: bytes,
                    entry_verifier: Callable[[int, int, Sequence[bytes]], Any] | None = None) -> str:
    """Check evidence against the log key you trust; return what it proves, or raise `EvidenceError`.

    For a violation or a void, pass the contract re-execution as `entry_verifier` (same signature as the
    miner's hook); without it only the entries' membership in the signed tree is checked. A verifier that
    records void leaves instead of returning them (contract_rules.replay.ContractWitness) is read through
    its `voids`.
    """
    try:
        named_key = parse_public_key_hex(ev.log_public_key, "the evidence's log_public_key")
    except PublicKeyError as exc:
        raise EvidenceError(str(exc)) from None
    if not hmac.compare_digest(named_key, trusted_log_key):
        raise EvidenceError("the evidence names another log key than the one you trust")
    new = _checkpoint("new_checkpoint", ev.new_checkpoint, trusted_log_key)
    old = (_checkpoint("old_checkpoint", ev.old_checkpoint, trusted_log_key) if ev.old_checkpoint is not None
           else None)
    if old is not None and old.origin != new.origin:
        raise EvidenceError(f"the checkpoints are from different logs ({old.origin!r}, {new.origin!r})")
    if ev.kind in (EvidenceKind.VIOLATION, EvidenceKind.VOID):
        return _verify_violation(ev, old, new, entry_verifier)
    if old is None:
        raise EvidenceError(f"{ev.kind} evidence needs two checkpoints")
    if old.tree_size > new.tree_size:
        raise EvidenceError("old_checkpoint must be the smaller tree")
    if ev.kind is EvidenceKind.SPLIT_VIEW:
        if old.tree_size != new.tree_size:
            raise EvidenceError("a split view is two checkpoints of the same size")
        if hmac.compare_digest(old.root_hash, new.root_hash):
            raise EvidenceError("the two checkpoints have the same root: no split view")
        return f"split_view: log {new.origin} signed two roots for tree size {new.tree_size}"
    return _verify_fork(ev.proof, old, new, trusted_log_key)


def _verify_fork(proof: ProofAttestation | None, old: Checkpoint, new: Checkpoint, log_key: bytes) -> str:
    """Two signed checkpoints and the log's signed, failing proof between them."""
    if proof is None:
        raise EvidenceError("fork evidence needs the log's signed proof response (`proof`)")
    if not proof.signed_by(log_key):
        raise EvidenceError("the proof response is not signed by the log key: it proves nothing")
    if proof.error is not None:
        raise EvidenceError(f"the log's signed response is an error ({proof.error[:80]!r}), not a proof")
    if sorted((proof.old_size, proof.new_size)) != [old.tree_size, new.tree_size]:
        raise EvidenceError(f"the signed proof is for sizes {proof.old_size} and {proof.new_size}, the checkpoints "
                            f"are {old.tree_size} and {new.tree_size}")
    if old.tree_size == new.tree_size:
        raise EvidenceError("two checkpoints of one size are a split view, not a fork")
    try:
        path = [bytes.fromhex(h) for h in proof.consistency_path]
        verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, path)
    except ProofError as exc:
        return f"fork: log {new.origin} signed {old.tree_size} and {new.tree_size}, inconsistent: {exc}"
    except ValueError:
        raise EvidenceError("the signed consistency_path is not hex") from None
    raise EvidenceError(f"the log's proof shows {new.tree_size} extends {old.tree_size}: the log was consistent")


def _verify_violation(ev: Evidence, old: Checkpoint | None, new: Checkpoint,
                      entry_verifier: Callable[[int, int, Sequence[bytes]], Any] | None) -> str:

    old_size, old_root = (old.tree_size, old.root_hash) if old is not None else (0, EMPTY_ROOT)
    try:
        frontier = [bytes.fromhex(h) for h in ev.old_frontier]
        entries = [bytes.fromhex(e) for e in ev.entries]
    except ValueError:
        raise EvidenceError("old_frontier and entries must be hex") from None
    if len(frontier) != old_size.bit_count() or not hmac.compare_digest(frontier_root(frontier), old_root):
        raise EvidenceError(f"old_frontier is not the frontier of the signed {old_size}-leaf tree")
    end = old_size + len(entries)
    if end > new.tree_size or (end < new.tree_size and ev.v < PREFIX_VERSION):
        raise EvidenceError(f"{len(entries)} entries do not take {old_size} leaves to {new.tree_size}")
    grown = extend_frontier(old_size, frontier, [leaf_hash(e) for e in entries])
    if end == new.tree_size:
        if not hmac.compare_digest(frontier_root(grown), new.root_hash):
            raise EvidenceError("the entries are not the leaves the log signed in new_checkpoint")
    else:  # a prefix: the proof must show the log's new tree extends the prefix's tree
        try:
            path = [bytes.fromhex(h) for h in ev.consistency_path]
            verify_consistency(end, new.tree_size, frontier_root(grown), new.root_hash, path)
        except (ProofError, ValueError) as exc:
            raise EvidenceError(f"the entries {old_size}..{end - 1} are not a prefix of the leaves the log "
                                f"signed in new_checkpoint: {exc}") from None
    leaf = ev.violation_leaf
    if leaf is None or not old_size <= leaf < end:
        raise EvidenceError(f"violation_leaf {leaf} is not in the entries' range {old_size}..{end - 1}")
    if entry_verifier is None:
        return (f"violation: leaves {old_size}..{new.tree_size - 1} are in the signed log; re-execute the "
                f"contracts to confirm {ev.violation_rule} at leaf {leaf}")
    found = entry_verifier(old_size, end, entries)
    if ev.kind is EvidenceKind.VOID:
        found_leaves = {getattr(v, "leaf_index", None) for v in [found, *getattr(entry_verifier, "voids", ())]}
        if leaf not in found_leaves:
            raise EvidenceError(f"re-executing the contracts finds no void leaf at {leaf}")
        return f"void: leaf {leaf} of log {new.origin} breaks {ev.violation_rule}; the operator appended it"
    if found is None or getattr(found, "leaf_index", None) != leaf:
        raise EvidenceError(f"re-executing the contracts finds no violation at leaf {leaf}")
    return f"violation: leaf {leaf} of log {new.origin} breaks {ev.violation_rule}"


def shrink_violation(ev: Evidence, old_size: int, prefix_path: Sequence[bytes]) -> Evidence:
    """`ev` (a violation of the range from `old_size`) with its entries cut after the violating leaf, and
    `prefix_path`: the log's consistency proof from that prefix's tree to the new checkpoint's tree. What
    fits one packet when all the entries would not; `verify_evidence` checks it the same way."""
    if ev.kind not in (EvidenceKind.VIOLATION, EvidenceKind.VOID) or ev.violation_leaf is None:
        raise ValueError("only violation evidence carries entries")
    keep = ev.violation_leaf - old_size + 1
    return ev.model_copy(update={"v": PREFIX_VERSION, "entries": ev.entries[:keep], "sig": None,
                                 "consistency_path": [h.hex() for h in prefix_path]})


def _checkpoint(what: str, note: str, key: bytes) -> Checkpoint:
    try:
        return verify_checkpoint(note, key)
    except VerificationError as exc:
        raise EvidenceError(f"{what}: {exc}") from None

"""The active miner set, read from the ledger (a library for rule modules and parties, not a rule module).

Who may cosign, hold shares and earn is decided by the ledger alone, never by a bridge's config: a miner
is *active* while it is a registered party with role "miner", `bonds.is_admitted` (bond at least the
minimum, not suspended) and has not failed an audit in the current storage epoch (`storage_v2` counts
audits in table `storage_counts`; a failed miner is back in the set once the epoch is settled).

A checkpoint is *final* when a genesis operator key (the bridge's log key is listed there) signed it and a
majority of the active miners (`finality_threshold`) cosigned it. `final_note` checks that and returns what
callers need (size, root, the cosigners, and the storage seed `carechain.seed.checkpoint_seed` over all the
note's signature lines, exactly as for the note the bridge publishes), so the access grant, placement in
`storage.commit`, audits, `checkpoint.final` and the bridge's finality all read finality the same way.

Epoch bookkeeping used by the storage rules also lives here, because the active set depends on it:
table `storage` key "epoch" is the current storage epoch (0 before any `storage.settle`; on a ledger that
settled v1 epochs, the one after its "last_epoch"), and `storage_counts` holds integer counters keyed
"<epoch>:<kind>:<miner id>" (kinds in `COUNT_KINDS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from carechain.checkpoint import Checkpoint, CheckpointError, NoteError, key_hash, parse_note
from carechain.cosignature import CosignatureError, Cosigner, cosignature_timestamp
from carechain.identity import SIGNATURE_SIZE, verify_signature
from carechain.seed import checkpoint_seed
from contract_rules import bonds
from contract_rules.runtime import State

COUNTS = "storage_counts"
# What `storage_counts` counts per (epoch, miner): cosignatures of recorded final checkpoints, audits passed
# and failed, retrievals answered and left unanswered.
COUNT_KINDS = ("cosig", "audit_passed", "audit_failed", "answered", "unanswered")


def current_epoch(state: State) -> int:
    """The storage epoch now open: the one the next `storage.settle` closes."""
    meta = state.table("storage")
    epoch = meta.get("epoch")
    if epoch is not None:
        return int(epoch)
    last_v1 = meta.get("last_epoch")  # a ledger that settled epochs with the v1 rules
    return 0 if last_v1 is None else int(last_v1) + 1


def count_key(epoch: int, kind: str, miner: str) -> str:
    if kind not in COUNT_KINDS:
        raise ValueError(f"unknown storage count {kind!r}; kinds: {', '.join(COUNT_KINDS)}")
    return f"{epoch}:{kind}:{miner}"


def count(state: State, epoch: int, kind: str, miner: str) -> int:
    """How many `kind` events the ledger holds for `miner` in `epoch`."""
    return int(state.table(COUNTS).get(count_key(epoch, kind, miner), 0))


def failed_this_epoch(state: State, miner: str) -> bool:
    """Whether `miner` failed an audit in the current storage epoch (it is out of the active set until settled)."""
    return count(state, current_epoch(state), "audit_failed", miner) > 0


def registered_miners(state: State) -> list[str]:
    """The party ids of every registered miner, sorted, admitted or not."""
    return sorted(state.table("miner_ids"))  # kept by the core's party registration


def active_miners(state: State) -> list[str]:
    """Sorted party ids of the miners that may cosign, hold shares and earn now (see the module docstring)."""
    return [m for m in registered_miners(state) if bonds.is_admitted(state, m) and not failed_this_epoch(state, m)]


def miner_keys(state: State) -> dict[str, bytes]:
    """Active miner id → its registered Ed25519 public key, in id order."""
    parties = state.table("parties")
    return {m: bytes(parties[m]["pk"]) for m in active_miners(state)}


def final_size(state: State) -> int:
    """The tree size of the latest final checkpoint recorded on the ledger (0: none); leaves below it are final.

    Recorded by `checkpoint.final` entries, whose note the rules (storage v2) checked when it was appended:
    signed by the log and cosigned by a majority of the miners active then.
    """
    last = state.table("final").get("last")
    return 0 if last is None else int(last["size"])


def finality_threshold(n: int) -> int:
    """Cosignatures a checkpoint needs from `n` active miners to be final: a strict majority."""
    return n // 2 + 1


@dataclass(frozen=True)
class FinalNote:
    """A checkpoint note found final against the ledger."""

    size: int
    root: bytes
    cosigners: tuple[str, ...]  # active miners whose cosignature verified, sorted
    seed: bytes  # carechain.seed.checkpoint_seed of the note: its body and all its signature lines


def final_note(state: State, note: str, index: int | None = None) -> FinalNote | str:
    """The note as a `FinalNote`, or the reason it is not final against `state`.

    Reasons: "bad_seed_checkpoint" (not a checkpoint note), "seed_checkpoint_from_the_future" (its tree
    size is beyond `index`, default the state's size: a rule judging leaf i passes i),
    "seed_checkpoint_not_signed_by_the_bridge", "seed_checkpoint_not_final" (fewer than
    `finality_threshold` of the active miners cosigned, or there are no active miners). Signature lines by
    other keys are ignored, as the signed-note spec asks, but they still count in the seed.
    """
    try:
        body, signatures = parse_note(note)
        checkpoint = Checkpoint.parse(body)
    except (NoteError, CheckpointError):
        return "bad_seed_checkpoint"
    if checkpoint.tree_size > (state.size if index is None else index):
        return "seed_checkpoint_from_the_future"
    message = body.encode()
    keys = miner_keys(state)
    log_signed = False
    cosigned: set[str] = set()
    for sig in signatures:
        for public_key in state.operators.values():
            try:
                expected = key_hash(sig.name, public_key)
            except NoteError:
                break  # not a valid key name: no operator signed this line
            if (sig.key_hash == expected and len(sig.signature) == SIGNATURE_SIZE
                    and verify_signature(public_key, message, sig.signature)):
                log_signed = True
        for miner, public_key in keys.items():
            try:
                cosigner = Cosigner(sig.name, public_key)
            except CosignatureError:
                break  # the name is not a cosigner name: no miner signed this line
            if cosignature_timestamp(body, sig, cosigner) is not None:
                cosigned.add(miner)
    if not log_signed:
        return "seed_checkpoint_not_signed_by_the_bridge"
    if not keys or len(cosigned) < finality_threshold(len(keys)):
        return "seed_checkpoint_not_final"
    seed = checkpoint_seed(body, [sig.signature for sig in signatures])
    return FinalNote(checkpoint.tree_size, checkpoint.root_hash, tuple(sorted(cosigned)), seed)


def verify_final_note(state: State, note: str, index: int | None = None) -> bytes | str:
    """The storage seed of a note that is final against `state` (see `final_note`), or the reason it is not."""
    final = final_note(state, note, index)
    return final if isinstance(final, str) else final.seed

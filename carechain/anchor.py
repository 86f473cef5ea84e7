"""Public anchoring of checkpoints on an Ethereum-compatible chain: the sans-IO core (docs/anchoring.md).

Three pure pieces, shared by the bridge's anchorer (`chain_bridge.anchoring`) and `carechain verify anchor`:

- **the calldata codec**: what one anchor transaction carries. A domain tag, then the log's signed tree head
  — tree size, root hash, the log key's signature line over the checkpoint body, and the origin — so that an
  anchor is the log's own statement whoever paid its gas, and checks with the log key alone:

      "carechain.anchor/v1" 0x00   20 bytes, the domain tag (a version bump changes it)
      tree size                    8 bytes, unsigned big-endian
      root hash                    32 bytes, RFC 9162 SHA-256 root of the first `tree size` leaves
      key id ‖ Ed25519 signature   4 + 64 bytes: the log's signed-note signature over the checkpoint body
      origin                       the rest, UTF-8 (1..MAX_ORIGIN_BYTES): the checkpoint's first line

- **the schedule**: when the next anchor is due — after `every_checkpoints` new checkpoints or `every_s`
  seconds since the last anchor, whichever comes first, and only when the log has a checkpoint the last
  anchor does not cover. Never per event: one transaction covers every checkpoint before it.

- **the "covered by" check**: a checkpoint of size m is covered by an anchor of size n ≥ m when the anchor
  carries the log's signature, names the same origin, and a consistency proof from (m, root_m) to
  (n, root_n) holds; and the anchor counts when its transaction succeeded in a block of the chain the node
  follows now, with at least the required confirmations on top (`check_inclusion`).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from carechain.checkpoint import KEY_ID_SIZE, Checkpoint, NoteError, NoteSignature, parse_note
from carechain.errors import FixedReasonError
from carechain.identity import SIGNATURE_SIZE
from carechain.merkle import HASH_SIZE, ProofError, verify_consistency
from carechain.proofs import VerificationError, verify_checkpoint

ANCHOR_TAG = b"carechain.anchor/v1\x00"
MAX_ORIGIN_BYTES = 255
_FIXED = len(ANCHOR_TAG) + 8 + HASH_SIZE + KEY_ID_SIZE + SIGNATURE_SIZE

# Gas of a plain transaction (to an account without code): the base cost, and the calldata's cost, the larger of
# the standard price (EIP-2028: 4 per zero byte, 16 per other byte) and the floor of EIP-7623 (Prague: 10 per
# token, a token being a zero byte or a quarter of another byte). Chains before Prague charge the standard.
TX_BASE_GAS = 21_000


class AnchorError(FixedReasonError):
    """An anchor that does not hold (bad calldata, wrong signature, not covering, not confirmed); the message
    says which check failed."""

    REASON = "not_anchored"


@dataclass(frozen=True)
class Anchor:
    """One anchored tree head: the log's (origin, size, root) and its signature over that checkpoint body."""

    origin: str
    tree_size: int
    root_hash: bytes
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not 1 <= len(self.origin.encode()) <= MAX_ORIGIN_BYTES:
            raise AnchorError(f"anchor origin must be 1 to {MAX_ORIGIN_BYTES} bytes of UTF-8, got "
                              f"{len(self.origin.encode())}")
        if not 0 <= self.tree_size < 2**64:
            raise AnchorError(f"anchor tree size {self.tree_size} is out of range")
        lengths = (len(self.root_hash), len(self.key_id), len(self.signature))
        if lengths != (HASH_SIZE, KEY_ID_SIZE, SIGNATURE_SIZE):
            raise AnchorError("anchor root hash, key id or signature has the wrong length")

    @property
    def checkpoint(self) -> Checkpoint:
        """The anchored tree head (raises `CheckpointError` if the origin is not a valid checkpoint line)."""
        return Checkpoint(self.origin, self.tree_size, self.root_hash)

    def note(self) -> str:
        """The signed note this anchor carries: the checkpoint body and the log's one signature line."""
        body = self.checkpoint.body()
        return body + "\n" + NoteSignature(self.origin, self.key_id, self.signature).line()

    def verify(self, log_public_key: bytes) -> Checkpoint:
        """The anchored checkpoint, once the log key's signature over it is checked."""
        try:
            return verify_checkpoint(self.note(), log_public_key)
        except (VerificationError, ValueError) as exc:
            raise AnchorError(f"the anchor is not signed by the log key: {exc}") from None


def anchor_of_note(note: str) -> Anchor:
    """The anchor for a log-signed checkpoint note (cosignature lines are left out: the log's line suffices).

    The log signs its checkpoints with the origin as key name; only plain three-line bodies are anchored (an
    extension line would not be covered by the calldata, so the signature could not be checked from it).
    """
    try:
        body, signatures = parse_note(note)
        cp = Checkpoint.parse(body)
    except (NoteError, ValueError) as exc:
        raise AnchorError(f"not a checkpoint note: {exc}") from None
    if cp.extensions:
        raise AnchorError("a checkpoint with extension lines cannot be anchored (the calldata carries three lines)")
    ours = [s for s in signatures if s.name == cp.origin]
    if not ours:
        raise AnchorError(f"the note carries no signature by its origin {cp.origin!r} (the log key's name)")
    sig = ours[0]
    return Anchor(cp.origin, cp.tree_size, cp.root_hash, sig.key_hash, sig.signature)


def encode_calldata(anchor: Anchor) -> bytes:
    """The transaction input that anchors `anchor` (layout in the module docstring)."""
    return b"".join((ANCHOR_TAG, anchor.tree_size.to_bytes(8, "big"), anchor.root_hash, anchor.key_id,
                     anchor.signature, anchor.origin.encode()))


def decode_calldata(data: bytes) -> Anchor:
    """Parse a transaction input as an anchor; `AnchorError` says why it is not one."""
    if not data.startswith(ANCHOR_TAG):
        raise AnchorError(f"the transaction input is not a carechain anchor (it does not start with "
                          f"{ANCHOR_TAG[:-1].decode()!r})")
    if len(data) < _FIXED + 1 or len(data) > _FIXED + MAX_ORIGIN_BYTES:
        raise AnchorError(f"a carechain anchor is {_FIXED + 1} to {_FIXED + MAX_ORIGIN_BYTES} bytes, "
                          f"this input is {len(data)}")
    at = len(ANCHOR_TAG)
    size = int.from_bytes(data[at:at + 8], "big")
    at += 8
    root, at = data[at:at + HASH_SIZE], at + HASH_SIZE
    key_id, at = data[at:at + KEY_ID_SIZE], at + KEY_ID_SIZE
    signature, at = data[at:at + SIGNATURE_SIZE], at + SIGNATURE_SIZE
    try:
        origin = data[at:].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise AnchorError("the anchor's origin is not UTF-8") from None
    return Anchor(origin, size, root, key_id, signature)


def calldata_gas(data: bytes) -> int:
    """Gas a plain transaction carrying `data` uses: the base cost plus the calldata's (standard or floor)."""
    zeros = data.count(0)
    others = len(data) - zeros
    return TX_BASE_GAS + max(4 * zeros + 16 * others, 10 * (zeros + 4 * others))


@dataclass
class AnchorSchedule:
    """When the next anchor is due: after `every_checkpoints` checkpoints or `every_s` seconds, whichever first.

    Fed with the time (seconds, any clock the caller keeps monotonic across its own life) and the tree size of
    the latest checkpoint. `anchored_at` None means no anchor yet (or the last one failed): the next checkpoint
    is anchored at once — the caller's retry backoff keeps failures from becoming a stream of transactions.
    """

    every_checkpoints: int
    every_s: float
    anchored_size: int = -1  # tree size of the last anchor sent (-1: none)
    anchored_at: float | None = None
    checkpoints_since: int = 0
    _confirmed_size: int = -1

    def __post_init__(self) -> None:
        if self.every_checkpoints < 1 or self.every_s <= 0:
            raise ValueError("every_checkpoints must be at least 1 and every_s positive")

    def checkpoint_issued(self) -> None:
        self.checkpoints_since += 1

    def due(self, now_s: float, latest_size: int) -> bool:
        if latest_size <= self.anchored_size:
            return False  # the last anchor already covers every checkpoint there is
        if self.anchored_at is None:
            return True
        return self.checkpoints_since >= self.every_checkpoints or now_s - self.anchored_at >= self.every_s

    def sent(self, tree_size: int, now_s: float) -> None:
        """An anchor of `tree_size` went out at `now_s`."""
        self.anchored_size, self.anchored_at, self.checkpoints_since = tree_size, now_s, 0

    def succeeded(self, tree_size: int) -> None:
        self._confirmed_size = max(self._confirmed_size, tree_size)

    def failed(self) -> None:
        """The last anchor reverted or was dropped: due again (after the caller's backoff)."""
        self.anchored_size, self.anchored_at = self._confirmed_size, None


@dataclass(frozen=True)
class ChainFacts:
    """What the chain says about one transaction, as a node answered (`chain_bridge.anchoring` fetches it)."""

    tx_hash: bytes
    chain_id: int
    sender: str
    to: str | None
    input: bytes
    status: int | None  # receipt status: 1 succeeded, 0 reverted, None not mined
    block_number: int | None
    block_hash: bytes | None  # from the receipt
    canonical_hash: bytes | None  # the hash of the block at `block_number` on the node's chain now
    block_timestamp: int | None  # seconds since the epoch
    head_number: int


@dataclass(frozen=True)
class Coverage:
    """A checkpoint covered by an anchor transaction: the anchored head, where, when, how deep."""

    checkpoint: Checkpoint
    anchored: Checkpoint
    tx_hash: bytes
    chain_id: int
    sender: str
    block_number: int
    block_timestamp: int
    confirmations: int

    def as_dict(self) -> dict[str, object]:
        return {"tree_size": self.checkpoint.tree_size, "anchored_size": self.anchored.tree_size,
                "anchored_root": self.anchored.root_hash.hex(), "origin": self.anchored.origin,
                "tx": "0x" + self.tx_hash.hex(), "chain_id": self.chain_id, "sender": self.sender,
                "block": self.block_number, "block_timestamp": self.block_timestamp,
                "confirmations": self.confirmations}


def check_inclusion(facts: ChainFacts, min_confirmations: int, *, chain_id: int | None = None,
                    sender: str | None = None) -> int:
    """The transaction's confirmations, once it is known to have succeeded in a block of the current chain."""
    tx = "0x" + facts.tx_hash.hex()
    if chain_id is not None and facts.chain_id != chain_id:
        raise AnchorError(f"the node is on chain {facts.chain_id}, not on chain {chain_id} as asked")
    if sender is not None and facts.sender.lower() != sender.lower():
        raise AnchorError(f"transaction {tx} was sent by {facts.sender}, not by the anchoring account {sender}")
    if facts.status is None or facts.block_number is None or facts.block_hash is None:
        raise AnchorError(f"transaction {tx} is not mined yet: try again later")
    if facts.status != 1:
        raise AnchorError(f"transaction {tx} reverted in block {facts.block_number}: it anchors nothing")
    if facts.canonical_hash is None or not hmac.compare_digest(facts.canonical_hash, facts.block_hash):
        raise AnchorError(f"transaction {tx}'s block {facts.block_number} is no longer on the node's chain "
                          "(reorganised away): wait for it to be mined again, or use a later anchor")
    confirmations = facts.head_number - facts.block_number + 1
    if confirmations < min_confirmations:
        raise AnchorError(f"transaction {tx} has {confirmations} confirmation(s), fewer than the "
                          f"{min_confirmations} asked: try again later")
    return confirmations


def check_covered(checkpoint: Checkpoint, anchored: Checkpoint, consistency_path: Sequence[bytes]) -> None:
    """The anchored head (already verified with the log key) extends `checkpoint`: same log, size ≥, and
    the consistency proof from the checkpoint to it holds."""
    if checkpoint.origin != anchored.origin:
        raise AnchorError(f"the anchor is for log {anchored.origin!r}, the checkpoint for {checkpoint.origin!r}")
    if anchored.tree_size < checkpoint.tree_size:
        raise AnchorError(f"the anchor's tree size {anchored.tree_size} is smaller than the checkpoint's "
                          f"{checkpoint.tree_size}: it cannot cover it (use a later anchor)")
    try:
        verify_consistency(checkpoint.tree_size, anchored.tree_size, checkpoint.root_hash, anchored.root_hash,
                           consistency_path)
    except ProofError as exc:
        raise AnchorError(f"the anchored tree ({anchored.tree_size}) does not extend the checkpoint "
                          f"({checkpoint.tree_size}): {exc}. If both are signed by the log key, they are a fork: "
                          "keep both as evidence") from None


def verify_coverage(facts: ChainFacts, checkpoint: Checkpoint, log_public_key: bytes,
                    consistency_path: Sequence[bytes], min_confirmations: int, *, chain_id: int | None = None,
                    sender: str | None = None) -> Coverage:
    """Every check at once: the transaction is confirmed, carries a log-signed anchor, and that anchor covers
    `checkpoint` (itself verified by the caller with the log key) through `consistency_path`."""
    confirmations = check_inclusion(facts, min_confirmations, chain_id=chain_id, sender=sender)
    anchored = decode_calldata(facts.input).verify(log_public_key)
    check_covered(checkpoint, anchored, consistency_path)
    assert facts.block_number is not None and facts.block_timestamp is not None  # check_inclusion saw them
    return Coverage(checkpoint, anchored, facts.tx_hash, facts.chain_id, facts.sender, facts.block_number,
                    facts.block_timestamp, confirmations)

"""Storage audits: checkpoint-seeded chunk challenges, miners' answers, their verification, and the math.

Each epoch a miner is asked for `c` chunks drawn uniformly, independently and with replacement from all the
chunks it holds (share picked with weight = its chunk count), seeded by the epoch's final checkpoint, so
neither the bridge nor the miner can predict them. The answer is the chunk and its RFC 9162 inclusion
proof against the share root recorded in the manifest; `verify_answer` checks it with `carechain.merkle`.

A miner that lost (or never stored) a fraction f of its chunks answers each challenge with probability at
most 1 - f, so c independent challenges catch it with probability 1 - (1 - f)^c; `challenges_needed` is the
smallest c that reaches a target (99.9 % by default).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from carechain.merkle import HASH_SIZE, ProofError, leaf_hash, verify_inclusion
from carechain.seed import uniform_below
from carechain.storage.codec import StorageError, chunks, share_tree

TARGET = 0.999
# Per-challenge wire overhead beyond chunk and proof: ids, indexes, CBOR framing, signature on the answer.
ANSWER_OVERHEAD = 128


@dataclass(frozen=True, order=True)
class ShareRef:
    """One share a miner holds, with what is needed to challenge and check it."""

    dataset_id: str
    segment: int
    version: int
    share: int
    root: bytes
    length: int


@dataclass(frozen=True)
class Challenge:
    ref: ShareRef
    chunk: int


@dataclass(frozen=True)
class Answer:
    chunk: bytes
    proof: tuple[bytes, ...]


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def chunk_count(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def draw_challenges(
    seed: bytes, miner: str, holdings: Sequence[ShareRef], count: int, chunk_size: int
) -> list[Challenge]:
    """`count` challenges for `miner`, uniform over every chunk of its `holdings`, fixed by `seed`."""
    if not holdings:
        return []
    refs = sorted(set(holdings))  # the order holdings are listed in must not change the draw
    cumulative: list[int] = []
    total = 0
    for r in refs:
        total += chunk_count(r.length, chunk_size)
        cumulative.append(total)
    out = []
    for j in range(count):
        x = uniform_below(seed, "audit", total, miner, j)
        i = bisect.bisect_right(cumulative, x)
        start = cumulative[i - 1] if i else 0
        out.append(Challenge(refs[i], x - start))
    return out


class StoredShare:
    """A miner's copy of one share, with its Merkle tree built once to answer many challenges."""

    def __init__(self, share: bytes, chunk_size: int) -> None:
        self._chunks = chunks(share, chunk_size)
        self._tree = share_tree(share, chunk_size)

    def answer(self, chunk_index: int) -> Answer:
        """Chunk `chunk_index` with its inclusion proof."""
        if not 0 <= chunk_index < self._tree.size:
            raise StorageError(f"chunk {chunk_index} is outside a share of {self._tree.size} chunks")
        return Answer(self._chunks[chunk_index], tuple(self._tree.inclusion_proof(chunk_index)))


def answer_challenge(share: bytes, chunk_index: int, chunk_size: int) -> Answer:
    """The miner's side: chunk `chunk_index` of `share` with its inclusion proof."""
    return StoredShare(share, chunk_size).answer(chunk_index)


def verify_answer(challenge: Challenge, answer: Answer | None, chunk_size: int) -> Verdict:
    """Check a miner's answer against the root recorded for the share; `None` (no answer) fails."""
    ref = challenge.ref
    where = f"{ref.dataset_id!r} segment {ref.segment} v{ref.version} share {ref.share} chunk {challenge.chunk}"
    if answer is None:
        return Verdict(False, f"{where}: no answer")
    n = chunk_count(ref.length, chunk_size)
    want = min(chunk_size, ref.length - challenge.chunk * chunk_size)
    if len(answer.chunk) != want:
        return Verdict(False, f"{where}: chunk has {len(answer.chunk)} bytes, expected {want}")
    try:
        verify_inclusion(challenge.chunk, n, leaf_hash(answer.chunk), answer.proof, ref.root)
    except ProofError as e:
        return Verdict(False, f"{where}: {e}")
    return Verdict(True, f"{where}: ok")


def detection_probability(missing_fraction: float, challenges: int) -> float:
    """Probability that `challenges` independent uniform challenges hit at least one missing chunk."""
    return 1.0 - (1.0 - missing_fraction) ** challenges


def challenges_needed(missing_fraction: float, target: float = TARGET) -> int:
    """Smallest c with 1 - (1 - f)^c >= target."""
    if not 0 < missing_fraction <= 1 or not 0 < target < 1:
        raise ValueError(f"need 0 < f <= 1 and 0 < target < 1, got f={missing_fraction} target={target}")
    if missing_fraction == 1:
        return 1
    c = math.ceil(math.log1p(-target) / math.log1p(-missing_fraction))
    while detection_probability(missing_fraction, c) < target:  # guard against float rounding
        c += 1
    return c


def proof_hashes(chunks_per_share: int) -> int:
    """Hashes in an inclusion proof in a tree of that many leaves (at most ceil(log2))."""
    return max(0, (chunks_per_share - 1).bit_length())


def bytes_per_challenge(chunk_size: int, chunks_per_share: int, overhead: int = ANSWER_OVERHEAD) -> int:
    """Answer size: the chunk, ceil(log2(chunks)) × 32 bytes of proof, and framing."""
    return chunk_size + proof_hashes(chunks_per_share) * HASH_SIZE + overhead


@dataclass(frozen=True)
class AuditSchedule:
    """How often miners are audited. Default: one epoch per day, c = challenges_needed(1 %) per miner, so a
    miner missing 1 % of its chunks is caught within a day with 99.9 % probability."""

    challenges_per_miner_epoch: int = challenges_needed(0.01)
    epochs_per_month: int = 30

    def bytes_per_miner_month(self, chunk_size: int, chunks_per_share: int) -> int:
        per_challenge = bytes_per_challenge(chunk_size, chunks_per_share)
        return self.challenges_per_miner_epoch * self.epochs_per_month * per_challenge

    def bytes_per_tb_month(self, chunk_size: int, chunks_per_share: int, tb_per_miner: float = 1.0) -> float:
        """Audit traffic per TB of shares stored per month, for miners each holding `tb_per_miner` TB.

        Challenges are per miner, not per byte, so the cost per TB falls as miners grow."""
        return self.bytes_per_miner_month(chunk_size, chunks_per_share) / tb_per_miner

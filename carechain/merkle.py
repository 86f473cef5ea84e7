"""RFC 9162 Merkle tree hashing and proof verification, used offline by `carechain verify`.

Hashing is RFC 9162 §2.1.1 with SHA-256: a leaf is `H(0x00 ‖ data)`, an interior node `H(0x01 ‖ l ‖ r)`
and the empty tree `H("")`. The verifiers follow RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2
(consistency) step by step; they share nothing with the proof generator in `carechain.merkle_tree`
except these hash functions, so each checks the other.

Every check raises `ProofError` saying what was wrong; nothing here returns a bare `False`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from carechain.errors import FixedReasonError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
# A tree can hold at most 2**64 - 1 leaves (sizes are uint64 on the wire), so no proof needs more than 64
# hashes; a longer one is garbage or an attack on the verifier's time.
MAX_PROOF_LENGTH = 64
MAX_TREE_SIZE = 2**64 - 1

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


class ProofError(FixedReasonError):
    """A Merkle proof, or an input to its verification, is invalid."""

    REASON = "bad_proof"


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 ‖ data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def inclusion_proof_length(index: int, tree_size: int) -> int:
    """Number of hashes in the RFC 9162 inclusion proof for leaf `index` in a tree of `tree_size` leaves."""
    _check_size("tree_size", tree_size)
    if not 0 <= index < tree_size:
        raise ProofError(f"leaf index {index} is outside a tree of {tree_size} leaves")
    # Levels below the point where the paths to `index` and to the last leaf diverge each contribute a
    # sibling; above it, only the levels where the path turns right (set bits) do.
    inner = (index ^ (tree_size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_length(size1: int, size2: int) -> int:
    """Number of hashes in the RFC 9162 consistency proof from `size1` to `size2` leaves."""
    _check_size("size1", size1)
    _check_size("size2", size2)
    if size1 > size2:
        raise ProofError(f"size1 {size1} is larger than size2 {size2}: a log never shrinks")
    if size1 == 0 or size1 == size2:
        return 0
    # The proof is the inclusion proof of leaf size1-1 in the size2 tree, minus the levels inside the
    # largest complete subtree ending at size1 (its root is known as root1 or sent once instead).
    shift = (size1 & -size1).bit_length() - 1
    length = inclusion_proof_length(size1 - 1, size2) - shift
    return length if size1 == 1 << shift else length + 1


def root_from_inclusion_proof(index: int, tree_size: int, leaf_hash: bytes, path: Sequence[bytes]) -> bytes:
    """Root hash implied by an inclusion `path` for `leaf_hash` at `index` (RFC 9162 §2.1.3.2).

    Only meaningful when compared with a trusted root: use `verify_inclusion` for that.
    """
    _check_size("tree_size", tree_size)
    if not isinstance(index, int) or not 0 <= index < tree_size:
        raise ProofError(
            f"leaf index {index} is outside a tree of {tree_size} leaves; "
            "check that the proof was requested for the right checkpoint"
        )
    _check_hash("leaf hash", leaf_hash)
    _check_path(path)
    want = inclusion_proof_length(index, tree_size)
    if len(path) != want:
        raise ProofError(
            f"inclusion proof for leaf {index} in a tree of {tree_size} leaves must have {want} hashes, "
            f"got {len(path)}"
        )
    fn, sn, r = index, tree_size - 1, leaf_hash
    for p in path:
        if sn == 0:  # unreachable after the length check; kept because it is the RFC's own guard
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # On the right edge of a tree whose size is not a power of two, a node may have no right
            # sibling at several levels: skip them.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(
    index: int, tree_size: int, leaf_hash: bytes, path: Sequence[bytes], root: bytes
) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `tree_size` leaves whose root is `root`.

    Raises `ProofError` if not.
    """
    _check_hash("root hash", root)
    computed = root_from_inclusion_proof(index, tree_size, leaf_hash, path)
    if not hmac.compare_digest(computed, root):
        raise ProofError(
            f"inclusion proof for leaf {index} does not lead to the expected root of the "
            f"{tree_size}-leaf tree: the leaf, the proof or the checkpoint is not what the log committed to"
        )


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Check that the tree (`size2`, `root2`) extends the tree (`size1`, `root1`) (RFC 9162 §2.1.4.2).

    RFC 9162 defines consistency proofs only for 0 < size1 < size2. The other cases, as in Trillian
    and transparency-dev/merkle: equal sizes need an empty proof and equal roots; an empty first tree is
    a prefix of every tree, so it needs an empty proof — and, stricter than transparency-dev, root1 must
    be the empty-tree hash (RFC 9162 §2.1.1), since any other root for size 0 is not a real tree head.
    Raises `ProofError` if the proof does not hold.
    """
    _check_size("size1", size1)
    _check_size("size2", size2)
    _check_hash("root1", root1)
    _check_hash("root2", root2)
    _check_path(proof)
    if size1 > size2:
        raise ProofError(
            f"size1 {size1} is larger than size2 {size2}: a log never shrinks, so this is a rollback"
        )
    if size1 == 0:
        if proof:
            raise ProofError(
                f"a consistency proof from the empty tree must be empty, got {len(proof)} hashes"
            )
        if not hmac.compare_digest(root1, EMPTY_ROOT):
            raise ProofError('root1 is not the empty-tree hash SHA-256(""), so it is no valid head of size 0')
        if size2 == 0 and not hmac.compare_digest(root2, EMPTY_ROOT):
            raise ProofError('root2 is not the empty-tree hash SHA-256(""), so it is no valid head of size 0')
        return
    if size1 == size2:
        if proof:
            raise ProofError(
                f"a consistency proof between equal sizes must be empty, got {len(proof)} hashes"
            )
        if not hmac.compare_digest(root1, root2):
            raise ProofError(
                f"two different roots for the same size {size1}: the log has forked (equivocation)"
            )
        return
    want = consistency_proof_length(size1, size2)
    if len(proof) != want:
        raise ProofError(
            f"consistency proof from {size1} to {size2} leaves must have {want} hashes, got {len(proof)}"
        )

    # RFC 9162 §2.1.4.2, steps 1-7.
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: root1 is itself the first node of the proof
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # unreachable after the length check; kept because it is the RFC's own guard
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if not hmac.compare_digest(fr, root1):
        raise ProofError(
            f"consistency proof does not reproduce root1 of the {size1}-leaf tree: the proof is wrong, "
            "or the older checkpoint is not a prefix of the newer one"
        )
    if not hmac.compare_digest(sr, root2):
        raise ProofError(
            f"consistency proof does not reproduce root2 of the {size2}-leaf tree: the log may have "
            "rewritten history (keep both checkpoints as evidence)"
        )


def _check_size(what: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise ProofError(f"{what} must be an integer between 0 and 2**64-1, got {size!r}")


def _check_hash(what: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != HASH_SIZE:
        size = len(value) if isinstance(value, bytes | bytearray | memoryview) else type(value).__name__
        raise ProofError(f"{what} must be a {HASH_SIZE}-byte SHA-256 hash, got {size}")


def _check_path(path: Sequence[bytes]) -> None:
    if len(path) > MAX_PROOF_LENGTH:
        raise ProofError(f"proof has {len(path)} hashes; no proof in a 2**64-leaf tree needs more than 64")
    for i, p in enumerate(path):
        _check_hash(f"proof element {i}", p)


# -- frontier (compact range from leaf 0: the miners' state and evidence) ------------------------------------


def extend_frontier(size: int, frontier: Sequence[bytes], leaf_hashes: Sequence[bytes]) -> tuple[bytes, ...]:
    """The frontier of the tree of `size` leaves with `leaf_hashes` appended.

    The frontier holds one perfect-subtree root per set bit of `size`, largest first.
    """
    if len(frontier) != size.bit_count():
        raise ValueError(f"a frontier of a {size}-leaf tree has {size.bit_count()} hashes, got {len(frontier)}")
    stack = list(frontier)
    for h in leaf_hashes:
        # Appending leaf number `size`: merge one pair per trailing one bit of `size`.
        n = size
        while n & 1:
            h = node_hash(stack.pop(), h)
            n >>= 1
        stack.append(h)
        size += 1
    return tuple(stack)


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """RFC 9162 root of the tree whose frontier this is (right-to-left fold)."""
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root

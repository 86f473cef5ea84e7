"""The ledger's append-only RFC 9162 Merkle tree, in memory, with proof generation.

Sans-IO: the store feeds leaf hashes in (at start-up, then as entries are sequenced) and asks for roots and
proofs; persisting the leaves is the store's job. `carechain.merkle` verifies what this module produces.

Besides the leaf hashes the tree keeps every *complete* subtree hash: `level k` holds, at position i, the
hash of the 2**k leaves starting at i * 2**k. Appending is amortized O(1): a leaf completes at most one
node per level, and n leaves complete n - 1 nodes in all. Because the log is append-only, a complete
subtree of today's tree is also a subtree of every earlier tree that contains all its leaves, so the root
of any historical size, and inclusion and consistency proofs between any historical sizes, are assembled
from O(log n) cached nodes plus O(log n) hashes per incomplete right-edge node: O(log² n) at worst.

Each level is one `bytearray` of concatenated 32-byte hashes (about 64 bytes per leaf in all) rather than
a list of `bytes` objects, which would take more than twice the memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from carechain.errors import FixedReasonError
from carechain.merkle import EMPTY_ROOT, HASH_SIZE, node_hash

_NODE_PREFIX = b"\x01"


class TreeError(FixedReasonError):
    """A request the tree cannot answer: a malformed leaf hash, or an index or size beyond the tree."""

    REASON = "bad_tree_request"


class MerkleTree:
    """Append-only RFC 9162 Merkle tree over leaf hashes (`carechain.merkle.leaf_hash` of each entry)."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        """Start with `leaf_hashes` (e.g. every leaf hash reloaded from the store), in log order."""
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._size

    def leaf_hash(self, index: int) -> bytes:
        """Hash of leaf `index`."""
        self._check_index(index, self._size)
        return self._node(0, index)

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf hash; return its index."""
        _check_leaf(leaf_hash, self._size)
        index = self._size
        self._levels[0] += leaf_hash
        self._size += 1
        # Each time a level gets an even count, its last two nodes complete a node one level up.
        level, i, h = 0, index, bytes(leaf_hash)
        while i & 1:
            h = node_hash(self._node(level, i - 1), h)
            level += 1
            i >>= 1
            if level == len(self._levels):
                self._levels.append(bytearray())
            self._levels[level] += h
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add many leaf hashes at once, in order. All are checked before any is added."""
        hashes = list(leaf_hashes)
        if not hashes:
            return
        # Fast path first: a million `bytes` are checked in a few milliseconds this way.
        if not all(type(h) is bytes and len(h) == HASH_SIZE for h in hashes):
            for i, h in enumerate(hashes):
                _check_leaf(h, self._size + i)
            hashes = [bytes(h) for h in hashes]
        self._levels[0] += b"".join(hashes)
        self._size += len(hashes)
        self._complete_levels(hashes)

    def root(self, size: int | None = None) -> bytes:
        """RFC 9162 Merkle Tree Hash of the first `size` leaves (default: all of them)."""
        size = self._size if size is None else size
        self._check_size(size)
        if size == 0:
            return EMPTY_ROOT
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof (PATH) of leaf `index` in the tree of the first `size` leaves.

        Hashes are ordered from the leaf's sibling up to the child of the root, as `verify_inclusion` wants.
        """
        size = self._size if size is None else size
        self._check_size(size)
        self._check_index(index, size)
        path: list[bytes] = []
        lo, hi = 0, size
        # Walk down from the root, each time keeping the half that holds `index` and recording the other.
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._subtree(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof (PROOF) that the first `size1` leaves are a prefix of the first `size2`.

        Empty when size1 is 0 or equals size2 (nothing to prove; see `carechain.merkle.verify_consistency`).
        """
        size2 = self._size if size2 is None else size2
        self._check_size(size2)
        if isinstance(size1, bool) or not isinstance(size1, int) or not 0 <= size1 <= size2:
            raise TreeError(f"size1 must be between 0 and size2 ({size2}), got {size1!r}")
        if size1 == 0 or size1 == size2:
            return []
        proof: list[bytes] = []
        lo, hi = 0, size2
        # SUBPROOF(m, D[lo:hi], b) unrolled: `whole` is b, true while the old tree is the left edge itself.
        whole = True
        while size1 != hi:
            k = _split(hi - lo)
            if size1 - lo <= k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo += k
                whole = False
        if not whole:
            proof.append(self._subtree(lo, hi))
        proof.reverse()
        return proof

    # -- internals --------------------------------------------------------------------------------

    def _node(self, level: int, i: int) -> bytes:
        start = i * HASH_SIZE
        return bytes(self._levels[level][start : start + HASH_SIZE])

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a node of an RFC 9162 tree: start is a multiple of the split size."""
        n = end - start
        if n & (n - 1) == 0:  # a complete subtree: cached
            level = n.bit_length() - 1
            return self._node(level, start >> level)
        # The right edge of a tree whose size is not a power of two: combine its complete subtrees,
        # largest first, folding from the smallest (MTH's recursion on the right child).
        parts = []
        while start < end:
            k = 1 << ((end - start).bit_length() - 1)
            level = k.bit_length() - 1
            parts.append(self._node(level, start >> level))
            start += k
        h = parts.pop()
        while parts:
            h = node_hash(parts.pop(), h)
        return h

    def _complete_levels(self, new: list[bytes]) -> None:
        """Compute the complete-subtree nodes finished by `new`, the leaf hashes just appended."""
        sha256 = hashlib.sha256
        level = 0
        while True:
            first = len(self._levels[level]) // HASH_SIZE - len(new)
            if first & 1:  # the first new node completes a pair with the last old one
                new = [self._node(level, first - 1), *new]
            pairs = iter(new)  # zip(pairs, pairs) takes two at a time and drops an odd last one
            # Inlined node_hash: this runs once per node when a million leaves are reloaded.
            parents = [
                sha256(_NODE_PREFIX + left + right).digest()
                for left, right in zip(pairs, pairs, strict=False)
            ]
            if not parents:
                return
            if level + 1 == len(self._levels):
                self._levels.append(bytearray())
            self._levels[level + 1] += b"".join(parents)
            new = parents
            level += 1

    def _check_size(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self._size:
            raise TreeError(f"tree size must be between 0 and the current size {self._size}, got {size!r}")

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise TreeError(
                f"leaf index must be between 0 and {size - 1} for a tree of {size} leaves, got {index!r}"
            )


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n > 1): where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaf(h: bytes, index: int) -> None:
    if not isinstance(h, bytes | bytearray | memoryview) or len(h) != HASH_SIZE:
        got = f"{len(h)} bytes" if isinstance(h, bytes | bytearray | memoryview) else type(h).__name__
        raise TreeError(
            f"leaf hash for index {index} must be a {HASH_SIZE}-byte SHA-256 leaf hash, got {got} "
            "(pass carechain.merkle.leaf_hash(entry), not the entry)"
        )

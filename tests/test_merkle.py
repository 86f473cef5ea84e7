"""RFC 9162 hashing, proof generation (carechain.merkle_tree) and verification (carechain.merkle)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain.merkle import (
    EMPTY_ROOT,
    ProofError,
    consistency_proof_length,
    inclusion_proof_length,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from carechain.merkle_tree import MerkleTree, TreeError

# -- published test vectors -------------------------------------------------------------------------
# The RFC 6962 reference vectors, as kept by transparency-dev/merkle (successor of Trillian's merkle
# package and certificate-transparency-go's merkletree tests), proof/verify_test.go at commit
# 02194e9afb6c1d95b5381350007963aa70fff472. Go's vectors number leaves from 1; they are 0-based here.
LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
ROOTS = [  # ROOTS[n - 1] is the root of the tree of the first n leaves
    bytes.fromhex(h)
    for h in [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]


def _hashes(*hexes: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


INCLUSION_PROOFS = [  # (leaf index, tree size, path)
    (0, 1, []),
    (
        0,
        8,
        _hashes(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        5,
        8,
        _hashes(
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (2, 3, _hashes("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")),
    (
        1,
        5,
        _hashes(
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
]
CONSISTENCY_PROOFS = [  # (size1, size2, proof)
    (1, 1, []),
    (
        1,
        8,
        _hashes(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        6,
        8,
        _hashes(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (
        2,
        5,
        _hashes(
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
    (
        6,
        7,
        _hashes(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


@pytest.fixture(scope="module")
def vector_tree() -> MerkleTree:
    return MerkleTree(leaf_hash(d) for d in LEAVES)


def _naive_mth(hashes: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 §2.1.1, recursing down to the leaves."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(_naive_mth(hashes[:k]), _naive_mth(hashes[k:]))


def _flip(h: bytes, bit: int = 0) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


# -- hashing ----------------------------------------------------------------------------------------


def test_hashes_are_domain_separated_sha256() -> None:
    assert bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == EMPTY_ROOT
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


# -- the published vectors ----------------------------------------------------------------------------


def test_roots_match_published_vectors(vector_tree: MerkleTree) -> None:
    assert vector_tree.root(0) == EMPTY_ROOT
    for n in range(1, 9):
        assert vector_tree.root(n) == ROOTS[n - 1], n
    assert vector_tree.root() == ROOTS[-1]


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION_PROOFS)
def test_inclusion_proofs_match_published_vectors(
    vector_tree: MerkleTree, index: int, size: int, path: list[bytes]
) -> None:
    assert vector_tree.inclusion_proof(index, size) == path
    assert inclusion_proof_length(index, size) == len(path)
    leaf = leaf_hash(LEAVES[index])
    assert root_from_inclusion_proof(index, size, leaf, path) == ROOTS[size - 1]
    verify_inclusion(index, size, leaf, path, ROOTS[size - 1])


@pytest.mark.parametrize(("size1", "size2", "proof"), CONSISTENCY_PROOFS)
def test_consistency_proofs_match_published_vectors(
    vector_tree: MerkleTree, size1: int, size2: int, proof: list[bytes]
) -> None:
    assert vector_tree.consistency_proof(size1, size2) == proof
    assert consistency_proof_length(size1, size2) == len(proof)
    verify_consistency(size1, size2, ROOTS[size1 - 1], ROOTS[size2 - 1], proof)


def _inclusion_probes(index: int, size: int, leaf: bytes, path: list[bytes], root: bytes):
    """The corruptions transparency-dev/merkle's verify_test.go checks (corruptInclusionProof)."""
    yield "index - 1", (index - 1, size, leaf, path, root)
    yield "index + 1", (index + 1, size, leaf, path, root)
    yield "index ^ 2", (index ^ 2, size, leaf, path, root)
    yield "size * 2", (index, size * 2, leaf, path, root)
    yield "size // 2", (index, size // 2, leaf, path, root)
    yield "wrong leaf", (index, size, leaf_hash(b"WrongLeaf"), path, root)
    yield "empty-tree root", (index, size, leaf, path, EMPTY_ROOT)
    yield "random root", (index, size, leaf, path, SOME_HASH)
    yield "trailing garbage", (index, size, leaf, [*path, b""], root)
    yield "trailing root", (index, size, leaf, [*path, root], root)
    yield "preceding garbage", (index, size, leaf, [b"", *path], root)
    yield "preceding root", (index, size, leaf, [root, *path], root)
    for i in range(len(path)):
        yield (
            f"path[{i}] bit flipped",
            (index, size, leaf, [*path[:i], _flip(path[i], 3), *path[i + 1 :]], root),
        )
    if path:
        yield "removed element", (index, size, leaf, path[:-1], root)
    if len(path) > 1:
        yield "inserted element", (index, size, leaf, [path[0], SOME_HASH, *path[1:]], root)


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION_PROOFS)
def test_corrupted_inclusion_proofs_are_rejected(index: int, size: int, path: list[bytes]) -> None:
    for desc, args in _inclusion_probes(index, size, leaf_hash(LEAVES[index]), path, ROOTS[size - 1]):
        with pytest.raises(ProofError):
            verify_inclusion(*args)
            pytest.fail(f"accepted a proof with {desc}")


def _consistency_probes(size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]):
    """The corruptions transparency-dev/merkle's verify_test.go checks (corruptConsistencyProof)."""
    yield "size1 - 1", (size1 - 1, size2, root1, root2, proof)
    yield "size1 + 1", (size1 + 1, size2, root1, root2, proof)
    yield "size1 ^ 2", (size1 ^ 2, size2, root1, root2, proof)
    yield "size2 * 2", (size1, size2 * 2, root1, root2, proof)
    yield "size2 // 2", (size1, size2 // 2, root1, root2, proof)
    yield "wrong root1", (size1, size2, SOME_HASH, root2, proof)
    yield "wrong root2", (size1, size2, root1, SOME_HASH, proof)
    yield "swapped roots", (size1, size2, root2, root1, proof)
    yield "empty proof", (size1, size2, root1, root2, [])
    yield "trailing garbage", (size1, size2, root1, root2, [*proof, b""])
    yield "trailing root1", (size1, size2, root1, root2, [*proof, root1])
    yield "trailing root2", (size1, size2, root1, root2, [*proof, root2])
    yield "preceding garbage", (size1, size2, root1, root2, [b"", *proof])
    yield "preceding root1", (size1, size2, root1, root2, [root1, *proof])
    yield "preceding root2", (size1, size2, root1, root2, [root2, *proof])
    yield "preceding proof[0]", (size1, size2, root1, root2, [proof[0], *proof])
    yield "truncated", (size1, size2, root1, root2, proof[:-1])
    for i in range(len(proof)):
        yield (
            f"proof[{i}] bit flipped",
            (size1, size2, root1, root2, [*proof[:i], _flip(proof[i], 4), *proof[i + 1 :]]),
        )


@pytest.mark.parametrize(("size1", "size2", "proof"), [v for v in CONSISTENCY_PROOFS if v[2]])
def test_corrupted_consistency_proofs_are_rejected(size1: int, size2: int, proof: list[bytes]) -> None:
    for desc, args in _consistency_probes(size1, size2, ROOTS[size1 - 1], ROOTS[size2 - 1], proof):
        with pytest.raises(ProofError):
            verify_consistency(*args)
            pytest.fail(f"accepted a proof with {desc}")


# -- edge cases ----------------------------------------------------------------------------------------


def test_single_leaf_tree_root_is_the_leaf_hash_and_its_proof_is_empty() -> None:
    h = leaf_hash(b"data")
    tree = MerkleTree([h])
    assert tree.root() == h
    assert tree.inclusion_proof(0) == []
    verify_inclusion(0, 1, h, [], h)
    with pytest.raises(ProofError):
        verify_inclusion(0, 1, h, [], leaf_hash(b"other"))


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 5), (8, 8)])
def test_inclusion_rejects_an_index_outside_the_tree(index: int, size: int) -> None:
    with pytest.raises(ProofError, match="outside"):
        verify_inclusion(index, size, SOME_HASH, [], SOME_HASH)


def test_inclusion_rejects_hashes_of_the_wrong_size() -> None:
    leaf, path = leaf_hash(LEAVES[0]), INCLUSION_PROOFS[1][2]
    with pytest.raises(ProofError, match="leaf hash"):
        verify_inclusion(0, 8, leaf[:31], path, ROOTS[7])
    with pytest.raises(ProofError, match="root hash"):
        verify_inclusion(0, 8, leaf, path, ROOTS[7] + b"\x00")
    with pytest.raises(ProofError, match="proof element 1"):
        verify_inclusion(0, 8, leaf, [path[0], path[1][:31], path[2]], ROOTS[7])


def test_overlong_proofs_are_rejected_before_hashing() -> None:
    with pytest.raises(ProofError, match="65 hashes"):
        verify_inclusion(0, 2**64 - 1, SOME_HASH, [SOME_HASH] * 65, SOME_HASH)
    with pytest.raises(ProofError, match="65 hashes"):
        verify_consistency(1, 2**64 - 1, SOME_HASH, SOME_HASH, [SOME_HASH] * 65)


def test_sizes_beyond_uint64_are_rejected() -> None:
    with pytest.raises(ProofError, match="2\\*\\*64"):
        verify_inclusion(0, 2**64, SOME_HASH, [], SOME_HASH)


def test_largest_tree_proof_lengths() -> None:
    assert inclusion_proof_length(2**64 - 2, 2**64 - 1) == 63  # one left sibling per set bit of the index
    assert inclusion_proof_length(0, 2**64 - 1) == 64


def test_consistency_edge_cases() -> None:
    """Sizes 0 and equal sizes (not defined by RFC 9162; see verify_consistency's docstring)."""
    r1, r2 = ROOTS[0], ROOTS[1]
    # Always consistent: empty to anything, and a size with itself, given empty proofs and right roots.
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 1, EMPTY_ROOT, r1, [])
    verify_consistency(0, 8, EMPTY_ROOT, ROOTS[7], [])
    verify_consistency(1, 1, r1, r1, [])
    bad = [
        (0, 0, EMPTY_ROOT, r2, []),  # two roots for size 0
        (1, 1, r1, r2, []),  # two roots for one size: a fork
        (0, 1, r1, r2, []),  # root1 is not the empty tree's (transparency-dev accepts this; we don't)
        (1, 0, r1, r2, []),  # the log shrank
        (2, 1, r2, r1, []),
        (1, 2, r1, r2, []),  # a real step needs a proof
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),  # the proof must be empty
        (0, 1, EMPTY_ROOT, r1, [EMPTY_ROOT]),
        (1, 1, r1, r1, [EMPTY_ROOT]),
    ]
    for args in bad:
        with pytest.raises(ProofError):
            verify_consistency(*args)
            pytest.fail(f"accepted {args}")


def test_rollback_message_names_the_problem() -> None:
    with pytest.raises(ProofError, match="never shrinks"):
        verify_consistency(5, 4, ROOTS[4], ROOTS[3], [])


# -- MerkleTree ---------------------------------------------------------------------------------------


def test_tree_rejects_requests_beyond_its_size(vector_tree: MerkleTree) -> None:
    with pytest.raises(TreeError, match="current size 8"):
        vector_tree.root(9)
    with pytest.raises(TreeError, match="between 0 and 4"):
        vector_tree.inclusion_proof(5, 5)
    with pytest.raises(TreeError):
        vector_tree.inclusion_proof(0, 0)
    with pytest.raises(TreeError):
        vector_tree.leaf_hash(8)
    with pytest.raises(TreeError, match="size1"):
        vector_tree.consistency_proof(6, 5)
    with pytest.raises(TreeError):
        vector_tree.consistency_proof(1, 9)


def test_tree_rejects_entries_in_place_of_leaf_hashes_and_changes_nothing() -> None:
    tree = MerkleTree([leaf_hash(b"a")])
    with pytest.raises(TreeError, match="index 2 .* got 5 bytes"):
        tree.extend([leaf_hash(b"b"), b"entry"])
    with pytest.raises(TreeError, match="index 1"):
        tree.append(b"entry")
    assert tree.size == 1
    assert tree.root() == leaf_hash(b"a")


def test_tree_empty() -> None:
    tree = MerkleTree()
    assert tree.size == 0
    assert tree.root() == EMPTY_ROOT
    assert tree.consistency_proof(0) == []


# -- properties -----------------------------------------------------------------------------------------

_MAX_LEAVES = 1100  # past 1024, so trees of 11 levels and every kind of right edge appear
_LEAF_HASHES = [leaf_hash(i.to_bytes(4, "big")) for i in range(_MAX_LEAVES)]
_TREE = MerkleTree(_LEAF_HASHES)


@st.composite
def _size_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, _MAX_LEAVES))
    return size, draw(st.integers(0, size - 1))


@st.composite
def _two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    size2 = draw(st.integers(0, _MAX_LEAVES))
    return draw(st.integers(0, size2)), size2


@settings(max_examples=300)
@given(st.integers(0, _MAX_LEAVES))
def test_root_of_any_historical_size_is_the_rfc_mth(size: int) -> None:
    assert _TREE.root(size) == _naive_mth(_LEAF_HASHES[:size])


@settings(max_examples=300)
@given(_size_and_index())
def test_generated_inclusion_proofs_verify(case: tuple[int, int]) -> None:
    size, index = case
    path = _TREE.inclusion_proof(index, size)
    assert len(path) == inclusion_proof_length(index, size)
    verify_inclusion(index, size, _TREE.leaf_hash(index), path, _TREE.root(size))


@settings(max_examples=300)
@given(_size_and_index(), st.data())
def test_tampered_inclusion_proofs_fail(case: tuple[int, int], data: st.DataObject) -> None:
    size, index = case
    path, root, leaf = _TREE.inclusion_proof(index, size), _TREE.root(size), _TREE.leaf_hash(index)
    bit = data.draw(st.integers(0, 7))
    with pytest.raises(ProofError):
        verify_inclusion(index, size, _flip(leaf, bit), path, root)
    if path:
        i = data.draw(st.integers(0, len(path) - 1))
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaf, [*path[:i], _flip(path[i], bit), *path[i + 1 :]], root)
    other = data.draw(st.integers(0, size - 1).filter(lambda j: j != index)) if size > 1 else None
    if other is not None:  # the right leaf, claimed at another index
        with pytest.raises(ProofError):
            verify_inclusion(other, size, leaf, path, root)


@settings(max_examples=300)
@given(_two_sizes())
def test_generated_consistency_proofs_verify(sizes: tuple[int, int]) -> None:
    size1, size2 = sizes
    proof = _TREE.consistency_proof(size1, size2)
    assert len(proof) == consistency_proof_length(size1, size2)
    verify_consistency(size1, size2, _TREE.root(size1), _TREE.root(size2), proof)


@settings(max_examples=300)
@given(_two_sizes(), st.data())
def test_tampered_consistency_proofs_fail(sizes: tuple[int, int], data: st.DataObject) -> None:
    size1, size2 = sizes
    proof, root1, root2 = _TREE.consistency_proof(size1, size2), _TREE.root(size1), _TREE.root(size2)
    bit = data.draw(st.integers(0, 7))
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        with pytest.raises(ProofError):
            verify_consistency(
                size1, size2, root1, root2, [*proof[:i], _flip(proof[i], bit), *proof[i + 1 :]]
            )
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, _flip(root1, bit), root2, proof)
    if size1 or not size2:  # from the empty tree any root2 is consistent: nothing to check it against
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, root1, _flip(root2, bit), proof)


@settings(max_examples=100)
@given(st.lists(st.integers(0, 70), max_size=20), st.binary(max_size=8))
def test_appending_in_any_batches_builds_the_same_tree(batches: list[int], salt: bytes) -> None:
    hashes = [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(sum(batches))]
    grown, pos = MerkleTree(), 0
    for n in batches:
        if n % 2:  # exercise both ways in
            for h in hashes[pos : pos + n]:
                grown.append(h)
        else:
            grown.extend(hashes[pos : pos + n])
        pos += n
    bulk = MerkleTree(hashes)
    assert grown.size == bulk.size == len(hashes)
    assert grown.root() == bulk.root() == _naive_mth(hashes)
    assert grown._levels == bulk._levels  # same cached nodes, whatever the batching

"""C2SP tlog-tiles core (carechain.tiles): the path codec, which tiles a tree has, and proofs assembled from
tiles that are byte for byte the proofs of the in-memory tree (carechain.merkle_tree) and verify as such."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from carechain.merkle_tree import MerkleTree
from carechain.tiles import (
    ENTRIES,
    MAX_ENTRY_SIZE,
    MissingTile,
    TileAppender,
    TileError,
    TileRef,
    bundles_for_size,
    changed_tiles,
    consistency_ranges,
    decode_bundle,
    edge_tiles,
    encode_bundle,
    hash_ranges,
    inclusion_ranges,
    root_from_tiles,
    root_range,
    tiles_for_ranges,
    tiles_for_size,
)


def entry(i: int) -> bytes:
    return b"entry %d" % i + bytes(i % 7)


def tiled(size: int) -> tuple[dict[TileRef, bytes], MerkleTree]:
    """Every tile and bundle of a log of `size` entries, and the same log as an in-memory tree."""
    app, store = TileAppender(), {}
    store.update(app.append(entry(i) for i in range(size)))
    store.update(app.partial_tiles())
    return store, MerkleTree(leaf_hash(entry(i)) for i in range(size))


# -- paths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "path"), [
    (TileRef(0, 1234067), "tile/0/x001/x234/067"),  # the spec's example
    (TileRef(0, 1234067, 8), "tile/0/x001/x234/067.p/8"),
    (TileRef(ENTRIES, 1234067, 8), "tile/entries/x001/x234/067.p/8"),
    (TileRef(1, 0, 17), "tile/1/000.p/17"),
    (TileRef(2, 999), "tile/2/999"),
    (TileRef(2, 1000), "tile/2/x001/000"),
    (TileRef(63, 0, 1), "tile/63/000.p/1"),
])
def test_tile_paths_follow_the_spec_and_parse_back(ref: TileRef, path: str) -> None:
    assert ref.path() == path
    assert TileRef.parse(path) == ref


@pytest.mark.parametrize("path", [
    "tile/0/1", "tile/00/001", "tile/0/x000/001", "tile/0/001.p/256", "tile/0/001.p/0", "tile/0/001.p/07",
    "tile/64/000", "tile/0/x001", "tile/0/001/x234", "tiles/0/001", "tile/0/0a1", "tile/entry/001", "tile/-1/000",
])
def test_non_canonical_or_malformed_tile_paths_are_refused(path: str) -> None:
    with pytest.raises(TileError):
        TileRef.parse(path)


# -- which tiles a tree has -----------------------------------------------------------------------------------


def test_a_tree_of_70000_has_the_tiles_the_spec_lists() -> None:
    refs = tiles_for_size(70_000)
    level0 = [r for r in refs if r.level == 0]
    assert len([r for r in level0 if not r.partial]) == 273
    assert [r for r in refs if r.partial] == [TileRef(0, 273, 112), TileRef(1, 1, 17), TileRef(2, 0, 1)]
    assert [r for r in refs if r.level == 1 and not r.partial] == [TileRef(1, 0)]
    assert tiles_for_size(256) == [TileRef(0, 0), TileRef(1, 0, 1)]
    assert tiles_for_size(0) == [] and bundles_for_size(0) == []


@pytest.mark.parametrize("size", [1, 255, 256, 257, 511, 512, 65535, 65536, 65537, 70_000])
def test_the_appender_writes_exactly_the_tiles_and_bundles_of_the_size(size: int) -> None:
    store, tree = tiled(size)
    assert sorted(store) == sorted(tiles_for_size(size) + bundles_for_size(size))
    assert root_from_tiles(size, store) == tree.root()
    for ref in bundles_for_size(size):
        assert decode_bundle(ref, store[ref]) == [entry(i) for i in range(ref.index * 256, ref.index * 256 + ref.width)]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**20), st.integers(0, 2**20))
def test_growing_a_tree_changes_only_the_new_full_tiles_and_the_new_partial_ones(a: int, b: int) -> None:
    old, new = min(a, b), max(a, b)
    before = set(tiles_for_size(old) + bundles_for_size(old))
    after = set(tiles_for_size(new) + bundles_for_size(new))
    assert set(changed_tiles(old, new)) == after - before


# -- proofs from tiles ------------------------------------------------------------------------------------------

_TREES: dict[int, tuple[dict[TileRef, bytes], MerkleTree]] = {}


def cached(size: int) -> tuple[dict[TileRef, bytes], MerkleTree]:
    if size not in _TREES:
        _TREES[size] = tiled(size)
    return _TREES[size]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([1, 2, 3, 7, 255, 256, 257, 300, 511, 513, 1000, 4096, 5000, 65536, 65537, 66000]),
       st.data())
def test_proofs_from_tiles_equal_the_in_memory_trees_and_verify(size: int, data: st.DataObject) -> None:
    store, tree = cached(size)
    index = data.draw(st.integers(0, size - 1))
    ranges = inclusion_ranges(index, size)
    path = hash_ranges(ranges, size, {r: store[r] for r in tiles_for_ranges(ranges, size)})
    assert path == tree.inclusion_proof(index, size)
    verify_inclusion(index, size, leaf_hash(entry(index)), path, tree.root())
    old = data.draw(st.integers(0, size))
    ranges = consistency_ranges(old, size)
    proof = hash_ranges(ranges, size, {r: store[r] for r in tiles_for_ranges(ranges, size)})
    assert proof == tree.consistency_proof(old, size)
    verify_consistency(old, size, tree.root(old), tree.root(), proof)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3000), st.data())
def test_proofs_at_any_size_use_that_sizes_tiles(size: int, data: st.DataObject) -> None:
    """A reader with a checkpoint at `size` fetches the tiles of `size` (partial ones of that width)."""
    store, tree = tiled(size)
    index = data.draw(st.integers(0, size - 1))
    ranges = inclusion_ranges(index, size) + root_range(size)
    needed = tiles_for_ranges(ranges, size)
    assert set(needed) <= set(store)
    *path, root = hash_ranges(ranges, size, store)
    assert (path, root) == (tree.inclusion_proof(index), tree.root())


def test_a_proof_from_a_tampered_tile_does_not_verify() -> None:
    store, tree = cached(5000)
    ranges = inclusion_ranges(4242, 5000)
    needed = tiles_for_ranges(ranges, 5000)
    tampered = dict(store)
    upper = next(r for r in needed if r.level == 0 and r.index != 4242 // 256)
    tampered[upper] = bytes(32) + store[upper][32:]
    path = hash_ranges(ranges, 5000, tampered)
    with pytest.raises(ProofError):
        verify_inclusion(4242, 5000, leaf_hash(entry(4242)), path, tree.root())


def test_a_missing_or_short_tile_is_named() -> None:
    store, _ = cached(5000)
    ranges = inclusion_ranges(10, 5000)
    needed = tiles_for_ranges(ranges, 5000)
    with pytest.raises(MissingTile) as missing:
        hash_ranges(ranges, 5000, {r: store[r] for r in needed[1:]})
    assert missing.value.tile == needed[0]
    with pytest.raises(TileError, match="must be 8192 bytes"):
        hash_ranges(ranges, 5000, {r: store[r][:-1] for r in needed})


# -- the writer's right edge --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "total"), [(0, 700), (1, 700), (255, 700), (256, 700), (300, 66_000)])
def test_an_appender_resumed_from_the_edge_tiles_continues_identically(first: int, total: int) -> None:
    store, tree = cached(total) if total in _TREES else tiled(total)
    head = TileAppender()
    early = dict(head.append(entry(i) for i in range(first)))
    early.update(head.partial_tiles())
    resumed = TileAppender.resume(first, {r: early[r] for r in edge_tiles(first)})
    assert resumed.root() == tree.root(first)
    rest = dict(resumed.append(entry(i) for i in range(first, total)))
    rest.update(resumed.partial_tiles())
    assert all(store[r] == data for r, data in rest.items())
    assert set(rest) == set(changed_tiles(first, total))
    assert resumed.root() == tree.root()


def test_entry_bundles_frame_entries_and_refuse_what_does_not_fit() -> None:
    ref = TileRef(ENTRIES, 0, 3)
    data = encode_bundle([b"", b"a", b"x" * MAX_ENTRY_SIZE])
    assert decode_bundle(ref, data) == [b"", b"a", b"x" * MAX_ENTRY_SIZE]
    with pytest.raises(TileError, match="at most 65535 bytes"):
        encode_bundle([b"x" * (MAX_ENTRY_SIZE + 1)])
    with pytest.raises(TileError, match="bytes after"):
        decode_bundle(ref, data + b"\x00")
    with pytest.raises(TileError, match="must hold 4 entries"):
        decode_bundle(TileRef(ENTRIES, 0, 4), data)
    with pytest.raises(TileError, match="past the end"):
        decode_bundle(ref, data[:-1])
    with pytest.raises(TileError, match="at most 65535 bytes"):
        list(TileAppender().append([b"x" * (MAX_ENTRY_SIZE + 1)]))

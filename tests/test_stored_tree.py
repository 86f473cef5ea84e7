"""The bridge's tree stored as tiles in the ledger database (chain_bridge.ledger.tree) answers exactly as the
in-memory MerkleTree does, resumes from the database, never runs ahead of a rollback, sees another writer's
leaves after a reload, and names a missing or damaged tile."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carechain.merkle import verify_consistency, verify_inclusion
from carechain.merkle_tree import MerkleTree, TreeError
from chain_bridge.ledger.tree import (
    TILES_SCHEMA,
    SqlTileStore,
    StoredTree,
    TileRow,
    TreeStoreError,
    build_tiles,
)

SQLITE_TYPES = {"int": "INTEGER", "blob": "BLOB"}


def leaves(start: int, stop: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(start, stop)]


def open_db(path: Path | str = ":memory:") -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(TILES_SCHEMA.format(**SQLITE_TYPES))
    return db


def append(db: sqlite3.Connection, tree: StoredTree, hashes: list[bytes]) -> None:
    """What the ledger does: stage, write the rows in the entries' transaction, commit, then tell the tree."""
    db.execute("BEGIN IMMEDIATE")
    try:
        SqlTileStore(db).write(tree.stage(hashes))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        tree.abort()
        raise
    tree.commit()


def table(db: sqlite3.Connection) -> list[tuple[int, int, int, bytes]]:
    return db.execute("SELECT level, idx, width, data FROM tree_tiles ORDER BY level, idx").fetchall()


def assert_same(stored: StoredTree, memory: MerkleTree, size: int, indexes: list[int], olds: list[int]) -> None:
    root = memory.root(size)
    assert stored.root(size) == root
    for i in indexes:
        proof = stored.inclusion_proof(i, size)
        assert proof == memory.inclusion_proof(i, size)
        verify_inclusion(i, size, memory.leaf_hash(i), proof, root)
    for old in olds:
        proof = stored.consistency_proof(old, size)
        assert proof == memory.consistency_proof(old, size)
        if old:
            verify_consistency(old, size, memory.root(old), root, proof)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.integers(1, 3000), cache=st.sampled_from([1, 4, 512]))
def test_roots_and_proofs_are_byte_identical_to_the_in_memory_tree(data: st.DataObject, size: int,
                                                                    cache: int) -> None:
    hashes = leaves(0, size)
    db = open_db()
    stored = StoredTree(SqlTileStore(db), cache_tiles=cache)
    done = 0
    while done < size:  # appended in batches of random sizes, as the bridge's batches come
        step = data.draw(st.integers(1, size - done), label="batch")
        append(db, stored, hashes[done : done + step])
        done += step
    memory = MerkleTree(hashes)
    assert stored.size == size
    for _ in range(3):
        at = data.draw(st.integers(1, size), label="historical size")
        indexes = data.draw(st.lists(st.integers(0, at - 1), min_size=1, max_size=5), label="indexes")
        olds = data.draw(st.lists(st.integers(0, at), min_size=1, max_size=3), label="old sizes")
        assert_same(stored, memory, at, indexes, olds)
    assert_same(stored, memory, size, [0, size - 1], [0, 1, size])


def test_sizes_around_two_full_tile_levels_match_the_in_memory_tree() -> None:
    edge = 256 * 256  # the first level-2 hash: tile levels 0, 1 and 2 all change here
    hashes = leaves(0, edge + 300)
    db = open_db()
    stored = StoredTree(SqlTileStore(db), cache_tiles=8)
    append(db, stored, hashes[: edge - 1])
    append(db, stored, hashes[edge - 1 : edge + 1])
    append(db, stored, hashes[edge + 1 :])
    memory = MerkleTree(hashes)
    for size in (255, 256, 257, edge - 256, edge - 1, edge, edge + 1, edge + 256, edge + 300):
        picks = sorted({0, size // 2, size - 1, max(0, size - 257)})
        olds = [old for old in (1, 255, 256, 257, edge, size // 3, size - 1, size) if old <= size]
        assert_same(stored, memory, size, picks, olds)


def test_a_reopened_tree_resumes_from_the_database_and_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    hashes = leaves(0, 70_000)
    db = open_db(path)
    first = StoredTree(SqlTileStore(db))
    append(db, first, hashes[:66_000])
    db.close()

    db = open_db(path)
    reopened = StoredTree(SqlTileStore(db))
    assert reopened.size == 66_000
    assert reopened.root() == first.root()
    append(db, reopened, hashes[66_000:])
    assert_same(reopened, MerkleTree(hashes), 70_000, [0, 65_999, 69_999], [66_000, 65_536])
    # Only the newest partial of each tile is kept: one row per (level, idx).
    levels = db.execute("SELECT level, COUNT(*), SUM(width) FROM tree_tiles GROUP BY level ORDER BY level").fetchall()
    assert levels == [(0, 274, 70_000), (1, 2, 273), (2, 1, 1)]


def test_a_rolled_back_append_leaves_the_store_and_the_tree_untouched() -> None:
    hashes = leaves(0, 1000)
    db = open_db()
    tree = StoredTree(SqlTileStore(db))
    append(db, tree, hashes[:300])
    before, root = table(db), tree.root()

    db.execute("BEGIN IMMEDIATE")
    SqlTileStore(db).write(tree.stage(hashes[300:700]))
    assert tree.size == 300 and tree.root() == root  # nothing staged is answered for before the commit
    db.execute("ROLLBACK")
    tree.abort()

    assert table(db) == before
    assert tree.size == 300 and tree.root() == root
    append(db, tree, hashes[300:])  # and the next append starts from the committed edge, not the aborted one
    assert_same(tree, MerkleTree(hashes), 1000, [299, 300, 999], [300, 700])


def test_two_stages_in_one_transaction_commit_together() -> None:
    hashes = leaves(0, 600)
    db = open_db()
    tree = StoredTree(SqlTileStore(db))
    db.execute("BEGIN IMMEDIATE")
    SqlTileStore(db).write(tree.stage(hashes[:200]))
    SqlTileStore(db).write(tree.stage(hashes[200:]))
    db.execute("COMMIT")
    tree.commit()
    assert_same(tree, MerkleTree(hashes), 600, [0, 599], [200, 256])
    assert StoredTree(SqlTileStore(db)).root() == tree.root()


def test_another_writers_leaves_are_seen_after_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    hashes = leaves(0, 5000)
    writer_db, reader_db = open_db(path), open_db(path)
    writer = StoredTree(SqlTileStore(writer_db))
    reader = StoredTree(SqlTileStore(reader_db))
    append(writer_db, writer, hashes[:1000])
    assert reader.size == 0
    assert reader.reload() == 1000
    assert_same(reader, MerkleTree(hashes[:1000]), 1000, [0, 999], [1, 500])
    append(writer_db, writer, hashes[1000:])
    assert reader.reload() == 5000
    assert_same(reader, MerkleTree(hashes), 5000, [999, 1000, 4999], [1000])


class SizeReadEarly(SqlTileStore):
    """A store whose size is read before another writer's commit and whose tiles are read after it."""

    def __init__(self, db: sqlite3.Connection, size: int) -> None:
        super().__init__(db)
        self.size = size

    def stored_size(self) -> int:
        return self.size


def test_a_reload_racing_another_writers_commit_reads_the_edge_of_the_size_it_read() -> None:
    hashes = leaves(0, 70_000)
    db = open_db()
    append(db, StoredTree(SqlTileStore(db)), hashes)
    raced = StoredTree(SizeReadEarly(db, 66_000))  # every edge row it reads is wider, or full, by now
    assert raced.size == 66_000
    assert_same(raced, MerkleTree(hashes), 66_000, [0, 65_999], [65_536, 66_000])


def test_a_database_behind_the_tree_is_refused_on_reload() -> None:
    db = open_db()
    tree = StoredTree(SqlTileStore(db))
    append(db, tree, leaves(0, 300))
    db.execute("DELETE FROM tree_tiles WHERE level = 0 AND idx = 1")
    with pytest.raises(TreeStoreError, match="describe 256 leaves but this tree already had 300"):
        tree.reload()


def test_a_missing_full_tile_is_named() -> None:
    db = open_db()
    tree = StoredTree(SqlTileStore(db), cache_tiles=1)
    append(db, tree, leaves(0, 1000))
    db.execute("DELETE FROM tree_tiles WHERE level = 0 AND idx = 1")
    tree = StoredTree(SqlTileStore(db))  # a fresh cache: the tile must come from the table
    assert tree.inclusion_proof(5, 1000)  # tile 0 is still there
    with pytest.raises(TreeStoreError, match=r"tile/0/001 \(tree_tiles level 0, idx 1\) is missing"):
        tree.inclusion_proof(300, 1000)


def test_a_damaged_tile_is_named() -> None:
    db = open_db()
    append(db, StoredTree(SqlTileStore(db)), leaves(0, 1000))
    db.execute("UPDATE tree_tiles SET data = substr(data, 1, 100) WHERE level = 0 AND idx = 2")
    tree = StoredTree(SqlTileStore(db))
    with pytest.raises(TreeStoreError, match=r"tile/0/002 \(tree_tiles level 0, idx 2\) is 100 bytes"):
        tree.inclusion_proof(600)


def test_a_missing_edge_tile_is_named_when_the_tree_is_opened() -> None:
    db = open_db()
    append(db, StoredTree(SqlTileStore(db)), leaves(0, 70_000))
    db.execute("DELETE FROM tree_tiles WHERE level = 1")
    with pytest.raises(TreeStoreError, match=r"tile/1/001\.p/17 .* is missing"):
        StoredTree(SqlTileStore(db))


def test_bad_requests_raise_the_in_memory_trees_errors() -> None:
    db = open_db()
    tree = StoredTree(SqlTileStore(db))
    append(db, tree, leaves(0, 8))
    with pytest.raises(TreeError, match="current size 8"):
        tree.root(9)
    with pytest.raises(TreeError, match="between 0 and 3"):
        tree.inclusion_proof(4, 4)
    with pytest.raises(TreeError, match="size1"):
        tree.consistency_proof(5, 4)
    with pytest.raises(TreeError, match="must be 32 bytes"):
        tree.stage([b"entry, not its hash"])
    assert tree.size == 8 and table(db) == table(db)


def test_build_tiles_streams_an_existing_ledgers_leaves_in_committed_batches() -> None:
    hashes = leaves(0, 10_000)
    db = open_db()
    tree = StoredTree(SqlTileStore(db))
    sizes: list[int] = []

    def in_transaction(rows: list[TileRow]) -> None:
        db.execute("BEGIN IMMEDIATE")
        SqlTileStore(db).write(rows)
        db.execute("COMMIT")

    assert build_tiles(tree, iter(hashes[:4000]), in_transaction, batch=1500, progress=sizes.append) == 4000
    assert sizes == [1500, 3000, 4000]
    # Resumed from what was committed (as after a crash): the rest of the leaves, from tree.size on.
    resumed = StoredTree(SqlTileStore(db))
    build_tiles(resumed, iter(hashes[resumed.size :]), in_transaction, batch=1500)
    assert resumed.root() == MerkleTree(hashes).root()


def test_a_failed_batch_write_is_aborted() -> None:
    db = open_db()
    tree = StoredTree(SqlTileStore(db))

    def failing(rows: list[TileRow]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_tiles(tree, iter(leaves(0, 10)), failing)
    assert tree.size == 0 and table(db) == []
    append(db, tree, leaves(0, 10))
    assert tree.root() == MerkleTree(leaves(0, 10)).root()


# -- the same table on the ledger's two SQL engines (conftest's `ledger_factory`: SQLite and PostgreSQL) ---------


def test_the_tile_table_works_alike_on_sqlite_and_postgresql(ledger_factory, tmp_path: Path) -> None:
    """Written and read through the ledger's `Database` (its `?` SQL translated for PostgreSQL): appends commit
    with their transaction, a rollback leaves nothing behind, and a second connection sees the first's leaves."""
    location = ledger_factory.location(tmp_path / "ledger.db")
    writer_db, reader_db = location.connect(), location.connect()
    try:
        writer_db.create_schema(TILES_SCHEMA)
        store = SqlTileStore(writer_db)
        writer, reader = StoredTree(store, cache_tiles=2), StoredTree(SqlTileStore(reader_db))
        hashes = leaves(0, 70_000)
        for start, stop in ((0, 255), (255, 257), (257, 66_000)):
            writer_db.begin()
            store.write(writer.stage(hashes[start:stop]))
            writer_db.commit()
            writer.commit()
        before = list(writer_db.execute("SELECT level, idx, width FROM tree_tiles ORDER BY level, idx"))

        writer_db.begin()
        store.write(writer.stage(hashes[66_000:]))
        writer_db.rollback()
        writer.abort()
        assert list(writer_db.execute("SELECT level, idx, width FROM tree_tiles ORDER BY level, idx")) == before

        writer_db.begin()
        store.write(writer.stage(hashes[66_000:]))
        writer_db.commit()
        writer.commit()
        assert reader.reload() == 70_000
        memory = MerkleTree(hashes)
        for tree in (writer, reader):
            assert_same(tree, memory, 70_000, [0, 65_535, 65_536, 69_999], [1, 66_000, 65_536])
            assert_same(tree, memory, 65_537, [65_536], [256, 65_536])
    finally:
        writer_db.close()
        reader_db.close()

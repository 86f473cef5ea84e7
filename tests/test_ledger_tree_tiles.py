"""The ledger keeps its tree as tiles committed with its entries (chain_bridge.ledger.tree), and builds them once
for a ledger that predates them."""

from __future__ import annotations

import contextlib
from pathlib import Path

from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from chain_bridge.ledger.store import EventCandidate


def test_a_ledger_without_tree_tiles_builds_them_once_at_open(ledger_factory, tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    leaves = [b"event %d" % i for i in range(1000)]
    ledger = ledger_factory(path)
    ledger.append_events([EventCandidate("dev", i, leaf) for i, leaf in enumerate(leaves)])
    root = ledger.tree.root()
    ledger._db.execute("DELETE FROM tree_tiles")  # as a ledger written before the tiles were kept
    ledger.close()

    reopened = ledger_factory(path)
    try:
        assert reopened.size == 1000
        assert reopened.tree.root() == root == MerkleTree(leaf_hash(e) for e in leaves).root()
        assert reopened.tree.inclusion_proof(700) == MerkleTree(leaf_hash(e) for e in leaves).inclusion_proof(700)
    finally:
        reopened.close()


def test_a_rolled_back_append_leaves_no_tile_behind(ledger_factory, tmp_path: Path) -> None:
    ledger = ledger_factory(tmp_path / "ledger.db")
    try:
        ledger.append_events([EventCandidate("dev", i, b"event %d" % i) for i in range(300)])
        tiles = ledger._db.execute("SELECT level, idx, width FROM tree_tiles ORDER BY level, idx").fetchall()

        class Boom(Exception):
            pass

        def fail(*_a: object) -> None:
            raise Boom

        ledger._db.commit = fail  # the tiles are written: the COMMIT fails
        with contextlib.suppress(Boom):
            ledger.append_events([EventCandidate("dev", 300 + i, b"more %d" % i) for i in range(10)])
        assert ledger.size == 300 and ledger.tree.root() == ledger.tree.root(300)
        assert ledger._db.execute("SELECT level, idx, width FROM tree_tiles ORDER BY level, idx").fetchall() == tiles
    finally:
        ledger.close()

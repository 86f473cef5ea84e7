"""The ledger's Merkle tree stored as C2SP tlog-tiles in the ledger database: memory flat with the log.

`StoredTree` answers what the bridge asks of its tree (`size`, `root`, `inclusion_proof`,
`consistency_proof`, byte for byte what `carechain.merkle_tree.MerkleTree` answers) while holding in memory
only the tree size, the right edge (the partial tile of each tile level: < 256 hashes per level,
`carechain.tiles.HashEdge`) and a bounded LRU of full tiles. Every other hash is read on demand from a
`TileStore`: the `tree_tiles` table of the ledger database, one row per tile (`level`, `idx`), holding the full
tile or the newest partial of it. Full tiles never change (the log is append-only), so the cache never goes stale,
and the partial a historical tree size needs is a prefix of the stored row.

Writes commit with the entries that made them: inside the ledger's transaction the store calls
`stage(leaf_hashes)`, writes the rows it returns, commits, then calls `commit()` (or `abort()` after a
rollback). Until `commit()` the tree answers for the committed size only, so a crash or a rollback can never
leave tiles ahead of or behind the entries, nor a root that covers uncommitted leaves. The stored size is
read from the table itself (the last level-0 tile), so `reload()` sees what another process or bridge host
committed.

`SqlTileStore` is that table over the ledger's connection (SQLite or PostgreSQL: the SQL is common to both);
`build_tiles` builds the tiles of a ledger that predates them from its stored leaf hashes, streaming.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from carechain.merkle import EMPTY_ROOT, HASH_SIZE
from carechain.merkle_tree import TreeError
from carechain.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    HashEdge,
    TileError,
    TileRef,
    consistency_ranges,
    edge_tiles,
    fold_subtrees,
    inclusion_ranges,
    root_range,
    subtree_nodes,
)

# One row per tile: the full tile, or the newest partial of it (width < 256). No entry bundles: the entries table
# holds the entries. `{int}` and `{blob}` are the engine's column types (the ledger schema's convention). A rowid
# table in SQLite, not WITHOUT ROWID: rows are 8 KiB, far above SQLite's advice for those.
TILES_SCHEMA = """
CREATE TABLE IF NOT EXISTS tree_tiles (
    level {int} NOT NULL, idx {int} NOT NULL, width {int} NOT NULL, data {blob} NOT NULL,
    PRIMARY KEY (level, idx));
"""
DEFAULT_CACHE_TILES = 512  # 8 MiB of expanded full tiles (`_TileNodes`): the upper levels stay warm


class TileRow(NamedTuple):
    """One row of `tree_tiles` to write (a tuple, so it is also the statement's parameters)."""

    level: int
    idx: int
    width: int
    data: bytes


class TreeStoreError(Exception):
    """The stored tiles cannot give what the tree needs: a tile is missing or damaged (which, and what to do)."""


class TileStore(Protocol):
    """Where the tiles live. Reads must see what the caller's transaction (if any) has written."""

    def stored_size(self) -> int:
        """The tree size the stored tiles describe (0 when there are none)."""
        ...

    def load(self, refs: Collection[TileRef]) -> Mapping[TileRef, bytes]:
        """The stored bytes of each tile's (level, index) row, keyed by the ref asked for; absent ones left out.

        A row may be wider than the ref (a newer partial, or the full tile): the tree takes the prefix it needs.
        """
        ...

    def write(self, rows: Sequence[TileRow]) -> None:
        """Insert or replace these rows (inside the caller's transaction)."""
        ...


_SELECT_TILE = "SELECT data FROM tree_tiles WHERE level = ? AND idx = ?"
_SELECT_LAST_LEAF_TILE = "SELECT idx, width FROM tree_tiles WHERE level = 0 ORDER BY idx DESC LIMIT 1"
# Never narrow a row: a full tile or a wider partial stays, whatever a stale writer would replace it by.
_UPSERT_TILE = ("INSERT INTO tree_tiles (level, idx, width, data) VALUES (?, ?, ?, ?) ON CONFLICT (level, idx) "
                "DO UPDATE SET width = excluded.width, data = excluded.data WHERE tree_tiles.width < excluded.width")


class _Executes(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...


class SqlTileStore:
    """The `tree_tiles` table over a connection whose `execute(sql, params)` takes `?` placeholders and returns an
    iterable cursor: sqlite3's `Connection`, or the ledger's `Database` (SQLite or PostgreSQL). The caller owns
    transactions."""

    def __init__(self, db: _Executes) -> None:
        self._db = db

    def stored_size(self) -> int:
        row = next(iter(self._db.execute(_SELECT_LAST_LEAF_TILE, ())), None)
        return 0 if row is None else int(row[0]) * TILE_WIDTH + int(row[1])

    def load(self, refs: Collection[TileRef]) -> Mapping[TileRef, bytes]:
        if len(refs) == 1:  # the common case (a proof's one uncached tile): the primary key lookup
            (ref,) = refs
            row = next(iter(self._db.execute(_SELECT_TILE, (ref.level, ref.index))), None)
            return {} if row is None else {ref: bytes(row[0])}
        wanted = {(r.level, r.index): r for r in refs}
        if not wanted:
            return {}
        where = " OR ".join(["(level = ? AND idx = ?)"] * len(wanted))
        params = [v for key in wanted for v in key]
        rows = self._db.execute(f"SELECT level, idx, data FROM tree_tiles WHERE {where}", params)
        return {wanted[(int(level), int(idx))]: bytes(data) for level, idx, data in rows}

    def write(self, rows: Sequence[TileRow]) -> None:
        for row in rows:
            self._db.execute(_UPSERT_TILE, row)


class StoredTree:
    """The ledger's append-only RFC 9162 tree, read from a `TileStore`; in memory: its size, right edge and an
    LRU of at most `cache_tiles` full tiles."""

    def __init__(self, store: TileStore, *, cache_tiles: int = DEFAULT_CACHE_TILES) -> None:
        if cache_tiles < 1:
            raise ValueError(f"cache_tiles must be at least 1, got {cache_tiles}")
        self._store = store
        self._cache: OrderedDict[tuple[int, int], _TileNodes] = OrderedDict()  # full tiles only: they never change
        self._edge_nodes: dict[int, _TileNodes] = {}  # per tile level, of the committed edge (built on demand)
        self._cache_tiles = cache_tiles
        self._edge = HashEdge()
        self._pending: HashEdge | None = None  # the edge after the rows staged, until they commit
        self.reload()

    @property
    def size(self) -> int:
        """Number of leaves committed."""
        return self._edge.size

    # -- reading --------------------------------------------------------------------------------------

    def reload(self) -> int:
        """Read the stored size again (another process or bridge host may have extended the log) and, if it
        changed, the right edge of that size; the size. Drops a stage not committed."""
        self._pending = None
        size = self._store.stored_size()
        if size < self._edge.size:
            raise TreeStoreError(f"the stored tiles describe {size} leaves but this tree already had "
                                 f"{self._edge.size}: the ledger database was rolled back or replaced; restart "
                                 "the bridge on the database it should serve")
        if size != self._edge.size:
            refs = [r for r in edge_tiles(size) if not r.is_entries]
            # Rows read after the size may already be wider (another writer committed in between): the edge of
            # `size` is their prefix, as the log is append-only.
            self._edge = HashEdge.resume(size, self._load_stored(refs))
            self._edge_nodes = {}
        return size

    def root(self, size: int | None = None) -> bytes:
        """RFC 9162 Merkle Tree Hash of the first `size` leaves (default: all of them)."""
        size = self._check_size(size)
        if size == self.size:
            return self._edge.root()  # the current root needs no read
        return self._hashes(root_range(size), size)[0] if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf `index` in the tree of the first `size` leaves (sibling first)."""
        size = self._check_size(size)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise TreeError(
                f"leaf index must be between 0 and {size - 1} for a tree of {size} leaves, got {index!r}")
        return self._hashes(inclusion_ranges(index, size), size)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof that the first `size1` leaves are a prefix of the first `size2`."""
        size2 = self._check_size(size2)
        if isinstance(size1, bool) or not isinstance(size1, int) or not 0 <= size1 <= size2:
            raise TreeError(f"size1 must be between 0 and size2 ({size2}), got {size1!r}")
        return self._hashes(consistency_ranges(size1, size2), size2)

    # -- writing --------------------------------------------------------------------------------------

    def stage(self, leaf_hashes: Iterable[bytes]) -> list[TileRow]:
        """The rows that appending `leaf_hashes` writes (after any stage not yet committed): every tile that
        becomes full and the new partial of each level. Write them in the transaction that appends the entries,
        then `commit()`; the tree's size and answers change only then."""
        base = self._pending or self._edge
        edge = base.copy()
        try:
            full = [TileRow(ref.level, ref.index, ref.width, data) for ref, data in edge.append(leaf_hashes)]
        except TileError as exc:
            raise TreeError(str(exc)) from None
        if edge.size == base.size:
            return []
        # A level's partial changed only if its count of hashes did; a level whose tile just filled has none.
        partial = [TileRow(ref.level, ref.index, ref.width, data) for ref, data in edge.partial_tiles()
                   if edge.size >> (TILE_HEIGHT * ref.level) != base.size >> (TILE_HEIGHT * ref.level)]
        self._pending = edge
        return full + partial

    def commit(self) -> None:
        """The staged rows are committed: the tree now answers for the new size."""
        if self._pending is None:
            return
        self._edge, self._pending = self._pending, None
        self._edge_nodes = {}

    def abort(self) -> None:
        """The transaction rolled back: forget what was staged; the tree stays at its committed size."""
        self._pending = None

    # -- internals ------------------------------------------------------------------------------------

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            raise TreeError(f"tree size must be between 0 and the current size {self.size}, got {size!r}")
        return size

    def _hashes(self, ranges: list[tuple[int, int]], size: int) -> list[bytes]:
        """The hash of each leaf range of the tree of `size` leaves, from the complete nodes that make it up."""
        per_range = [[_locate(height, k) for height, k in subtree_nodes(start, end, size)] for start, end in ranges]
        tiles = self._tile_nodes({key for nodes in per_range for key, _, _ in nodes})
        return [fold_subtrees([tiles[key].node(sub, position) for key, sub, position in nodes])
                for nodes in per_range]

    def _tile_nodes(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], _TileNodes]:
        """The nodes of each tile (level, idx): the right edge's from memory, full tiles from the cache, else
        read from the store (all the missing ones at once) and cached."""
        out: dict[tuple[int, int], _TileNodes] = {}
        missing: list[TileRef] = []
        for key in keys:
            level, idx = key
            if idx == self.size >> (TILE_HEIGHT * (level + 1)):  # the current partial of its level
                nodes = self._edge_nodes.get(level)
                if nodes is None:
                    nodes = self._edge_nodes[level] = _TileNodes(b"".join(self._edge.partial_row(level)))
                out[key] = nodes
            elif (cached := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                out[key] = cached
            else:
                missing.append(TileRef(level, idx))
        if missing:
            for ref, data in self._load_stored(missing, exact=True).items():
                out[(ref.level, ref.index)] = self._remember((ref.level, ref.index), data)
        return out

    def _load_stored(self, refs: list[TileRef], *, exact: bool = False) -> dict[TileRef, bytes]:
        """The stored rows of `refs`, each cut to the ref's width (`exact`: each must be that wide, as a full
        tile is); a missing row, or one too short or of the wrong length, is an error."""
        loaded = self._store.load(refs)
        out: dict[TileRef, bytes] = {}
        for ref in refs:
            data = loaded.get(ref)
            if data is None:
                raise TreeStoreError(f"stored tile {ref.path()} (tree_tiles level {ref.level}, idx {ref.index}) "
                                     f"is missing: {_REBUILD_ADVICE}")
            want = ref.width * HASH_SIZE
            if len(data) < want or len(data) % HASH_SIZE or (exact and len(data) != want):
                raise TreeStoreError(f"stored tile {ref.path()} (tree_tiles level {ref.level}, idx {ref.index}) "
                                     f"is {len(data)} bytes, not {ref.width} hashes of {HASH_SIZE}: "
                                     f"{_REBUILD_ADVICE}")
            out[ref] = data[:want]
        return out

    def _remember(self, key: tuple[int, int], data: bytes) -> _TileNodes:
        nodes = self._cache[key] = _TileNodes(data)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return nodes


class _TileNodes:
    """Every complete node inside one tile: its w hashes, then the w // 2 nodes over pairs of them, and so on up
    to the nodes over 128 of them (the node over all 256 is the next tile level's hash). C2SP tiles store every
    8th level of the tree only; expanding a tile once when it is read spares each proof some 250 hashes per
    tile. 16 KiB for a full tile."""

    __slots__ = ("_data", "_offsets")

    def __init__(self, row: bytes) -> None:
        sha256 = hashlib.sha256  # inlined node_hash: this runs for every tile read
        hashes = [row[i : i + HASH_SIZE] for i in range(0, len(row), HASH_SIZE)]
        parts, offsets, offset = [row], [0], len(hashes)
        for _ in range(TILE_HEIGHT - 1):
            hashes = [sha256(b"\x01" + hashes[i] + hashes[i + 1]).digest() for i in range(0, len(hashes) - 1, 2)]
            parts.append(b"".join(hashes))
            offsets.append(offset)
            offset += len(hashes)
        self._data = b"".join(parts)
        self._offsets = offsets

    def node(self, sub: int, position: int) -> bytes:
        """The node over 2**sub of the tile's hashes, the `position`-th of those."""
        start = (self._offsets[sub] + position) * HASH_SIZE
        return self._data[start : start + HASH_SIZE]


def _locate(height: int, k: int) -> tuple[tuple[int, int], int, int]:
    """Where complete node (height, k) of the tree is: its tile (level, idx), and its (sub, position) there."""
    level, sub = divmod(height, TILE_HEIGHT)
    first = k << sub  # the node's first hash in its tile level
    return (level, first >> TILE_HEIGHT), sub, (first & (TILE_WIDTH - 1)) >> sub


_REBUILD_ADVICE = ("the tiles are derived from the entries: stop the bridge, delete every row of tree_tiles and "
                   "start it again, which rebuilds them from the entries (`build_tiles`); or restore the ledger "
                   "database from a backup")


def build_tiles(tree: StoredTree, leaf_hashes: Iterator[bytes], in_transaction: Callable[[list[TileRow]], None], *,
                batch: int = 1 << 16, progress: Callable[[int], None] | None = None) -> int:
    """Build the tiles of a ledger that predates them: feed its stored leaf hashes from `tree.size` on, in order,
    `batch` at a time; `in_transaction(rows)` writes and commits each batch's rows. Streaming: memory is one
    batch. Resumable: after a crash, `tree.reload()` and call again with the leaves from `tree.size`. Calls
    `progress(size)` after each batch; returns the final size."""
    chunk: list[bytes] = []
    for h in leaf_hashes:
        chunk.append(h)
        if len(chunk) == batch:
            _commit_batch(tree, chunk, in_transaction, progress)
            chunk = []
    if chunk:
        _commit_batch(tree, chunk, in_transaction, progress)
    return tree.size


def _commit_batch(tree: StoredTree, chunk: list[bytes], in_transaction: Callable[[list[TileRow]], None],
                  progress: Callable[[int], None] | None) -> None:
    rows = tree.stage(chunk)
    try:
        in_transaction(rows)
    except BaseException:
        tree.abort()
        raise
    tree.commit()
    if progress is not None:
        progress(tree.size)

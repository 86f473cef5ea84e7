"""The log as C2SP tlog-tiles: tile paths, which tiles a tree has, and RFC 9162 proofs assembled from tiles.

Spec: https://c2sp.org/tlog-tiles. A tile is 256 consecutive Merkle tree hashes at one *tile level*: level 0
holds leaf hashes, and each hash at level l + 1 is the root of one full tile of level l, so tile level l
holds the nodes of tree height 8·l. The n-th tile of level l is served at `tile/<l>/<n>`, where n is written
in 3-digit path segments, all but the last prefixed with `x` (1234067 → `x001/x234/067`). The rightmost tile
of a level is usually *partial*: `tile/<l>/<n>.p/<w>` holds its first w (1..255) hashes. Entries are served
the same way as *entry bundles*, `tile/entries/<n>[.p/<w>]`, each a sequence of big-endian uint16
length-prefixed entries aligned with the level-0 tile of the same index. The signed checkpoint is at
`checkpoint` (carechain.checkpoint).

Sans-IO: this module never fetches or writes a tile. Readers ask which tiles a proof needs
(`tiles_for_ranges`), fetch them however they like (carechain.tile_client over HTTP), and hand the bytes
back (`hash_ranges`); writers feed entries into a `TileAppender`, which returns the tiles to store and keeps
only the right edge of the tree (at most 255 hashes per tile level and 255 entries): its memory does not
grow with the log. Proofs are RFC 9162 proofs, checked by `carechain.merkle` as any other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from carechain.errors import FixedReasonError
from carechain.merkle import EMPTY_ROOT, HASH_SIZE, MAX_TREE_SIZE, frontier_root, leaf_hash, node_hash

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # hashes in a full tile, entries in a full bundle
FULL_TILE_BYTES = TILE_WIDTH * HASH_SIZE
MAX_LEVEL = 63
MAX_ENTRY_SIZE = 0xFFFF  # the uint16 length prefix of an entry bundle
MAX_BUNDLE_BYTES = TILE_WIDTH * (2 + MAX_ENTRY_SIZE)
ENTRIES = -1  # the `level` of an entry bundle's TileRef

_WIDTH = re.compile(r"[1-9][0-9]{0,2}")
_SEGMENT = re.compile(r"[0-9]{3}")


class TileError(FixedReasonError):
    """A tile path, tile or entry bundle that is malformed, or that does not belong to the tree asked about."""

    REASON = "bad_tile"


class MissingTile(TileError):
    """A proof needs a tile that was not supplied (`tile` says which)."""

    REASON = "missing_tile"

    def __init__(self, tile: TileRef) -> None:
        super().__init__(f"tile {tile.path()} is needed but was not supplied")
        self.tile = tile


@dataclass(frozen=True, order=True)
class TileRef:
    """One tile (`level` 0..63) or entry bundle (`level` ENTRIES): its index in the level and width (1..256)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if not ENTRIES <= self.level <= MAX_LEVEL:
            raise TileError(f"tile level must be between 0 and {MAX_LEVEL} (or entries), got {self.level}")
        if not 0 <= self.index <= MAX_TREE_SIZE >> TILE_HEIGHT:
            raise TileError(f"tile index must be between 0 and 2**56-1, got {self.index}")
        if not 1 <= self.width <= TILE_WIDTH:
            raise TileError(f"tile width must be between 1 and {TILE_WIDTH}, got {self.width}")

    @property
    def partial(self) -> bool:
        return self.width < TILE_WIDTH

    @property
    def is_entries(self) -> bool:
        return self.level == ENTRIES

    def full(self) -> TileRef:
        """The full tile (or bundle) this one is a prefix of."""
        return TileRef(self.level, self.index)

    def path(self) -> str:
        """The tile's path below the log's prefix, e.g. `tile/0/x001/x234/067.p/8`."""
        level = "entries" if self.is_entries else str(self.level)
        suffix = f".p/{self.width}" if self.partial else ""
        return f"tile/{level}/{encode_index(self.index)}{suffix}"

    @classmethod
    def parse(cls, path: str) -> TileRef:
        """Parse a tile or entry-bundle path (canonical form only: one path per tile)."""
        parts = path.split("/")
        if len(parts) < 3 or parts[0] != "tile":
            raise TileError(f"{path!r} is not a tile path (tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>])")
        level_text, rest = parts[1], parts[2:]
        if level_text == "entries":
            level = ENTRIES
        elif level_text == "0" or (level_text.isascii() and level_text.isdigit() and level_text[0] != "0"):
            level = int(level_text)
        else:
            raise TileError(f"{path!r}: tile level {level_text!r} is not a decimal without leading zeros")
        width = TILE_WIDTH
        if len(rest) >= 2 and rest[-2].endswith(".p"):
            if not _WIDTH.fullmatch(rest[-1]) or int(rest[-1]) >= TILE_WIDTH:
                raise TileError(f"{path!r}: partial width {rest[-1]!r} is not a decimal from 1 to 255")
            width = int(rest[-1])
            rest = [*rest[:-2], rest[-2][:-2]]
        index = 0
        for i, seg in enumerate(rest):
            digits = seg[1:] if i < len(rest) - 1 and seg.startswith("x") else seg
            if not _SEGMENT.fullmatch(digits) or (i < len(rest) - 1 and digits is seg):
                raise TileError(f"{path!r}: index segment {seg!r} is not x<3 digits> (or 3 digits, last)")
            index = index * 1000 + int(digits)
        ref = cls(level, index, width)
        if ref.path() != path:
            raise TileError(f"{path!r} is not in canonical form; the tile's path is {ref.path()!r}")
        return ref


def encode_index(n: int) -> str:
    """A tile index as 3-digit path segments, all but the last prefixed with `x` (1234067 → x001/x234/067)."""
    text = f"{n % 1000:03d}"
    n //= 1000
    while n:
        text = f"x{n % 1000:03d}/{text}"
        n //= 1000
    return text


# -- which tiles a tree has ------------------------------------------------------------------------------


def tile_at(level: int, index: int, size: int) -> TileRef:
    """Tile `index` of `level` as the tree of `size` leaves has it: full, or partial at the right edge."""
    _check_size(size)
    count = (size >> (TILE_HEIGHT * level)) if level != ENTRIES else size
    width = min(TILE_WIDTH, count - index * TILE_WIDTH)
    if width <= 0:
        what = "entry bundle" if level == ENTRIES else f"level-{level} tile"
        raise TileError(f"a tree of {size} leaves has no {what} {index}")
    return TileRef(level, index, width)


def tiles_for_size(size: int) -> list[TileRef]:
    """Every hash tile of a tree of `size` leaves, level by level (entry bundles: `bundles_for_size`)."""
    _check_size(size)
    refs: list[TileRef] = []
    level, count = 0, size
    while count:
        full, rest = divmod(count, TILE_WIDTH)
        refs.extend(TileRef(level, n) for n in range(full))
        if rest:
            refs.append(TileRef(level, full, rest))
        level, count = level + 1, count >> TILE_HEIGHT
    return refs


def bundles_for_size(size: int) -> list[TileRef]:
    """Every entry bundle of a log of `size` entries."""
    _check_size(size)
    full, rest = divmod(size, TILE_WIDTH)
    return [TileRef(ENTRIES, n) for n in range(full)] + ([TileRef(ENTRIES, full, rest)] if rest else [])


def edge_tiles(size: int) -> list[TileRef]:
    """The partial tiles and the partial entry bundle of a tree of `size`: all a writer needs to resume."""
    _check_size(size)
    refs = []
    level, count = 0, size
    while count:  # O(height), not tiles_for_size: a resume reads nothing else
        if count % TILE_WIDTH:
            refs.append(TileRef(level, count // TILE_WIDTH, count % TILE_WIDTH))
        level, count = level + 1, count >> TILE_HEIGHT
    if size % TILE_WIDTH:
        refs.append(TileRef(ENTRIES, size // TILE_WIDTH, size % TILE_WIDTH))
    return refs


def changed_tiles(old_size: int, new_size: int) -> list[TileRef]:
    """The tiles and bundles that growing a tree from `old_size` to `new_size` leaves adds: the tiles that
    became full, and the partial tiles of the new size. Everything else the old tree had stays as it was."""
    _check_size(old_size)
    _check_size(new_size)
    if old_size > new_size:
        raise TileError(f"a log never shrinks: {old_size} → {new_size}")
    refs: list[TileRef] = []
    for level, shift in [(ENTRIES, 0), *((lv, TILE_HEIGHT * lv) for lv in range(MAX_LEVEL + 1))]:
        old, new = old_size >> shift, new_size >> shift
        if not new:
            break
        refs.extend(TileRef(level, n) for n in range(old // TILE_WIDTH, new // TILE_WIDTH))
        if new % TILE_WIDTH and new != old:
            refs.append(TileRef(level, new // TILE_WIDTH, new % TILE_WIDTH))
    return refs


# -- proofs from tiles ------------------------------------------------------------------------------------


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges [start, end) whose Merkle tree hashes are the RFC 9162 inclusion proof of leaf
    `index` in the tree of `size` leaves, in proof order (the leaf's sibling first)."""
    _check_size(size)
    if not 0 <= index < size:
        raise TileError(f"leaf index {index} is outside a tree of {size} leaves")
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:  # PATH(m, D[lo:hi]) of RFC 9162 §2.1.3.1, walked from the root down
        k = _split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return ranges


def consistency_ranges(size1: int, size2: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes are the RFC 9162 consistency proof from `size1` to `size2` leaves."""
    _check_size(size1)
    _check_size(size2)
    if size1 > size2:
        raise TileError(f"size1 {size1} is larger than size2 {size2}: a log never shrinks")
    if size1 == 0 or size1 == size2:
        return []
    ranges: list[tuple[int, int]] = []
    lo, hi, whole = 0, size2, True  # SUBPROOF(m, D[lo:hi], b) of RFC 9162 §2.1.4.1; `whole` is b
    while size1 != hi:
        k = _split(hi - lo)
        if size1 - lo <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
            whole = False
    if not whole:
        ranges.append((lo, hi))
    ranges.reverse()
    return ranges


def tiles_for_ranges(ranges: Iterable[tuple[int, int]], size: int) -> list[TileRef]:
    """The tiles of the tree of `size` leaves that hold the hashes of these leaf ranges (sorted, unique)."""
    refs = {_node_tile(height, k, size)[0] for start, end in ranges for height, k in subtree_nodes(start, end, size)}
    return sorted(refs)


def hash_ranges(ranges: Iterable[tuple[int, int]], size: int, tiles: Mapping[TileRef, bytes]) -> list[bytes]:
    """The Merkle tree hash of each leaf range, from `tiles` (tile → its bytes, as `tiles_for_ranges` named
    them). Raises MissingTile for a tile not supplied, TileError for one of the wrong length."""
    rows: dict[TileRef, Sequence[bytes]] = {}
    out: list[bytes] = []
    for start, end in ranges:
        hashes = []
        for height, k in subtree_nodes(start, end, size):
            ref, first, count = _node_tile(height, k, size)
            row = rows.get(ref)
            if row is None:
                data = tiles.get(ref)
                if data is None:
                    raise MissingTile(ref)
                row = rows[ref] = split_tile(ref, data)
            hashes.append(_perfect_root(row[first : first + count]))
        out.append(fold_subtrees(hashes))
    return out


def subtree_nodes(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """MTH(D[start:end]) as complete subtrees (height, index), largest first: one if end - start is a power of
    two (start is then a multiple of it), else the right edge's decomposition."""
    if not 0 <= start < end <= size:
        raise TileError(f"leaf range [{start}, {end}) is not inside a tree of {size} leaves")
    nodes = []
    while start < end:
        height = ((end - start).bit_length() - 1)
        if start & ((1 << height) - 1):
            raise TileError(f"leaf range [{start}, {end}) is not a subtree of an RFC 9162 tree")
        nodes.append((height, start >> height))
        start += 1 << height
    return nodes


def fold_subtrees(hashes: Sequence[bytes]) -> bytes:
    """MTH of a leaf range from the hashes of its `subtree_nodes`, largest first (RFC 9162 folds from the right)."""
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = node_hash(left, h)
    return h


def root_range(size: int) -> list[tuple[int, int]]:
    """The one range whose hash is the root of the tree of `size` leaves (none for the empty tree)."""
    _check_size(size)
    return [(0, size)] if size else []


def root_from_tiles(size: int, tiles: Mapping[TileRef, bytes]) -> bytes:
    """RFC 9162 root of the tree of `size` leaves, from the tiles `tiles_for_ranges(root_range(size))`."""
    return hash_ranges(root_range(size), size, tiles)[0] if size else EMPTY_ROOT


def split_tile(ref: TileRef, data: bytes) -> list[bytes]:
    """The hashes of a hash tile, checking that it is as long as its width says."""
    if ref.is_entries:
        raise TileError(f"{ref.path()} is an entry bundle, not a hash tile")
    if len(data) != ref.width * HASH_SIZE:
        raise TileError(f"tile {ref.path()} must be {ref.width * HASH_SIZE} bytes ({ref.width} hashes), "
                        f"got {len(data)}")
    return [bytes(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


# -- entry bundles -----------------------------------------------------------------------------------------


def encode_bundle(entries: Sequence[bytes]) -> bytes:
    """An entry bundle: each entry as a big-endian uint16 length and its bytes."""
    if not 1 <= len(entries) <= TILE_WIDTH:
        raise TileError(f"an entry bundle holds 1 to {TILE_WIDTH} entries, got {len(entries)}")
    out = bytearray()
    for i, e in enumerate(entries):
        if len(e) > MAX_ENTRY_SIZE:
            raise TileError(f"entry {i} of the bundle is {len(e)} bytes; tlog-tiles entries are at most "
                            f"{MAX_ENTRY_SIZE} bytes (a uint16 length)")
        out += len(e).to_bytes(2, "big") + e
    return bytes(out)


def decode_bundle(ref: TileRef, data: bytes) -> list[bytes]:
    """The entries of bundle `ref`, checking that it holds exactly `ref.width` of them and nothing else."""
    entries: list[bytes] = []
    view, pos = memoryview(data), 0
    while pos < len(view):
        if len(entries) == ref.width or pos + 2 > len(view):
            raise TileError(f"entry bundle {ref.path()} has bytes after its {len(entries)} entries")
        n = int.from_bytes(view[pos : pos + 2], "big")
        if pos + 2 + n > len(view):
            raise TileError(f"entry bundle {ref.path()}: entry {len(entries)} claims {n} bytes, past the end")
        entries.append(bytes(view[pos + 2 : pos + 2 + n]))
        pos += 2 + n
    if len(entries) != ref.width:
        raise TileError(f"entry bundle {ref.path()} must hold {ref.width} entries, got {len(entries)}")
    return entries


# -- writing: the right edge of a tiled tree ------------------------------------------------------------------


class HashEdge:
    """The right edge of a tiled tree fed leaf hashes: the partial row of every tile level (< 256 hashes each).

    Its memory is bounded by the tree's height, never by its size. `append` returns the hash tiles each append
    completes; `partial_tiles` the partial ones of the current size. `TileAppender` adds entry bundles on top;
    a store that already has leaf hashes (the bridge's `StoredTree`) feeds them in directly.
    """

    def __init__(self) -> None:
        self._rows: list[list[bytes]] = []  # per tile level: hashes of its partial tile
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    @classmethod
    def resume(cls, size: int, tiles: Mapping[TileRef, bytes]) -> HashEdge:
        """The edge of a tree of `size` leaves, from its partial hash tiles (`edge_tiles(size)`; tile → bytes)."""
        edge = cls()
        edge._size = size
        for ref in edge_tiles(size):
            if ref.is_entries:
                continue
            data = tiles.get(ref)
            if data is None:
                raise MissingTile(ref)
            while len(edge._rows) <= ref.level:
                edge._rows.append([])
            edge._rows[ref.level] = split_tile(ref, data)
        return edge

    def copy(self) -> HashEdge:
        """An independent copy: appending to it leaves this edge as it is."""
        other = HashEdge()
        other._rows = [list(row) for row in self._rows]
        other._size = self._size
        return other

    def append(self, leaf_hashes: Iterable[bytes]) -> Iterator[tuple[TileRef, bytes]]:
        """Append leaf hashes; yield each full hash tile as it completes (store them as they come)."""
        for h in leaf_hashes:
            if len(h) != HASH_SIZE:
                raise TileError(f"leaf hash {self._size} must be {HASH_SIZE} bytes, got {len(h)}")
            self._size += 1
            h, level = bytes(h), 0
            while True:
                if level == len(self._rows):
                    self._rows.append([])
                row = self._rows[level]
                row.append(h)
                if len(row) < TILE_WIDTH:
                    break
                yield TileRef(level, (self._size >> (TILE_HEIGHT * (level + 1))) - 1), b"".join(row)
                h = _perfect_root(row)
                self._rows[level] = []
                level += 1

    def partial_tiles(self) -> list[tuple[TileRef, bytes]]:
        """The partial hash tiles of the current size, lowest level first."""
        return [(TileRef(level, self._size >> (TILE_HEIGHT * (level + 1)), len(row)), b"".join(row))
                for level, row in enumerate(self._rows) if row]

    def partial_row(self, level: int) -> list[bytes]:
        """The hashes of the partial tile of `level` (empty when the level's tiles are all full)."""
        return self._rows[level] if level < len(self._rows) else []

    def root(self) -> bytes:
        """RFC 9162 root of the tree so far, from the right edge alone."""
        frontier: list[bytes] = []
        for row in reversed(self._rows):  # largest subtrees first: the highest level's hashes
            start = 0
            for bit in reversed(range(TILE_HEIGHT)):
                if len(row) >> bit & 1:
                    frontier.append(_perfect_root(row[start : start + (1 << bit)]))
                    start += 1 << bit
        return frontier_root(frontier)


class TileAppender:
    """The right edge of a tiled log, fed entries in order; returns the tiles and bundles each append completes.

    It holds the partial row of every tile level (a `HashEdge`) and the entries of the partial bundle,
    so its memory is bounded by the tree's height, never by its size.
    """

    def __init__(self) -> None:
        self._edge = HashEdge()
        self._entries: list[bytes] = []  # entries of the partial bundle

    @property
    def size(self) -> int:
        return self._edge.size

    @classmethod
    def resume(cls, size: int, tiles: Mapping[TileRef, bytes]) -> TileAppender:
        """The appender of a tree of `size` leaves, from its `edge_tiles(size)` (tile → bytes)."""
        app = cls()
        app._edge = HashEdge.resume(size, tiles)
        if size % TILE_WIDTH:
            ref = TileRef(ENTRIES, size // TILE_WIDTH, size % TILE_WIDTH)
            data = tiles.get(ref)
            if data is None:
                raise MissingTile(ref)
            app._entries = decode_bundle(ref, data)
        return app

    def append(self, entries: Iterable[bytes]) -> Iterator[tuple[TileRef, bytes]]:
        """Append entries; yield each full tile and full bundle as it completes (store them as they come)."""
        for entry in entries:
            if len(entry) > MAX_ENTRY_SIZE:
                raise TileError(f"entry {self.size} is {len(entry)} bytes; tlog-tiles entry bundles hold entries "
                                f"of at most {MAX_ENTRY_SIZE} bytes")
            self._entries.append(bytes(entry))
            if len(self._entries) == TILE_WIDTH:
                yield TileRef(ENTRIES, self.size >> TILE_HEIGHT), encode_bundle(self._entries)
                self._entries = []
            yield from self._edge.append([leaf_hash(entry)])

    def partial_tiles(self) -> list[tuple[TileRef, bytes]]:
        """The partial tiles and partial bundle of the current size (store them with its checkpoint)."""
        out = self._edge.partial_tiles()
        if self._entries:
            out.append((TileRef(ENTRIES, self.size >> TILE_HEIGHT, len(self._entries)),
                        encode_bundle(self._entries)))
        return out

    def root(self) -> bytes:
        """RFC 9162 root of the tree so far, from the right edge alone."""
        return self._edge.root()


# -- internals --------------------------------------------------------------------------------------------


def _node_tile(height: int, k: int, size: int) -> tuple[TileRef, int, int]:
    """Where complete node (height, k) is found: its tile, and the first of and number of the tile's hashes
    whose perfect subtree it is."""
    level, sub = divmod(height, TILE_HEIGHT)
    first = k << sub  # position of its first hash in the whole level
    ref = tile_at(level, first // TILE_WIDTH, size)
    return ref, first % TILE_WIDTH, 1 << sub


def _perfect_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a perfect binary tree over 2**k hashes."""
    row = list(hashes)
    while len(row) > 1:
        row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n > 1): where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise TileError(f"tree size must be an integer between 0 and 2**64-1, got {size!r}")

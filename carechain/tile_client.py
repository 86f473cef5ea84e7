"""Read a carechain log from C2SP tlog-tiles over HTTP(S): its checkpoint, inclusion and consistency proofs, and
every entry for a full audit. The I/O shell around the sans-IO `carechain.tiles`.

Nothing the server sends is trusted: the checkpoint must verify with the log key the caller gives, every proof
is checked against it by `carechain.proofs` (so a wrong tile makes the proof fail, never pass), and a full read
recomputes every tile from the entries. Every request has a timeout and a size bound; failures are
`TileFetchError` with the URL and what to do.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from carechain.checkpoint import MAX_NOTE_SIZE, Checkpoint
from carechain.errors import FixedReasonError
from carechain.merkle import HASH_SIZE, leaf_hash
from carechain.proofs import ConsistencyBundle, InclusionBundle, verify_checkpoint
from carechain.tiles import (
    ENTRIES,
    FULL_TILE_BYTES,
    MAX_BUNDLE_BYTES,
    TileAppender,
    TileError,
    TileRef,
    consistency_ranges,
    decode_bundle,
    hash_ranges,
    inclusion_ranges,
    split_tile,
    tile_at,
    tiles_for_ranges,
)

DEFAULT_TIMEOUT_S = 10.0
USER_AGENT = "carechain-tiles/1"


class TileFetchError(FixedReasonError):
    """A tile, bundle or checkpoint could not be fetched (network, HTTP status, size), or is not what it must be."""

    REASON = "tiles_unavailable"


@dataclass(frozen=True)
class TiledEntry:
    index: int
    data: bytes
    leaf_hash: bytes  # as the level-0 tile has it, checked against the entry's own hash


class HttpTiles:
    """GET the resources of a tiled log below `base_url` (http or https), bounded in time and size."""

    def __init__(self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, parallel: int = 8) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise TileFetchError(f"{base_url!r} is not an http:// or https:// URL of a tiled log")
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout_s = timeout_s
        self.parallel = parallel
        self.requests = 0

    def get(self, path: str, max_bytes: int) -> bytes | None:
        """The body at `path` (decompressed), None on 404 or 410; at most `max_bytes`, else TileFetchError."""
        url = self.base_url + path
        request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip, identity",
                                                       "User-Agent": USER_AGENT})
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (scheme checked)
                raw = response.read(max_bytes + 1)
                encoding = (response.headers.get("Content-Encoding") or "identity").lower()
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                return None
            raise TileFetchError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TileFetchError(f"GET {url}: {reason} (is the log served there? timeout {self.timeout_s:g} s)"
                                 ) from None
        if encoding == "gzip":
            raw = _gunzip(raw, max_bytes, url)
        elif encoding != "identity":
            raise TileFetchError(f"GET {url}: unsupported Content-Encoding {encoding!r}")
        if len(raw) > max_bytes:
            raise TileFetchError(f"GET {url}: the body is larger than the {max_bytes} bytes such a resource can be")
        return raw

    def checkpoint(self) -> str:
        """The checkpoint note the log serves (not yet verified)."""
        data = self.get("checkpoint", MAX_NOTE_SIZE)
        if data is None:
            raise TileFetchError(f"{self.base_url}checkpoint: not found (HTTP 404): is this the URL of a tiled log?")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise TileFetchError(f"{self.base_url}checkpoint is not UTF-8 text") from None

    def tile(self, ref: TileRef) -> bytes:
        """A tile or bundle; a partial one that is gone is read from its full tile (tlog-tiles allows the log to
        delete partial tiles once the full one exists)."""
        limit = MAX_BUNDLE_BYTES if ref.is_entries else FULL_TILE_BYTES
        data = self.get(ref.path(), limit)
        if data is None and ref.partial:
            full = self.get(ref.full().path(), limit)
            if full is not None:
                data = _bundle_prefix(ref, full) if ref.is_entries else full[: ref.width * HASH_SIZE]
        if data is None:
            raise TileFetchError(f"{self.base_url}{ref.path()}: not found (HTTP 404); the log does not serve a tile "
                                 "its checkpoint needs")
        return data

    def tiles(self, refs: Iterable[TileRef]) -> dict[TileRef, bytes]:
        """Several tiles, fetched in parallel."""
        refs = list(refs)
        if len(refs) <= 1:
            return {r: self.tile(r) for r in refs}
        with ThreadPoolExecutor(min(self.parallel, len(refs))) as pool:
            return dict(zip(refs, pool.map(self.tile, refs), strict=True))


class TiledLog:
    """A log read from tiles, trusting nothing but `log_public_key`."""

    def __init__(self, source: HttpTiles, log_public_key: bytes) -> None:
        self.source = source
        self.log_public_key = log_public_key

    def checkpoint(self) -> tuple[Checkpoint, str]:
        """The served checkpoint, verified with the log key (VerificationError if it does not)."""
        note = self.source.checkpoint()
        return verify_checkpoint(note, self.log_public_key), note

    def entry(self, index: int, tree_size: int) -> bytes:
        """Entry `index` from its bundle in the tree of `tree_size` leaves (not yet checked against a root)."""
        if not 0 <= index < tree_size:
            raise TileFetchError(f"leaf {index} is not in the log of {tree_size} entries its checkpoint covers")
        ref = tile_at(ENTRIES, index // 256, tree_size)
        return decode_bundle(ref, self.source.tile(ref))[index % 256]

    def inclusion_bundle(self, index: int, note: str) -> InclusionBundle:
        """A proof bundle (docs/proofs.md) for leaf `index` against checkpoint `note`: check it with
        `carechain.proofs.verify_inclusion_bundle`."""
        cp = verify_checkpoint(note, self.log_public_key)
        entry = self.entry(index, cp.tree_size)
        ranges = inclusion_ranges(index, cp.tree_size)
        path = hash_ranges(ranges, cp.tree_size, self.source.tiles(tiles_for_ranges(ranges, cp.tree_size)))
        return InclusionBundle(leaf_index=index, tree_size=cp.tree_size, root_hash=cp.root_hash.hex(),
                               inclusion_path=[h.hex() for h in path], entry=base64.b64encode(entry).decode(),
                               checkpoint=note, log_public_key=self.log_public_key.hex())

    def consistency_bundle(self, old_note: str, new_note: str) -> ConsistencyBundle:
        """A proof bundle that `new_note`'s tree extends `old_note`'s, from the tiles of the newer tree."""
        old = verify_checkpoint(old_note, self.log_public_key)
        new = verify_checkpoint(new_note, self.log_public_key)
        if old.tree_size > new.tree_size:
            raise TileFetchError(f"the served checkpoint (size {new.tree_size}) is older than the one given "
                                 f"(size {old.tree_size}): the log rolled back, or serves a stale copy")
        path = self.consistency_path(old.tree_size, new.tree_size)
        return ConsistencyBundle(old_checkpoint=old_note, new_checkpoint=new_note,
                                 consistency_path=[h.hex() for h in path], log_public_key=self.log_public_key.hex())

    def consistency_path(self, size1: int, size2: int) -> list[bytes]:
        """The RFC 9162 consistency proof from `size1` to `size2` leaves, from the tiles of the tree of `size2`
        (not yet checked: `carechain.merkle.verify_consistency` against the two roots does)."""
        ranges = consistency_ranges(size1, size2)
        try:
            return hash_ranges(ranges, size2, self.source.tiles(tiles_for_ranges(ranges, size2)))
        except TileError as exc:
            raise TileFetchError(f"{self.source.base_url}: {exc}") from None

    def entry_range(self, start: int, stop: int, tree_size: int, window: int = 16) -> list[bytes]:
        """Entries `start`..`stop - 1` of the tree of `tree_size` leaves, from their bundles, each bundle checked
        entry by entry against the leaf hashes of its level-0 tile (a bundle that does not match is refused
        here, naming it). That the tiles are the tree's is the caller's check: the entries must hash to the
        root its checkpoint signs (with the frontier it holds, as a witness does)."""
        if not 0 <= start <= stop <= tree_size:
            raise TileFetchError(f"entries {start}..{stop - 1} are not in the log of {tree_size} entries")
        out: list[bytes] = []
        numbers = range(start // 256, -(-stop // 256))
        with ThreadPoolExecutor(self.source.parallel) as pool:
            for first in range(0, len(numbers), window):
                batch = [tile_at(ENTRIES, n, tree_size) for n in numbers[first : first + window]]
                level0 = [TileRef(0, b.index, b.width) for b in batch]
                fetched = dict(zip(batch + level0, pool.map(self.source.tile, batch + level0), strict=True))
                for bundle, tile0 in zip(batch, level0, strict=True):
                    items, _ = _checked_bundle(bundle, fetched[bundle], tile0, fetched[tile0])
                    base = bundle.index * 256
                    out.extend(items[max(start - base, 0) : stop - base])
        return out

    def entries(self, cp: Checkpoint, window: int = 16) -> Iterator[TiledEntry]:
        """Every entry of the tree `cp` signs, in order, while rebuilding every tile from them and comparing it
        with the served one; at the end the rebuilt root must be the checkpoint's. Raises TileFetchError at the
        first difference. Bundles are fetched `window` at a time in parallel; memory stays bounded."""
        appender = TileAppender()
        count = -(-cp.tree_size // 256)  # bundles, the last maybe partial
        with ThreadPoolExecutor(self.source.parallel) as pool:
            for first in range(0, count, window):
                batch = [tile_at(ENTRIES, n, cp.tree_size) for n in range(first, min(count, first + window))]
                level0 = [TileRef(0, b.index, b.width) for b in batch]
                fetched = dict(zip(batch + level0, pool.map(self.source.tile, batch + level0), strict=True))
                for bundle, tile0 in zip(batch, level0, strict=True):
                    items, leaf_hashes = _checked_bundle(bundle, fetched[bundle], tile0, fetched[tile0])
                    base = bundle.index * 256
                    for ref, data in appender.append(items):
                        # Level 0 was just compared hash by hash; the levels above are rebuilt and compared here.
                        if ref.level > 0 and self.source.tile(ref) != data:
                            raise TileFetchError(f"tile {ref.path()} is not what the tiles below it hash to: the "
                                                 "log serves tiles that do not match its entries")
                    for i, (item, h) in enumerate(zip(items, leaf_hashes, strict=True)):
                        yield TiledEntry(base + i, item, h)
        for ref, data in appender.partial_tiles():
            if not ref.is_entries and ref.level > 0 and self.source.tile(ref) != data:
                raise TileFetchError(f"partial tile {ref.path()} is not what the entries hash to")
        if appender.root() != cp.root_hash:
            raise TileFetchError(f"the {cp.tree_size} entries served do not hash to the root the checkpoint signs")


def _checked_bundle(bundle: TileRef, data: bytes, tile0: TileRef, tile0_data: bytes
                    ) -> tuple[list[bytes], list[bytes]]:
    """The entries of a bundle and their leaf hashes, each checked against its level-0 tile's."""
    try:
        items = decode_bundle(bundle, data)
        hashes = split_tile(tile0, tile0_data)
    except TileError as exc:
        raise TileFetchError(str(exc)) from None
    leaf_hashes = [leaf_hash(item) for item in items]
    for i, h in enumerate(leaf_hashes):
        if hashes[i] != h:
            raise TileFetchError(f"entry {bundle.index * 256 + i} does not hash to its leaf hash in tile "
                                 f"{tile0.path()}: the log serves entries its tiles do not commit to")
    return items, leaf_hashes


def _gunzip(raw: bytes, max_bytes: int, url: str) -> bytes:
    """Decompress at most `max_bytes + 1` bytes: a small gzip body cannot expand without bound."""
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise TileFetchError(f"GET {url}: the gzip body is damaged ({exc})") from None
    return out


def _bundle_prefix(ref: TileRef, full: bytes) -> bytes:
    """The first `ref.width` entries of a full bundle, re-framed."""
    pos = 0
    for _ in range(ref.width):
        if pos + 2 > len(full):
            break
        pos += 2 + int.from_bytes(full[pos : pos + 2], "big")
    return full[:pos]


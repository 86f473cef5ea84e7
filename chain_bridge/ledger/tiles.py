"""Keep a directory of C2SP tlog-tiles up to date from the ledger, for any static web server or CDN to serve.

The layout is the URL layout (docs/tiles.md): `checkpoint`, `tile/<L>/<N>[.p/<W>]`, `tile/entries/<N>[.p/<W>]`.
`TileWriter.publish(note, size, leaves)` writes only what growing the tiled tree to the checkpoint's size adds
(the tiles and bundles that became full, and the new partial ones), checks that the tiles' root is the root the
note signs, and writes the checkpoint last. Every file is replaced atomically (temporary file, fsync, rename,
fsync of the directory), so a crash at any point leaves the old checkpoint with every tile it needs; full
tiles are deterministic, so whatever was written after it is written again, identically, by the next run.

The writer's memory is the right edge of the tree (`carechain.tiles.TileAppender`): at most 255 hashes per
tile level and 255 entries, whatever the size of the log. It resumes from the directory itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from carechain.checkpoint import Checkpoint, CheckpointError, NoteError, parse_note
from carechain.files import PUBLIC, write_atomic
from carechain.tiles import TileAppender, TileError, TileRef, edge_tiles

CHECKPOINT_FILE = "checkpoint"

# leaves(start, stop): the log's entries with indexes start..stop-1, in order (e.g. `Ledger.leaves`).
Leaves = Callable[[int, int], Iterable[bytes]]


class TileWriterError(Exception):
    """The tile directory cannot be brought up to the ledger: what is wrong and what to do."""


class TileWriter:
    """The tile directory of one log, resumed from what it holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.origin: str | None = None
        self.written = 0  # files written since start (tiles, bundles, checkpoints)
        self._appender = self._resume()

    @property
    def size(self) -> int:
        """The tree size of the checkpoint the directory serves (0: none yet)."""
        return self._appender.size

    def publish(self, note: str, size: int, leaves: Leaves) -> int:
        """Bring the directory to the signed checkpoint `note` of `size` leaves; the number of files written.

        `leaves` gives the entries the directory does not have yet (from its size to `size`).
        """
        cp = _checkpoint_of(note, f"the checkpoint to publish at size {size}")
        if cp.tree_size != size:
            raise TileWriterError(f"the checkpoint to publish is for tree size {cp.tree_size}, not {size}")
        if self.origin is not None and cp.origin != self.origin:
            raise TileWriterError(f"{self.directory} serves the log {self.origin!r}, not {cp.origin!r}: give each "
                                  "log its own tiles_dir")
        if size < self.size:
            raise TileWriterError(f"{self.directory} serves a checkpoint at size {self.size}, larger than the "
                                  f"ledger's {size}: it belongs to another ledger (or the ledger was replaced); "
                                  "move it away and it is rebuilt from the ledger")
        before = self.written
        superseded: list[str] = []
        try:
            if size > self.size:
                for ref, data in self._appender.append(_exactly(leaves(self.size, size), self.size, size)):
                    self._write(ref.path(), data)
                    superseded.append(f"{ref.path()}.p")
                for ref, data in self._appender.partial_tiles():
                    path = self.directory / ref.path()
                    if not path.exists():
                        self._write(ref.path(), data)
                if self._appender.root() != cp.root_hash:
                    raise TileWriterError(f"the tiles' root at size {size} is {self._appender.root().hex()} but the "
                                          f"checkpoint signs {cp.root_hash.hex()}: the ledger's leaves do not match "
                                          "its checkpoint (run `carechain verify --full` on the ledger)")
            self._write(CHECKPOINT_FILE, note.encode())
        except BaseException:
            self._appender = self._resume()  # what the directory serves, not what we meant to write
            raise
        self.origin = cp.origin
        for partials in superseded:
            # Only once the new checkpoint is out: the old one may still need them. Readers of older checkpoints
            # fall back to the full tile, of which a partial tile is a prefix.
            shutil.rmtree(self.directory / partials, ignore_errors=True)
        return self.written - before

    # -- internals ------------------------------------------------------------------------------------------

    def _write(self, relative: str, data: bytes) -> None:
        write_atomic(self.directory / relative, data, PUBLIC)
        self.written += 1

    def _resume(self) -> TileAppender:
        path = self.directory / CHECKPOINT_FILE
        if not path.exists():
            return TileAppender()
        try:
            note = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TileWriterError(f"{path}: cannot read the checkpoint the directory serves ({exc}); move the "
                                  "directory away and it is rebuilt from the ledger") from None
        cp = _checkpoint_of(note, str(path))
        tiles: dict[TileRef, bytes] = {}
        for ref in edge_tiles(cp.tree_size):
            try:
                tiles[ref] = (self.directory / ref.path()).read_bytes()
            except OSError as exc:
                raise TileWriterError(f"{self.directory}: the tile {ref.path()} that its checkpoint at size "
                                      f"{cp.tree_size} needs cannot be read ({exc.strerror}); move the directory "
                                      "away and it is rebuilt from the ledger") from None
        try:
            appender = TileAppender.resume(cp.tree_size, tiles)
        except TileError as exc:
            raise TileWriterError(f"{self.directory}: {exc}; move the directory away and it is rebuilt from the "
                                  "ledger") from None
        if appender.root() != cp.root_hash:
            raise TileWriterError(f"{self.directory}: its partial tiles do not lead to the root of its checkpoint "
                                  f"at size {cp.tree_size}; move the directory away and it is rebuilt")
        self.origin = cp.origin
        return appender


def _checkpoint_of(note: str, what: str) -> Checkpoint:
    try:
        body, _ = parse_note(note)
        return Checkpoint.parse(body)
    except (NoteError, CheckpointError) as exc:
        raise TileWriterError(f"{what}: not a signed checkpoint ({exc})") from None


def _exactly(leaves: Iterable[bytes], start: int, stop: int) -> Iterable[bytes]:
    """The leaves, checking that there are exactly stop - start of them."""
    n = start
    for leaf in leaves:
        if n == stop:
            raise TileWriterError(f"the ledger gave more than the {stop - start} leaves {start}..{stop - 1}")
        yield leaf
        n += 1
    if n != stop:
        raise TileWriterError(f"the ledger gave leaves {start}..{n - 1} but the checkpoint covers {stop}")


"""The tile writer (chain_bridge.ledger.tiles): incremental (only what a checkpoint adds is written), crash-safe
(a failure or a SIGKILL at any point leaves a directory whose checkpoint has every tile it needs, and the next
run ends with exactly the tiles a fresh writer produces), and careful about what it publishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carechain.checkpoint import Checkpoint, sign_note
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from carechain.tiles import changed_tiles, edge_tiles
from chain_bridge.ledger.tiles import TileWriter, TileWriterError

KEY = Identity.from_seed(b"\x42" * 32)
ORIGIN = "tiles.test/log"
N = 3000
ENTRIES = [b"leaf %d " % i + b"." * (i % 50) for i in range(N)]
TREE = MerkleTree(leaf_hash(e) for e in ENTRIES)


def note(size: int, origin: str = ORIGIN, root: bytes | None = None) -> str:
    body = Checkpoint(origin, size, TREE.root(size) if root is None else root).body()
    return sign_note(body, origin, KEY.public_key, KEY.sign)


def leaves(start: int, stop: int) -> Iterator[bytes]:
    yield from ENTRIES[start:stop]


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def fresh(tmp_path: Path, size: int) -> dict[str, bytes]:
    d = tmp_path / f"fresh-{size}"
    TileWriter(d).publish(note(size), size, leaves)
    return files(d)


def assert_serves(directory: Path, size: int, tmp_path: Path, exact: bool = True) -> None:
    """The directory serves the checkpoint at `size` with every tile and bundle a fresh writer would write
    (`exact`: and nothing else but partial tiles of older checkpoints; else full tiles written ahead of a
    publish that failed may be there too, to be written again by the next)."""
    have, want = files(directory), fresh(tmp_path, size)
    assert have["checkpoint"] == note(size).encode()
    missing = {k for k in want if have.get(k) != want[k]}
    assert not missing, sorted(missing)[:5]
    stale = [k for k in have if k not in want]
    assert not exact or all(".p/" in k for k in stale), stale  # only partial tiles of older checkpoints may remain


def test_each_checkpoint_writes_only_the_tiles_it_adds(tmp_path: Path) -> None:
    w, d = TileWriter(tmp_path / "tiles"), tmp_path / "tiles"
    sizes = [1, 2, 255, 256, 300, 700, 1024, 2999, N]
    old = 0
    for size in sizes:
        written = w.publish(note(size), size, leaves)
        assert written == len(changed_tiles(old, size)) + 1  # + the checkpoint
        old = size
    assert w.publish(note(N), N, leaves) == 1  # the same checkpoint again: only its file
    assert_serves(d, N, tmp_path)
    # Full tiles replace their partial versions: no `.p` directory is left beside a full tile.
    assert not [p for p in d.rglob("*.p") if (p.parent / p.name[:-2]).is_file()]


def test_a_restarted_writer_resumes_from_its_directory_and_reads_only_new_leaves(tmp_path: Path) -> None:
    d = tmp_path / "tiles"
    TileWriter(d).publish(note(700), 700, leaves)
    asked: list[tuple[int, int]] = []

    def counting(start: int, stop: int) -> Iterator[bytes]:
        asked.append((start, stop))
        return leaves(start, stop)

    w = TileWriter(d)
    assert w.size == 700 and w.origin == ORIGIN
    w.publish(note(N), N, counting)
    assert asked == [(700, N)]
    assert_serves(d, N, tmp_path)


@pytest.mark.parametrize("fail_after", [0, 1, 255, 256, 1000])
def test_a_failure_mid_publish_leaves_the_old_checkpoint_whole_and_the_next_publish_completes(
        tmp_path: Path, fail_after: int) -> None:
    d = tmp_path / "tiles"
    w = TileWriter(d)
    w.publish(note(300), 300, leaves)

    def failing(start: int, stop: int) -> Iterator[bytes]:
        for i, leaf in enumerate(leaves(start, stop)):
            if i == fail_after:
                raise OSError(28, "No space left on device")
            yield leaf

    with pytest.raises(OSError, match="No space"):
        w.publish(note(2500), 2500, failing)
    assert w.size == 300
    assert_serves(d, 300, tmp_path, exact=False)
    assert TileWriter(d).size == 300
    w.publish(note(2500), 2500, leaves)
    assert_serves(d, 2500, tmp_path)


def test_a_writer_killed_mid_write_resumes_to_the_exact_tiles(tmp_path: Path) -> None:
    """SIGKILL a real writer process while it publishes checkpoint after checkpoint; whatever it left must serve
    its last checkpoint, and a new writer must finish with the tiles of a fresh one."""
    d = tmp_path / "tiles"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_tiles_writer import N, leaves, note
        from chain_bridge.ledger.tiles import TileWriter
        w = TileWriter(sys.argv[1])
        for size in range(7, N + 1, 7):
            w.publish(note(size), size, leaves)
            print(size, flush=True)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(d)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        published = 0
        while published < 1400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            published = int(line)
        assert published >= 1400, "the writer did not get far enough"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    w = TileWriter(d)
    assert published <= w.size <= N
    assert_serves(d, w.size, tmp_path, exact=False)
    w.publish(note(N), N, leaves)
    assert_serves(d, N, tmp_path)


def test_a_checkpoint_whose_root_the_leaves_do_not_give_is_not_published(tmp_path: Path) -> None:
    d = tmp_path / "tiles"
    w = TileWriter(d)
    w.publish(note(256), 256, leaves)
    with pytest.raises(TileWriterError, match="do not match its checkpoint"):
        w.publish(note(600, root=bytes(32)), 600, leaves)
    assert TileWriter(d).size == 256
    assert_serves(d, 256, tmp_path, exact=False)


def test_a_directory_of_another_log_or_a_larger_log_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "tiles"
    w = TileWriter(d)
    w.publish(note(600), 600, leaves)
    with pytest.raises(TileWriterError, match="give each log its own tiles_dir"):
        w.publish(note(700, origin="other.test/log"), 700, leaves)
    with pytest.raises(TileWriterError, match="larger than the ledger's"):
        w.publish(note(300), 300, leaves)
    with pytest.raises(TileWriterError, match="checkpoint covers 700"):
        w.publish(note(700), 700, lambda a, b: leaves(a, b - 1))


def test_a_damaged_edge_tile_is_found_at_start_with_what_to_do(tmp_path: Path) -> None:
    d = tmp_path / "tiles"
    TileWriter(d).publish(note(600), 600, leaves)
    edge = next(r for r in edge_tiles(600) if r.level == 0)
    (d / edge.path()).write_bytes(bytes(len((d / edge.path()).read_bytes())))
    with pytest.raises(TileWriterError, match="move the directory away"):
        TileWriter(d)
    (d / edge.path()).unlink()
    with pytest.raises(TileWriterError, match=r"cannot be read.*rebuilt from the ledger"):
        TileWriter(d)

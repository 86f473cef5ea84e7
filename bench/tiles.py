"""Tiled-log benchmark: writer throughput, and a reader proving inclusion from tiles over HTTP vs from the
in-memory tree, for a synthetic log of N leaves (docs/tiles.md).

1. Write: a `TileWriter` brings a tile directory up to a signed checkpoint every `--checkpoint-every` entries
   (20,000 by default: one second of the issue's ingest target), from synthetic 300-byte entries (about the size
   of a real event entry). Reported: entries/s, files written, bytes on disk, the writer's peak RSS.
2. Read from tiles: a fresh process fetches the checkpoint from a real `http.server` on loopback, then builds and
   verifies `--proofs` inclusion proofs of random leaves (entry bundle + tiles for each, fetched in parallel).
   Reported: its peak RSS, time to the first verified proof, time per proof, HTTP requests per proof.
3. Read from memory: a fresh process loads every leaf hash (read from the level-0 tiles, as the bridge reloads
   them from its store) into `carechain.merkle_tree.MerkleTree`, then makes the same proofs. Reported: peak RSS,
   load time, time per proof.

Each reader is its own process so that its peak RSS (VmHWM) is its own. One run on this machine, warm page cache.

    python bench/tiles.py [--sizes 1000000,10000000] [--checkpoint-every 20000] [--proofs 100] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain.checkpoint import Checkpoint, sign_note  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.tiles import TileAppender  # noqa: E402
from chain_bridge.ledger.tiles import TileWriter  # noqa: E402
from simulators.static_http import serve_directory  # noqa: E402

KEY = Identity.from_seed(b"\x07" * 32)
ORIGIN = "bench.example/tiles"
ENTRY_BYTES = 300


def entry(i: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (ENTRY_BYTES // 32 + 1))[:ENTRY_BYTES]


def leaves(start: int, stop: int) -> Iterator[bytes]:
    return (entry(i) for i in range(start, stop))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not carried over from the parent across exec)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024


def write(directory: Path, size: int, every: int) -> dict:
    """Publish checkpoints every `every` entries up to `size`; the roots come from a second appender."""
    writer, shadow = TileWriter(directory), TileAppender()
    done, files, spent = 0, 0, 0.0
    while done < size:
        nxt = min(size, done + every)
        for _ in shadow.append(leaves(done, nxt)):
            pass
        note = sign_note(Checkpoint(ORIGIN, nxt, shadow.root()).body(), ORIGIN, KEY.public_key, KEY.sign)
        started = time.perf_counter()
        files += writer.publish(note, nxt, leaves)
        spent += time.perf_counter() - started
        done = nxt
    on_disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {"entries": size, "seconds": round(spent, 2), "entries_per_s": round(size / spent),
            "files_written": files, "bytes_on_disk": on_disk, "checkpoints": -(-size // every)}


READ_TILES = """
import json, random, sys, time
def hwm():  # peak RSS in KiB; VmHWM, unlike ru_maxrss, is not inherited from the parent across exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.path.insert(0, {repo!r})
started = time.perf_counter()
import base64
from carechain.merkle import leaf_hash, verify_inclusion
from carechain.tile_client import HttpTiles, TiledLog
key = bytes.fromhex({key!r})
source = HttpTiles({url!r})
log = TiledLog(source, key)
cp, note = log.checkpoint()
rng = random.Random(1)
first = None
t0 = time.perf_counter()
for i in range({proofs}):
    b = log.inclusion_bundle(rng.randrange(cp.tree_size), note)  # synthetic entries: check the proof only
    verify_inclusion(b.leaf_index, b.tree_size, leaf_hash(base64.b64decode(b.entry)),
                     [bytes.fromhex(h) for h in b.inclusion_path], cp.root_hash)
    if first is None:
        first = time.perf_counter() - started
per = (time.perf_counter() - t0) / {proofs}
print(json.dumps({{"first_proof_s": round(first, 3), "per_proof_ms": round(per * 1000, 2),
                  "requests_per_proof": round((source.requests - 1) / {proofs}, 1),
                  "peak_rss_mb": round(hwm() / 1024, 1)}}))
"""

READ_MEMORY = """
import json, random, sys, time
def hwm():  # peak RSS in KiB; VmHWM, unlike ru_maxrss, is not inherited from the parent across exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
from pathlib import Path
sys.path.insert(0, {repo!r})
started = time.perf_counter()
from carechain.merkle import leaf_hash, verify_inclusion
from carechain.merkle_tree import MerkleTree
from carechain.tiles import bundles_for_size, tiles_for_size
size = {size}
d = Path({directory!r})
tree = MerkleTree()
for ref in tiles_for_size(size):
    if ref.level == 0:
        data = (d / ref.path()).read_bytes()
        tree.extend([data[i:i + 32] for i in range(0, len(data), 32)])
loaded = time.perf_counter() - started
root = tree.root()
rng = random.Random(1)
t0 = time.perf_counter()
for i in range({proofs}):
    index = rng.randrange(size)
    verify_inclusion(index, size, tree.leaf_hash(index), tree.inclusion_proof(index), root)
per = (time.perf_counter() - t0) / {proofs}
print(json.dumps({{"load_s": round(loaded, 2), "per_proof_ms": round(per * 1000, 3),
                  "peak_rss_mb": round(hwm() / 1024, 1)}}))
"""


def child(code: str, timeout: float) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise SystemExit(f"reader failed:\n{done.stderr}")
    return json.loads(done.stdout)


def run(size: int, every: int, proofs: int, base: Path) -> dict:
    directory = base / f"tiles-{size}"
    written = write(directory, size, every)
    with serve_directory(directory) as url:
        tiles = child(READ_TILES.format(repo=str(REPO), key=KEY.public_key.hex(), url=url, proofs=proofs), 600)
    memory = child(READ_MEMORY.format(repo=str(REPO), size=size, directory=str(directory), proofs=proofs), 1800)
    return {"size": size, "write": written, "read_tiles_http": tiles, "read_in_memory_tree": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000", help="comma-separated log sizes (default 1000000)")
    parser.add_argument("--checkpoint-every", type=int, default=20_000)
    parser.add_argument("--proofs", type=int, default=100)
    parser.add_argument("--dir", type=Path, help="where to write the tiles (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [run(size, args.checkpoint_every, args.proofs, Path(tmp)) for size in sizes]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'leaves':>11} | {'write ent/s':>11} {'files':>7} {'MB disk':>8} | {'tiles RSS MB':>12} "
          f"{'1st proof s':>11} {'ms/proof':>8} {'req/proof':>9} | {'tree RSS MB':>11} {'load s':>7} {'ms/proof':>8}")
    for r in results:
        w, t, m = r["write"], r["read_tiles_http"], r["read_in_memory_tree"]
        print(f"{r['size']:>11,} | {w['entries_per_s']:>11,} {w['files_written']:>7,} "
              f"{w['bytes_on_disk'] / 1e6:>8.0f} | {t['peak_rss_mb']:>12} {t['first_proof_s']:>11} "
              f"{t['per_proof_ms']:>8} {t['requests_per_proof']:>9} | {m['peak_rss_mb']:>11} {m['load_s']:>7} "
              f"{m['per_proof_ms']:>8}")
    print(f"writer peak RSS (this process, whole run): {peak_rss_mb():.0f} MB; checkpoint every "
          f"{args.checkpoint_every:,} entries; {ENTRY_BYTES}-byte entries; {args.proofs} random proofs per reader")


if __name__ == "__main__":
    main()

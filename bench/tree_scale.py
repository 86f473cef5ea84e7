"""The bridge's tree stored as tiles (chain_bridge.ledger.tree.StoredTree): start-up time and memory against
the size of the log, for synthetic logs of 1 M, 10 M and 100 M leaves (docs/tiles.md).

1. Build (cached under --work): a SQLite database holding only the `tree_tiles` table of a log of N random leaf
   hashes: random level-0 tiles, and real node hashes above them (each level-1 hash is the root of its level-0
   tile, and so on up), so every root and proof is a real one. Progress is printed as it goes. A database
   already built for that size is reused.
2. Measure, in a fresh process per size (so each RSS is its own), on a copy of the built database: open it as
   the ledger does (WAL, synchronous=FULL) and make the tree ready (read the stored size and the right edge: its
   whole start-up; the median of five opens); RSS then. Then append 100,000 leaves in batches of 2,000, each
   batch one transaction (stage, write the rows, COMMIT, commit), make 10,000 inclusion proofs of random leaves
   and 1,000 consistency proofs from random older sizes (a sample of each verified against the roots); RSS and
   peak RSS after, and proofs/s.
3. For comparison (sizes up to --baseline-max), in another fresh process: the start-up of the in-memory
   `MerkleTree` the bridge kept before, rebuilt from every leaf hash; its time and RSS.

The table ends with the ratios largest/smallest for RSS and start-up: flat means close to 1.

    python bench/tree_scale.py [--sizes 1000000,10000000,100000000] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain.merkle import HASH_SIZE  # noqa: E402
from carechain.tiles import FULL_TILE_BYTES, TILE_WIDTH, HashEdge  # noqa: E402
from chain_bridge.ledger.tree import TILES_SCHEMA  # noqa: E402

SQLITE_TYPES = {"int": "INTEGER", "blob": "BLOB"}
TILES_PER_TRANSACTION = 2_000


def tile_root(data: bytes) -> bytes:
    """The root of one full tile: the hash one tile level up (RFC 9162 node hashes)."""
    sha256 = hashlib.sha256
    row = [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
    while len(row) > 1:
        row = [sha256(b"\x01" + row[i] + row[i + 1]).digest() for i in range(0, len(row), 2)]
    return row[0]


def build(path: Path, size: int) -> None:
    """A `tree_tiles` table of `size` random leaves at `path` (reused if already built)."""
    if path.exists():
        return
    partial = path.with_suffix(".building")
    partial.unlink(missing_ok=True)
    db = sqlite3.connect(partial, isolation_level=None)
    # A scratch build: no journal, no fsync. The measured process uses the ledger's settings.
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.executescript(TILES_SCHEMA.format(**SQLITE_TYPES))
    rng = random.Random(size)
    upper = HashEdge()  # the tree above level 0: its leaves are the roots of the level-0 tiles
    full, rest = divmod(size, TILE_WIDTH)
    started, rows = time.perf_counter(), []
    insert = "INSERT INTO tree_tiles VALUES (?, ?, ?, ?)"
    for n in range(full):
        data = rng.randbytes(FULL_TILE_BYTES)
        rows.append((0, n, TILE_WIDTH, data))
        rows.extend((ref.level + 1, ref.index, ref.width, d) for ref, d in upper.append([tile_root(data)]))
        if len(rows) >= TILES_PER_TRANSACTION:
            db.execute("BEGIN")
            db.executemany(insert, rows)
            db.execute("COMMIT")
            rows = []
            done = (n + 1) * TILE_WIDTH
            elapsed = time.perf_counter() - started
            print(f"\r  building {size:,} leaves: {done / size:6.1%}  ({done / elapsed:,.0f} leaves/s)", end="",
                  file=sys.stderr, flush=True)
    if rest:
        rows.append((0, full, rest, rng.randbytes(rest * HASH_SIZE)))
    rows.extend((ref.level + 1, ref.index, ref.width, d) for ref, d in upper.partial_tiles())
    db.execute("BEGIN")
    db.executemany(insert, rows)
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    partial.rename(path)
    print(f"\r  built {size:,} leaves in {time.perf_counter() - started:.0f} s ({path.stat().st_size / 1e9:.2f} GB)"
          + " " * 20, file=sys.stderr)


MEASURE = """
import json, random, sqlite3, sys, time
sys.path.insert(0, {repo!r})
from carechain.merkle import leaf_hash, verify_consistency, verify_inclusion
from chain_bridge.ledger.tree import SqlTileStore, StoredTree

def status(field):  # KiB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

def open_tree():
    db = sqlite3.connect({path!r}, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    store = SqlTileStore(db)
    tree = StoredTree(store)
    tree.root()
    return db, store, tree

rss_before = status("VmRSS")
times = []
for attempt in range(5):  # a millisecond or so each: the median of five opens, each on a new connection
    started = time.perf_counter()
    db, store, tree = open_tree()
    times.append(time.perf_counter() - started)
    if attempt < 4:
        db.close()
open_s = sorted(times)[2]
rss_open = status("VmRSS")

rng = random.Random(7)
appended = [leaf_hash(rng.randbytes(300)) for _ in range({append})]
first_new = tree.size
t0 = time.perf_counter()
for i in range(0, len(appended), {batch}):
    db.execute("BEGIN IMMEDIATE")
    store.write(tree.stage(appended[i : i + {batch}]))
    db.execute("COMMIT")
    tree.commit()
append_s = time.perf_counter() - t0
size, root = tree.size, tree.root()

t0 = time.perf_counter()
for _ in range({inclusion}):
    tree.inclusion_proof(rng.randrange(size))
inclusion_s = time.perf_counter() - t0
for k in range(0, {append}, {append} // 100):  # proofs of leaves whose hashes we know
    verify_inclusion(first_new + k, size, appended[k], tree.inclusion_proof(first_new + k), root)

t0 = time.perf_counter()
for _ in range({consistency}):
    tree.consistency_proof(rng.randrange(1, size))
consistency_s = time.perf_counter() - t0
for old in range(1, size, size // 20):
    verify_consistency(old, size, tree.root(old), root, tree.consistency_proof(old))

print(json.dumps({{"leaves": size - {append}, "open_s": round(open_s, 4), "rss_open_mb": round(rss_open / 1024, 1),
                  "rss_interpreter_mb": round(rss_before / 1024, 1), "rss_after_mb": round(status("VmRSS") / 1024, 1),
                  "peak_rss_mb": round(status("VmHWM") / 1024, 1), "append_leaves_per_s": round({append} / append_s),
                  "inclusion_proofs_per_s": round({inclusion} / inclusion_s),
                  "consistency_proofs_per_s": round({consistency} / consistency_s)}}))
"""


BASELINE = """
import json, sqlite3, sys, time
sys.path.insert(0, {repo!r})
from carechain.merkle_tree import MerkleTree

def status(field):  # KiB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

started = time.perf_counter()
db = sqlite3.connect({path!r}, isolation_level=None)
tree = MerkleTree()
for (data,) in db.execute("SELECT data FROM tree_tiles WHERE level = 0 ORDER BY idx"):
    tree.extend([data[i : i + 32] for i in range(0, len(data), 32)])
tree.root()
print(json.dumps({{"load_s": round(time.perf_counter() - started, 2), "rss_mb": round(status("VmRSS") / 1024, 1)}}))
"""


def run_child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"the measuring process failed:\n{done.stderr}")
    result: dict = json.loads(done.stdout)
    return result


def baseline(path: Path) -> dict:
    """Start-up of the in-memory tree the bridge had before: every leaf hash reloaded into a MerkleTree."""
    return run_child(BASELINE.format(repo=str(REPO), path=str(path)))


def measure(path: Path, append: int, batch: int, inclusion: int, consistency: int) -> dict:
    """Open a copy of the built database in a fresh process (appends must not grow the cached one)."""
    work = path.with_suffix(".run")
    subprocess.run(["cp", "--reflink=auto", str(path), str(work)], check=True)
    os.sync()  # the copy's dirty pages must not be written back during the measured fsyncs
    try:
        return run_child(MEASURE.format(repo=str(REPO), path=str(work), append=append, batch=batch,
                                        inclusion=inclusion, consistency=consistency))
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{work}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000,100000000", help="comma-separated log sizes")
    parser.add_argument("--work", type=Path, help="where built databases are kept and reused (default: a temporary "
                                                  "directory, removed at the end)")
    parser.add_argument("--append", type=int, default=100_000, help="leaves appended after start-up")
    parser.add_argument("--batch", type=int, default=2_000, help="leaves per append transaction")
    parser.add_argument("--inclusion", type=int, default=10_000, help="inclusion proofs of random leaves")
    parser.add_argument("--consistency", type=int, default=1_000, help="consistency proofs from random sizes")
    parser.add_argument("--baseline-max", type=int, default=10_000_000, help="also time the in-memory MerkleTree "
                        "start-up (the bridge before the tiled tree) for sizes up to this (0: never; it needs "
                        "about 75 bytes of RAM per leaf)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for size in sizes:
            path = work / f"tree-{size}.db"
            build(path, size)
            result = measure(path, args.append, args.batch, args.inclusion, args.consistency)
            if size <= args.baseline_max:
                result["in_memory_tree"] = baseline(path)
            results.append(result)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'leaves':>13} | {'open+ready s':>12} {'RSS open MB':>11} {'RSS after MB':>12} {'peak MB':>8} | "
          f"{'append leaves/s':>15} {'incl proofs/s':>13} {'cons proofs/s':>13} | {'MerkleTree load s':>17} "
          f"{'MerkleTree MB':>13}")
    for r in results:
        before = r.get("in_memory_tree", {"load_s": "-", "rss_mb": "-"})
        print(f"{r['leaves']:>13,} | {r['open_s']:>12} {r['rss_open_mb']:>11} {r['rss_after_mb']:>12} "
              f"{r['peak_rss_mb']:>8} | {r['append_leaves_per_s']:>15,} {r['inclusion_proofs_per_s']:>13,} "
              f"{r['consistency_proofs_per_s']:>13,} | {before['load_s']:>17} {before['rss_mb']:>13}")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"ratios {hi['leaves']:,} / {lo['leaves']:,} leaves: "
              f"RSS after open {hi['rss_open_mb'] / lo['rss_open_mb']:.2f}, "
              f"RSS after appends and proofs {hi['rss_after_mb'] / lo['rss_after_mb']:.2f}, "
              f"peak RSS {hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}, start-up {hi['open_s'] / lo['open_s']:.2f}")
    print(f"each size measured in a fresh process (interpreter alone: {results[0]['rss_interpreter_mb']} MB); "
          f"{args.append:,} leaves appended in batches of {args.batch:,}, {args.inclusion:,} inclusion and "
          f"{args.consistency:,} consistency proofs; SQLite WAL, synchronous=FULL")


if __name__ == "__main__":
    main()

"""Restart benchmark: how long a bridge with contracts takes to be ready, by ledger size, with and without a
contract snapshot.

1. Build: a ledger of `--leaves` leaves, fast: devices registered the normal way, then signed heart-rate
   events prepared in memory and bulk-inserted as rows (entries + events), not sent through MQTT.
2. Before (no snapshot): what every start cost until now: open the ledger (leaf hashes → Merkle tree), then
   the contract gate replays every leaf from 0.
3. After: the gate snapshots at a checkpoint every `SNAPSHOT_EVERY` leaves; the worst case is a restart
   just before the next one, so the snapshot is taken `SNAPSHOT_EVERY - 1` leaves before the end. A fresh
   gate then restores it and replays only those leaves.
4. `--extrapolate N` (default 10,000,000): restore a synthetic N-leaf snapshot (the part of restore that is
   O(size): rebuilding the per-leaf results), and scale the per-leaf costs measured here to N.

Timings are one run on this machine, warm page cache; the ratio before ÷ after is what carries over.

    python bench/restart.py [--leaves 1000000] [--extrapolate 10000000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import cbor, envelope  # noqa: E402
from carechain.entries import ENTRY_EVENT, Entry  # noqa: E402
from carechain.events import HeartRate, make_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.inventory import InventoryDevice  # noqa: E402
from carechain.merkle import leaf_hash  # noqa: E402
from chain_bridge.contract_gate import SNAPSHOT_EVERY, ContractGate  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from chain_bridge.registry import contract_genesis, ledger_path, operator_key, register_devices  # noqa: E402
from contract_rules import Replica  # noqa: E402
from contract_rules.replay import SNAPSHOT_VERSION  # noqa: E402


def build(data_dir: Path, leaves: int, devices: int = 20) -> float:
    """Register `devices`, then bulk-insert signed events up to `leaves` leaves; returns seconds taken."""
    started = time.perf_counter()
    contract_genesis(data_dir)
    ledger = Ledger(ledger_path(data_dir))
    idents = [Identity.generate() for _ in range(devices)]
    register_devices(ledger, operator_key(data_dir), [
        InventoryDevice(name=f"d{i}", profile="heart_rate_band", owner="patient:bench", site="bench",
                        public_key=d.public_key, line=0) for i, d in enumerate(idents)])
    first = ledger.size
    ledger.close()
    db = sqlite3.connect(ledger_path(data_dir), isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # a bench fixture, built once: durability is not what is measured
    now = int(time.time() * 1000)
    body = HeartRate(bpm=72)
    chunk = 20_000
    idx = first
    while idx < leaves:
        rows_e, rows_v = [], []
        for i in range(idx, min(leaves, idx + chunk)):
            dev = idents[i % devices]
            seq = (i - first) // devices
            cose = envelope.sign(dev, make_payload(dev.device_id, seq, now + i, "heart_rate", body))
            data = Entry(ENTRY_EVENT, cose).encode()
            h = leaf_hash(data)
            rows_e.append((i, ENTRY_EVENT, h, data, now))
            rows_v.append((dev.device_id, seq, i, h))
        db.execute("BEGIN")
        db.executemany("INSERT INTO entries VALUES (?,?,?,?,?)", rows_e)
        db.executemany("INSERT INTO events VALUES (?,?,?,?)", rows_v)
        db.execute("COMMIT")
        idx += len(rows_e)
        print(f"  built {idx:,} leaves ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    db.close()
    return time.perf_counter() - started


def restart(data_dir: Path) -> dict[str, float]:
    """One start as the bridge does it: open the ledger, then bring the contract gate in step."""
    t0 = time.perf_counter()
    ledger = Ledger(ledger_path(data_dir))
    t1 = time.perf_counter()
    gate = ContractGate(contract_genesis(data_dir), operator_key(data_dir))
    gate.catch_up(ledger)
    t2 = time.perf_counter()
    ledger.close()
    return {"open_s": t1 - t0, "contracts_s": t2 - t1, "total_s": t2 - t0, "replayed": gate.replayed}


def snapshot_before_end(data_dir: Path, behind: int) -> int:
    """Take the gate's snapshot `behind` leaves before the end of the log (the worst case for a restart)."""
    ledger = Ledger(ledger_path(data_dir))
    gate = ContractGate(contract_genesis(data_dir), operator_key(data_dir))
    at = ledger.size - behind
    gate.replica.apply_leaves(ledger.leaves(0, at))
    ledger.save_contract_snapshot(at, gate._genesis_hash, gate.replica.snapshot())
    ledger.close()
    return at


def synthetic_restore_s(size: int) -> float:
    """The O(size) part of a restore: decoding a snapshot and rebuilding `size` per-leaf results."""
    data_dir = Path(tempfile.mkdtemp(prefix="cc-restart-syn-"))
    genesis = contract_genesis(data_dir)
    blob = Replica(genesis).snapshot()
    raw = cbor.decode(blob, max_depth=64)
    raw.update({"size": size, "v": SNAPSHOT_VERSION})
    blob = cbor.encode(raw)
    started = time.perf_counter()
    Replica(genesis).restore(blob)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leaves", type=int, default=1_000_000)
    ap.add_argument("--extrapolate", type=int, default=10_000_000)
    ap.add_argument("--dir", type=Path, default=None, help="build here (default: a new temporary directory)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data_dir = args.dir or Path(tempfile.mkdtemp(prefix="cc-restart-"))
    built_s = build(data_dir, args.leaves) if not ledger_path(data_dir).exists() else 0.0
    before = restart(data_dir)
    at = snapshot_before_end(data_dir, SNAPSHOT_EVERY - 1)
    after = restart(data_dir)
    n, big = args.leaves, args.extrapolate
    restore_big = synthetic_restore_s(big)
    per_leaf_replay = before["contracts_s"] / n
    per_leaf_open = before["open_s"] / n
    out = {
        "leaves": n, "build_s": round(built_s, 1), "snapshot_at": at,
        "before": {k: round(v, 3) for k, v in before.items()},
        "after": {k: round(v, 3) for k, v in after.items()},
        "replay_us_per_leaf": round(per_leaf_replay * 1e6, 1),
        "open_us_per_leaf": round(per_leaf_open * 1e6, 2),
        "contracts_speedup": round(before["contracts_s"] / after["contracts_s"], 1),
        "extrapolated": {
            "leaves": big,
            "before_contracts_s": round(per_leaf_replay * big, 1),
            "after_contracts_s": round(restore_big + per_leaf_replay * (SNAPSHOT_EVERY - 1), 2),
            "measured_restore_of_a_snapshot_this_size_s": round(restore_big, 2),
            "open_s": round(per_leaf_open * big, 1),
        },
    }
    if args.json:
        print(json.dumps(out))
        return
    ex = out["extrapolated"]
    print(f"ledger of {n:,} leaves (built in {built_s:.0f} s by bulk insert), snapshot at {at:,}")
    print(f"before (replay from leaf 0): open {before['open_s']:.2f} s + contracts {before['contracts_s']:.2f} s "
          f"({out['replay_us_per_leaf']} µs/leaf)")
    print(f"after  (from the snapshot):  open {after['open_s']:.2f} s + contracts {after['contracts_s']:.2f} s "
          f"({after['replayed']:,.0f} leaves replayed); contracts {out['contracts_speedup']}x faster")
    print(f"at {big:,} leaves (scaled per leaf; restore measured on a synthetic snapshot of that size): "
          f"contracts {ex['before_contracts_s']:.0f} s before, {ex['after_contracts_s']:.2f} s after; "
          f"opening the ledger {ex['open_s']:.0f} s either way")


if __name__ == "__main__":
    main()

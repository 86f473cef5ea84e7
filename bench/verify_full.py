"""`carechain verify --full` benchmark: leaves/s of the full ledger audit, sequential and across worker
processes, and of an incremental audit that resumes from a saved state (docs/proofs.md).

1. Build (cached under --cache, reused when it has the right size): `--devices` devices registered the normal
   way, then `--events` real signed heart-rate events bulk-inserted as rows (entries + events index, round-robin
   over the devices), with a signed checkpoint every 20,000 leaves and one at the end.
2. One-core PyNaCl verify rate: Ed25519 verifications of the ledger's own signatures, in this process — the
   floor of what one core can do for the audit's main cost.
3. The audit, sequential (`workers=0`: everything in one process), then `--workers 1..cpu_count`.
4. Incremental: the state an audit of the log as it was at the checkpoint 90 % of the way in saves (a copy of
   the file cut there), then an audit of the whole log that resumes from it and reads the last 10 %.

Figures are one run on this machine, warm page cache; ratios are to the one-core PyNaCl rate. Wall-clock rates
depend on what else runs (the load average is printed); the CPU time per leaf does much less, and
`ceiling_all_cores_leaves_per_s` (cpu_count ÷ the sequential audit's CPU time per leaf) is what a quiet
machine allows at best.

5. With --postgresql DSN: the same ledger copied into a scratch PostgreSQL database and audited there with one
   worker per core (`PostgresLogSource`: entries through a server-side cursor, the events index a batch at a time).

    python bench/verify_full.py [--events 500000] [--devices 1000] [--cache DIR] [--postgresql DSN] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import envelope  # noqa: E402
from carechain.checkpoint import Checkpoint, sign_note  # noqa: E402
from carechain.entries import ENTRY_EVENT, Entry  # noqa: E402
from carechain.events import HeartRate, make_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.inventory import InventoryDevice  # noqa: E402
from carechain.merkle import extend_frontier, frontier_root, leaf_hash  # noqa: E402
from chain_bridge.bridge import default_origin  # noqa: E402
from chain_bridge.ledger.integrity import audit_ledger  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from chain_bridge.registry import ledger_path, log_key, operator_key, register_devices  # noqa: E402

CHECKPOINT_EVERY = 20_000


def build(data_dir: Path, events: int, devices: int) -> None:
    """Register `devices`, then bulk-insert `events` signed events with a checkpoint every CHECKPOINT_EVERY."""
    started = time.perf_counter()
    ledger = Ledger(ledger_path(data_dir))
    idents = [Identity.from_seed(i.to_bytes(4, "big") * 8) for i in range(devices)]
    register_devices(ledger, operator_key(data_dir), [
        InventoryDevice(name=f"d{i}", profile="heart_rate_band", owner="patient:bench", site="bench",
                        public_key=d.public_key, line=0) for i, d in enumerate(idents)])
    first = ledger.size
    frontier = extend_frontier(0, (), [leaf_hash(data) for data in ledger.leaves()])
    ledger.close()
    key = log_key(data_dir)
    origin = default_origin(key)
    db = sqlite3.connect(ledger_path(data_dir), isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # a bench fixture, built once: durability is not what is measured
    now = int(time.time() * 1000)
    body = HeartRate(bpm=72)
    idx, end = first, first + events
    while idx < end:
        rows_e, rows_v = [], []
        stop = min(end, (idx // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY)
        for i in range(idx, stop):
            dev = idents[i % devices]
            seq = i // devices
            cose = envelope.sign(dev, make_payload(dev.device_id, seq, now + i, "heart_rate", body))
            data = Entry(ENTRY_EVENT, cose).encode()
            h = leaf_hash(data)
            rows_e.append((i, ENTRY_EVENT, h, data, now))
            rows_v.append((dev.device_id, seq, i, h))
        frontier = extend_frontier(idx, frontier, [r[2] for r in rows_e])
        root = frontier_root(frontier)
        note = sign_note(Checkpoint(origin=origin, tree_size=stop, root_hash=root).body(), origin, key.public_key,
                         key.sign)
        db.execute("BEGIN")
        db.executemany("INSERT INTO entries VALUES (?,?,?,?,?)", rows_e)
        db.executemany("INSERT INTO events VALUES (?,?,?,?)", rows_v)
        db.execute("INSERT INTO checkpoints VALUES (?,?,?,?)", (stop, root, note, now))
        db.execute("COMMIT")
        idx = stop
        print(f"  built {idx:,} leaves ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    db.close()


def cached_ledger(cache: Path, events: int, devices: int) -> Path:
    data_dir = cache / f"verify-full-{events}-{devices}"
    marker = data_dir / "built"
    if not marker.exists():
        if data_dir.exists():
            for f in data_dir.rglob("*"):
                if f.is_file():
                    f.unlink()
        data_dir.mkdir(parents=True, exist_ok=True)
        build(data_dir, events, devices)
        marker.write_text("ok\n")
    return data_dir


def pynacl_rate(data_dir: Path, n: int = 50_000) -> float:
    """Ed25519 verifications per second on one core, of the ledger's own event signatures."""
    db = sqlite3.connect(ledger_path(data_dir))
    keys = dict(db.execute("SELECT device_id, public_key FROM devices"))
    rows = db.execute("SELECT data FROM entries WHERE type = ? ORDER BY idx LIMIT ?", (ENTRY_EVENT, n)).fetchall()
    db.close()
    signed = [envelope.parse(Entry.decode(data).cose) for (data,) in rows]
    jobs = [(msg, keys[msg.kid]) for msg in signed]
    started = time.perf_counter()
    for msg, key in jobs:
        msg.verify(key)  # the one verification the audit makes per event, and nothing else
    return len(jobs) / (time.perf_counter() - started)


def timed_audit(data_dir: Path, workers: int, state: Path | None = None) -> tuple[float, int, float]:
    """(leaves/s, leaves audited, CPU µs per leaf of this process: the ordered part when workers > 0)."""
    op = operator_key(data_dir)
    started, cpu = time.perf_counter(), time.process_time()
    report = audit_ledger(ledger_path(data_dir), log_key(data_dir).public_key,
                          operator_keys={op.device_id: op.public_key}, workers=workers, state_file=state)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    audited = report.entries - (report.resumed_at or 0)
    return audited / elapsed, audited, cpu / audited * 1e6


def postgresql_audit(data_dir: Path, dsn: str, workers: int) -> tuple[float, int, float]:
    """`timed_audit` of the same ledger copied into a scratch PostgreSQL database (`PostgresLogSource`)."""
    from chain_bridge.ledger.postgres import PostgresLocation, PostgresLogSource
    from simulators.postgres import scratch_database

    with scratch_database(dsn, "cc_bench_verify_full") as scratch:
        location = PostgresLocation(scratch)
        Ledger(location).close()
        copied = {"entries": "idx, type, leaf_hash, data, appended_ms", "events": "device_id, seq, idx, leaf_hash",
                  "devices": "device_id, public_key, profile, owner, site, registered_idx, revoked_idx",
                  "checkpoints": "tree_size, root_hash, note, issued_ms"}
        source = sqlite3.connect(ledger_path(data_dir))
        with location.open() as conn:
            for table, columns in copied.items():
                conn.execute(f"DELETE FROM {table}")  # a new ledger holds its genesis rows: the copy replaces them
                with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in source.execute(f"SELECT {columns} FROM {table} ORDER BY 1"):
                        copy.write_row(row)
        source.close()
        op = operator_key(data_dir)
        log = PostgresLogSource(location)
        try:
            started, cpu = time.perf_counter(), time.process_time()
            report = audit_ledger(log, log_key(data_dir).public_key, operator_keys={op.device_id: op.public_key},
                                  workers=workers)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            log.close()
        return report.entries / elapsed, report.entries, cpu / report.entries * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "carechain-bench")
    ap.add_argument("--postgresql", metavar="DSN", help="also audit a copy of the ledger in a scratch database "
                    "created on this server (e.g. 'host=127.0.0.1 dbname=test'; dropped after), with all workers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data_dir = cached_ledger(args.cache, args.events, args.devices)
    cpus = os.cpu_count() or 1
    results: dict[str, float] = {"events": args.events, "devices": args.devices, "cpus": cpus}
    nacl = pynacl_rate(data_dir)
    results["pynacl_verify_per_s_one_core"] = round(nacl)
    results["load_average_before"] = round(os.getloadavg()[0], 1)  # other work on the machine skews every rate
    rate, leaves, cpu_us = timed_audit(data_dir, 0)
    results["leaves"] = leaves
    results["sequential_leaves_per_s"] = round(rate)
    results["sequential_cpu_us_per_leaf"] = round(cpu_us, 1)
    # All of a leaf's work, spread over every core with nothing else running: what a quiet machine allows.
    results["ceiling_all_cores_leaves_per_s"] = round(cpus * 1e6 / cpu_us)
    for w in range(1, cpus + 1):
        rate, _, cpu_us = timed_audit(data_dir, w)
        results[f"workers_{w}_leaves_per_s"] = round(rate)
        results[f"workers_{w}_ordered_part_cpu_us_per_leaf"] = round(cpu_us, 1)
    # Incremental: a state saved at the checkpoint 90 % of the way in, then an audit resuming from it.
    db = sqlite3.connect(ledger_path(data_dir))
    (at,) = db.execute("SELECT MAX(tree_size) FROM checkpoints WHERE tree_size <= ?",
                       (int(leaves * 0.9),)).fetchone()
    db.close()
    with tempfile.TemporaryDirectory() as tmp:
        # The state an audit of the log as it was at that checkpoint saves: audit a copy cut there.
        earlier = Path(tmp) / "earlier"
        shutil.copytree(data_dir, earlier)
        cut = sqlite3.connect(ledger_path(earlier), isolation_level=None)
        for table in ("entries", "events"):
            cut.execute(f"DELETE FROM {table} WHERE idx >= ?", (at,))
        cut.execute("DELETE FROM checkpoints WHERE tree_size > ?", (at,))
        cut.close()
        state = Path(tmp) / "audit.state"
        timed_audit(earlier, cpus, state)
        rate, audited, _ = timed_audit(data_dir, cpus, state)
        results["incremental_from"] = at
        results["incremental_leaves"] = audited
        results["incremental_leaves_per_s"] = round(rate)
    if args.postgresql:
        rate, _, cpu_us = postgresql_audit(data_dir, args.postgresql, cpus)
        results[f"postgresql_workers_{cpus}_leaves_per_s"] = round(rate)
        results[f"postgresql_workers_{cpus}_ordered_part_cpu_us_per_leaf"] = round(cpu_us, 1)
    results["load_average_after"] = round(os.getloadavg()[0], 1)
    best = max(rate for key, rate in results.items() if key.startswith("workers_") and key.endswith("leaves_per_s"))
    results["best_workers_over_pynacl_one_core"] = round(best / nacl, 2)
    results["sequential_over_pynacl_one_core"] = round(results["sequential_leaves_per_s"] / nacl, 2)
    if args.json:
        print(json.dumps(results))
        return
    for k, v in results.items():
        print(f"{k:34} {v:>12,}" if isinstance(v, int) else f"{k:34} {v!s:>12}")


if __name__ == "__main__":
    main()

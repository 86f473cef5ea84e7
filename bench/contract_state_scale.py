"""The contracts' replica against the size of the log: what restoring a contract snapshot and following new
readings cost at 1 M, 10 M and 100 M leaves (docs/performance.md, "The contracts' replica at scale").

Every replica of the contracts — the bridge's gate, each miner's witness, the console — restores the newest
snapshot at start and then applies each new leaf. The state records an outcome per leaf; it used to be a list of
`[index, outcome]` pairs, now the count and the refusals (`contract_rules.runtime.Results`).

For each size N, in a fresh process (so each RSS is its own): a genesis with its operator, a snapshot of a log of
N leaves — a registered heart-rate band, accepted readings and 100 refusals — restored as a bridge restores it
(time, RSS after); then 100,000 of the band's readings applied as the bridge's gate follows its batches
(`Replica.apply_ingested`; CPU µs per reading, RSS after), and one snapshot taken (time, bytes). For comparison,
up to --baseline-max leaves, the list of pairs the state held before, built alone in another fresh process
(its RSS).

    python bench/contract_state_scale.py [--sizes 1000000,10000000,100000000] [--baseline-max 10000000] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from carechain.entries import Registration, event_entry, registration_entry
from carechain import envelope
from carechain.events import make_payload
from carechain.identity import Identity
from contract_rules import Genesis, Replica, builtin_hashes
from contract_rules.runtime import Results


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


size, follow = int(sys.argv[1]), 100_000
operator = Identity.from_seed(b"\x01" * 32)
genesis = Genesis(operators={operator.device_id: operator.public_key}, allocations={"pool:miners": 1000},
                  contracts=builtin_hashes())
device = Identity.from_seed(b"\x02" * 32)
registration = Registration(dev=device.device_id, pk=device.public_key, profile="heart_rate_band", owner="patient:a",
                            site="bench", ts=1_765_000_000_000)
source = Replica(genesis)
assert source.runtime.apply(registration_entry(operator, registration)) == "ok"
source.state.results = Results(size, {1 + i * (size // 100): "bad_signature" for i in range(100)})
source.state.size = size
snapshot = source.snapshot()
del source
base = rss_mb()
t0 = time.perf_counter()
replica = Replica(genesis)
replica.restore(snapshot)
restore_s = time.perf_counter() - t0
after_restore = rss_mb()
# A registered band's v1 heart-rate readings, which no contract reads: the gate's common case.
leaf = event_entry(envelope.sign(device, make_payload(device.device_id, 0, 1_765_000_000_000, "heart_rate",
                                                       {"bpm": 70}))).encode()
t0 = time.process_time()
for k in range(follow):
    assert replica.apply_ingested(leaf, device.device_id, k, "heart_rate", 1) == "ok"
follow_us = (time.process_time() - t0) / follow * 1e6
after_follow = rss_mb()
t0 = time.perf_counter()
data = replica.snapshot()
snapshot_s = time.perf_counter() - t0
print(json.dumps({"size": size, "restore_s": restore_s, "rss_before_mb": base, "rss_restored_mb": after_restore,
                  "follow_us_per_leaf": follow_us, "rss_followed_mb": after_follow, "snapshot_s": snapshot_s,
                  "snapshot_bytes": len(data), "refused": len(replica.state.results.refused())}))
"""

BASELINE = r"""
import json, sys
size = int(sys.argv[1])
pairs = [[i, "ok"] for i in range(size)]
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(json.dumps({"size": size, "list_of_pairs_rss_mb": int(line.split()[1]) / 1024}))
"""


def run(code: str, size: int) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(size), str(REPO)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000,100000000")
    ap.add_argument("--baseline-max", type=int, default=10_000_000,
                    help="build the old list of pairs only up to this many leaves (it takes ~88 bytes a leaf)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows = []
    for size in sizes:
        say(f"{size:,} leaves: restoring and following…")
        row = run(CHILD, size)
        if size <= args.baseline_max:
            say(f"{size:,} leaves: the old list of pairs, for comparison…")
            row.update(run(BASELINE, size))
        rows.append(row)
    first, last = rows[0], rows[-1]
    ratios = {"rss_restored_ratio": round(last["rss_restored_mb"] / first["rss_restored_mb"], 2),
              "restore_s_ratio": round(last["restore_s"] / max(first["restore_s"], 1e-9), 2)}
    if args.json:
        print(json.dumps({"rows": rows, **ratios}))
        return
    print(f"{'leaves':>12} {'restore ms':>11} {'RSS restored':>13} {'follow µs/leaf':>15} {'RSS +100k':>10} "
          f"{'snapshot ms':>12} {'snapshot B':>11} {'old list RSS':>13}")
    for r in rows:
        old = f"{r['list_of_pairs_rss_mb']:,.0f} MB" if "list_of_pairs_rss_mb" in r else "-"
        print(f"{r['size']:>12,} {r['restore_s'] * 1000:>11.1f} {r['rss_restored_mb']:>10.1f} MB "
              f"{r['follow_us_per_leaf']:>15.1f} {r['rss_followed_mb']:>7.1f} MB {r['snapshot_s'] * 1000:>12.1f} "
              f"{r['snapshot_bytes']:>11,} {old:>13}")
    print(f"RSS after restore, largest ÷ smallest: {ratios['rss_restored_ratio']}; restore time: "
          f"{ratios['restore_s_ratio']}")


if __name__ == "__main__":
    main()

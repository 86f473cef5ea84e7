"""Data-market benchmark (issue 15): one study's MPC over --contributors contributors, 3 aggregator processes.

Two studies, run one after the other on this machine: a mean (heart rate, 40..200 bpm) and a 10-bin
histogram over the same values. Each contributor's vector is split, encoded and sealed to the three
aggregators as its agent does (not timed); then three `python -m chain_miner.aggregator` processes (MPyC over
mutually authenticated TLS on loopback) open their shares, check every input's validity inside the MPC (bits
and range, one-hot), apply the cohort rule and open the aggregate. Reported per study:

  wall             seconds from starting the three processes to all three results written (includes
                   Python start-up and the MPyC connection set-up)
  bytes            sealed share bytes one contributor uploads; MPC bytes each aggregator sent, and their
                   total per contributor
  vs plain         wall time over the plain computation (validity check + aggregate in one Python loop)
  tls/plaintext    the mean's wall time over mutually authenticated TLS (as miners run it) over the same
                   computation with the parties in the clear (--plaintext), in the same run

Target: < 2 min for both studies at 1,000 contributors.

    python bench/market.py [--contributors 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import market  # noqa: E402
from tests.test_market_mpc import Contribution, aggregator_keys, agreed_payload, build_inputs, run_aggregators  # noqa: E402

HR = {"kind": "heart_rate", "lo": 40, "hi": 200}
QUERIES = {"mean": {"type": "mean", **HR},
           "histogram": {"type": "histogram", **HR, "bins": [40 + 16 * i for i in range(11)]}}


def bench_study(name: str, values: list[int], workdir: Path, tls: bool = True) -> dict[str, Any]:
    query = market.Query.model_validate(QUERIES[name])
    vectors = [market.contribution(query, v) for v in values]
    keys = aggregator_keys(workdir)
    inputs = build_inputs(keys, query.model_dump(exclude_none=True), [Contribution(v) for v in vectors],
                          study_id=f"bench-{name}")
    started = time.perf_counter()
    results = run_aggregators(workdir, inputs, timeout=600, tls=tls)
    wall = time.perf_counter() - started
    payload = agreed_payload(results, keys)
    t0 = time.perf_counter()
    plain = market.plain_answer(query, [v for v in vectors if market.is_valid(query, v)])
    plain_s = time.perf_counter() - t0
    if payload["answer"] != plain:
        raise SystemExit(f"{name}: the MPC opened {payload['answer']}, the plain computation {plain}")
    sent = [r["stats"]["bytes_sent"] for r in results]
    upload = sum(len(s) // 2 for c in inputs["contributions"] for s in c["shares"]) / len(values)
    return {"study": name, "contributors": len(values), "wall_s": round(wall, 2),
            "aggregator_s": [round(r["stats"]["seconds"], 2) for r in results],
            "upload_bytes_per_contributor": round(upload, 1), "mpc_bytes_per_aggregator": sent,
            "mpc_bytes_per_contributor": round(sum(sent) / len(values), 1),
            "plain_s": plain_s, "cost_vs_plain": round(wall / max(plain_s, 1e-9))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contributors", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # Before mpyc's first import (in split_contribution): its own logging set-up would print to stdout.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    values = [random.randint(40, 200) for _ in range(args.contributors)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in QUERIES:
            workdir = Path(tmp) / name
            workdir.mkdir()
            rows.append(bench_study(name, values, workdir))
        # The same mean once more with the parties in the clear (--plaintext): what the TLS channels cost.
        clear_dir = Path(tmp) / "mean-plaintext"
        clear_dir.mkdir()
        clear = bench_study("mean", values, clear_dir, tls=False)
    total = sum(r["wall_s"] for r in rows)
    tls_ratio = round(rows[0]["wall_s"] / clear["wall_s"], 2)
    report = {"studies": rows, "total_wall_s": round(total, 2), "target_s": 120, "met": total < 120,
              "mean_plaintext_wall_s": clear["wall_s"], "tls_over_plaintext": tls_ratio}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in rows:
            print(f"{r['study']:>9}: {r['contributors']} contributors, {r['wall_s']} s wall "
                  f"(aggregators {r['aggregator_s']}), upload {r['upload_bytes_per_contributor']} B/contributor, "
                  f"MPC {r['mpc_bytes_per_contributor']} B/contributor, "
                  f"per aggregator {r['mpc_bytes_per_aggregator']} B, "
                  f"{r['cost_vs_plain']}x the plain computation")
        print(f"total {total:.1f} s (target < 120 s): {'met' if total < 120 else 'NOT met'}")
        print(f"the mean over TLS / in the clear (--plaintext, {clear['wall_s']} s): {tls_ratio}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

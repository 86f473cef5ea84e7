"""Fault-injection table: runs every scenario of simulators/fault_harness.py with real processes and prints
scenario, events, lost, duplicated and seconds to drain (the table in docs/reliability.md).

    python bench/fault_table.py [--only broker_down,network_cut] [--down-s 60] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulators import fault_harness as faults  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(faults.SCENARIOS)}")
    ap.add_argument("--down-s", type=float, default=60.0, help="broker outage length")
    ap.add_argument("--cut-s", type=float, default=20.0, help="network blackhole length")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    scenarios = dict(faults.SCENARIOS)
    scenarios["broker_down"] = functools.partial(faults.broker_down, down_s=args.down_s)
    scenarios["network_cut"] = functools.partial(faults.network_cut, cut_s=args.cut_s)
    names = [n for n in args.only.split(",") if n] or list(scenarios)
    unknown = set(names) - set(scenarios)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"cc-fault-{name}-"))
        try:
            print(f"running {name}…", file=sys.stderr, flush=True)
            results.append(scenarios[name](work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(faults.table(results))
    sys.exit(0 if all(r.lost == 0 and r.duplicated == 0 and r.drained for r in results) else 1)


if __name__ == "__main__":
    main()

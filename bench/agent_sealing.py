"""Agent CPU per reading, protocol 2 (seal + sign + outbox) next to protocol 1 (sign + outbox), one core.

Each reading is recorded as a source records it (`Agent.record`, one heart-rate reading per call: one
outbox transaction each), `time.process_time` over N readings, so the figure is CPU, not fsync waits.
Protocol 2's cost includes the epoch_key event (one umbral encapsulation per epoch; all N readings fall in
one epoch here, as 10,000 readings at 1 Hz nearly do in a 3-hour epoch) and a fresh nonce per reading.

    .venv/bin/python bench/agent_sealing.py [--readings 10000] [--batch 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from carechain.identity import Identity  # noqa: E402
from carechain.reencryption import PreKey  # noqa: E402
from edge_agent.agent import Agent, AgentDevice  # noqa: E402
from edge_agent.outbox import Outbox  # noqa: E402
from edge_agent.sealing import RecordOwner  # noqa: E402

EPOCH_MS = 86_400_000
READING = ("heart_rate", {"bpm": 72, "sensor_contact": True, "rr_intervals_1024": [830, 842]})


def cpu_per_reading(protocol: int, readings: int, batch: int, work: Path) -> float:
    """CPU seconds per reading for `readings` readings recorded `batch` at a time."""
    device = Identity.generate()
    owner = PreKey.generate()
    agent = Agent([AgentDevice(device, None, RecordOwner(Identity.generate().device_id, owner.public_key))],
                  Outbox(work / f"outbox-v{protocol}.db"), None, Identity.generate().public_key,  # type: ignore[arg-type]
                  protocol=protocol, epoch_ms=EPOCH_MS)
    ts = int(time.time() * 1000) // EPOCH_MS * EPOCH_MS + 1  # every reading in one epoch
    try:
        start = time.process_time()
        for i in range(0, readings, batch):
            agent.record(device.device_id, [READING] * min(batch, readings - i), ts + i)
        spent = time.process_time() - start
        assert agent.stats.signed == readings + (protocol == 2), agent.stats  # + the one epoch_key event
    finally:
        agent.outbox.close()
    return spent / readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1, help="readings per Agent.record call (one transaction)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    with tempfile.TemporaryDirectory(prefix="cc-agent-bench-") as tmp:
        v1 = cpu_per_reading(1, args.readings, args.batch, Path(tmp))
        v2 = cpu_per_reading(2, args.readings, args.batch, Path(tmp))
    result = {"readings": args.readings, "batch": args.batch, "v1_cpu_us_per_reading": round(v1 * 1e6, 1),
              "v2_cpu_us_per_reading": round(v2 * 1e6, 1), "v2_over_v1": round(v2 / v1, 2)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.readings} heart-rate readings, {args.batch} per transaction, one core (time.process_time):")
    print(f"  protocol 1 (sign + outbox):         {result['v1_cpu_us_per_reading']:8.1f} µs CPU per reading")
    print(f"  protocol 2 (seal + sign + outbox):  {result['v2_cpu_us_per_reading']:8.1f} µs CPU per reading")
    print(f"  ratio v2 / v1:                      {result['v2_over_v1']:8.2f}")


if __name__ == "__main__":
    main()

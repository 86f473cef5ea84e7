"""Long-outage benchmark: an agent that was offline for days drains a backlog of ≥ 1,000,000 events.

1. Backlog: the agent's own code path (Agent.record → sign → outbox group commit) fills the outbox of a
   `carechain agent` with `--events` signed readings from `--devices` devices, time-stamped over the
   last `--days` days, as if the broker had been unreachable that long.
2. Reconnect: a real mosquitto and `carechain bridge` (2 ingest workers) come up, then `carechain agent`
   starts with production off and drains. Its RSS is sampled from /proc the whole time.
3. Prints: backlog size on disk, fill rate, drain rate (events/s from agent start to an empty outbox,
   every event checked in the ledger), agent RSS (peak) and the ratio drain ÷ bridge-only rate is left
   to bench/ingest.py. `--json` prints a JSON list, one object per run.

Each value of `--batch` is one such run on a fresh fleet, with that `agent.batch_max_events`: by default
the config's default (the drain packs each device's events into batch messages) and then 1 (one event per
message, as before batching), so one invocation compares the two.

    python bench/outage.py [--events 1000000] [--devices 1000] [--days 3] [--batch 256,1] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain.config import AgentConfig  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from edge_agent.agent import Agent, AgentDevice  # noqa: E402
from edge_agent.outbox import Outbox  # noqa: E402
from simulators.fault_harness import Fleet, ledger_event_counts  # noqa: E402


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fill_backlog(config: Path, events: int, days: float, say) -> tuple[float, int, int]:
    """Sign `events` readings through Agent.record into the agent's outbox; returns (seconds, bytes, signed)."""
    cfg = yaml.safe_load(config.read_text())["agent"]
    idents = [Identity.load(Path(d["key_file"])) for d in cfg["devices"]]
    outbox_path = Path(cfg["data_dir"]) / "outbox.db"
    outbox = Outbox(outbox_path)
    agent = Agent([AgentDevice(i, None) for i in idents], outbox, None, b"")  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    span_ms = int(days * 86_400_000)
    batch = 100  # readings per group commit, as a source delivering a burst of stored records would
    t0 = time.perf_counter()
    done = 0
    while done < events:
        for ident in idents:
            n = min(batch, events - done)
            if n <= 0:
                break
            ts = now - span_ms + int(span_ms * done / events)
            agent.record(ident.device_id, [("heart_rate", {"bpm": 60 + (done + k) % 50}) for k in range(n)], ts)
            done += n
        if done % 100_000 < batch * len(idents):
            say(f"  backlog {done:,}/{events:,}")
    seconds = time.perf_counter() - t0
    outbox.close()
    return seconds, outbox_path.stat().st_size, agent.stats.signed


def set_batching(config: Path, batch_max_events: int) -> None:
    """Write `agent.batch_max_events` into the agent's config (1: one event per message, as before batching)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["agent"]["batch_max_events"] = batch_max_events
    config.write_text(yaml.safe_dump(cfg))


def drain_run(args: argparse.Namespace, batch_max_events: int, say) -> dict[str, object]:
    """One fleet: fill the backlog, reconnect, drain with `batch_max_events`; the figures of the run."""
    work = Path(tempfile.mkdtemp(prefix="cc-bench-outage-"))
    try:
        with Fleet(work, agents=1, devices_per_agent=args.devices, workers=args.workers,
                   resend_after_s=30.0, window=args.window) as fleet:
            agent = fleet.agents[0]
            set_batching(agent.config, batch_max_events)
            say(f"[batch_max_events {batch_max_events}] filling a {args.days:g}-day backlog of {args.events:,} "
                f"events for {args.devices} devices…")
            fill_s, backlog_bytes, signed = fill_backlog(agent.config, args.events, args.days, say)
            say(f"  {args.events / fill_s:,.0f} events/s signed and stored; outbox {backlog_bytes / 2**20:,.0f} MB")

            assert fleet.bridge is not None
            fleet.bridge.start()
            say("agent reconnects and drains…")
            agent.start(produce_s=0.0)
            assert agent.proc is not None
            t0 = time.perf_counter()
            peak_rss = 0
            depth = args.events
            last_report = t0
            while depth > 0 and agent.proc.poll() is None and time.perf_counter() - t0 < 1800:
                time.sleep(0.5)
                peak_rss = max(peak_rss, rss_kb(agent.proc.pid))
                db = sqlite3.connect(f"file:{agent.outbox}?mode=ro", uri=True, timeout=30)
                depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                db.close()
                if time.perf_counter() - last_report > 10:
                    last_report = time.perf_counter()
                    say(f"  {depth:,} left, {(args.events - depth) / (last_report - t0):,.0f} events/s, "
                        f"agent RSS {peak_rss / 1024:.0f} MB")
            drain_s = time.perf_counter() - t0
            hwm = rss_kb(agent.proc.pid, "VmHWM")
            agent.stop()
            counts = ledger_event_counts(fleet.ledger_file)
            anchored = sum(1 for c in counts.values() if c >= 1)
            dup = sum(c - 1 for c in counts.values() if c > 1)
            fleet.bridge.stop()
            return {
                "batch_max_events": batch_max_events, "events": args.events, "devices": args.devices,
                "backlog_mb": round(backlog_bytes / 2**20, 1), "fill_eps": round(args.events / fill_s),
                "drain_eps": round(anchored / drain_s), "drain_s": round(drain_s, 1), "drained": depth == 0,
                "anchored": anchored, "lost": signed - anchored, "duplicated": dup,
                "bridge_batches": fleet.bridge.stats.get("batches"),
                "agent_peak_rss_mb": round(max(peak_rss, hwm) / 1024, 1), "window": args.window,
                "workers": args.workers,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=AgentConfig().window,
                    help="agent send window (events in flight; default: the config default)")
    ap.add_argument("--workers", type=int, default=2, help="bridge ingest worker processes")
    ap.add_argument("--batch", default=f"{AgentConfig().batch_max_events},1",
                    help="agent.batch_max_events of each run, comma-separated (1: one event per message); "
                         "default: the config default, then 1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    runs = [drain_run(args, int(n), say) for n in args.batch.split(",")]
    if args.json:
        print(json.dumps(runs))
        return
    keys = list(runs[0])
    print(f"{'':>18}  " + "  ".join(f"{'run ' + str(i + 1):>12}" for i in range(len(runs))))
    for k in keys:
        print(f"{k:>18}  " + "  ".join(f"{str(r[k]):>12}" for r in runs))


if __name__ == "__main__":
    main()

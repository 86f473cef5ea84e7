"""Finality benchmark: 5 `carechain miner` processes witness `carechain bridge` (its own process) on a
private mosquitto while devices send events; plus contract evaluation throughput.

Measured in one run, on one machine (the broker, the bridge, the five miners and the load generator share
its cores):
  finality p50/p99    checkpoint seen on cc/v1/log/checkpoint → the t-th miner cosignature seen (t-of-n)
  all-n p50/p99       … → the n-th cosignature seen
  published p50/p99   … → the bridge's final checkpoint seen on cc/v1/log/final
  cosignatures/s      cosignatures seen ÷ the time from the first checkpoint to the last cosignature
                      (bounded by the offered load, miners × checkpoints/s: lower --interval to probe)
Only checkpoints issued while events are driven count (not the registrations' one, issued before the
miners start).
  sales/s             a synthetic pharmacy day of N sales replayed through the contracts' `Runtime`
                      (decoded entries) and through `ContractWitness` (ledger leaves, as miners do)

    python bench/finality.py [--miners 5] [--threshold 3] [--seconds 15] [--rate 200] [--interval 1.0]
                             [--sales 5000] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import envelope, topics  # noqa: E402
from carechain.config import BrokerConfig  # noqa: E402
from carechain.entries import Entry, Registration, event_entry, registration_entry  # noqa: E402
from carechain.events import Purchase, make_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.transport import connect_client  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from chain_bridge.registry import contract_genesis, ledger_path, log_key, operator_key  # noqa: E402
from simulators.fault_harness import wait_ready  # noqa: E402
from simulators.miners import CARECHAIN, CosignatureWatch, MinerProcess  # noqa: E402
from simulators.mosquitto import Mosquitto  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> dict[str, float | None]:
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    return {"p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1), "n": len(values)}


# -- finality -----------------------------------------------------------------------------------------

def drive_events(broker: BrokerConfig, devices: list[Identity], rate: float, seconds: float) -> int:
    """Publish heart-rate events round-robin at `rate` per second; returns how many were sent."""
    ready = threading.Event()
    client = connect_client(broker, "bench-finality-devices", connected=ready)
    assert ready.wait(30), "broker unreachable"
    sent, t0 = 0, time.monotonic()
    try:
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                d = devices[sent % len(devices)]
                seq = sent // len(devices)
                payload = envelope.sign(d, make_payload(d.device_id, seq, int(time.time() * 1000), "heart_rate",
                                                        {"bpm": 60 + seq % 40}))
                client.publish(topics.events(d.device_id), payload, qos=1)
                sent += 1
            time.sleep(0.005)
    finally:
        client.disconnect()
        client.loop_stop()
    return sent


def run_finality(args: argparse.Namespace, say) -> dict[str, object]:  # noqa: ANN001
    work = Path(tempfile.mkdtemp(prefix="cc-bench-finality-"))
    miners: list[MinerProcess] = []
    bridge: subprocess.Popen[str] | None = None
    with Mosquitto(work / "mosquitto") as mq:
        broker = BrokerConfig(host="127.0.0.1", port=mq.port)
        bdir = work / "bridge"
        lk, op = log_key(bdir), operator_key(bdir)
        contract_genesis(bdir)  # what the bridge writes on first start; the miners replay from it
        genesis = bdir / "contracts" / "genesis.json"
        devices = [Identity.generate() for _ in range(args.devices)]
        ledger = Ledger(ledger_path(bdir))
        now = int(time.time() * 1000)
        ledger.append_registrations([
            (registration_entry(op, reg), reg) for reg in (
                Registration(dev=d.device_id, pk=d.public_key, profile="heart_rate_band", owner=f"patient:{i}",
                             site="bench", ts=now) for i, d in enumerate(devices))])
        ledger.close()
        miners = [MinerProcess(work / f"miner{i}", broker, lk.public_key, "--genesis", str(genesis))
                  for i in range(args.miners)]
        config = work / "carechain.yaml"
        config.write_text(yaml.safe_dump({
            "broker": {"host": "127.0.0.1", "port": mq.port},
            "bridge": {"data_dir": str(bdir), "checkpoint_interval_s": args.interval,
                       "miners": [m.registered.model_dump() for m in miners],
                       "finality_threshold": args.threshold}}))
        watch = CosignatureWatch(broker, "bench-finality-watch")
        try:
            assert watch.connected.wait(30)
            bridge = subprocess.Popen(
                [*CARECHAIN, "bridge", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
            wait_ready(bridge, work / "bridge.log")
            for m in miners:
                m.start()
            for m in miners:
                m.wait_ready()
            time.sleep(args.interval * 2)  # the registrations' checkpoint: a first cosigned tree
            say(f"{args.miners} miners, {args.threshold}-of-{args.miners}; {args.rate:.0f} events/s for "
                f"{args.seconds:.0f} s, checkpoints every {args.interval} s…")
            reader = Ledger(ledger_path(bdir))
            base = reader.count_events()
            drive_start = time.monotonic()
            sent = drive_events(broker, devices, args.rate, args.seconds)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and reader.count_events() - base < sent:
                time.sleep(0.1)
            anchored = reader.count_events() - base
            reader.close()
            while time.monotonic() < deadline and len(watch.miners_at(max(watch.checkpoints, default=0))) < args.miners:
                time.sleep(0.1)
            time.sleep(args.interval)  # the last cosignatures and final note in flight
        finally:
            stats = [m.stop() for m in miners]
            if bridge is not None and bridge.poll() is None:
                bridge.terminate()
                bridge.wait(30)
            watch.stop()
    t_of_n, all_n, published = [], [], []
    finals = {size: at for at, size, _ in watch.finals}
    measured = {size: seen for size, seen in watch.checkpoints.items() if seen >= drive_start}
    for size, seen in measured.items():
        times = sorted(watch.cosigned.get(size, {}).values())
        if len(times) >= args.threshold:
            t_of_n.append(times[args.threshold - 1] - seen)
        if len(times) >= args.miners:
            all_n.append(times[args.miners - 1] - seen)
        if size in finals:
            published.append(finals[size] - seen)
    cosig_times = [t for size in measured for t in watch.cosigned.get(size, {}).values()]
    span = max(cosig_times) - min(measured.values()) if cosig_times else 0.0
    return {
        "miners": args.miners, "threshold": args.threshold, "checkpoint_interval_s": args.interval,
        "events_sent": sent, "events_anchored": anchored, "checkpoints": len(measured),
        "final_checkpoints": len(finals.keys() & measured.keys()), "finality": ms(t_of_n), "all_cosigned": ms(all_n),
        "final_published": ms(published), "cosignatures": len(cosig_times),
        "cosignatures_per_s": round(len(cosig_times) / span, 1) if span else None,
        "miner_stats": stats,
    }


# -- contract evaluation --------------------------------------------------------------------------------

def synthetic_day(n_sales: int) -> tuple[object, list[Entry], int]:
    """A pharmacy day: parties, a terminal, policies; then sales — every third an Rx-only sale filling an
    anchored Rx, every third a covered immunization, the rest over the counter. Returns the genesis, the
    entries and how many of them are sales."""
    from contract_rules import Genesis, builtin_hashes
    from contract_rules import transactions as ce

    def ident(n: int) -> Identity:
        return Identity.from_seed(n.to_bytes(32, "big"))

    operator, prescriber, pharmacy, insurer, terminal = (ident(i) for i in range(1, 6))
    t0 = int(datetime.datetime(2026, 11, 16, tzinfo=datetime.UTC).timestamp() * 1000)
    genesis = Genesis({operator.device_id: operator.public_key},
                      {f"insurer:{insurer.device_id}": 10**12}, builtin_hashes())
    out: list[Entry] = []
    for role, who in (("prescriber", prescriber), ("pharmacy", pharmacy), ("insurer", insurer)):
        out.append(ce.signed(operator, ce.PARTY_REGISTER, ce.PartyRegistration(role=role, pk=who.public_key,
                                                                                name=role, ts=t0)))
    reg = Registration(dev=terminal.device_id, pk=terminal.public_key, profile="pharmacy_terminal",
                       owner=pharmacy.device_id, site="s", ts=t0)
    out.append(registration_entry(operator, reg))
    patients = [f"pt-{i}" for i in range(max(1, n_sales // 10))]
    for p in patients:
        coverage = [ce.CoverageRule(category="immunization", bp=10_000, items=["ndc:49281-0621-15"]),
                    ce.CoverageRule(category="generic", bp=8_000, items=["ndc:70882-114-20"])]
        out.append(ce.signed(insurer, ce.POLICY_REGISTER, ce.PolicyRegistration(
            policy_id=f"pol-{p}", patient_token=p, coverage=coverage, wellness=None, ts=t0)))
    for i in range(n_sales):
        patient = patients[i % len(patients)]
        ts = t0 + 86_400_000 + i * 10
        rx_ref = None
        if i % 3 == 0:
            item, rx_only = "70882-114-20", True
            rx = ce.Prescription(prescriber=prescriber.device_id, patient_token=patient, drug_code=item,
                                 code_system="ndc", quantity=1, refills=0, expires_ms=t0 + 30 * 86_400_000,
                                 controlled=False, issued_ms=t0, nonce=i.to_bytes(16, "big"))
            out.append(ce.signed(prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, t0)))
            rx_ref = rx.rx_ref()
        elif i % 3 == 1:
            item, rx_only = "49281-0621-15", False
        else:
            item, rx_only = "00000-0000-01", False
        body = Purchase(item_code=item, code_system="ndc", rx_only=rx_only, quantity=1, price_minor=1250,
                        currency="USD", patient_token=patient, payment_method="card", rx_ref=rx_ref)
        out.append(event_entry(envelope.sign(terminal, make_payload(terminal.device_id, i, ts, "purchase", body))))
    return genesis, out, n_sales


def run_contracts(n_sales: int, say) -> dict[str, object] | None:  # noqa: ANN001
    try:
        from contract_rules import ContractWitness, Runtime
    except ImportError:
        return None
    say(f"contracts: a synthetic day of {n_sales} sales…")
    genesis, entries, sales = synthetic_day(n_sales)
    runtime = Runtime(genesis)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    results = [runtime.apply(e) for e in entries]
    runtime_s = time.perf_counter() - t0
    rejected = sum(r != "ok" for r in results)
    leaves = [e.encode() for e in entries]
    witness = ContractWitness(genesis)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    violation = witness(0, len(leaves), leaves)
    witness_s = time.perf_counter() - t0
    return {"sales": sales, "entries": len(entries), "not_ok": rejected,
            "runtime_sales_per_s": round(sales / runtime_s), "runtime_entries_per_s": round(len(entries) / runtime_s),
            "witness_sales_per_s": round(sales / witness_s), "witness_violation": None if violation is None
            else f"leaf {violation.leaf_index}: {violation.rule}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--miners", type=int, default=5)
    ap.add_argument("--threshold", type=int, default=3)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rate", type=float, default=200.0, help="offered events/s")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--interval", type=float, default=1.0, help="checkpoint interval (s)")
    ap.add_argument("--sales", type=int, default=5000, help="sales in the synthetic day (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    result: dict[str, object] = {"finality": run_finality(args, say)}
    if args.sales:
        result["contracts"] = run_contracts(args.sales, say)
    if args.json:
        print(json.dumps(result))
        return
    f = result["finality"]
    assert isinstance(f, dict)
    print(f"events sent {f['events_sent']}, anchored {f['events_anchored']}; {f['checkpoints']} checkpoints, "
          f"{f['final_checkpoints']} published final")
    for label, key in (("finality (t-of-n)", "finality"), ("all n cosigned", "all_cosigned"),
                       ("final published", "final_published")):
        print(f"{label:<18} p50 {f[key]['p50_ms']} ms  p99 {f[key]['p99_ms']} ms  (n={f[key]['n']})")
    print(f"cosignatures/s    {f['cosignatures_per_s']} ({f['cosignatures']} cosignatures)")
    c = result.get("contracts")
    if c:
        print(f"contracts         {c['runtime_sales_per_s']:,} sales/s (Runtime), {c['witness_sales_per_s']:,} "
              f"sales/s (ContractWitness on leaves); {c['entries']} entries, {c['not_ok']} not ok")


if __name__ == "__main__":
    main()

"""Ingest benchmark: ≥1,000 simulated devices → real mosquitto → bridge (its own process) → receipts.

Measured in one run, on the same broker and the same pre-signed events:
  raw_eps     bare broker delivery: a plain paho subscriber on cc/v1/dev/+/ev
  bridge_eps  events verified, appended (group commit, fsync) and receipted by `carechain bridge`
  ratio       bridge_eps / raw_eps
  p50/p99     signing → receipt latency at a fixed offered load (default 2,000 events/s)
With --protocol 2, the same bridge then takes as many sealed (v2) readings — wire form {"ct", "ev"}, the
ciphertext hash checked and the ciphertext stored with its leaf — and the run adds
  v2_bridge_eps   sealed readings anchored per second
  v2_ratio        v2_bridge_eps / bridge_eps (the issue's target: at least 0.9)

    python bench/ingest.py [--devices 1000] [--events 30000] [--rate 2000] [--protocol 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import envelope, topics  # noqa: E402
from carechain.events import make_payload, make_sealed_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.inventory import InventoryDevice  # noqa: E402
from carechain.sealed import DEFAULT_EPOCH_MS, ciphertext_hash, encode_sealed, epoch_of, seal_body  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from chain_bridge.registry import ledger_path, operator_key, register_devices  # noqa: E402
from simulators.fault_harness import wait_ready  # noqa: E402
from simulators.mosquitto import Mosquitto  # noqa: E402

# Unacknowledged publishes per client: below paho's 65,535 packet ids (they must never wrap), and large
# because paho handles one PUBACK per network-loop pass (~4k/s): a small window would measure paho.
WINDOW = 30_000


def _client(port: int, client_id: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(0)  # unlimited: WindowedPublisher bounds it
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


class WindowedPublisher:
    """QoS 1 publisher that never has more than WINDOW messages unacknowledged by the broker."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client = _client(port, client_id)
        self._slots = threading.Semaphore(WINDOW)
        self.client.on_publish = lambda *_a: self._slots.release()

    def publish(self, topic: str, payload: bytes) -> None:
        self._slots.acquire()
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        for _ in range(WINDOW):
            self._slots.acquire(timeout=30)
        self.client.disconnect()
        self.client.loop_stop()


def sign_events(devices: list[Identity], count: int, start_seq: int) -> list[tuple[str, bytes]]:
    now = int(time.time() * 1000)
    out = []
    for i in range(count):
        dev = devices[i % len(devices)]
        seq = start_seq + i // len(devices)
        body = {"bpm": 60 + i % 40}
        payload = make_payload(dev.device_id, seq, now, "heart_rate", body)
        out.append((topics.events(dev.device_id), envelope.sign(dev, payload)))
    return out


def sign_sealed_events(devices: list[Identity], count: int, start_seq: int) -> list[tuple[str, bytes]]:
    """Sealed (v2) heart-rate readings as a v2 agent sends them; the key is fixed (the bridge never sees it)."""
    now = int(time.time() * 1000)
    epoch = epoch_of(now, DEFAULT_EPOCH_MS)
    key = bytes(32)
    out = []
    for i in range(count):
        dev = devices[i % len(devices)]
        seq = start_seq + i // len(devices)
        ct = seal_body(key, i.to_bytes(12, "big"), dev.device_id, seq, now, "heart_rate", epoch, {"bpm": 60 + i % 40})
        payload = make_sealed_payload(dev.device_id, seq, now, "heart_rate", epoch, ciphertext_hash(ct))
        out.append((topics.events(dev.device_id), encode_sealed(envelope.sign(dev, payload), ct)))
    return out


def anchored_rate(port: int, data_dir: Path, events: list[tuple[str, bytes]], client_id: str) -> tuple[float, int]:
    """Publish `events` and time until the ledger holds them all: (events anchored per second, how many)."""
    # Counted from the ledger (committed = durable), not by a receipt subscriber in this process: in
    # production the receipts go to agents on other machines, and consuming 30k receipts here would take
    # CPU from the bridge on this 2-core box.
    reader = Ledger(ledger_path(data_dir))
    base = reader.count_events()
    pub = WindowedPublisher(port, client_id)
    t0 = time.perf_counter()
    for t, p in events:
        pub.publish(t, p)
    deadline, anchored, t1 = time.monotonic() + 180, 0, time.perf_counter()
    while anchored < len(events) and time.monotonic() < deadline:
        time.sleep(0.02)
        n_now = reader.count_events() - base
        if n_now != anchored:
            anchored, t1 = n_now, time.perf_counter()
    reader.close()
    pub.close()
    return anchored / (t1 - t0), anchored


def raw_delivery_rate(port: int, events: list[tuple[str, bytes]]) -> float:
    done = threading.Event()
    got = [0, 0.0]

    def on_message(*_a: object) -> None:
        got[0] += 1
        if got[0] == len(events):
            got[1] = time.perf_counter()
            done.set()

    sub = _client(port, "bench-raw-sub")
    sub.on_message = on_message
    sub.subscribe(topics.EVENTS_WILDCARD, qos=1)
    time.sleep(0.5)
    pub = WindowedPublisher(port, "bench-raw-pub")
    t0 = time.perf_counter()
    for t, p in events:
        pub.publish(t, p)
    done.wait(120)
    pub.close()
    sub.disconnect()
    sub.loop_stop()
    return got[0] / ((got[1] or time.perf_counter()) - t0)


class ReceiptCounter:
    """Counts acknowledged (seq) per device from receipts and records when each arrived."""

    def __init__(self, port: int) -> None:
        self.acked: dict[tuple[str, int], float] = {}
        self.lock = threading.Lock()
        self.client = _client(port, "bench-receipts")
        self.client.on_message = self._on_message
        self.client.subscribe(f"{topics.PREFIX}/dev/+/rcpt", qos=1)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        payload = cbor2.loads(cbor2.loads(msg.payload).value[2])  # timing only: agents verify receipts
        with self.lock:
            for seq, _idx in payload["ok"]:
                self.acked.setdefault((payload["dev"], seq), now)

    def wait_for(self, keys: set[tuple[str, int]], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if keys <= self.acked.keys():
                    return True
            time.sleep(0.02)
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--events", type=int, default=30_000, help="events for the throughput runs")
    ap.add_argument("--rate", type=float, default=2000.0, help="offered load for the latency run (events/s)")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2, help="bridge ingest worker processes (0: in-process)")
    ap.add_argument("--protocol", type=int, choices=(1, 2), default=1,
                    help="2: also measure sealed v2 readings on the same bridge and print the ratio to v1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    work = Path(tempfile.mkdtemp(prefix="cc-bench-ingest-"))
    bridge = None
    try:
        with Mosquitto(work / "mosquitto") as broker:
            say(f"mosquitto on :{broker.port}; {args.devices} devices; signing {args.events} events…")
            devices = [Identity.from_seed(random.Random(i).randbytes(32)) for i in range(args.devices)]
            data_dir = work / "bridge"
            ledger = Ledger(ledger_path(data_dir))
            register_devices(ledger, operator_key(data_dir), [
                InventoryDevice(name=f"d{i}", profile="heart_rate_band", owner=f"patient:{i}", site="bench",
                                public_key=d.public_key, line=0) for i, d in enumerate(devices)])
            ledger.close()
            events = sign_events(devices, args.events, 0)

            say("raw broker delivery (plain paho subscriber)…")
            raw_eps = raw_delivery_rate(broker.port, events)
            say(f"  raw_eps {raw_eps:,.0f}")

            bridge = subprocess.Popen(
                [sys.executable, "-m", "carechain.cli", "bridge", "--data-dir", str(data_dir),
                 "--broker", f"127.0.0.1:{broker.port}", "--workers", str(args.workers)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
            wait_ready(bridge, work / "bridge.log")
            say("bridge throughput (verify + append + fsync + receipt)…")
            bridge_eps, anchored = anchored_rate(broker.port, data_dir, events, "bench-pub")
            say(f"  bridge_eps {bridge_eps:,.0f} ({'all' if anchored == len(events) else 'NOT all'} "
                f"{len(events)} anchored)")
            start_seq = args.events // args.devices + 1
            v2: dict[str, float] = {}
            if args.protocol == 2:
                sealed = sign_sealed_events(devices, args.events, start_seq)
                start_seq += args.events // args.devices + 1
                say("sealed v2 readings (+ ciphertext hash check and store)…")
                v2_eps, v2_anchored = anchored_rate(broker.port, data_dir, sealed, "bench-pub-v2")
                v2 = {"v2_bridge_eps": round(v2_eps, 1), "v2_ratio": round(v2_eps / bridge_eps, 3)}
                say(f"  v2_bridge_eps {v2_eps:,.0f} ({'all' if v2_anchored == len(sealed) else 'NOT all'} "
                    f"{len(sealed)} anchored), ratio to v1 {v2_eps / bridge_eps:.3f}")
            pub = WindowedPublisher(broker.port, "bench-pub-latency")
            counter = ReceiptCounter(broker.port)
            time.sleep(0.5)

            say(f"latency at {args.rate:,.0f} events/s offered for {args.latency_seconds:.0f} s…")
            sent_at: dict[tuple[str, int], float] = {}
            n = int(args.rate * args.latency_seconds)
            t_start = time.perf_counter()
            now_ms = int(time.time() * 1000)
            for i in range(n):
                target = t_start + i / args.rate
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                dev = devices[i % len(devices)]
                seq = start_seq + i // len(devices)
                t = time.perf_counter()  # latency clock starts before signing
                raw = envelope.sign(dev, make_payload(dev.device_id, seq, now_ms, "heart_rate", {"bpm": 70}))
                sent_at[(dev.device_id, seq)] = t
                pub.publish(topics.events(dev.device_id), raw)
            offered = n / (time.perf_counter() - t_start)
            counter.wait_for(set(sent_at), 60)
            lat = sorted((counter.acked[k] - t) * 1000 for k, t in sent_at.items() if k in counter.acked)
            pub.close()
            p50 = statistics.median(lat)
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            result = {
                "bridge_eps": round(bridge_eps, 1), "raw_eps": round(raw_eps, 1),
                "ratio": round(bridge_eps / raw_eps, 3), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
                "devices": args.devices, "events": args.events, "offered_eps": round(offered, 1),
                "latency_samples": len(lat), "latency_lost": n - len(lat), "workers": args.workers,
                "protocol": args.protocol, **v2,
            }
    finally:
        if bridge is not None:
            bridge.terminate()
            bridge.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()

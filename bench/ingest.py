"""Ingest benchmark: the same pre-signed load from ≥ 1,000 devices through mosquitto and through a 3-node NATS
cluster (JetStream, 3 replicas) into `carechain bridge` — its own process, started from a config file as a user
would — with 1, 2 and 4 ingest workers; the load generator runs on this machine too.

Each cell (broker × workers × events per message) reports, from one run:
  anchored_eps    events verified, appended (group commit, fsync) and receipted per second, counted in the ledger
  raw_eps         bare broker delivery of the same messages on the same broker, in events/s (mosquitto: a plain
                  paho subscriber; NATS: the same JetStream work queue read by a plain pull consumer that
                  acknowledges each message)
  ratio_raw       anchored_eps / raw_eps
  verify_eps      Ed25519 verifications per second on one core (PyNaCl, as the check stage calls it), this run
  ratio_verify    anchored_eps / (2 × verify_eps): the share of this 2-core machine's verify capacity reached
  p50/p99/p999    sign → receipt latency (ms) at 50 % and 90 % of the cell's anchored_eps, and at each --offered
                  rate (default 10,000 events/s) (the clock starts before the event is signed and stops when
                  its receipt arrives here)
  cpu/rss         CPU (% of one core) and peak RSS of the bridge, each worker, each broker process and this load
                  generator, over the throughput phase
With --protocol 2 each cell then anchors as many sealed (v2) readings — wire form {"ct", "ev"}, the ciphertext
hash checked and the ciphertext stored with its leaf — and adds
  v2_anchored_eps sealed readings anchored per second
  v2_ratio        v2_anchored_eps / anchored_eps (the target: at least 0.9)
With --profile DIR, py-spy samples the bridge and its workers during each throughput phase; the share of time
per ingest stage is printed (docs/performance.md).

    python bench/ingest.py [--quick] [--brokers mosquitto,nats] [--workers 1,2,4] [--batch 1,64] [--protocol 2]
                           [--devices 1000] [--events 30000] [--latency-seconds 8] [--offered 10000]
                           [--profile DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import nats
import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]
import yaml
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import envelope, topics  # noqa: E402
from carechain.batch import encode_batch  # noqa: E402
from carechain.events import make_payload, make_sealed_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.inventory import InventoryDevice  # noqa: E402
from carechain.sealed import DEFAULT_EPOCH_MS, ciphertext_hash, encode_sealed, epoch_of, seal_body  # noqa: E402
from chain_bridge.broker.nats import EVENTS_STREAM, EVENTS_SUBJECTS  # noqa: E402
from chain_bridge.ledger.store import Ledger  # noqa: E402
from chain_bridge.registry import ledger_path, operator_key, register_devices  # noqa: E402
from simulators.fault_harness import wait_ready  # noqa: E402
from simulators.mosquitto import Mosquitto  # noqa: E402
from simulators.nats_cluster import NatsCluster  # noqa: E402

# Unacknowledged publishes per client: below paho's 65,535 packet ids (they must never wrap), and large
# because paho handles one PUBACK per network-loop pass (~4k/s): a small window would measure paho.
WINDOW = 30_000
CELL_TIMEOUT_S = 180.0  # a throughput phase that has not anchored everything by then reports what it has


@dataclass(frozen=True)
class Message:
    """One MQTT message of the load: `events` events of one device (a batch message when more than one)."""

    topic: str
    payload: bytes
    device: int  # index in the fleet: which publisher (broker node) sends it
    events: int


# -- the load --------------------------------------------------------------------------------------------

def fleet(count: int) -> list[Identity]:
    """The benchmark's devices, the same keys in every run."""
    return [Identity.from_seed(random.Random(i).randbytes(32)) for i in range(count)]


def register(data_dir: Path, devices: Sequence[Identity]) -> None:
    ledger = Ledger(ledger_path(data_dir))
    register_devices(ledger, operator_key(data_dir), [
        InventoryDevice(name=f"d{i}", profile="heart_rate_band", owner=f"patient:{i}", site="bench",
                        public_key=d.public_key, line=0) for i, d in enumerate(devices)])
    ledger.close()


def sign_event(dev: Identity, seq: int, ts_ms: int) -> bytes:
    return envelope.sign(dev, make_payload(dev.device_id, seq, ts_ms, "heart_rate", {"bpm": 60 + seq % 40}))


def sign_sealed(dev: Identity, seq: int, ts_ms: int) -> bytes:
    """A sealed (v2) heart-rate reading as a v2 agent sends it; the key is fixed (the bridge never sees it)."""
    epoch = epoch_of(ts_ms, DEFAULT_EPOCH_MS)
    ct = seal_body(bytes(32), seq.to_bytes(12, "big"), dev.device_id, seq, ts_ms, "heart_rate", epoch,
                   {"bpm": 60 + seq % 40})
    payload = make_sealed_payload(dev.device_id, seq, ts_ms, "heart_rate", epoch, ciphertext_hash(ct))
    return encode_sealed(envelope.sign(dev, payload), ct)


def signed_load(devices: Sequence[Identity], count: int, per_message: int, first_seq: int = 0,
                sign: Callable[[Identity, int, int], bytes] = sign_event) -> tuple[list[Message], int]:
    """`count` events, device after device, `per_message` consecutive events of a device in each message; and
    the first sequence number no device has used yet."""
    now = int(time.time() * 1000)
    out: list[Message] = []
    total, seq = 0, first_seq
    while total < count:
        for i, dev in enumerate(devices):
            n = min(per_message, count - total)
            if n == 0:
                break
            out.append(_message(i, dev, [sign(dev, s, now) for s in range(seq, seq + n)]))
            total += n
        seq += per_message
    return out, seq


def _message(index: int, dev: Identity, signed: list[bytes]) -> Message:
    payload = signed[0] if len(signed) == 1 else encode_batch(signed)
    return Message(topics.events(dev.device_id), payload, index, len(signed))


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


class Publishers:
    """One publisher per broker node (a device always on the same node), each fed by its own thread."""

    def __init__(self, ports: Sequence[int], name: str) -> None:
        self.pubs = [WindowedPublisher(p, f"{name}-{i}") for i, p in enumerate(ports)]

    def publish_all(self, messages: Sequence[Message]) -> None:
        """Publish every message as fast as the window lets, in parallel per node."""
        parts: list[list[Message]] = [[] for _ in self.pubs]
        for m in messages:
            parts[m.device % len(self.pubs)].append(m)
        threads = [threading.Thread(target=lambda p=pub, ms=part: [p.publish(m.topic, m.payload) for m in ms])
                   for pub, part in zip(self.pubs, parts, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def publish(self, m: Message) -> None:
        self.publish_raw(m.topic, m.payload, m.device)

    def publish_raw(self, topic: str, payload: bytes, device: int) -> None:
        self.pubs[device % len(self.pubs)].publish(topic, payload)

    def close(self) -> None:
        for p in self.pubs:
            p.close()


def verify_rate(seconds: float) -> float:
    """Ed25519 verifications per second on one core, through the call the check stage makes (PyNaCl)."""
    dev = Identity.from_seed(b"\x01" * 32)
    msg = envelope.parse(sign_event(dev, 0, int(time.time() * 1000)))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            assert msg.verify(dev.public_key)
        n += 200
    return n / (time.perf_counter() - t0)


# -- resource use ----------------------------------------------------------------------------------------

@dataclass
class Meter:
    """CPU (% of one core) and peak RSS of named processes over a phase; RSS sampled every 0.2 s."""

    procs: dict[str, psutil.Process]
    _cpu0: dict[str, float] = field(default_factory=dict)
    _rss: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def phase(self) -> Iterator[dict[str, dict[str, float]]]:
        result: dict[str, dict[str, float]] = {}
        self._cpu0 = {n: _cpu(p) for n, p in self.procs.items()}
        self._rss = {n: 0 for n in self.procs}
        self._stop.clear()
        sampler = threading.Thread(target=self._sample, daemon=True)
        t0 = time.perf_counter()
        sampler.start()
        try:
            yield result
        finally:
            self._stop.set()
            sampler.join()
            wall = time.perf_counter() - t0
            for n, p in self.procs.items():
                result[n] = {"cpu_pct": round(100 * (_cpu(p) - self._cpu0[n]) / wall, 1),
                             "rss_mb": round(self._rss[n] / 2**20, 1)}

    def _sample(self) -> None:
        while True:
            for n, p in self.procs.items():
                with contextlib.suppress(psutil.Error):  # the process is gone: its peak stays
                    self._rss[n] = max(self._rss[n], p.memory_info().rss)
            if self._stop.wait(0.2):
                return


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


# -- where the time goes --------------------------------------------------------------------------------

# A sampled stack belongs to the first stage one of its frames names (py-spy's raw format: "frame;frame;… count",
# root first; a frame reads "function (path/file.py:line)").
STAGES = (
    ("contracts (gate, replay: re-verifies each event)", ("contract_rules/", "contract_gate.py")),
    ("verify (Ed25519, PyNaCl)", ("verify_signature",)),
    ("receipts (CBOR, sign)", ("receipts.py",)),
    ("sequence + append + commit (SQLite, fsync)", ("ledger/", "sqlite", "ingest/sequence.py", "ingest/guards.py")),
    ("parse + check (CBOR, COSE, batch)", ("ingest/check.py", "carechain/envelope.py", "carechain/batch.py",
                                           "carechain/cbor.py", "cbor2", "carechain/events.py")),
    ("MQTT client (paho)", ("paho/",)),
    ("NATS client (nats-py, asyncio)", ("nats/", "asyncio/")),
    ("worker → sequencer queue (pickle)", ("multiprocessing/", "pickle")),
)


class Profiler:
    """py-spy sampling the bridge and its workers (`--subprocesses`) during a throughput phase."""

    def __init__(self, out_dir: Path, name: str, pid: int) -> None:
        self.raw = out_dir / f"{name}.txt"
        out_dir.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                                      "--rate", "200", "--format", "raw", "--output", str(self.raw)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, dict[str, float]]:
        """End sampling (py-spy writes its file on SIGINT); per process kind, the share of its samples per stage."""
        self.proc.send_signal(2)
        self.proc.wait(60)
        return stage_shares(self.raw.read_text() if self.raw.exists() else "")


def stage_shares(raw: str) -> dict[str, dict[str, float]]:
    """{"bridge" | "workers": {stage: % of that kind's samples}}; a worker's root frame names multiprocessing."""
    counts: dict[str, dict[str, int]] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        kind = "workers" if ';process ' in stack else "bridge"  # a child's stack hangs below its parent's line
        stage = next((name for name, marks in STAGES if any(m in stack for m in marks)), "other")
        counts.setdefault(kind, {})[stage] = counts.get(kind, {}).get(stage, 0) + int(n)
    return {kind: {k: round(100 * v / (sum(c.values()) or 1), 1) for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
            for kind, c in counts.items()}


# -- the brokers ----------------------------------------------------------------------------------------

class MosquittoTier:
    name = "mosquitto"

    def __init__(self, workdir: Path) -> None:
        self.broker = Mosquitto(workdir).start()

    @property
    def ports(self) -> list[int]:
        return [self.broker.port]

    def processes(self) -> dict[str, psutil.Process]:
        assert self.broker.process is not None
        return {"mosquitto": psutil.Process(self.broker.process.pid)}

    def bridge_settings(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        """Nothing outlives a bridge on mosquitto: its session is persistent, but every event is anchored."""

    def raw_rate(self, messages: Sequence[Message]) -> float:
        done = threading.Event()
        got = [0]
        last = [0.0]
        total = len(messages)

        def on_message(*_a: object) -> None:
            got[0] += 1
            if got[0] == total:
                last[0] = time.perf_counter()
                done.set()

        sub = _client(self.broker.port, "bench-raw-sub")
        sub.on_message = on_message
        sub.subscribe(topics.EVENTS_WILDCARD, qos=1)
        time.sleep(0.5)
        pubs = Publishers(self.ports, "bench-raw-pub")
        t0 = time.perf_counter()
        pubs.publish_all(messages)
        done.wait(CELL_TIMEOUT_S)
        pubs.close()
        sub.disconnect()
        sub.loop_stop()
        return _events(messages, got[0]) / ((last[0] or time.perf_counter()) - t0)

    def stop(self) -> None:
        self.broker.stop()


class NatsTier:
    """A 3-node cluster; the bridge's events stream and consumer are deleted between cells."""

    name = "nats"

    def __init__(self, workdir: Path) -> None:
        self.cluster = NatsCluster(workdir).start()

    @property
    def ports(self) -> list[int]:
        return [n.ports.mqtt for n in self.cluster.nodes]

    def processes(self) -> dict[str, psutil.Process]:
        return {f"nats-{n.name}": psutil.Process(n.process.pid) for n in self.cluster.nodes if n.process}

    def bridge_settings(self) -> dict[str, Any]:
        return {"ingest": "nats", "nats": {"servers": self.cluster.servers}}

    def _js(self, work: Callable[[Any], Any]) -> Any:
        async def run() -> Any:
            nc = await nats.connect(servers=self.cluster.servers, connect_timeout=30)
            try:
                return await work(nc.jetstream(timeout=30))  # on a busy 2-core machine R3 calls take seconds
            finally:
                await nc.close()
        return asyncio.run(run())

    def reset(self) -> None:
        async def delete(js: Any) -> None:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(EVENTS_STREAM)
        self._js(delete)

    def raw_rate(self, messages: Sequence[Message]) -> float:
        """The bridge's path without the bridge: MQTT in, the 3-replica work queue, a pull consumer that
        acknowledges each message (its reply subject, as the bridge does) and does nothing else."""
        self.reset()
        total = len(messages)
        result: list[float] = []  # when the last message came
        counts: list[int] = []
        ready = threading.Event()

        async def consume(js: Any) -> None:
            await js.add_stream(StreamConfig(name=EVENTS_STREAM, subjects=list(EVENTS_SUBJECTS), num_replicas=3,
                                             retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE))
            sub = await js.pull_subscribe(EVENTS_SUBJECTS[0], durable="bench-raw", stream=EVENTS_STREAM)
            ready.set()
            got, first, last = 0, 0.0, 0.0
            deadline = time.monotonic() + CELL_TIMEOUT_S
            while got < total and time.monotonic() < deadline:
                try:
                    batch = await sub.fetch(500, timeout=0.1)
                except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either when nothing came
                    continue
                for m in batch:
                    await m.ack()
                got += len(batch)
                last = time.perf_counter()
                first = first or last
            counts.extend([got])
            result.extend([last])

        consumer = threading.Thread(target=lambda: self._js(consume))
        consumer.start()
        ready.wait(30)
        pubs = Publishers(self.ports, "bench-raw-pub")
        t0 = time.perf_counter()
        pubs.publish_all(messages)
        consumer.join()
        pubs.close()
        self.reset()
        return _events(messages, counts[0]) / (result[0] - t0) if result and result[0] else 0.0

    def stop(self) -> None:
        self.cluster.stop()


def _events(messages: Sequence[Message], delivered: int) -> int:
    """Events in the first `delivered` messages."""
    return sum(m.events for m in messages[:delivered])


# -- one cell --------------------------------------------------------------------------------------------

class Bridge:
    """`carechain bridge --config FILE` in its own process, on a copy of the registered template data dir."""

    def __init__(self, work: Path, template: Path, tier: MosquittoTier | NatsTier, workers: int) -> None:
        self.data_dir = work / "bridge"
        shutil.copytree(template, self.data_dir)
        config = work / "carechain.yaml"
        config.write_text(yaml.safe_dump({
            "broker": {"host": "127.0.0.1", "port": tier.ports[0]},
            "bridge": {"data_dir": str(self.data_dir), "ingest_workers": workers, **tier.bridge_settings()},
        }))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carechain.cli", "bridge", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
                 "COLUMNS": "200"})
        wait_ready(self.proc, work / "bridge.log")
        self._reader: sqlite3.Connection | None = None

    def processes(self) -> dict[str, psutil.Process]:
        me = psutil.Process(self.proc.pid)
        workers = [c for c in me.children() if "resource_tracker" not in " ".join(c.cmdline())]
        return {"bridge": me, **{f"worker{i}": w for i, w in enumerate(sorted(workers, key=lambda c: c.pid))}}

    def anchored(self) -> int:
        """Events committed: exact, but a count over the events table (O(n)): call it rarely."""
        reader = Ledger(ledger_path(self.data_dir))
        try:
            return reader.count_events()
        finally:
            reader.close()

    def log_size(self) -> int:
        """Leaves committed (events and the bridge's own entries): one index lookup on a connection kept open,
        cheap enough to poll every 20 ms without taking CPU from the bridge."""
        if self._reader is None:
            self._reader = sqlite3.connect(f"file:{ledger_path(self.data_dir)}?mode=ro", uri=True)
        row = self._reader.execute("SELECT MAX(idx) FROM entries").fetchone()
        return 0 if row[0] is None else row[0] + 1

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def anchored_rate(bridge: Bridge, pubs: Publishers, messages: Sequence[Message]) -> tuple[float, int]:
    """Publish `messages` and time until the ledger holds all their events: (events anchored per second, how many)."""
    # Counted from the ledger (committed = durable), not by a receipt subscriber in this process: in production
    # the receipts go to agents on other machines, and consuming them here would take CPU from the bridge.
    # Polled by the log's size (an index lookup); the exact event count (a table scan) only once the log has
    # grown by at least `total` leaves, or at the deadline.
    total = sum(m.events for m in messages)
    base, base_size = bridge.anchored(), bridge.log_size()
    t0 = time.perf_counter()
    feeder = threading.Thread(target=pubs.publish_all, args=(messages,))
    feeder.start()
    deadline, size, t1, anchored = time.monotonic() + CELL_TIMEOUT_S, base_size, time.perf_counter(), 0
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = bridge.log_size()
        if now != size:
            size, t1 = now, time.perf_counter()
        if size - base_size >= total and (anchored := bridge.anchored() - base) >= total:
            break
    else:
        anchored = bridge.anchored() - base
    feeder.join()
    return anchored / (t1 - t0), anchored


class ReceiptClock:
    """When each (device, seq) was receipted, as seen by a subscriber to every device's receipts."""

    def __init__(self, port: int, qos: int) -> None:
        self.acked: dict[tuple[str, int], float] = {}
        self.lock = threading.Lock()
        self.client = _client(port, f"bench-receipts-{port}")
        self.client.on_message = self._on_message
        self.client.subscribe(f"{topics.PREFIX}/dev/+/rcpt", qos=qos)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        payload = cbor2.loads(cbor2.loads(msg.payload).value[2])  # timing only: agents verify receipts
        with self.lock:
            for seq, _idx in payload["ok"]:
                self.acked.setdefault((payload["dev"], seq), now)

    def wait_for(self, keys: set[tuple[str, int]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if keys <= self.acked.keys():
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def latency(pubs: Publishers, clock: ReceiptClock, devices: Sequence[Identity], rate: float, seconds: float,
            per_message: int, first_seq: int) -> tuple[dict[str, float], int]:
    """Offer `rate` events/s for `seconds`, signing each event when it is due: sign → receipt percentiles, and
    the first sequence number left unused."""
    sent_at: dict[tuple[str, int], float] = {}
    messages = max(1, int(rate * seconds / per_message))
    now_ms = int(time.time() * 1000)
    t_start = time.perf_counter()
    for k in range(messages):
        delay = t_start + k * per_message / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        i = k % len(devices)
        dev = devices[i]
        seq0 = first_seq + (k // len(devices)) * per_message
        t = time.perf_counter()  # the clock starts before signing
        signed = [sign_event(dev, seq0 + j, now_ms) for j in range(per_message)]
        for j in range(per_message):
            sent_at[(dev.device_id, seq0 + j)] = t
        pubs.publish(_message(i, dev, signed))
    offered = messages * per_message / (time.perf_counter() - t_start)
    next_seq = first_seq + -(-messages // len(devices)) * per_message
    clock.wait_for(set(sent_at), 30)
    with clock.lock:
        lat = sorted((clock.acked[k] - t) * 1000 for k, t in sent_at.items() if k in clock.acked)
    if not lat:
        return {"offered_eps": round(offered, 1), "lost": len(sent_at)}, next_seq

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * q))], 1)
    return {"offered_eps": round(offered, 1), "p50_ms": round(statistics.median(lat), 1), "p99_ms": pct(0.99),
            "p999_ms": pct(0.999), "samples": len(lat), "lost": len(sent_at) - len(lat)}, next_seq


@dataclass(frozen=True)
class Load:
    """One message form's pre-signed load: the clear events, with --protocol 2 as many sealed readings (their
    sequence numbers after the clear ones), and the first sequence number left for the latency runs."""

    per_message: int
    messages: list[Message]
    sealed: list[Message]
    next_seq: int


def make_load(devices: Sequence[Identity], count: int, per_message: int, protocol: int) -> Load:
    messages, seq = signed_load(devices, count, per_message)
    sealed: list[Message] = []
    if protocol == 2:
        sealed, seq = signed_load(devices, count, per_message, seq, sign_sealed)
    return Load(per_message, messages, sealed, seq)


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    devices: list[Identity]
    template: Path
    verify_eps: float
    say: Callable[..., None]

    def cell(self, tier: MosquittoTier | NatsTier, workers: int, load: Load, raw_eps: float) -> dict[str, Any]:
        messages, per_message, first_seq = load.messages, load.per_message, load.next_seq
        tier.reset()
        cell_dir = self.work / f"{tier.name}-w{workers}-b{per_message}"
        cell_dir.mkdir()
        bridge = Bridge(cell_dir, self.template, tier, workers)
        pubs = Publishers(tier.ports, f"bench-pub-{cell_dir.name}")
        clock = ReceiptClock(tier.ports[0], qos=1 if tier.name == "mosquitto" else 0)
        try:
            meter = Meter({**bridge.processes(), **tier.processes(), "loadgen": psutil.Process()})
            profiler = Profiler(self.args.profile, cell_dir.name, bridge.proc.pid) if self.args.profile else None
            with meter.phase() as resources:
                eps, anchored = anchored_rate(bridge, pubs, messages)
            stages = profiler.stop() if profiler else None
            total = sum(m.events for m in messages)
            self.say(f"  {tier.name} × {workers} worker(s), {per_message} event(s)/message: {eps:,.0f} anchored/s "
                     f"({'all' if anchored == total else f'ONLY {anchored} of'} {total})")
            if stages:
                self.say(f"    where the bridge's time goes (% of samples): {stages}")
            v2: dict[str, Any] = {}
            if load.sealed:
                v2_eps, v2_anchored = anchored_rate(bridge, pubs, load.sealed)
                v2 = {"v2_anchored_eps": round(v2_eps, 1), "v2_ratio": round(v2_eps / eps, 3) if eps else None}
                self.say(f"    sealed v2 readings: {v2_eps:,.0f} anchored/s ({v2_anchored} of "
                         f"{sum(m.events for m in load.sealed)}), {v2['v2_ratio']} of v1")
            lat: dict[str, dict[str, float]] = {}
            for share in (0.5, 0.9):
                key = f"at_{int(share * 100)}pct"
                lat[key], first_seq = latency(pubs, clock, self.devices, share * eps, self.args.latency_seconds,
                                              per_message, first_seq)
                self.say(f"    latency at {share:.0%} of peak: {lat[key]}")
            for rate in self.args.offered:  # a fixed offered rate, whatever the cell's peak (the p99 target's)
                key = f"at_{rate}eps"
                lat[key], first_seq = latency(pubs, clock, self.devices, rate, self.args.latency_seconds,
                                              per_message, first_seq)
                self.say(f"    latency at {rate:,} events/s offered: {lat[key]}")
        finally:
            clock.close()
            pubs.close()
            bridge.stop()
        return {"broker": tier.name, "workers": workers, "events_per_message": per_message,
                "anchored_eps": round(eps, 1), "anchored": anchored, "events": total, "raw_eps": round(raw_eps, 1),
                "ratio_raw": round(eps / raw_eps, 3) if raw_eps else None, "verify_eps": round(self.verify_eps, 1),
                "ratio_verify": round(eps / (2 * self.verify_eps), 3), "latency": lat, "resources": resources, **v2,
                **({"profile": stages} if stages else {})}


def _offered(cells: list[dict[str, Any]]) -> list[int]:
    """The fixed offered rates the cells were measured at (`--offered`)."""
    keys = {k for c in cells for k in c["latency"] if k.endswith("eps")}
    return sorted(int(k[3:-3]) for k in keys)


def table(cells: list[dict[str, Any]]) -> str:
    head = (f"{'broker':<10}{'w':>2}{'ev/msg':>7}{'anchored/s':>11}{'raw/s':>9}{'÷raw':>6}{'÷2·verify':>10}"
            f"{'p50/p99/p999 @50%':>22}{'p50/p99/p999 @90%':>22}"
            + "".join(f"{f'@{r:,}/s':>22}" for r in _offered(cells)) + "  cpu% / rss MB")
    lines = [head]
    for c in cells:
        def lat(key: str, c: dict[str, Any] = c) -> str:
            x = c["latency"][key]
            return f"{x.get('p50_ms', '-')}/{x.get('p99_ms', '-')}/{x.get('p999_ms', '-')}"
        res = " ".join(f"{n} {r['cpu_pct']:.0f}%/{r['rss_mb']:.0f}" for n, r in c["resources"].items())
        lines.append(f"{c['broker']:<10}{c['workers']:>2}{c['events_per_message']:>7}{c['anchored_eps']:>11,.0f}"
                     f"{c['raw_eps']:>9,.0f}{c['ratio_raw'] or 0:>6.2f}{c['ratio_verify']:>10.2f}"
                     f"{lat('at_50pct'):>22}{lat('at_90pct'):>22}"
                     + "".join(f"{lat(f'at_{r}eps'):>22}" for r in _offered(cells)) + f"  {res}"
                     + (f"  v2 {c['v2_anchored_eps']:,.0f}/s = {c['v2_ratio']} × v1" if "v2_ratio" in c else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run: 4,000 events per cell, 3 s per latency run")
    ap.add_argument("--brokers", default="mosquitto,nats", help="comma-separated: mosquitto, nats")
    ap.add_argument("--workers", default="1,2,4", help="comma-separated ingest worker counts")
    ap.add_argument("--batch", default="1", help="comma-separated events per message (1: one event per message)")
    ap.add_argument("--protocol", type=int, choices=(1, 2), default=1,
                    help="2: each cell also anchors as many sealed (v2) readings — ciphertext hash checked, "
                         "ciphertext stored with its leaf — and reports v2_anchored_eps and v2_ratio (÷ v1)")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--events", type=int, default=None, help="events per throughput run (default 30,000)")
    ap.add_argument("--latency-seconds", type=float, default=None, help="per latency run (default 8)")
    ap.add_argument("--offered", default="10000", help="comma-separated fixed offered rates (events/s) for one more "
                    "latency run each, besides 50 %% and 90 %% of the cell's peak (default 10000; '' for none)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="sample the bridge and its workers with py-spy during each throughput phase (raw stacks "
                         "into DIR) and print the share of time per ingest stage")
    ap.add_argument("--json", action="store_true", help="print the cells as one JSON object")
    args = ap.parse_args()
    args.offered = [int(r) for r in args.offered.split(",") if r]
    args.events = args.events or (4000 if args.quick else 30_000)
    args.latency_seconds = args.latency_seconds or (3.0 if args.quick else 8.0)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    brokers = [b for b in args.brokers.split(",") if b]
    unknown = set(brokers) - {"mosquitto", "nats"}
    if unknown:
        ap.error(f"--brokers: unknown {', '.join(sorted(unknown))} (mosquitto, nats)")
    workers = [int(w) for w in args.workers.split(",")]
    batches = [int(b) for b in args.batch.split(",")]

    work = Path(tempfile.mkdtemp(prefix="cc-bench-ingest-"))
    cells: list[dict[str, Any]] = []
    try:
        devices = fleet(args.devices)
        template = work / "template"
        register(template, devices)
        verify_eps = verify_rate(1.0 if args.quick else 3.0)
        say(f"{args.devices} devices; one-core PyNaCl verify: {verify_eps:,.0f}/s")
        loads = [make_load(devices, args.events, b, args.protocol) for b in batches]
        run = Run(args, work, devices, template, verify_eps, say)
        for name in brokers:
            tier: MosquittoTier | NatsTier = (MosquittoTier(work / "mosquitto") if name == "mosquitto"
                                              else NatsTier(work / "nats"))
            try:
                for load in loads:
                    raw_eps = tier.raw_rate(load.messages)
                    say(f"{name}: bare delivery {raw_eps:,.0f} events/s ({load.per_message} per message)")
                    for w in workers:
                        cells.append(run.cell(tier, w, load, raw_eps))
            finally:
                tier.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"devices": args.devices, "events": args.events, "verify_eps": round(verify_eps, 1),
                          "cells": cells}))
    else:
        print(table(cells))


if __name__ == "__main__":
    main()

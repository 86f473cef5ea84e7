"""The ledger's two stores side by side, and the sequencer fail-over time on PostgreSQL.

1. Append throughput: `--events` events from `--devices` devices (311-byte leaves, as a signed reading is)
   appended through `Ledger.append_events` in group commits of `--batch` (one transaction each), into a fresh
   SQLite file (WAL, synchronous=FULL) and into a fresh PostgreSQL database (COPY inside the transaction).
2. Fail-over: a process holding the sequencer lease appends a batch every 10 ms; a standby waits for the
   lease (`SequencerLease.wait`). The holder is killed with SIGKILL; the figure is the time from the kill to
   the standby's first committed append. `--failovers` rounds; min / median / max.
3. Bridge hosts: `--host-events` pre-signed events (one per MQTT message, `--devices` devices) published
   through a private mosquitto to one, then two `carechain bridge` processes on one PostgreSQL ledger (every
   host ingests through the shared subscription; the lease holder also checkpoints); events anchored per
   second, from the first publish to the last committed event counted in the database, and each host's share.
   The load generator, mosquitto, PostgreSQL and the bridges share this machine's cores.

The PostgreSQL server is CARECHAIN_BENCH_POSTGRES (default `host=127.0.0.1 port=5432 dbname=test`); a
database is created for the run and dropped after it.

    python bench/postgres_store.py [--events 100000] [--batch 2000] [--devices 1000] [--failovers 5]
                                   [--host-events 20000] [--hosts 1,2]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as SyncEvent
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
import psycopg  # noqa: E402
import yaml  # noqa: E402

from carechain import envelope, topics  # noqa: E402
from carechain.events import make_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.inventory import InventoryDevice  # noqa: E402
from chain_bridge.lease import SequencerLease  # noqa: E402
from chain_bridge.ledger.postgres import PostgresLocation  # noqa: E402
from chain_bridge.ledger.sql import SqliteLocation, StoreLocation  # noqa: E402
from chain_bridge.ledger.store import EventCandidate, Ledger  # noqa: E402
from chain_bridge.registry import LOG_KEY_FILE, OPERATOR_KEY_FILE, log_key, operator_key, register_devices  # noqa: E402
from simulators.fault_harness import BridgeProcess  # noqa: E402
from simulators.mosquitto import Mosquitto  # noqa: E402
from simulators.postgres import scratch_database  # noqa: E402

logging.getLogger("carechain.bridge").setLevel(logging.ERROR)  # the lease's standby lines, in every round
ADMIN_DSN = os.environ.get("CARECHAIN_BENCH_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")
LEAF_BYTES = 311
PUBLISH_WINDOW = 500  # QoS 1 messages in flight from the load generator
HOSTS_TIMEOUT_S = 300.0


def candidates(start: int, count: int, devices: int) -> list[EventCandidate]:
    out = []
    for i in range(start, start + count):
        device = f"dev{i % devices:06d}"
        body = f"{device}:{i // devices}:".encode()
        out.append(EventCandidate(device, i // devices, body + b"x" * (LEAF_BYTES - len(body))))
    return out


def append_rate(location: StoreLocation, events: int, batch: int, devices: int) -> float:
    ledger = Ledger(location)
    try:
        batches = [candidates(start, min(batch, events - start), devices) for start in range(0, events, batch)]
        started = time.perf_counter()
        for b in batches:
            ledger.append_events(b)
        elapsed = time.perf_counter() - started
        assert ledger.size == events == ledger.count_events()
    finally:
        ledger.close()
    return events / elapsed


def _holder(dsn: str, ready: SyncEvent) -> None:
    """The active sequencer: holds the lease and appends a small batch every 10 ms until it is killed."""
    location = PostgresLocation(dsn)
    lease = SequencerLease(location, name="bench holder")
    assert lease.try_acquire()
    ledger = Ledger(location)
    ready.set()
    n = ledger.size
    while True:
        ledger.append_events(candidates(n, 10, 10))
        n += 10
        time.sleep(0.01)


def _standby(dsn: str, waiting: SyncEvent, took: Queue[float]) -> None:
    """The standby: waits for the lease, then appends once and reports when that append committed."""
    location = PostgresLocation(dsn)
    ledger = Ledger(location)
    lease = SequencerLease(location, name="bench standby")
    waiting.set()
    lease.wait(lambda: False)
    ledger.append_events(candidates(10_000_000 + ledger.size, 1, 1))
    took.put(time.monotonic())  # CLOCK_MONOTONIC: one clock for every process on the machine
    lease.release()


def failover_s(dsn: str) -> float:
    spawn = multiprocessing.get_context("spawn")
    ready, waiting, took = spawn.Event(), spawn.Event(), spawn.Queue()
    holder = spawn.Process(target=_holder, args=(dsn, ready))
    holder.start()
    assert ready.wait(30)
    standby = spawn.Process(target=_standby, args=(dsn, waiting, took))
    standby.start()
    assert waiting.wait(30)
    time.sleep(0.5)  # the holder is mid-stream, the standby polling
    assert holder.pid is not None
    killed = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    appended = took.get(timeout=60)
    holder.join()
    standby.join(10)
    return float(appended - killed)


def _publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1, at most PUBLISH_WINDOW unacknowledged by the broker."""
    slots = threading.Semaphore(PUBLISH_WINDOW)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"load-{uuid.uuid4().hex}")
    client.max_inflight_messages_set(0)
    client.on_publish = lambda *_a: slots.release()
    client.connect("127.0.0.1", port)
    client.loop_start()
    for topic, payload in messages:
        slots.acquire()
        client.publish(topic, payload, qos=1)
    for _ in range(PUBLISH_WINDOW):
        slots.acquire(timeout=30)
    client.disconnect()
    client.loop_stop()


def _events_in(dsn: str) -> int:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


def hosts_rate(hosts: int, events: int, devices: int) -> tuple[float, list[int]]:
    """Anchor `events` pre-signed events through `hosts` bridge processes on one fresh PostgreSQL ledger:
    (events anchored per second, events each host appended)."""
    fleet = [Identity.generate() for _ in range(devices)]
    now = int(time.time() * 1000)
    messages = [(topics.events(dev.device_id),
                 envelope.sign(dev, make_payload(dev.device_id, i // devices, now, "heart_rate", {"bpm": 70})))
                for i in range(events) for dev in [fleet[i % devices]]]
    with tempfile.TemporaryDirectory() as tmp, scratch_database(ADMIN_DSN, "cc_bench") as dsn:
        work = Path(tmp)
        dirs = [work / f"host{i}" for i in range(hosts)]
        log_key(dirs[0])
        ledger = Ledger(PostgresLocation(dsn))
        register_devices(ledger, operator_key(dirs[0]), [
            InventoryDevice(f"d{i}", "heart_rate_band", f"patient:{i}", "bench", d.public_key, 0)
            for i, d in enumerate(fleet)])
        ledger.close()
        for other in dirs[1:]:
            for name in (LOG_KEY_FILE, OPERATOR_KEY_FILE):
                (other / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(dirs[0] / name, other / name)
        broker = Mosquitto(work / "mosquitto").start()
        running: list[BridgeProcess] = []
        try:
            config = work / "carechain.yaml"
            config.write_text(yaml.safe_dump({
                "broker": {"host": "127.0.0.1", "port": broker.port},
                "bridge": {"contracts": False, "store": {"backend": "postgresql", "dsn": dsn}}}))
            for i, d in enumerate(dirs):
                running.append(BridgeProcess(d, config, 0, work / f"host{i}.log"))
                running[-1].start()
            started = time.perf_counter()
            feeder = threading.Thread(target=_publish, args=(broker.port, messages))
            feeder.start()
            anchored, last = 0, started
            deadline = time.monotonic() + HOSTS_TIMEOUT_S
            while anchored < events and time.monotonic() < deadline:
                time.sleep(0.05)
                now_anchored = _events_in(dsn)
                if now_anchored != anchored:
                    anchored, last = now_anchored, time.perf_counter()
            feeder.join()
        finally:
            for host in running:
                host.stop()
            split = [int(host.stats.get("anchored", 0)) for host in running]
            broker.stop()
    if anchored < events:
        raise RuntimeError(f"only {anchored} of {events} events anchored within {HOSTS_TIMEOUT_S:.0f} s")
    return anchored / (last - started), split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--host-events", type=int, default=20_000)  # 0 (or --events 0, --failovers 0): skip
    parser.add_argument("--hosts", default="1,2", help="bridge process counts to run, comma-separated")
    args = parser.parse_args()

    if args.events:
        with tempfile.TemporaryDirectory() as tmp, scratch_database(ADMIN_DSN, "cc_bench") as dsn:
            sqlite_rate = append_rate(SqliteLocation(Path(tmp) / "ledger.db"), args.events, args.batch,
                                      args.devices)
            pg_rate = append_rate(PostgresLocation(dsn), args.events, args.batch, args.devices)
        print(f"append, group commit of {args.batch}, {args.events:,} events of {LEAF_BYTES} B "
              f"from {args.devices:,} devices:")
        print(f"  SQLite (WAL, synchronous=FULL)    {sqlite_rate:>10,.0f} events/s")
        print(f"  PostgreSQL (COPY, one txn/batch)  {pg_rate:>10,.0f} events/s   "
              f"({pg_rate / sqlite_rate:.2f}x SQLite)")
    times = []
    for _ in range(args.failovers):
        with scratch_database(ADMIN_DSN, "cc_bench") as dsn:
            times.append(failover_s(dsn))
    if times:
        print(f"fail-over, kill -9 of the lease holder to the standby's first append, {args.failovers} rounds: "
              f"min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    if not args.host_events:
        return
    print(f"bridge hosts on one PostgreSQL ledger, {args.host_events:,} events (one per message) from "
          f"{args.devices:,} devices through mosquitto, {os.cpu_count()} cores for everything:")
    base = None
    for hosts in (int(h) for h in args.hosts.split(",")):
        rate, split = hosts_rate(hosts, args.host_events, args.devices)
        base = base or rate
        print(f"  {hosts} bridge process(es)  {rate:>10,.0f} events/s anchored  ({rate / base:.2f}x)   "
              f"per host: {' / '.join(f'{n:,}' for n in split)}")


if __name__ == "__main__":
    main()

"""The ledger's two stores side by side, and the sequencer fail-over time on PostgreSQL.

1. Append throughput: `--events` events from `--devices` devices (311-byte leaves, as a signed reading is)
   appended through `Ledger.append_events` in group commits of `--batch` (one transaction each), into a fresh
   SQLite file (WAL, synchronous=FULL) and into a fresh PostgreSQL database (COPY inside the transaction).
2. Fail-over: a process holding the sequencer lease appends a batch every 10 ms; a standby waits for the
   lease (`SequencerLease.wait`). The holder is killed with SIGKILL; the figure is the time from the kill to
   the standby's first committed append. `--failovers` rounds; min / median / max.

The PostgreSQL server is CARECHAIN_BENCH_POSTGRES (default `host=127.0.0.1 port=5432 dbname=test`); a
database is created for the run and dropped after it.

    python bench/postgres_store.py [--events 100000] [--batch 2000] [--devices 1000] [--failovers 5]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as SyncEvent
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from chain_bridge.lease import SequencerLease  # noqa: E402
from chain_bridge.ledger.postgres import PostgresLocation  # noqa: E402
from chain_bridge.ledger.sql import SqliteLocation, StoreLocation  # noqa: E402
from chain_bridge.ledger.store import EventCandidate, Ledger  # noqa: E402

logging.getLogger("carechain.bridge").setLevel(logging.ERROR)  # the lease's standby lines, in every round
ADMIN_DSN = os.environ.get("CARECHAIN_BENCH_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")
LEAF_BYTES = 311


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new PostgreSQL database for this run, dropped afterwards; its DSN."""
    name = f"cc_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield conninfo.make_conninfo(ADMIN_DSN, dbname=name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--failovers", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, scratch_database() as dsn:
        sqlite_rate = append_rate(SqliteLocation(Path(tmp) / "ledger.db"), args.events, args.batch, args.devices)
        pg_rate = append_rate(PostgresLocation(dsn), args.events, args.batch, args.devices)
        print(f"append, group commit of {args.batch}, {args.events:,} events of {LEAF_BYTES} B "
              f"from {args.devices:,} devices:")
        print(f"  SQLite (WAL, synchronous=FULL)    {sqlite_rate:>10,.0f} events/s")
        print(f"  PostgreSQL (COPY, one txn/batch)  {pg_rate:>10,.0f} events/s   "
              f"({pg_rate / sqlite_rate:.2f}x SQLite)")
    times = []
    for _ in range(args.failovers):
        with scratch_database() as dsn:
            times.append(failover_s(dsn))
    print(f"fail-over, kill -9 of the lease holder to the standby's first append, {args.failovers} rounds: "
          f"min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s")


if __name__ == "__main__":
    main()

"""Ingest worker processes: the stateless, CPU-bound half of the bridge (Trillian's split).

Each worker has its own MQTT connection on a shared subscription (`$share/<group>/cc/v1/dev/+/ev`), so
the broker spreads events across workers and both receiving and verifying run in parallel, outside the
sequencer's GIL. A worker parses, checks and verifies, then hands verdicts to the one sequencer (the
`Bridge`) over a multiprocessing queue. It holds nothing durable: if it dies, the events it held were
never receipted and the agents resend them.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain import topics
from carechain.config import BrokerConfig, Limits

log = logging.getLogger("carechain.bridge.worker")
SHARE_GROUP = "carechain-bridge"
Verdicts = list[Any]  # EventCandidate | Rejection | ("bad_topic", topic)


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    broker: BrokerConfig
    ledger_path: Path
    limits: Limits
    batch_max: int
    client_id: str


def share_group(broker: BrokerConfig | None = None) -> str:
    """The workers' shared-subscription group name.

    mosquitto 2.0's acl_file does not check SUBSCRIBE (only READ, per delivered message), so any client
    that can log in may join a group it can name: the broker then hands it its turn of the events, READ
    is denied, and that turn is dropped instead of reaching a worker. When the bridge logs in with a
    password, the group name carries a tag derived from it, which no device can guess
    (docs/broker-security.md). On an open broker anyone could read the events anyway.
    """
    if broker is None or not broker.password:
        return SHARE_GROUP
    tag = hashlib.sha256(b"carechain/share-group/v1\0" + broker.password.encode()).hexdigest()[:32]
    return f"{SHARE_GROUP}-{tag}"


def shared_subscription(broker: BrokerConfig | None = None) -> str:
    return f"$share/{share_group(broker)}/{topics.EVENTS_WILDCARD}"


def run_worker(spec: WorkerSpec, out: mp.Queue, stop: Any, subscribed: Any) -> None:  # mp.Events
    """Process entry point (spawned): receive, verify, forward verdicts until `stop` is set."""
    from carechain.transport import connect_client
    from chain_bridge.ingest import Ingest
    from chain_bridge.ledger.store import Ledger

    ledger = Ledger(spec.ledger_path)  # read-only use: registry and its version counter
    registry = {"version": -1, "devices": {}}

    def refresh() -> None:
        version = ledger.registry_version()
        if version != registry["version"]:
            registry["devices"], registry["version"] = ledger.devices(), version

    ingest = Ingest(spec.limits, lambda dev: registry["devices"].get(dev))
    inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    # A clean session: a worker holds nothing durable, and a persistent session of a worker that is gone
    # would keep taking its share of the group's messages into a queue nobody reads.
    client = connect_client(
        spec.broker, spec.client_id, clean_session=True,
        on_message=lambda _c, _u, m: inbox.put((m.topic, m.payload)),
        subscriptions=[(shared_subscription(spec.broker), 1)], connected=(ready := threading.Event()),
    )
    if ready.wait(30):
        subscribed.set()
    # If the sequencer dies (kill -9, OOM), an orphaned worker would keep taking its share of the
    # subscription and feed a queue nobody reads: leave as soon as the parent is gone.
    parent = mp.parent_process()
    try:
        while not stop.is_set() and (parent is None or parent.is_alive()):
            try:
                batch = [inbox.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < spec.batch_max:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            refresh()
            now_ms = int(time.time() * 1000)
            verdicts: Verdicts = []
            for topic, payload in batch:
                device = topics.device_of_event_topic(topic)
                verdicts.append(("bad_topic", topic[:100]) if device is None
                                else ingest.check(device, payload, now_ms))
            out.put(verdicts)
    finally:
        client.disconnect()
        client.loop_stop()
        ledger.close()


class WorkerPool:
    """Starts and stops the ingest worker processes (spawned, so no paho thread is forked)."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = mp.get_context("spawn")
        self.results: mp.Queue = ctx.Queue()
        self._stop = ctx.Event()
        self._subscribed = [ctx.Event() for _ in specs]
        self._procs = [ctx.Process(target=run_worker, args=(s, self.results, self._stop, ready),
                                   name=f"carechain-ingest-{s.index}", daemon=True)
                       for s, ready in zip(specs, self._subscribed, strict=True)]

    def start(self) -> None:
        for p in self._procs:
            p.start()

    def stop(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once every worker holds its shared subscription (events sent before may be dropped)."""
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self._subscribed)

    def alive(self) -> int:
        return sum(p.is_alive() for p in self._procs)

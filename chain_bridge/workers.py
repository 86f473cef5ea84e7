"""Ingest worker processes: the stateless, CPU-bound half of the bridge (Trillian's split).

Each worker has its own MQTT connection on a shared subscription (`$share/<group>/cc/v1/dev/+/ev`), so
the broker spreads events across workers and both receiving and verifying run in parallel, outside the
sequencer's GIL. A worker runs the same receive → check loop as an in-process bridge (a
`chain_bridge.ingest.Receiver`), then hands verdicts to the one sequencer (the `Bridge`) over a
multiprocessing queue; `WorkerPool.receive` is the sequencer's end of it. A worker holds nothing
durable: if it dies, the events it held were never receipted and the agents resend them.

With `bridge.ingest: nats` the workers pull from the one durable JetStream consumer instead (JetStream hands
each message to one puller), and every batch they forward carries the acknowledgement subjects of the
messages it came from: the sequencer acknowledges them only after the batch is committed
(`chain_bridge.ingest.nats_source`). A worker that dies leaves its messages unacknowledged, and JetStream
delivers them again after `bridge.nats.ack_wait_s`.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain import topics
from carechain.config import BrokerConfig, Limits, NatsIngestConfig
from chain_bridge.ingest.verdicts import Verdict
from chain_bridge.ledger.sql import StoreLocation

log = logging.getLogger("carechain.bridge.worker")
SHARE_GROUP = "carechain-bridge"
STOP_TIMEOUT_S = 10.0  # a worker checks `stop` every 0.1 s; one still running after this is stuck


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    broker: BrokerConfig
    ledger: Path | StoreLocation  # the bridge's ledger: its file, or the PostgreSQL database (picklable)
    limits: Limits
    batch_max: int
    client_id: str
    nats: NatsIngestConfig | None = None  # set: pull from its JetStream consumer, not the MQTT shared subscription


@dataclass(frozen=True)
class WorkerBatch:
    """What a worker hands the sequencer: verdicts on whole messages, and (from JetStream) the acknowledgement
    subjects of those messages, to be acknowledged once the verdicts are committed."""

    verdicts: list[Verdict]
    acks: tuple[str, ...] = ()


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


def run_worker(spec: WorkerSpec, out: mp.Queue[WorkerBatch], stop: Any, subscribed: Any) -> None:  # mp.Events
    """Process entry point (spawned): receive, verify, forward verdicts until `stop` is set."""
    # The parent decides when workers stop (a Ctrl-C reaches the whole process group): no KeyboardInterrupt
    # tracebacks from workers, whoever spawned them (`carechain bridge` spawns them with SIGINT ignored; the
    # demo and tests do not).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.nats is not None:
        _pull_from_jetstream(spec, spec.nats, out, stop, subscribed)
    else:
        _read_shared_subscription(spec, out, stop, subscribed)


def _read_shared_subscription(spec: WorkerSpec, out: mp.Queue[WorkerBatch], stop: Any, subscribed: Any) -> None:
    from carechain.transport import connect_client
    from chain_bridge.ingest.receive import Receiver
    from chain_bridge.ledger.store import Ledger

    ledger = Ledger(spec.ledger)  # read-only use: registry and its version counter
    receiver = Receiver(ledger, spec.limits, spec.batch_max, max_message_bytes=spec.broker.max_packet_bytes)
    # A clean session: a worker holds nothing durable, and a persistent session of a worker that is gone
    # would keep taking its share of the group's messages into a queue nobody reads.
    client = connect_client(
        spec.broker, spec.client_id, clean_session=True, on_message=receiver.inbox.on_message,
        subscriptions=[(shared_subscription(spec.broker), 1)], connected=(ready := threading.Event()),
    )
    # If the sequencer dies (kill -9, OOM), an orphaned worker would keep taking its share of the
    # subscription and feed a queue nobody reads: leave as soon as the parent is gone.
    parent = mp.parent_process()
    try:
        # Short steps, whether the broker is up or not: `stop` (and the parent's death) end the worker
        # promptly even while it is still waiting for its first subscription.
        pending: list[Verdict] = []
        while not stop.is_set() and (parent is None or parent.is_alive()):
            if not subscribed.is_set() and ready.is_set():
                subscribed.set()
            if len(pending) < spec.batch_max:
                pending.extend(receiver.receive(0.01 if pending else 0.1))
            if not pending:
                continue
            # The queue to the sequencer is bounded (a few slots). While it is full, this worker keeps merging
            # verdicts into one list up to `batch_max`, so the sequencer still gets full batches; only then does
            # it stop draining its inbox (back-pressure, ending at the broker).
            try:
                if len(pending) < spec.batch_max:
                    out.put_nowait(WorkerBatch(pending))
                else:
                    out.put(WorkerBatch(pending), timeout=0.1)
                pending = []
            except queue.Full:
                continue
    finally:
        # Disconnect first: a network thread waiting for room in a full inbox then gives up, and the message
        # it held is not acknowledged (the DISCONNECT goes out before its PUBACK could); close() ends any
        # other wait, so the exit never hangs on a full inbox.
        client.disconnect()
        receiver.inbox.close()
        client.loop_stop()
        ledger.close()


def _pull_from_jetstream(spec: WorkerSpec, cfg: NatsIngestConfig, out: mp.Queue[WorkerBatch], stop: Any,
                         subscribed: Any) -> None:
    from carechain.config import ConfigError
    from chain_bridge.ingest.nats_source import NatsSource
    from chain_bridge.ingest.receive import Receiver
    from chain_bridge.ledger.store import Ledger

    ledger = Ledger(spec.ledger)  # read-only use: registry and its version counter
    receiver = Receiver(ledger, spec.limits, spec.batch_max, max_message_bytes=spec.broker.max_packet_bytes)
    parent = mp.parent_process()

    def running() -> bool:
        return not stop.is_set() and (parent is None or parent.is_alive())

    source: NatsSource | None = None
    try:
        # The sequencer's own NatsSource sets up the stream and consumer too, at the same time: until the cluster
        # answers, try again (a fresh source each time: a failed one has stopped its thread).
        while running() and source is None:
            attempt = NatsSource(cfg, receiver, spec.broker, name=spec.client_id)
            try:
                attempt.start()
                source = attempt
            except ConfigError as exc:
                log.warning("ingest worker %d: %s; trying again", spec.index, exc)
                stop.wait(1.0)
        if source is None:
            return
        subscribed.set()
        while running():
            verdicts = source.receive(0.1)
            acks = source.hand_over()
            if not acks:
                continue
            batch = WorkerBatch(verdicts, acks)
            # Unacknowledged until the sequencer commits them: a worker stopped while the queue is full leaves
            # them to JetStream, which delivers them again after ack_wait.
            while running():
                try:
                    out.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
    finally:
        if source is not None:
            source.stop()
        ledger.close()


def worker_specs(count: int, broker: BrokerConfig, ledger: Path | StoreLocation, limits: Limits, batch_max: int,
                 client_id: str, nats: NatsIngestConfig | None = None) -> list[WorkerSpec]:
    """The bridge's `count` ingest workers: on MQTT each under its own login (chain_bridge.broker.worker_broker);
    on NATS under the bridge's login, which the cluster allows its stream's JetStream API."""
    from chain_bridge.broker import worker_broker

    return [WorkerSpec(i, broker if nats is not None else worker_broker(broker, i), ledger, limits, batch_max,
                       f"{client_id}-w{i}", nats) for i in range(count)]


class WorkerPool:
    """Starts and stops the ingest worker processes (spawned, so no paho thread is forked)."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = mp.get_context("spawn")
        self.batch_max = max((s.batch_max for s in specs), default=1)
        # Bounded like an inbox: verdicts waiting for the sequencer take at most about one inbox's worth.
        slots = max((s.limits.inbox_max_messages // max(s.batch_max, 1) for s in specs), default=1)
        self.results: mp.Queue[WorkerBatch] = ctx.Queue(maxsize=max(2, slots))
        self._acks: list[str] = []  # of the messages behind the verdicts `receive` returned since `take_acks`
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
            p.join(timeout=STOP_TIMEOUT_S)
            if p.is_alive():
                log.warning("ingest worker %s did not stop within %.0f s of being asked; killed it", p.name,
                            STOP_TIMEOUT_S)
                p.kill()
                p.join()

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids (None before `start`)."""
        return [p.pid for p in self._procs]

    @property
    def exitcodes(self) -> list[int | None]:
        """The workers' exit codes: None while running, 0 after a clean stop, -N when killed by signal N."""
        return [p.exitcode for p in self._procs]

    def receive(self, timeout: float) -> list[Verdict]:
        """The sequencer's end of the workers' queue: their verdicts, up to about `batch_max` at once (always
        every verdict of a message, so a message is acknowledged only once all its events are committed)."""
        try:
            first = self.results.get(timeout=timeout)
        except queue.Empty:
            return []
        verdicts = list(first.verdicts)
        self._acks.extend(first.acks)
        while len(verdicts) < self.batch_max:
            try:
                more = self.results.get_nowait()
            except queue.Empty:
                break
            verdicts.extend(more.verdicts)
            self._acks.extend(more.acks)
        return verdicts

    def take_acks(self) -> list[str]:
        """The JetStream acknowledgement subjects of the messages received since the last call (empty on MQTT)."""
        acks, self._acks = self._acks, []
        return acks

    def wait_subscribed(self, timeout: float) -> bool:
        """True once every worker holds its shared subscription (events sent before may be dropped)."""
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self._subscribed)

    def alive(self) -> int:
        return sum(p.is_alive() for p in self._procs)

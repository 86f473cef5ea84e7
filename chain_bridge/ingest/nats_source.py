"""The `receive` stage on a NATS cluster: device events pulled from a durable JetStream consumer, acknowledged
only after they are committed.

Devices publish over MQTT to any node of the cluster; the events' stream (`bridge.nats.stream`, a work queue
with 3 replicas) captures `cc.v1.dev.*.ev`, and the bridge pulls from its durable consumer. A pulled message
is acknowledged only when the batch that holds it is committed and its receipts are out (`settle`): a bridge
that dies before that leaves it unacknowledged, and JetStream delivers it again after `ack_wait_s` (the ledger
deduplicates, the receipt is re-sent). A batch that failed is negatively acknowledged, for redelivery now.
Receipts go back through the cluster as core NATS messages on the devices' receipt subjects, which the MQTT
listeners deliver to each device's subscription (at QoS 0: a receipt a device misses is answered again when
it resends). nats-py fails over between the servers by itself, so losing one node stops nothing.

`NatsSource` is a `VerdictSource` for the sequencer thread; nats-py's asyncio loop runs in a thread of its own.
With ingest workers (`workers`, a `chain_bridge.workers.WorkerPool`), the workers pull and check, each running
a `NatsSource` of its own and handing over the acknowledgement subjects of what it pulled (`hand_over`); the
sequencer's `NatsSource` then only takes their verdicts and acknowledges those subjects after commit.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from carechain.batch import events_in
from carechain.config import BrokerConfig, ConfigError, NatsIngestConfig
from chain_bridge.broker.nats import EVENTS_SUBJECTS, mqtt_subject
from chain_bridge.ingest.receive import Receiver
from chain_bridge.ingest.verdicts import Verdict

if TYPE_CHECKING:
    from chain_bridge.workers import WorkerPool

log = logging.getLogger("carechain.bridge.nats")
CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0  # one call into the NATS thread (acks, receipts) at most; past it, JetStream redelivers
FLUSH_TIMEOUT_S = 10  # nats-py takes whole seconds
RECONNECT_WAIT_S = 0.5
T = TypeVar("T")


def _why(exc: BaseException) -> str:
    """A JetStream API error's own words (e.g. a work-queue stream refusing a second consumer), else its repr."""
    description = getattr(exc, "description", None)
    return f"{description} ({type(exc).__name__})" if description else repr(exc)


def topic_of_subject(subject: str) -> str:
    """The MQTT topic of a subject our topics map to (the inverse of `mqtt_subject` for plain levels)."""
    return subject.replace(".", "/")


class NatsSource:
    """Pull → check: batches of verdicts from the durable consumer (or from `workers`, which pull); `settle`
    acknowledges the last batch."""

    def __init__(self, cfg: NatsIngestConfig, receiver: Receiver, broker: BrokerConfig, *,
                 name: str = "carechain-bridge", workers: WorkerPool | None = None) -> None:
        self.cfg = cfg
        self.workers = workers
        self.receiver = receiver
        self.broker = broker
        self.name = name
        self.batch_max = receiver.batch_max
        # Events per pulled message, smoothed: a pull asks for about `batch_max` events' worth of messages. Starting
        # from the largest batch message allowed, the first pull cannot hand one puller many commits' worth.
        self._per_message = float(receiver.ingest.limits.max_batch_events)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bridge-nats", daemon=True)
        self._nc: NatsClient | None = None
        self._sub: Any = None  # nats-py's JetStreamContext.PullSubscription
        # Acknowledgement subjects of the messages in the last batch handed on, not yet acknowledged.
        self._unsettled: list[str] = []
        self.ready = threading.Event()
        self._closing = False
        self.stats = {"pulled": 0, "acked": 0, "naked": 0, "redelivered": 0, "disconnects": 0, "reconnects": 0,
                      "receipts_lost": 0}

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect, make sure the stream and the durable consumer exist; a `ConfigError` saying why not."""
        self._thread.start()
        try:
            self._call(self._connect(), timeout)
        except ConfigError:
            self.stop()
            raise
        except (NatsError, OSError) as exc:
            self.stop()
            raise ConfigError(f"bridge.nats: cannot set up the events' stream {self.cfg.stream!r} and consumer "
                              f"{self.cfg.consumer!r} on {', '.join(self.cfg.servers)}: {_why(exc)}. Is the cluster "
                              "up with JetStream, and does the bridge's login allow the JetStream API "
                              "(docs/nats.md)?") from None
        self.ready.set()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._closing = True
            if self._nc is not None:
                try:
                    self._call(self._nc.close(), 5.0)
                except Exception:  # stopping anyway: unacknowledged messages are delivered again
                    log.debug("closing the NATS connection failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def _call(self, coro: Awaitable[T], timeout: float = CALL_TIMEOUT_S) -> T:
        async def run() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    async def _connect(self) -> None:
        tls: ssl.SSLContext | None = None
        if self.cfg.tls_ca is not None:
            tls = ssl.create_default_context(cafile=str(self.cfg.tls_ca))
        self._nc = await nats.connect(
            servers=list(self.cfg.servers), user=self.broker.username, password=self.broker.password,
            name=self.name, tls=tls, connect_timeout=CONNECT_TIMEOUT_S, reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=-1, allow_reconnect=True,
            disconnected_cb=self._disconnected, reconnected_cb=self._reconnected, error_cb=self._error)
        js = self._nc.jetstream()
        try:
            info = await js.stream_info(self.cfg.stream)
            if not set(EVENTS_SUBJECTS) <= set(info.config.subjects or ()):
                raise ConfigError(f"bridge.nats.stream {self.cfg.stream!r} exists but does not capture "
                                  f"{', '.join(EVENTS_SUBJECTS)} (it has {info.config.subjects}): name another "
                                  "stream, or add the subjects to it")
        except NotFoundError:
            await js.add_stream(StreamConfig(
                name=self.cfg.stream, subjects=list(EVENTS_SUBJECTS), retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE, num_replicas=self.cfg.replicas,
                description="carechain device events, removed once the bridge acknowledges them (committed)"))
            log.info("created the JetStream stream %s on %s with %d replicas", self.cfg.stream,
                     ", ".join(EVENTS_SUBJECTS), self.cfg.replicas)
        consumer = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.cfg.ack_wait_s,
                                  max_ack_pending=self.cfg.max_ack_pending, max_deliver=-1)
        if self.workers is not None:  # they pull; this source only acknowledges
            try:
                await js.consumer_info(self.cfg.stream, self.cfg.consumer)
            except NotFoundError:
                consumer.durable_name = self.cfg.consumer
                await js.add_consumer(self.cfg.stream, config=consumer)
            return
        self._sub = await js.pull_subscribe(EVENTS_SUBJECTS[0], durable=self.cfg.consumer, stream=self.cfg.stream,
                                            config=consumer)

    async def _disconnected(self) -> None:
        if self._closing:
            return
        self.stats["disconnects"] += 1
        log.warning("lost NATS server; reconnecting to another of %s", ", ".join(self.cfg.servers))

    async def _reconnected(self) -> None:
        self.stats["reconnects"] += 1
        nc = self._nc
        log.warning("reconnected to NATS server %s", nc.connected_url.netloc if nc and nc.connected_url else "?")

    async def _error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    # -- the sequencer's side ------------------------------------------------------------------------

    def receive(self, timeout: float) -> list[Verdict]:
        """Up to `batch_max` events pulled within `timeout`, checked. Messages of a batch that was never
        settled (its commit failed) are handed back to JetStream first, for redelivery."""
        if self._unsettled:
            self._settle(self._unsettled, ack=False)
        if self.workers is not None:
            verdicts = self.workers.receive(timeout)
            self._unsettled = self.workers.take_acks()
            if not verdicts and self._unsettled:  # messages that held no event: nothing to commit
                self.settle()
            return verdicts
        try:
            msgs = self._call(self._fetch(timeout), timeout + CALL_TIMEOUT_S)
        except (NatsError, OSError) as exc:
            log.debug("pull failed (%r); trying again", exc)
            return []
        if not msgs:
            return []
        self._unsettled = [m.reply for m in msgs]
        self._learn(msgs)
        self.stats["pulled"] += len(msgs)
        self.stats["redelivered"] += sum(1 for m in msgs if m.metadata.num_delivered > 1)
        return self.receiver.check([(topic_of_subject(m.subject), m.data) for m in msgs])

    async def _fetch(self, timeout: float) -> list[Msg]:
        try:
            msgs: list[Msg] = await self._sub.fetch(self.fetch_count(), timeout=max(timeout, 0.05))
            return msgs
        except NatsTimeout:
            return []

    def fetch_count(self) -> int:
        """Messages to pull at once: about `batch_max` events. Pulling `batch_max` messages of 64 events handed
        one worker 64 commits' worth while the others waited (bench/ingest.py: workers at 7 % and 62 % CPU, a
        multi-second p99)."""
        return max(1, min(self.batch_max, round(self.batch_max / self._per_message)))

    def _learn(self, msgs: Sequence[Msg]) -> None:
        """Fold the events per message of a pull into the running estimate `fetch_count` divides by."""
        most = self.receiver.ingest.limits.max_batch_events  # what a batch message may hold, whatever it declares
        per_message = sum(min(events_in(m.data), most) for m in msgs) / len(msgs)
        self._per_message = max(1.0, 0.7 * self._per_message + 0.3 * per_message)

    def hand_over(self) -> tuple[str, ...]:
        """The acknowledgement subjects of the last batch, which another process acknowledges after commit (an
        ingest worker's source hands them to the sequencer); this source forgets them."""
        acks, self._unsettled = tuple(self._unsettled), []
        return acks

    def settle(self) -> None:
        """The last batch is committed and receipted: acknowledge every message in it."""
        if self._unsettled:
            self._settle(self._unsettled, ack=True)

    def _settle(self, acks: list[str], *, ack: bool) -> None:
        self._unsettled = []
        try:
            self._call(self._acknowledge(acks, ack))
        except (NatsError, OSError) as exc:
            # JetStream delivers them again after ack_wait; the ledger deduplicates.
            log.warning("could not %s %d event(s) (%r): they come again after %.0f s and are deduplicated",
                        "acknowledge" if ack else "hand back", len(acks), exc, self.cfg.ack_wait_s)
            return
        self.stats["acked" if ack else "naked"] += len(acks)

    async def _acknowledge(self, acks: Sequence[str], ack: bool) -> None:
        """Acknowledge (or hand back) by publishing to each message's reply subject, as `Msg.ack` does: the
        subjects may come from messages another connection pulled (an ingest worker's)."""
        assert self._nc is not None
        answer = Msg.Ack.Ack if ack else Msg.Ack.Nak
        for subject in acks:
            await self._nc.publish(subject, answer)
        await self._nc.flush(timeout=FLUSH_TIMEOUT_S)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish to an MQTT topic through the cluster (a device's receipt: devices subscribed over MQTT get it).

        Queued on the NATS thread without waiting; `settle` flushes before it acknowledges, so a batch's
        receipts leave before its events are acknowledged. Best effort, like any receipt: one that is lost
        is sent again when its device resends the event."""
        future = asyncio.run_coroutine_threadsafe(self._publish(mqtt_subject(topic), payload), self._loop)
        future.add_done_callback(self._published)

    async def _publish(self, subject: str, payload: bytes) -> None:
        assert self._nc is not None
        await self._nc.publish(subject, payload)

    def _published(self, future: Any) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.stats["receipts_lost"] += 1
            log.warning("could not publish a receipt (%r); its device resends and is answered then",
                        future.exception())

__all__ = ["NatsSource", "topic_of_subject"]

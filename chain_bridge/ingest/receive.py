"""The `receive` stage: MQTT messages in, batches of verdicts out — one loop for both ways of running.

paho's network thread puts each message in an `Inbox`; a `Receiver` drains it in batches, refreshes its
view of the device registry when a registration or revocation was committed, and runs the `check` stage
on each event (a batch message, carechain.batch, is unpacked first: each of its events is checked alone).
The bridge runs one `Receiver` in process; with `ingest_workers`, each worker process runs the same
`Receiver` (chain_bridge.workers) and the bridge drains the workers' verdicts instead.
Either way the sequencer gets `list[Verdict]` from a `VerdictSource`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from carechain import topics
from carechain.batch import BatchError, decode_batch, events_in
from carechain.config import BrokerConfig, Limits
from carechain.errors import Reason
from carechain.receipts import event_digest
from chain_bridge.ingest.check import Ingest
from chain_bridge.ingest.verdicts import RawMessage, Rejection, Verdict
from chain_bridge.ledger.store import DeviceRecord, Ledger

log = logging.getLogger("carechain.bridge.inbox")
DEFAULT_INBOX_MESSAGES = Limits.model_fields["inbox_max_messages"].default
# The largest batch message taken: the broker's packet limit (`broker.max_packet_bytes`) unless told otherwise.
DEFAULT_MESSAGE_BYTES = BrokerConfig.model_fields["max_packet_bytes"].default


class VerdictSource(Protocol):
    """Where the sequencer takes its next batch of verdicts from (the in-process receiver, or the workers)."""

    def receive(self, timeout: float) -> list[Verdict]: ...


class Inbox:
    """Messages handed over by paho's network thread, drained in batches by the receive loop.

    Bounded, with back-pressure rather than loss: when it holds `max_messages`, `put` waits for room. paho
    calls `on_message` on its network thread and acknowledges a QoS 1 message only after it returns, so
    while the inbox is full the broker keeps the rest queued (for a persistent session) and the bridge's
    memory stays bounded, however fast junk arrives. Publishing is not held up: paho's `publish`, which the
    sequencer thread calls for receipts and checkpoints, only queues the packet. A wait ends when there
    is room, when the inbox is closed, or — given the link's state (`on_message` passes it) — when the link
    goes down: the message is then not acknowledged and the broker delivers it again. Without the link's
    state, it ends when the thread that drains the inbox has ended (a bridge stopping; the message may
    then be acknowledged unprocessed: never receipted, so its agent resends it). Stopping never hangs on
    a full inbox.
    """

    def __init__(self, max_messages: int = DEFAULT_INBOX_MESSAGES) -> None:
        self.max_messages = max_messages
        self._queue: queue.Queue[RawMessage] = queue.Queue(maxsize=max_messages)
        self._closed = threading.Event()
        self._consumer: threading.Thread | None = None
        self.stats: Counter[str] = Counter()  # "waited": puts that found it full; "abandoned": gave up waiting

    def put(self, topic: str, payload: bytes, link_up: Callable[[], bool] | None = None) -> bool:
        """Hand over one message, waiting while the inbox is full; False if the wait was abandoned (see above)."""
        msg = RawMessage(topic, payload)
        try:
            self._queue.put_nowait(msg)
            return True
        except queue.Full:
            pass
        self.stats["waited"] += 1
        if self.stats["waited"] & (self.stats["waited"] - 1) == 0:  # 1st, 2nd, 4th, 8th, ...
            log.warning("the inbox is full (%d messages): holding the broker's deliveries until the bridge "
                        "catches up (%d times so far)", self.max_messages, self.stats["waited"])
        while not self._closed.is_set():
            if link_up is not None:
                if not link_up():
                    break
            elif (consumer := self._consumer) is not None and not consumer.is_alive():
                break
            try:
                self._queue.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        self.stats["abandoned"] += 1
        return False

    def on_message(self, client: Any, _userdata: object, msg: Any) -> None:  # paho's on_message signature
        self.put(msg.topic, msg.payload, client.is_connected)

    def close(self) -> None:
        """End every wait for room (the bridge is stopping); messages still waiting are not acknowledged."""
        self._closed.set()

    def qsize(self) -> int:
        return self._queue.qsize()

    def drain(self, timeout: float, batch_max: int, linger_s: float = 0.0) -> list[RawMessage]:
        """Messages holding up to `batch_max` events (a batch message counts as its events, so one commit
        stays bounded): wait up to `timeout` for the first, then up to `linger_s` for more."""
        self._consumer = threading.current_thread()
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        events = events_in(first.payload)
        deadline = time.monotonic() + linger_s
        while events < batch_max:
            try:
                batch.append(self._queue.get_nowait())
                events += events_in(batch[-1].payload)
            except queue.Empty:
                if linger_s <= 0 or time.monotonic() >= deadline:
                    break
                time.sleep(0.001)
        return batch


@dataclass
class RegistryView:
    """The registered devices as the `check` stage sees them, reloaded when the ledger's registry changes."""

    ledger: Ledger
    _devices: dict[str, DeviceRecord] = field(default_factory=dict)
    _version: int = -1

    def refresh(self) -> None:
        """Reload if `carechain register` or a revocation (possibly another process) changed the registry."""
        version = self.ledger.registry_version()
        if version != self._version:
            self._devices, self._version = self.ledger.devices(), version

    def lookup(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)


def check_batch(ingest: Ingest, batch: Sequence[tuple[str, bytes]], now_ms: int,
                max_message_bytes: int = DEFAULT_MESSAGE_BYTES) -> list[Verdict]:
    """The `check` stage over a batch of messages: a verdict per event, in order. A batch message
    (carechain.batch) is unpacked and each of its events checked as if it had come alone; a malformed one
    is one `bad_batch` rejection, a message on a non-event topic one `bad_topic` rejection."""
    verdicts: list[Verdict] = []
    for topic, payload in batch:
        device = topics.device_of_event_topic(topic)
        if device is None:
            verdicts.append(Rejection(None, None, Reason.BAD_TOPIC, f"{topic[:100]!r} is not a device event topic"))
            continue
        try:
            events = decode_batch(payload, ingest.limits.max_batch_events, max_message_bytes)
        except BatchError as exc:
            verdicts.append(Rejection(device, None, Reason.BAD_BATCH, exc.detail, event_digest(payload)))
            continue
        if events is None:
            verdicts.append(ingest.check(device, payload, now_ms))
        else:
            verdicts += [ingest.check(device, event, now_ms) for event in events]
    return verdicts


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Receiver:
    """receive → check: drains an `Inbox` in batches and checks them against a fresh registry view.

    `check` turns messages into verdicts, one per event (batch messages unpacked), in message order: a
    caller that must acknowledge each message only once its events are committed (JetStream) commits the
    whole list of verdicts of the messages it passed, then acknowledges those messages."""

    def __init__(self, ledger: Ledger, limits: Limits, batch_max: int, linger_s: float = 0.0,
                 clock_ms: Callable[[], int] = wall_clock_ms, max_message_bytes: int = DEFAULT_MESSAGE_BYTES) -> None:
        self.inbox = Inbox(limits.inbox_max_messages)
        self.registry = RegistryView(ledger)
        self.registry.refresh()
        self.ingest = Ingest(limits, self.registry.lookup)
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.max_message_bytes = max_message_bytes
        self._clock_ms = clock_ms

    def check(self, batch: Sequence[tuple[str, bytes]]) -> list[Verdict]:
        self.registry.refresh()
        return check_batch(self.ingest, batch, self._clock_ms(), self.max_message_bytes)

    def receive(self, timeout: float) -> list[Verdict]:
        batch = self.inbox.drain(timeout, self.batch_max, self.linger_s)
        return self.check(batch) if batch else []

"""The `receive` stage: MQTT messages in, batches of verdicts out — one loop for both ways of running.

paho's network thread puts each message in an `Inbox`; a `Receiver` drains it in batches, refreshes its
view of the device registry when a registration or revocation was committed, and runs the `check` stage
on each message. The bridge runs one `Receiver` in process; with `ingest_workers`, each worker process
runs the same `Receiver` (chain_bridge.workers) and the bridge drains the workers' verdicts instead.
Either way the sequencer gets `list[Verdict]` from a `VerdictSource`.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from carechain import topics
from carechain.config import Limits
from carechain.errors import Reason
from chain_bridge.ingest.check import Ingest
from chain_bridge.ingest.verdicts import RawMessage, Rejection, Verdict
from chain_bridge.ledger.store import DeviceRecord, Ledger


class VerdictSource(Protocol):
    """Where the sequencer takes its next batch of verdicts from (the in-process receiver, or the workers)."""

    def receive(self, timeout: float) -> list[Verdict]: ...


class Inbox:
    """Messages handed over by paho's network thread, drained in batches by the receive loop."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[RawMessage] = queue.SimpleQueue()

    def put(self, topic: str, payload: bytes) -> None:
        self._queue.put(RawMessage(topic, payload))

    def on_message(self, _client: Any, _userdata: object, msg: Any) -> None:  # paho's on_message signature
        self._queue.put(RawMessage(msg.topic, msg.payload))

    def drain(self, timeout: float, batch_max: int, linger_s: float = 0.0) -> list[RawMessage]:
        """Up to `batch_max` messages: wait up to `timeout` for the first, then up to `linger_s` for more."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + linger_s
        while len(batch) < batch_max:
            try:
                batch.append(self._queue.get_nowait())
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


def check_batch(ingest: Ingest, batch: Sequence[tuple[str, bytes]], now_ms: int) -> list[Verdict]:
    """The `check` stage over a batch: a verdict per message, a `bad_topic` one for a non-event topic."""
    verdicts: list[Verdict] = []
    for topic, payload in batch:
        device = topics.device_of_event_topic(topic)
        verdicts.append(ingest.check(device, payload, now_ms) if device is not None else
                        Rejection(None, None, Reason.BAD_TOPIC, f"{topic[:100]!r} is not a device event topic"))
    return verdicts


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Receiver:
    """receive → check: drains an `Inbox` in batches and checks them against a fresh registry view."""

    def __init__(self, ledger: Ledger, limits: Limits, batch_max: int, linger_s: float = 0.0,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.inbox = Inbox()
        self.registry = RegistryView(ledger)
        self.registry.refresh()
        self.ingest = Ingest(limits, self.registry.lookup)
        self.batch_max = batch_max
        self.linger_s = linger_s
        self._clock_ms = clock_ms

    def check(self, batch: Sequence[tuple[str, bytes]]) -> list[Verdict]:
        self.registry.refresh()
        return check_batch(self.ingest, batch, self._clock_ms())

    def receive(self, timeout: float) -> list[Verdict]:
        batch = self.inbox.drain(timeout, self.batch_max, self.linger_s)
        return self.check(batch) if batch else []

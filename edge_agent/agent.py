"""The edge agent: sources → sign → outbox (durable) → MQTT uplink → receipt → delete.

asyncio shell. Each device is its own MQTT principal: one client per device (client id
`cc-agent-<instance>-<device_id>`, unique per agent data directory; the device's own login when one is
provisioned, never another party's), publishing only that device's events and subscribed only to its
receipts, so a broker ACL can confine every device to its own topics (docs/broker-security.md). paho's
network threads hand receipts and connection changes to the event loop with `call_soon_threadsafe`; all
outbox and window state is touched only on the loop.

Under pressure: a full disk never stops the agent — the readings it cannot store are counted as lost
(`losses`, policy `disk_full`), writing is retried with backoff, and signing resumes when space returns.
An `ok` receipt deletes an event only when it names our bytes' digest (a mismatch is quarantined and
raises the alarm); a `seq_reused` refusal naming the highest anchored seq moves the counter past it and
re-signs the refused reading, so a lost or restored outbox costs no readings.

Protocol 2 (`protocol=2`): each health reading is sealed under its (device, epoch) data key before it is
signed (`edge_agent.sealing`); the epoch_key event that anchors the key's capsule goes into the outbox in
the same transaction as, and before, the first reading sealed under it. A device with a wellness policy
discloses one signed weekly_activity summary per completed ISO week instead of its raw activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from carechain import envelope, topics
from carechain.config import AgentConfig, BrokerConfig
from carechain.credentials import MqttCredentials
from carechain.datadir import instance_id
from carechain.errors import Reason, contract_reason
from carechain.events import SEALED_KINDS, EventBody, make_payload
from carechain.identity import Identity
from carechain.mqtt_loop import NetworkLoop
from carechain.receipts import Receipt, ReceiptError, open_receipt
from carechain.sealed import DEFAULT_EPOCH_MS, epoch_of
from carechain.transport import connect_client
from edge_agent.outbox import Batch, DataKey, DiskFull, Outbox, OutboxFull, Pending
from edge_agent.sealing import (
    RecordOwner,
    iso_week,
    new_epoch_key,
    reading_body,
    reseal,
    sign_clear,
    sign_epoch_key,
    sign_sealed,
    weekly_activity_body,
)
from edge_agent.source import Source
from edge_agent.status_report import StatusReporter
from edge_agent.uplink import Uplink
from edge_agent.window import SendWindow

log = logging.getLogger("carechain.agent")


@dataclass
class AgentDevice:
    """A device the agent runs: its identity and where its readings come from. (Its config entry is
    `carechain.config.AgentDeviceConfig`.)"""

    identity: Identity
    source: Source | None  # None: events are recorded by the caller via Agent.record
    owner: RecordOwner | None = None  # protocol 2: whose records its health readings are (required for those)
    wellness_policy: str | None = None  # protocol 2: disclose weekly active minutes to this policy
    battery: Callable[[], int | None] | None = None  # the level its source last read, for its status reports


@dataclass
class AgentStats:
    signed: int = 0
    sent: int = 0  # events published (each resend counts again)
    resent: int = 0  # events due again after resend_after_s without a receipt (sent again once their link is up)
    messages: int = 0  # MQTT messages they went in (fewer than `sent` when events share batch messages)
    acked: int = 0
    quarantined: int = 0
    rejected_retryable: int = 0
    bad_receipts: int = 0
    refused_quota: int = 0
    refused_disk: int = 0  # readings not signed because the outbox's disk was full (also in `losses`)
    storage_errors: int = 0  # outbox writes the disk refused (signing, acks, quarantine, re-signing)
    receipt_mismatches: int = 0  # `ok` receipts naming other bytes than ours: an alarm (cloned key/image)
    unbound_acks: int = 0  # `ok` entries without a digest (an older bridge): deleted by seq alone
    resigned: int = 0  # readings re-signed past the highest anchored seq after a `seq_reused` refusal
    epoch_keys: int = 0  # protocol 2: data keys made (one epoch_key event each)
    keys_forgotten: int = 0  # protocol 2: data keys deleted once their epoch was over and its events receipted
    sealed_late: int = 0  # protocol 2: late readings of a spent epoch, sealed under the current epoch's key
    rekeyed: int = 0  # protocol 2: an epoch_key refused because its epoch's key is anchored (lost outbox)
    weekly_summaries: int = 0  # protocol 2: weekly_activity summaries signed
    final: int = 0  # receipted events a final checkpoint has covered since the agent started
    reasons: dict[str, int] = field(default_factory=dict)


# Backoff between attempts to write to a full disk (first, at most): short, because every reading that
# arrives meanwhile is lost (and counted), and an attempt costs one statvfs and one refused transaction.
DISK_RETRY_S = (0.5, 5.0)
EPOCH_KEY_EXISTS = contract_reason("epoch_key_exists")  # the contracts' word for a second key of one epoch
KEY_SWEEP_S = 1.0  # at most this often, look for data keys of spent epochs to delete (one indexed query)
_BATCH_DEFAULTS = AgentConfig()  # batch_max_events, batch_max_bytes, batch_linger_ms: one set of defaults
SEND_TICK_S = 0.25  # the send loop looks for due events at least this often
# A batch message refused whole: `bad_batch`, or `not_cose_sign1` from a bridge older than batching.
_BATCH_REFUSALS = frozenset({Reason.BAD_BATCH, Reason.NOT_COSE_SIGN1})


class Agent:
    """Runs the devices of one host. `credentials` maps a device id to that device's own MQTT login; a
    device without one connects without a login, and only when `broker` carries none either: the agent
    never logs a device in with another party's login (in a shared config file, `broker`'s is the
    bridge's). `client_id` is the prefix of the per-device client ids (`<prefix>-<device_id>`); default
    `cc-agent-<instance>`, with the instance id of the outbox's directory (`carechain.datadir`)."""

    def __init__(self, devices: Sequence[AgentDevice], outbox: Outbox, broker: BrokerConfig,
                 bridge_public_key: bytes, *, window: int = 2000, resend_after_s: float = 10.0,
                 speedup: float = 1.0, client_id: str | None = None,
                 credentials: Mapping[str, MqttCredentials] | None = None, protocol: int = 1,
                 epoch_ms: int = DEFAULT_EPOCH_MS, batch_max_events: int = _BATCH_DEFAULTS.batch_max_events,
                 batch_max_bytes: int = _BATCH_DEFAULTS.batch_max_bytes,
                 batch_linger_ms: int = _BATCH_DEFAULTS.batch_linger_ms,
                 status_interval_s: float = _BATCH_DEFAULTS.status_interval_s) -> None:
        if protocol not in (1, 2):
            raise ValueError(f"protocol {protocol} is not one this agent speaks (1 or 2)")
        self.devices = {d.identity.device_id: d for d in devices}
        if protocol == 1:
            wellness = sorted(d for d, dev in self.devices.items() if dev.wellness_policy is not None)
            if wellness:
                raise ValueError(f"device(s) {', '.join(wellness)} have a wellness policy, which needs protocol 2")
        unknown = sorted(set(credentials or {}) - set(self.devices))
        if unknown:
            raise ValueError(f"MQTT credentials given for device(s) this agent does not run: {', '.join(unknown)}")
        if broker is not None and broker.has_login:
            without = sorted(set(self.devices) - set(credentials or {}))
            if without:
                raise ValueError(f"device(s) {', '.join(without)} have no MQTT login of their own, and the agent "
                                 f"never logs a device in with the broker settings' login (user "
                                 f"{broker.username!r}, another party's): give each its own (credentials)")
        self.outbox = outbox
        self.broker = broker
        self.bridge_public_key = bridge_public_key
        self.window = SendWindow(window, int(resend_after_s * 1000))
        self.uplink = Uplink(batch_max_events, batch_max_bytes, batch_linger_ms)
        self.speedup = speedup
        self.client_id = client_id or f"cc-agent-{instance_id(outbox.path.parent)}"
        self.credentials = dict(credentials or {})
        self.stats = AgentStats()
        self._wake = asyncio.Event()
        self._producing = True
        self._connected: set[str] = set()  # devices whose MQTT client is connected now
        self._clients: dict[str, mqtt.Client] = {}
        self._disk_backoff_s = 0.0  # 0: the outbox's disk took the last write
        self._disk_retry_at = 0.0  # monotonic time of the next write attempt while the disk is full
        self.protocol = protocol
        self.epoch_ms = epoch_ms
        self._keys: dict[tuple[str, int], DataKey] = {}  # protocol 2: data keys in use, as stored
        self._key_sweep_at = 0.0  # monotonic time of the next search for spent keys
        # Each device's signed status (outbox depth, battery) for the bridge's console: QoS 0, never queued.
        self.status = StatusReporter({d: dev.identity for d, dev in self.devices.items()},
                                     self.outbox.depth_by_device,
                                     self._battery_of, interval_s=status_interval_s)
        self.last_receipt_ms: dict[str, int] = {}  # device -> wall-clock ms of its latest valid receipt (metrics)

    def device_client_id(self, device_id: str) -> str:
        return f"{self.client_id}-{device_id}"

    def device_broker(self, device_id: str) -> BrokerConfig:
        """The broker settings of one device's client: the shared ones with the device's own login, or with
        no login at all — never with the shared settings' own."""
        login = self.credentials.get(device_id)
        username, password = (login.username, login.password) if login is not None else (None, None)
        return self.broker.model_copy(update={"username": username, "password": password,
                                              "credentials_file": None})

    def summary(self) -> dict[str, Any]:
        """The counts `carechain agent` prints when it stops: the stats, what is left in the outbox, and
        the readings lost to the outbox quota."""
        return {**asdict(self.stats), "outbox_left": self.outbox.depth(), "quota_losses": self.outbox.losses()}

    # -- producing ---------------------------------------------------------------------------------

    def record(self, device_id: str, readings: Sequence[tuple[str, EventBody | dict[str, Any]]],
               now_ms: int | None = None) -> list[int]:
        """Sign readings for one device and store them durably before anything is sent. A reading is a
        `Reading` (kind, `EventBody` model) or a kind with a plain dict body, validated against the kind's
        model; any other model is a `TypeError` (a bug in the source)."""
        device = self.devices[device_id]
        ts = int(time.time() * 1000) if now_ms is None else now_ms

        def signer(kind: str, body: EventBody | dict[str, Any]) -> Callable[[int], bytes]:
            # make_payload checks the body model matches the kind (a PayloadError otherwise).
            return lambda seq: envelope.sign(device.identity, make_payload(device_id, seq, ts, kind, body))

        if self._disk_backoff_s and time.monotonic() < self._disk_retry_at:
            self.stats.refused_disk += len(readings)  # not even tried: counted, written to `losses` later
            self.outbox.count_disk_loss(device_id, len(readings))
            return []
        if self.protocol == 1:
            batch = Batch()
            for kind, body in readings:
                batch.add(signer(kind, body))
        else:
            batch = self._sealed_batch(device, readings, ts)
        try:
            seqs = self.outbox.add_batch(device_id, batch)
        except DiskFull as exc:
            self.stats.refused_disk += len(readings)  # counted by the outbox (persisted as soon as it can)
            self.stats.storage_errors += 1
            self._disk_backoff_s = min(DISK_RETRY_S[1], max(DISK_RETRY_S[0], 2 * self._disk_backoff_s))
            self._disk_retry_at = time.monotonic() + self._disk_backoff_s
            log.error("%s; next attempt in %.1f s", exc, self._disk_backoff_s)
            return []
        except OutboxFull:
            self.stats.refused_quota += len(readings)  # counted and logged by the outbox, persisted too
            return []
        if self._disk_backoff_s:
            self._disk_backoff_s = 0.0
            log.warning("outbox disk has room again: signing resumed (%d reading(s) lost to a full disk so far, "
                        "in `losses`)", self.stats.refused_disk)
        self.stats.signed += len(seqs)
        if self.protocol == 2:
            for key in batch.new_keys:
                self._keys[(device_id, key.epoch)] = key
            self.stats.epoch_keys += len(batch.new_keys)
            self.stats.weekly_summaries += len(batch.disclosed_weeks)
            if batch.new_keys:  # a new epoch began: the previous one's key may be spent
                self.forget_spent_keys(ts, force=True)
        self._wake.set()
        return seqs

    def _sealed_batch(self, device: AgentDevice, readings: Sequence[tuple[str, EventBody | dict[str, Any]]],
                      ts: int) -> Batch:
        """Protocol 2: the events to store for these readings — summaries of completed weeks first, then
        per reading its epoch's epoch_key event when the key is new, and the sealed reading (clear kinds,
        purchases, are signed in clear)."""
        identity, dev = device.identity, device.identity.device_id
        batch = Batch()
        week = iso_week(ts)
        if device.wellness_policy is not None:
            for done, minutes in self.outbox.undisclosed_weeks(dev, week):
                batch.add(sign_clear(identity, ts, "weekly_activity",
                                     weekly_activity_body(done, minutes, device.wellness_policy)))
                batch.disclosed_weeks.append(done)
        for kind, body in readings:
            if kind not in SEALED_KINDS:
                batch.add(sign_clear(identity, ts, kind, body))
                continue
            plain = reading_body(kind, body)  # validated now: a bad body fails before any seq is reserved
            key = self._epoch_key(device, ts, batch)
            batch.add(sign_sealed(identity, key, ts, kind, plain), key.epoch)
            if kind == "activity" and device.wellness_policy is not None:
                batch.activity_minutes[week] = batch.activity_minutes.get(week, 0) + int(plain["active_minutes"])
        return batch

    def _epoch_key(self, device: AgentDevice, ts: int, batch: Batch) -> DataKey:
        """The data key of the device's epoch at `ts`: the one in use (kept across restarts in the outbox),
        or a new one announced by an epoch_key event ahead of the reading in the same batch."""
        dev = device.identity.device_id
        epoch = epoch_of(ts, self.epoch_ms)
        if (dev, epoch) not in self._keys and self.outbox.epoch_spent(dev, epoch):
            # A late reading (synced from the device's memory) of an epoch whose key is already deleted, or an
            # epoch another key of which is anchored (a lost outbox): a second epoch_key would be refused, so the
            # reading is sealed under the first key epoch from now on that is not spent (the AAD binds it).
            epoch = epoch_of(int(time.time() * 1000), self.epoch_ms)
            while (dev, epoch) not in self._keys and self.outbox.epoch_spent(dev, epoch):
                epoch += 1
            self.stats.sealed_late += 1
        key = self._keys.get((dev, epoch))
        if key is None and (key := self.outbox.data_key(dev, epoch)) is not None:
            self._keys[(dev, epoch)] = key  # stored by an earlier run: reused, not announced again
        if key is None:
            key = next((k for k in batch.new_keys if k.epoch == epoch), None)
        if key is None:
            if device.owner is None:
                raise ValueError(f"device {dev} has no record owner (owner, owner_pre_key): protocol 2 cannot "
                                 "seal its health readings to anyone")
            key = new_epoch_key(dev, epoch, self.epoch_ms)  # cached once stored (record)
            batch.new_keys.append(key)
            batch.add(sign_epoch_key(device.identity, key, device.owner, ts), epoch)
        return key

    def forget_spent_keys(self, now_ms: int | None = None, *, force: bool = False) -> None:
        """Delete the data keys of epochs that are over and whose events all left the outbox (at most once
        per KEY_SWEEP_S unless `force`): a stolen device no longer holds the keys of its past readings."""
        if self.protocol != 2 or (not force and time.monotonic() < self._key_sweep_at):
            return
        self._key_sweep_at = time.monotonic() + KEY_SWEEP_S
        try:
            gone = self.outbox.forget_spent_keys(int(time.time() * 1000) if now_ms is None else now_ms)
        except sqlite3.OperationalError as exc:  # tried again at the next sweep
            self.stats.storage_errors += 1
            log.error("could not delete spent data keys from the outbox (%s); tried again later", exc)
            return
        for dev_epoch in gone:
            self._keys.pop(dev_epoch, None)
        if gone:
            self.stats.keys_forgotten += len(gone)
            log.info("deleted the data keys of %d spent epoch(s): %s", len(gone),
                     ", ".join(f"{d} epoch {e}" for d, e in gone[:10]))

    def stop_producing(self) -> None:
        """Stop sampling sources; sending and receipts go on so the outbox can drain."""
        self._producing = False

    async def _produce(self, device_id: str, source: Source, stop: asyncio.Event) -> None:
        # With speedup > 1 the source runs on a faster virtual clock (a day of readings in minutes);
        # events are still stamped with real time, which is what the bridge's skew check sees.
        t0 = int(time.time() * 1000)

        def virtual(real_ms: int) -> int:
            return t0 + int((real_ms - t0) * self.speedup)

        while not stop.is_set() and self._producing:
            now_ms = int(time.time() * 1000)
            readings = source.next_readings(virtual(now_ms))
            if readings:
                self.record(device_id, readings, now_ms)
            due = source.next_due_ms()
            wait_s = 1.0 if due is None else max(0.0, (t0 + (due - t0) / self.speedup) / 1000 - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(wait_s, 1.0))

    # -- sending -----------------------------------------------------------------------------------

    async def _send(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self._connected:
                now_ms = int(time.time() * 1000)
                self.stats.resent += self.window.expire(now_ms)  # counted here; `due` would expire them silently
                # Rows of a device whose client is down are parked, not sent; the others keep flowing.
                due = self.window.due(self.outbox.pending_after, now_ms, eligible=self._connected.__contains__)
                for device_id, rows in self.uplink.messages(due, now_ms):
                    self._publish(device_id, rows)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.uplink.wait_s(int(time.time() * 1000),
                                                                                     SEND_TICK_S))

    def _publish(self, device_id: str, rows: Sequence[Pending]) -> None:
        """One MQTT message for `rows` (one device's): the event alone, or a batch message. The window counts
        events and is far below 65,535, so the messages paho holds unacknowledged stay below its packet ids."""
        info = self._clients[device_id].publish(topics.events(device_id), Uplink.payload(rows), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            for row in rows:
                self.window.unsent(row)  # due again at once (a disconnected device's: when back)
            return
        self.stats.sent += len(rows)
        self.stats.messages += 1

    # -- receipts ----------------------------------------------------------------------------------

    def _on_receipt(self, client_device: str, topic: str, payload: bytes) -> None:
        device_id = topics.device_of_receipt_topic(topic)
        if device_id != client_device or device_id not in self.devices:
            return  # each device's client hears only its own receipts
        try:
            receipt = open_receipt(payload, self.bridge_public_key, device_id)
        except ReceiptError as exc:
            self.stats.bad_receipts += 1
            log.warning("ignored receipt on %s: %s", topic, exc)
            return
        self.last_receipt_ms[device_id] = int(time.time() * 1000)
        try:
            self._apply_receipt(device_id, receipt)
        except sqlite3.OperationalError as exc:  # e.g. a full disk: the events stay, are resent and re-acked
            self.stats.storage_errors += 1
            log.error("could not apply a receipt for %s to the outbox (%s): free space on %s; the events "
                      "stay queued and are resent", device_id, exc, self.outbox.path.parent)
        self._wake.set()

    def _apply_receipt(self, device_id: str, receipt: Receipt) -> None:
        anchored = dict(receipt.ok)  # seq -> leaf index of what this receipt acknowledges as ours
        if receipt.ok and receipt.bound:
            deleted, mismatched = self.outbox.ack_bound(
                device_id, [(seq, digest) for seq, _, digest in receipt.acknowledged() if digest is not None])
            anchored = {seq: anchored[seq] for seq in deleted}
            self.stats.acked += len(deleted)
            if mismatched:
                self.stats.receipt_mismatches += len(mismatched)
                self.stats.quarantined += len(mismatched)
                log.error("ALARM: the bridge anchored OTHER bytes under %s seq %s than this agent signed: another "
                          "holder of this device's key or disk image is publishing as it. Ours are kept in "
                          "quarantine (receipt_mismatch); revoke and re-key the device", device_id,
                          ", ".join(map(str, mismatched[:10])))
        elif receipt.ok:  # an older bridge: its receipts do not name the bytes
            self.stats.unbound_acks += len(receipt.ok)
            self.stats.acked += self.outbox.ack(device_id, [seq for seq, _ in receipt.ok])
        for seq, _ in receipt.ok:
            self.window.settled((device_id, seq))
        if receipt.final_size is not None:  # a bridge that tracks finality: keep the leaves until final
            self.stats.final += self.outbox.record_anchored(device_id, anchored.items(), receipt.final_size)
        if receipt.ok:
            self.forget_spent_keys()
        if receipt.highest_seq is not None and any(r.reason == Reason.SEQ_REUSED for r in receipt.rejected):
            before = self.outbox.next_seq(device_id)
            nxt = self.outbox.advance(device_id, receipt.highest_seq)
            if nxt != before:
                log.warning("bridge says %s's highest anchored seq is %d: its counter moves from %d to %d (outbox "
                            "lost or restored?); refused readings are re-signed", device_id, receipt.highest_seq,
                            before, nxt)
        for rej in receipt.rejected:
            self.stats.reasons[rej.reason] = self.stats.reasons.get(rej.reason, 0) + 1
            if rej.seq is None and rej.reason in _BATCH_REFUSALS and self.uplink.max_events > 1:
                log.warning("bridge refused a batch message from %s (%s): at most %d event(s) per message from "
                            "now on; its events are resent", device_id, rej.detail, self.uplink.refused())
                continue
            if rej.seq is None:
                log.warning("bridge rejected an unidentifiable event from %s: %s", device_id, rej.reason)
                continue
            if rej.retryable:
                self.stats.rejected_retryable += 1  # stays in flight; resent after the timeout
                log.info("bridge deferred %s seq %d: %s", device_id, rej.seq, rej.detail)
            elif rej.reason == Reason.SEQ_REUSED and receipt.highest_seq is not None:
                new_seq = self.outbox.resign(device_id, rej.seq, rej.digest, receipt.highest_seq,
                                             self._resigner(device_id))
                if new_seq is not None:
                    self.stats.resigned += 1
                    self.window.settled((device_id, rej.seq))
                    log.info("re-signed %s seq %d as seq %d (its seq was already anchored)",
                             device_id, rej.seq, new_seq)
            elif rej.reason == EPOCH_KEY_EXISTS and (epoch := self.outbox.retire_epoch(device_id, rej.seq)) is not None:
                self._keys.pop((device_id, epoch), None)
                self.window.settled((device_id, rej.seq))
                self.stats.rekeyed += 1
                log.warning("%s: another key of epoch %d is already anchored (was this outbox lost or restored?); "
                            "readings from now on are sealed under a new key epoch, those already sent under this "
                            "key cannot be opened by anyone", device_id, epoch)
            elif self.outbox.quarantine(device_id, rej.seq, rej.reason, rej.detail, rej.digest):
                self.stats.quarantined += 1
                self.window.settled((device_id, rej.seq))
                log.error("bridge rejected %s seq %d (%s): %s; kept in quarantine",
                          device_id, rej.seq, rej.reason, rej.detail)

    def _resigner(self, device_id: str) -> Callable[[bytes, int], bytes]:
        """Re-sign one of our own stored events with a new seq, everything else unchanged (a sealed one is
        re-sealed: its AEAD binds the seq)."""
        identity = self.devices[device_id].identity

        def key_of(epoch: int) -> DataKey | None:
            return self._keys.get((device_id, epoch)) or self.outbox.data_key(device_id, epoch)

        return lambda old, seq: reseal(identity, old, seq, key_of)

    def _battery_of(self, device_id: str) -> int | None:
        read = self.devices[device_id].battery
        return None if read is None else read()

    def _publish_status(self, device_id: str, topic: str, payload: bytes) -> bool:
        client = self._clients.get(device_id)
        return client is not None and client.publish(topic, payload, qos=0).rc == mqtt.MQTT_ERR_SUCCESS

    def _on_state(self, device_id: str, up: bool) -> None:
        if up:
            self._connected.add(device_id)
            self.window.resume(device_id)  # parked rows of this device are due again
            self.status.link_up(device_id)
        else:
            self._connected.discard(device_id)
            for row in self.uplink.drop(device_id):  # lingering rows are due again when the device is back
                self.window.unsent(row)
        self._wake.set()

    @property
    def connected(self) -> frozenset[str]:
        """Devices whose MQTT client is connected to the broker now."""
        return frozenset(self._connected)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def connect(device_id: str) -> mqtt.Client:
            def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
                loop.call_soon_threadsafe(self._on_receipt, device_id, msg.topic, bytes(msg.payload))

            def on_state(_c: mqtt.Client, up: bool) -> None:
                loop.call_soon_threadsafe(self._on_state, device_id, up)

            return connect_client(
                self.device_broker(device_id), self.device_client_id(device_id), on_message=on_message,
                on_state=on_state, subscriptions=[(topics.receipts(device_id), 1)], max_queued=self.window.size,
                network=network,
            )

        # Every device has its own login, so its own connection: one network thread serves them all (a thread
        # per client stops working past ~340 devices; carechain.mqtt_loop says why).
        network = NetworkLoop(name="agent-mqtt")
        self._clients = {device_id: connect(device_id) for device_id in self.devices}
        tasks = [asyncio.create_task(self._send(stop), name="agent-send"),
                 asyncio.create_task(self.status.run(stop, lambda: self._connected, self._publish_status),
                                     name="agent-status")]
        tasks += [asyncio.create_task(self._produce(dev_id, d.source, stop), name=f"agent-produce-{dev_id}")
                  for dev_id, d in self.devices.items() if d.source is not None]
        stopped = asyncio.create_task(stop.wait(), name="agent-stop")
        try:
            # Until stopped — or until a task fails, which is a bug to report, not to run on without. A
            # producer whose source is exhausted ends normally; sending goes on.
            pending: set[asyncio.Task[Any]] = {stopped, *tasks}
            while stopped in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if not t.cancelled() and t.exception() is not None]
                for t in failed:
                    log.error("agent task %s failed: %r; the agent stops (its supervisor restarts it)",
                              t.get_name(), t.exception())
                if failed:
                    break
        finally:
            for t in (stopped, *tasks):
                t.cancel()
            results = await asyncio.gather(stopped, *tasks, return_exceptions=True)
            self.status.report(self.devices, self._connected, self._publish_status)  # the last word before leaving
            for client in self._clients.values():
                client.disconnect()
            network.stop()
            self._connected.clear()
        failures = [r for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
        if failures:
            raise failures[0]


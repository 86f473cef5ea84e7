"""Reading a Bluetooth LE health device through its standard GATT profile, with bleak.

One `BleSource` serves one device: it scans for the profile's primary service (or a known address),
connects, reads Device Information and Battery, subscribes to every notify/indicate characteristic the
profile lists, decodes each value with the profile's parser (`edge_agent.gatt.registry.decode`) and
hands the readings to `on_readings` — the agent passes `lambda r: agent.record(device_id, r)`. When the
link drops it reconnects under the one retry policy (`carechain.retry`).

The connect call itself goes through bleak-retry-connector (`establish_connection`), which knows BlueZ's
transient failures — `le-connection-abort-by-local`, `br-connection-canceled`, "Device with address … was
not found", a D-Bus `InProgress` — and retries them within one attempt after the short pauses BlueZ needs,
so a momentary radio hiccup is not a failed session with a growing backoff; what it cannot fix ends the
attempt, and the session backoff of `carechain.retry` decides when to scan again. `adapter` (config
`agent.ble_adapter`, e.g. hci1) picks the BlueZ adapter that scans and connects.

Devices that keep numbered records (glucose meters: Record Access Control Point, 0x2A52) are asked after
every (re)connection for the stored records from the last sequence number handed on plus one, so what the
meter measured while out of range still arrives; that sequence number lives in the paired-device registry
(`edge_agent.paired_devices`), and records at or before it are dropped as duplicates.

This module imports bleak only. On a Pi, bleak's platform backend (BlueZ over D-Bus) does the radio
work; `BleBackend` can name other backend classes — the simulator's bumble backend — and nothing else
changes. A malformed value is counted and logged, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.args.bluez import BlueZClientArgs, BlueZScannerArgs
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError
from bleak_retry_connector import BleakClientWithServiceCache, establish_connection

from carechain.profiles import Characteristic, DeviceProfile, bluetooth_uuid
from carechain.retry import Backoff, ReconnectPolicy
from edge_agent.gatt import device_information
from edge_agent.gatt import record_access as racp
from edge_agent.gatt import registry as gatt_registry
from edge_agent.gatt.errors import GattError
from edge_agent.paired_devices import PairedDevices
from edge_agent.source import Reading

log = logging.getLogger("carechain.ble")

OnReadings = Callable[[list[Reading]], object]

DEVICE_INFORMATION = bluetooth_uuid(0x180A)
DEVICE_INFORMATION_STRINGS = {  # Device Information Service strings → (registry field, parser)
    bluetooth_uuid(0x2A29): ("manufacturer", device_information.parse_manufacturer_name),
    bluetooth_uuid(0x2A24): ("model", device_information.parse_model_number),
    bluetooth_uuid(0x2A25): ("serial", device_information.parse_serial_number),
    bluetooth_uuid(0x2A26): ("firmware", device_information.parse_firmware_revision),
}
RACP_PARSER = "record_access_control_point"
BATTERY_PARSER = "battery_level"
_SEQ_MOD = 1 << 16  # GATT record sequence numbers are uint16 and wrap
# Connect attempts that failed for a non-transient reason (timeouts, GATT errors) before the session fails and
# backs off; transient BlueZ errors are retried beyond this, up to bleak-retry-connector's own bound.
CONNECT_ATTEMPTS = 3
SAVE_SEQ_EVERY = 50  # during a stored-records transfer, save the last sequence number this often


@dataclass(frozen=True)
class BleBackend:
    """Which bleak backend classes to use; None is bleak's platform default (BlueZ on Linux)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


PLATFORM = BleBackend()


@dataclass
class BleSourceStats:
    """Counters of one device's source; `malformed` counts values its parser refused."""

    scans: int = 0
    not_found: int = 0
    connects: int = 0
    link_losses: int = 0
    failures: int = 0
    readings: int = 0
    duplicates: int = 0
    malformed: int = 0
    callback_errors: int = 0
    stored_fetches: int = 0  # RACP "report stored records" completed
    stored_records: int = 0  # readings received while a RACP fetch ran


@dataclass
class DeviceStatus:
    """What the source read from the device on its last connection."""

    address: str
    name: str | None = None
    battery_pct: int | None = None
    info: dict[str, str] = field(default_factory=dict)  # manufacturer, model, serial, firmware
    features: dict[str, object] = field(default_factory=dict)  # parser name → decoded read-only value


class BleSource:
    """Reads one BLE device of `profile` until `stop` is set; see the module docstring.

    `address` pins the device (else the registry's record for this profile, else the first device
    advertising the profile's service that no other source in `claims` has taken). `pair` asks bleak
    to pair before use (None: the registry's `pair` field). `adapter` names the BlueZ adapter (hci0, hci1…)
    to scan and connect with; None is the system's default.
    """

    def __init__(self, profile: DeviceProfile, on_readings: OnReadings, *, address: str | None = None,
                 backend: BleBackend = PLATFORM, registry: PairedDevices | None = None,
                 policy: ReconnectPolicy | None = None, pair: bool | None = None, scan_timeout_s: float = 10.0,
                 connect_timeout_s: float = 20.0, racp_timeout_s: float = 30.0, claims: set[str] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 adapter: str | None = None) -> None:
        if profile.gatt is None:
            raise ValueError(f"profile {profile.name!r} has no gatt section: it is not a BLE device profile")
        self.profile = profile
        self.gatt = profile.gatt
        self.on_readings = on_readings
        self.backend = backend
        self.registry = registry if registry is not None else PairedDevices()
        self.pair = pair
        self.scan_timeout_s = scan_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.racp_timeout_s = racp_timeout_s
        self.claims = claims if claims is not None else set()
        self.adapter = adapter
        # bleak's BlueZ arguments: the BlueZ backend reads the adapter from them, other backends ignore them.
        self._scan_args: BlueZScannerArgs = {"adapter": adapter} if adapter else {}
        self._client_args: BlueZClientArgs = {"adapter": adapter} if adapter else {}
        self.stats = BleSourceStats()
        self.status: DeviceStatus | None = None
        self._backoff = Backoff(policy or ReconnectPolicy(), rng or random.Random())
        self._clock = clock
        self._address = address.upper() if address else None
        self._last_seq: int | None = None
        self._racp_reply: asyncio.Future[object] | None = None
        self._fetching = False
        self._connected = asyncio.Event()
        self._up = False  # the current session got as far as connected and subscribed
        self._unsaved_seqs = 0  # records handed on whose sequence number is not yet in the registry

    # -- public ----------------------------------------------------------------------------------------

    @property
    def address(self) -> str | None:
        """The device this source is bound to, once known."""
        return self._address

    @property
    def connected(self) -> asyncio.Event:
        """Set while the device is connected and subscribed."""
        return self._connected

    async def run(self, stop: asyncio.Event) -> None:
        """Find, connect, stream, and reconnect after any loss, until `stop` is set."""
        try:
            while not stop.is_set():
                delay = await self._attempt(stop)
                if delay is not None and not stop.is_set():
                    log.info("%s: retrying in %.2f s", self._label(), delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            if self._address is not None:
                self.claims.discard(self._address)

    # -- one attempt: find, connect, stream --------------------------------------------------------------

    async def _attempt(self, stop: asyncio.Event) -> float | None:
        """One session; returns the seconds to wait before the next, or None when stopping."""
        try:
            device = await self._find()
        except (BleakError, OSError, TimeoutError) as exc:
            self.stats.failures += 1
            log.warning("%s: scan failed: %s", self._label(), exc)
            return self._backoff.failed()
        if device is None:
            self.stats.not_found += 1
            log.info("%s: no device advertising %s within %.1f s", self._label(), self.gatt.service,
                     self.scan_timeout_s)
            return self._backoff.failed()
        self._up = False
        try:
            await self._session(device, stop)
        except (BleakError, OSError, TimeoutError) as exc:
            if not self._up:
                self.stats.failures += 1
            log.warning("%s: %s", self._label(), exc)
        except Exception:  # a bug must not end this device's task, nor (in run_sources) the others'
            self.stats.failures += 1
            log.exception("%s: unexpected error; retrying", self._label())
            self._up = False
        finally:
            self._connected.clear()
        if stop.is_set():
            return None
        if self._up:  # the link was up (connected, subscribed) and went down: not a failed attempt
            self.stats.link_losses += 1
            return self._backoff.link_lost(self._clock())
        return self._backoff.failed()

    async def _find(self) -> BLEDevice | None:
        if self._address is None:
            self._address = self._registered_address()
        wanted = self._address
        self.stats.scans += 1

        def match(device: BLEDevice, _adv: AdvertisementData) -> bool:
            address = device.address.upper()
            return address == wanted if wanted is not None else address not in self.claims

        scan: dict[str, Any] = {} if self.backend.scanner is None else {"backend": self.backend.scanner}
        device = await BleakScanner.find_device_by_filter(
            match, timeout=self.scan_timeout_s, service_uuids=[self.gatt.service], bluez=self._scan_args,
            **scan
        )
        if device is not None and self._address is None:
            if device.address.upper() in self.claims:  # taken by another source while we scanned
                return None
            self._address = device.address.upper()
            self.claims.add(self._address)
            log.info("%s: bound to %s (%s)", self.profile.name, device.address, device.name)
        return device

    def _registered_address(self) -> str | None:
        for record in self.registry.for_profile(self.profile.name):
            if record.address.upper() not in self.claims:
                self.claims.add(record.address.upper())
                return record.address.upper()
        return None

    async def _session(self, device: BLEDevice, stop: asyncio.Event) -> None:
        """Connect and stream until the link drops or `stop`; sets `_up` once connected and subscribed."""
        lost = asyncio.Event()
        record = self.registry.get(device.address)
        pair = self.pair if self.pair is not None else bool(record and record.pair)
        self._last_seq = record.last_record_seq if record is not None else None
        # establish_connection tries again after BlueZ's transient errors; on BlueZ each try has its own 20 s
        # timeout (bleak-retry-connector's), other backends keep `connect_timeout_s`.
        client = await establish_connection(
            BleakClientWithServiceCache, device, self._label(), disconnected_callback=lambda _c: lost.set(),
            max_attempts=CONNECT_ATTEMPTS, pair=pair, timeout=self.connect_timeout_s, backend=self.backend.client,
            bluez=self._client_args)
        self.stats.connects += 1
        try:
            await self._read_status(client, device, bonded=pair)
            await self._subscribe(client)
            self._backoff.connected(self._clock())
            self._up = True
            self._connected.set()
            log.info("%s: connected and subscribed", self._label())
            if self._racp_characteristic() is not None:
                await self._fetch_stored(client, lost)
            await _first(stop.wait(), lost.wait())
            if lost.is_set():
                log.warning("%s: link lost", self._label())
        finally:
            self._racp_reply = None
            self._fetching = False
            if client.is_connected:
                with contextlib.suppress(BleakError, OSError, TimeoutError):
                    await client.disconnect()

    # -- on connect: status and subscriptions ------------------------------------------------------------

    async def _read_status(self, client: BleakClient, device: BLEDevice, *, bonded: bool) -> None:
        status = DeviceStatus(address=device.address, name=device.name)
        if DEVICE_INFORMATION in self.gatt.also_read:
            service = client.services.get_service(DEVICE_INFORMATION)
            for char in service.characteristics if service is not None else ():
                known = DEVICE_INFORMATION_STRINGS.get(char.uuid)
                if known is None or "read" not in char.properties:
                    continue
                key, parse = known
                raw = bytes(await client.read_gatt_char(char))
                try:
                    status.info[key] = parse(raw)
                except GattError as exc:
                    self.stats.malformed += 1
                    log.warning("%s: malformed Device Information %s %s: %s", self._label(), key, raw.hex(), exc)
        for ch in self.gatt.characteristics:
            if ch.mode != "read":
                continue
            char = self._resolve(client, ch)
            if char is None:
                continue
            value = self._parse_status(ch, await client.read_gatt_char(char))
            if value is None:
                continue
            if ch.parser == BATTERY_PARSER:
                status.battery_pct = value  # type: ignore[assignment]
            else:
                status.features[ch.parser] = value
        self.status = status
        fields: dict[str, object] = {"name": device.name, "last_seen_ms": int(time.time() * 1000), **status.info}
        if status.battery_pct is not None:
            fields["battery_pct"] = status.battery_pct
        if bonded:
            fields["bonded"] = True
        self.registry.update(device.address, self.profile.name, **fields)

    async def _subscribe(self, client: BleakClient) -> None:
        subscribed = 0
        for ch in self.gatt.characteristics:
            if ch.mode == "read":
                continue
            char = self._resolve(client, ch)
            if char is None:
                continue
            await client.start_notify(char, _bind(self._on_value, ch))
            subscribed += 1
        if subscribed == 0:
            raise BleakError(f"{self._label()}: none of the profile's notify/indicate characteristics is present")

    def _resolve(self, client: BleakClient, ch: Characteristic) -> Any:
        service = client.services.get_service(self.gatt.service_of(ch))
        char = service.get_characteristic(ch.uuid) if service is not None else None
        if char is None:
            log.warning("%s: the device has no %s (%s); skipped", self._label(), ch.name, ch.uuid)
        return char

    # -- values ------------------------------------------------------------------------------------------

    def _decode(self, ch: Characteristic, data: bytes | bytearray) -> list[Reading] | None:
        try:
            return list(gatt_registry.decode(ch.parser, bytes(data)))
        except GattError as exc:
            self.stats.malformed += 1
            log.warning("%s: malformed %s value %s: %s", self._label(), ch.name, bytes(data).hex(), exc)
        except Exception:  # a parser bug must not kill the device's task: count it, log it loudly
            self.stats.malformed += 1
            log.exception("%s: the %s parser failed on %s", self._label(), ch.parser, bytes(data).hex())
        return None

    def _parse_status(self, ch: Characteristic, data: bytes | bytearray) -> object | None:
        """A read-only or status value (battery level, features) as its parser gives it, or None if malformed."""
        try:
            return gatt_registry.parse(ch.parser, bytes(data))
        except GattError as exc:
            self.stats.malformed += 1
            log.warning("%s: malformed %s value %s: %s", self._label(), ch.name, bytes(data).hex(), exc)
            return None

    def _on_value(self, ch: Characteristic, _sender: object, data: bytearray) -> None:
        if ch.parser == RACP_PARSER:
            self._on_racp(ch, data)
            return
        if ch.event is None:  # a status value someone notifies (battery level, glucose context)
            value = self._parse_status(ch, data)
            if ch.parser == BATTERY_PARSER and isinstance(value, int) and self.status is not None:
                self.status.battery_pct = value
            return
        decoded = self._decode(ch, data)
        if decoded is None:
            return
        readings = [(kind, body) for kind, body in decoded if kind in self.profile.events]
        fresh = [r for r in readings if self._is_new(r)]
        self.stats.duplicates += len(readings) - len(fresh)
        if not fresh:
            return
        try:
            self.on_readings(fresh)
        except Exception:  # the agent's failure must not kill the radio callback
            self.stats.callback_errors += 1
            log.exception("%s: on_readings failed; readings not handed on", self._label())
            return
        self.stats.readings += len(fresh)
        if self._fetching:
            self.stats.stored_records += len(fresh)
        self._remember_seq(fresh)

    def _is_new(self, reading: Reading) -> bool:
        seq = getattr(reading[1], "record_seq", None)
        return seq is None or self._last_seq is None or _seq_after(seq, self._last_seq)

    def _remember_seq(self, readings: Sequence[Reading]) -> None:
        seqs = [s for _, body in readings if (s := getattr(body, "record_seq", None)) is not None]
        if not seqs or self._address is None:
            return
        for seq in seqs:
            if self._last_seq is None or _seq_after(seq, self._last_seq):
                self._last_seq = seq
        self._unsaved_seqs += len(seqs)
        # During a transfer, save every so many records (and at its end) rather than fsync per record.
        if not self._fetching or self._unsaved_seqs >= SAVE_SEQ_EVERY:
            self._save_seq()

    def _save_seq(self) -> None:
        # Saved only after on_readings returned, i.e. after the agent stored the readings: a crash between
        # the two re-fetches a few records, it never skips one.
        if self._unsaved_seqs and self._address is not None:
            self.registry.update(self._address, self.profile.name, last_record_seq=self._last_seq)
            self._unsaved_seqs = 0

    # -- stored records (Record Access Control Point) ------------------------------------------------------

    def _racp_characteristic(self) -> Characteristic | None:
        return next((ch for ch in self.gatt.characteristics if ch.parser == RACP_PARSER), None)

    async def _fetch_stored(self, client: BleakClient, lost: asyncio.Event) -> None:
        """Ask for the records after the last one handed on (all, the first time) and wait for the end."""
        ch = self._racp_characteristic()
        char = self._resolve(client, ch) if ch is not None else None
        if char is None:
            return
        first = None if self._last_seq is None else (self._last_seq + 1) % _SEQ_MOD
        request = racp.encode_record_access_control_point(racp.racp_report_stored_records(first))
        loop = asyncio.get_running_loop()
        self._racp_reply = loop.create_future()
        self._fetching = True
        try:
            await client.write_gatt_char(char, request, response=True)
            reply = await asyncio.wait_for(_first_result(self._racp_reply, lost), timeout=self.racp_timeout_s)
        finally:
            self._fetching = False
            self._racp_reply = None
            self._save_seq()
        if reply is None:
            raise BleakError("link lost while fetching stored records")
        code = reply.response_code if isinstance(reply, racp.RacpResponse) else None
        if code not in (racp.RacpResponseCode.SUCCESS, racp.RacpResponseCode.NO_RECORDS_FOUND):
            log.warning("%s: the meter refused the stored-records request: %s", self._label(), reply)
            return
        self.stats.stored_fetches += 1
        log.info("%s: stored records fetched from sequence %s", self._label(), "start" if first is None else first)

    def _on_racp(self, ch: Characteristic, data: bytearray) -> None:
        message = self._parse_status(ch, data)
        if message is None:
            return
        if self._racp_reply is not None and not self._racp_reply.done():
            self._racp_reply.set_result(message)
        else:
            log.info("%s: unsolicited record access message %s", self._label(), message)

    def _label(self) -> str:
        return f"{self.profile.name}@{self._address or '?'}"


async def run_sources(sources: Sequence[BleSource], stop: asyncio.Event) -> None:
    """Run several devices at once, one task each, sharing one claims set so no two take one device."""
    claims: set[str] = set()
    for source in sources:
        source.claims = claims
    async with asyncio.TaskGroup() as group:
        for source in sources:
            group.create_task(source.run(stop))


def _bind(handler: Callable[[Characteristic, object, bytearray], None],
          ch: Characteristic) -> Callable[[object, bytearray], None]:
    def callback(sender: object, data: bytearray) -> None:
        handler(ch, sender, data)

    return callback


def _seq_after(seq: int, last: int) -> bool:
    """Serial-number order on uint16 (RFC 1982): `seq` follows `last`, allowing for wrap-around."""
    return 0 < (seq - last) % _SEQ_MOD < _SEQ_MOD // 2


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first_result(reply: asyncio.Future[Any], lost: asyncio.Event) -> Any:
    """The RACP reply, or None if the link drops first."""
    waiter = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait([reply, waiter], return_when=asyncio.FIRST_COMPLETED)
        return reply.result() if reply.done() else None
    finally:
        waiter.cancel()

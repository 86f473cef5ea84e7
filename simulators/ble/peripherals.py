"""Virtual BLE health devices: GATT servers on a bumble virtual link that behave like the real ones.

A `VirtualPeripheral` is one device of a profile: it advertises the profile's primary service with a
local name, serves the GATT layout the profile's `gatt:` section describes (plus Battery and Device
Information), and emits readings. The values come from `edge_agent.sources.simulated.SimulatedDevice`
(one model of physiology for the whole project) and are written with the GATT encoders of
`edge_agent.gatt`, so what goes over the air is the standard byte layout and the agent's parsers decode
it like a real device's. Every emission is kept in `emitted`, for tests to compare with what arrived.

How each kind of device treats its measurements, as the specifications describe:
- notify-only streams (heart rate, PLX continuous) go to whoever is subscribed, or nowhere;
- indicated measurements (thermometer, cuff, scale, PLX spot-check) are kept while no collector is
  subscribed and indicated, oldest first, once one subscribes;
- a glucose meter stores every record (numbered), notifies it live to a subscribed collector, and
  answers the Record Access Control Point: report stored records (all, or from a sequence number on),
  report the number of stored records. While a transfer runs, new records wait, so records always
  arrive in sequence order.

Faults for tests: `drop_link()` ends the connection from the device side (the collector sees the link
drop mid-stream), `offline()` takes the device out of range (no advertising, no connections) for the
duration of a block, `send_raw()` sends any bytes on a characteristic (a malformed value), and
`drop_link_after_records` cuts a stored-records transfer after so many records.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from bumble import gatt, hci
from bumble.core import UUID, AdvertisingData
from bumble.device import Connection, Device
from bumble.link import LocalLink
from pydantic import BaseModel

from carechain.profiles import Characteristic, DeviceProfile, bluetooth_uuid
from edge_agent.gatt import registry as gatt_registry
from edge_agent.sources.simulated import SimulatedDevice
from simulators.ble import encoding
from simulators.ble.radio import make_device

log = logging.getLogger("carechain.sim.ble")

_SIG = re.compile(r"^0000([0-9a-f]{4})-0000-1000-8000-00805f9b34fb$")
BATTERY_SERVICE = bluetooth_uuid(0x180F)
BATTERY_LEVEL = bluetooth_uuid(0x2A19)
DEVICE_INFORMATION = bluetooth_uuid(0x180A)
RACP_PARSER = "record_access_control_point"
MANUFACTURER = "carechain simulator"
ADVERTISING_INTERVAL_MS = 20  # fast, so a scan finds a device within a few event-loop turns
MAX_STORED_RECORDS = 1000  # a glucose meter's memory (real meters keep 500 to 1000)
MAX_PENDING_INDICATIONS = 200  # measurements an indicating device keeps for a collector


def bumble_uuid(uuid: str) -> UUID:
    """A profile's 128-bit UUID as bumble wants it: 16-bit for Bluetooth SIG numbers, as devices send them."""
    match = _SIG.match(uuid)
    return UUID.from_16_bits(int(match.group(1), 16)) if match else UUID(uuid)


@dataclass(frozen=True)
class Emission:
    """One value a peripheral produced: the reading, the GATT measurement encoded, and its fate."""

    kind: str
    body: BaseModel  # what SimulatedDevice made (the agent should end up with an equal reading)
    measurement: object  # the edge_agent.gatt measurement dataclass that was encoded
    characteristic: str  # 128-bit UUID of the characteristic that carries it
    parser: str  # the profile's parser for that characteristic
    data: bytes
    record_seq: int | None = None  # glucose meters: the record's sequence number


class VirtualPeripheral:
    """One virtual device of `profile` on `link`; see the module docstring for its behaviour."""

    def __init__(self, profile: DeviceProfile, link: LocalLink, address: str, *, seed: int | str = 0,
                 name: str | None = None, battery_pct: int = 87, start_ms: int = 1_700_000_000_000) -> None:
        if profile.gatt is None:
            raise ValueError(f"profile {profile.name!r} is not a BLE profile (no gatt section)")
        self.profile = profile
        self.address = address
        self.name = name or _local_name(profile.name, address)
        self.battery_pct = battery_pct
        self.simulated = SimulatedDevice(profile, seed)
        self.emitted: list[Emission] = []
        self.drop_link_after_records: int | None = None  # glucose: cut the next transfer after so many
        self._rng = random.Random(f"{seed}/ble")
        self._now_ms = start_ms
        self._device, self._controller = make_device(link, self.name, address)
        self._link = link
        self._chars: dict[str, gatt.Characteristic] = {}  # 128-bit uuid → served characteristic
        self._routes = encoding.routes(profile)
        self._spot_every = 5  # PLX: every fifth reading is a spot-check, the others continuous
        self._counts: collections.Counter[str] = collections.Counter()
        self._pending: dict[str, collections.deque[bytes]] = {}  # indicate chars: kept for a collector
        self._records: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # glucose store
        self._held: list[tuple[int, bytes]] = []  # glucose: new records waiting for a transfer to end
        self._transfer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._build_gatt()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Power on and advertise."""
        self._device.gatt_server.on(self._device.gatt_server.EVENT_CHARACTERISTIC_SUBSCRIPTION,
                                    self._on_subscription)
        await self._device.power_on()
        await self._device.start_advertising(
            advertising_data=self._advertising_data(), auto_restart=True,
            advertising_interval_min=ADVERTISING_INTERVAL_MS, advertising_interval_max=ADVERTISING_INTERVAL_MS,
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # stopping must not mask a test's own failure
            await self._device.power_off()

    @property
    def device(self) -> Device:
        """The bumble Device (for tests that need the raw stack)."""
        return self._device

    @property
    def connected(self) -> bool:
        return bool(self._device.connections)

    def subscribed(self, uuid: str) -> bool:
        """Whether a collector has enabled notifications or indications on the characteristic `uuid`."""
        char = self._chars.get(uuid)
        if char is None:
            return False
        return any(cccds.get(char.handle, b"\x00\x00")[0] & 0x03
                   for cccds in self._device.gatt_server.subscribers.values())

    @property
    def stored_record_seqs(self) -> list[int]:
        """Glucose meters: the sequence numbers held in memory, oldest first."""
        return list(self._records)

    # -- producing readings ------------------------------------------------------------------------------

    async def emit(self, now_ms: int | None = None) -> list[Emission]:
        """Produce the readings due at `now_ms` (default: the next due time) and send or store them."""
        due = self.simulated.next_due_ms()
        self._now_ms = now_ms if now_ms is not None else (due if due is not None else self._now_ms)
        out: list[Emission] = []
        for kind, body in self.simulated.next_readings(self._now_ms):
            route = self._route(kind)
            if route is None:
                continue  # a kind this device cannot carry (no encoder): it does not measure it
            emission = self._emission(route, kind, body, self._now_ms)
            self.emitted.append(emission)
            out.append(emission)
            await self._send(emission)
        return out

    async def run(self, period_s: Callable[[], float] | float = 1.0) -> None:
        """Emit readings forever, one batch every `period_s` seconds (wall clock), until cancelled."""
        while True:
            await self.emit()
            await asyncio.sleep(period_s() if callable(period_s) else period_s)

    def _route(self, kind: str) -> encoding.Route | None:
        served = [r for r in self._routes.get(kind, []) if r.characteristic in self._chars]
        if not served:
            return None
        self._counts[kind] += 1
        # Several characteristics carry one kind (PLX spot-check, then continuous): every fifth reading is
        # a spot-check, deterministically.
        return served[0] if len(served) == 1 or (self._counts[kind] - 1) % self._spot_every == 0 else served[1]

    def _emission(self, route: encoding.Route, kind: str, body: BaseModel, now_ms: int) -> Emission:
        measurement = route.measurement(body, now_ms)
        seq = getattr(body, "record_seq", None) if route.stored else None
        return Emission(kind=kind, body=body, measurement=measurement, characteristic=route.characteristic,
                        parser=route.parser, data=route.encode(measurement), record_seq=seq)

    async def _send(self, emission: Emission) -> None:
        uuid = emission.characteristic
        char = self._chars[uuid]
        if emission.record_seq is not None:
            await self._store_record(emission.record_seq, emission.data)
        elif char.properties & gatt.Characteristic.Properties.INDICATE:
            pending = self._pending.setdefault(uuid, collections.deque(maxlen=MAX_PENDING_INDICATIONS))
            if pending or not self.subscribed(uuid) or not await self._indicate(char, emission.data):
                pending.append(emission.data)  # kept until a collector confirms it
        else:
            await self._notify(char, emission.data)

    # -- glucose records -----------------------------------------------------------------------------------

    async def _store_record(self, seq: int, data: bytes) -> None:
        self._records[seq] = data
        while len(self._records) > MAX_STORED_RECORDS:
            self._records.popitem(last=False)
        if self._transfer is not None and not self._transfer.done():
            self._held.append((seq, data))
            return
        await self._notify_record(seq, data)

    async def _notify_record(self, seq: int, data: bytes) -> None:
        char = self._chars[self._record_char()]
        await self._notify(char, data)

    def _record_char(self) -> str:
        return next(r.characteristic for routes in self._routes.values() for r in routes if r.stored)

    def _on_racp_write(self, connection: Connection, value: bytes) -> None:
        # Answer after the write response, as the specification orders: records, then the RACP indication.
        if self._transfer is not None and not self._transfer.done():
            self._spawn(self._racp_reply(connection, encoding.racp_busy(value)))
            return
        self._transfer = self._spawn(self._racp_procedure(connection, bytes(value)))

    async def _racp_procedure(self, connection: Connection, request: bytes) -> None:
        try:
            outcome = encoding.racp_answer(request, list(self._records))
            for sent, seq in enumerate(outcome.records):
                if self.drop_link_after_records is not None and sent >= self.drop_link_after_records:
                    self.drop_link_after_records = None
                    await self.drop_link()
                    return
                await self._notify(self._chars[self._record_char()], self._records[seq], connection)
            await self._racp_reply(connection, outcome.response)
        finally:
            held, self._held = self._held, []
            for seq, data in held:
                await self._notify_record(seq, data)

    async def _racp_reply(self, connection: Connection, response: bytes) -> None:
        racp = self._racp_char()
        if racp is not None:
            await self._indicate(racp, response, connection)

    def _racp_char(self) -> gatt.Characteristic | None:
        ch = next((c for c in self.profile.gatt.characteristics if c.parser == RACP_PARSER), None)  # type: ignore[union-attr]
        return self._chars.get(ch.uuid) if ch is not None else None

    # -- faults ----------------------------------------------------------------------------------------

    async def drop_link(self) -> None:
        """End every connection from the device side (reason: remote user terminated); it advertises again."""
        for connection in list(self._device.connections.values()):
            with contextlib.suppress(Exception):  # already going down
                await connection.disconnect(hci.HCI_REMOTE_USER_TERMINATED_CONNECTION_ERROR)

    @contextlib.asynccontextmanager
    async def offline(self) -> AsyncIterator[None]:
        """Out of range for the block: the link drops, nobody hears the device; records are still stored."""
        # Off the link first, so the advertising that restarts on disconnection reaches no one; the
        # termination still reaches the collector, which is on the link.
        self._link.remove_controller(self._controller)
        try:
            await self.drop_link()
            yield
        finally:
            self._link.add_controller(self._controller)

    async def send_raw(self, uuid: str, data: bytes) -> None:
        """Send arbitrary bytes on a notify or indicate characteristic (e.g. a malformed measurement)."""
        char = self._chars[uuid]
        if char.properties & gatt.Characteristic.Properties.INDICATE:
            await self._indicate(char, data)
        else:
            await self._notify(char, data)

    # -- GATT plumbing ---------------------------------------------------------------------------------

    async def _notify(self, char: gatt.Characteristic, data: bytes, connection: Connection | None = None) -> None:
        await self._guard(self._device.notify_subscribers(char, data) if connection is None
                          else self._device.notify_subscriber(connection, char, data))

    async def _indicate(self, char: gatt.Characteristic, data: bytes, connection: Connection | None = None) -> bool:
        """Indicate `data`; True once confirmed by the collector(s)."""
        return await self._guard(self._device.indicate_subscribers(char, data) if connection is None
                                 else self._device.indicate_subscriber(connection, char, data))

    async def _guard(self, operation: Any) -> bool:
        # A link that drops while an indication awaits its confirmation cancels bumble's wait; that is
        # the collector's problem (it re-fetches or gets the kept copy), not a reason to stop emitting.
        task = asyncio.current_task()
        try:
            await operation
            return True
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise
            log.debug("%s: link dropped during a notification", self.name)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("%s: value not delivered: %s", self.name, exc)
        return False

    def _on_subscription(self, _bearer: Any, characteristic: gatt.Characteristic, _notify: bool,
                         indicate: bool) -> None:
        if not indicate:
            return
        uuid = next((u for u, c in self._chars.items() if c is characteristic), None)
        if uuid is not None and self._pending.get(uuid):
            self._spawn(self._flush(uuid))

    async def _flush(self, uuid: str) -> None:
        queue = self._pending.get(uuid)
        char = self._chars[uuid]
        while queue and self.subscribed(uuid):
            if not await self._indicate(char, queue[0]):
                return  # not confirmed: keep it for the next collector
            queue.popleft()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _advertising_data(self) -> bytes:
        service = bumble_uuid(self.profile.gatt.service)  # type: ignore[union-attr]
        kind = (AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS if len(service.to_bytes()) == 2
                else AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS)
        return bytes(AdvertisingData([
            (AdvertisingData.FLAGS, bytes([0x06])),  # LE general discoverable, BR/EDR not supported
            (kind, service.to_bytes()),
            (AdvertisingData.COMPLETE_LOCAL_NAME, self.name.encode("utf-8")),
        ]))

    def _build_gatt(self) -> None:
        assert self.profile.gatt is not None
        by_service: dict[str, list[gatt.Characteristic]] = collections.defaultdict(list)
        by_service[self.profile.gatt.service] = []
        for ch in self.profile.gatt.characteristics:
            char = self._characteristic(ch)
            if char is not None:
                self._chars[ch.uuid] = char
                by_service[self.profile.gatt.service_of(ch)].append(char)
        if DEVICE_INFORMATION in self.profile.gatt.also_read:
            by_service[DEVICE_INFORMATION] += self._device_information()
        if BATTERY_SERVICE in self.profile.gatt.also_read and not any(
            u == BATTERY_LEVEL for u in self._chars
        ):
            battery = self._battery_level()
            self._chars[BATTERY_LEVEL] = battery
            by_service[BATTERY_SERVICE].append(battery)
        self._device.add_services(gatt.Service(bumble_uuid(uuid), chars) for uuid, chars in by_service.items())

    def _characteristic(self, ch: Characteristic) -> gatt.Characteristic | None:
        props = gatt.Characteristic.Properties
        if ch.uuid == BATTERY_LEVEL:
            return self._battery_level()
        if ch.parser == RACP_PARSER:
            return gatt.Characteristic(
                bumble_uuid(ch.uuid), props.WRITE | props.INDICATE, gatt.Characteristic.WRITEABLE,
                gatt.CharacteristicValue(write=self._on_racp_write),
            )
        if ch.mode == "read":
            value = encoding.read_value(ch.parser, self.profile)
            if value is None:
                return None  # no encoder for it: this simulated model does not have the feature
            return gatt.Characteristic(bumble_uuid(ch.uuid), props.READ, gatt.Characteristic.READABLE, value)
        carries_readings = any(r.characteristic == ch.uuid for routes in self._routes.values() for r in routes)
        if not carries_readings and (ch.event is not None or ch.parser not in gatt_registry.CODECS):
            return None  # nothing this device can encode travels on it (a status one, like context, stays)
        mode = props.INDICATE if ch.mode == "indicate" else props.NOTIFY
        return gatt.Characteristic(bumble_uuid(ch.uuid), mode, gatt.Characteristic.READABLE, b"")

    def _battery_level(self) -> gatt.Characteristic:
        props = gatt.Characteristic.Properties
        return gatt.Characteristic(
            bumble_uuid(BATTERY_LEVEL), props.READ | props.NOTIFY, gatt.Characteristic.READABLE,
            gatt.CharacteristicValue(read=lambda _connection: encoding.battery_level(self.battery_pct)),
        )

    def _device_information(self) -> list[gatt.Characteristic]:
        props = gatt.Characteristic.Properties
        serial = f"SIM-{self._rng.getrandbits(40):010X}"
        strings = {0x2A29: MANUFACTURER, 0x2A24: self.profile.name, 0x2A25: serial, 0x2A26: "1.0.0"}
        return [gatt.Characteristic(UUID.from_16_bits(n), props.READ, gatt.Characteristic.READABLE,
                                    encoding.DEVICE_INFORMATION[n](text)) for n, text in strings.items()]



def _local_name(profile: str, address: str) -> str:
    """A short advertised name, e.g. "Thermometer 0006" or "BPC 0001" (legacy advertising has 31 bytes)."""
    suffix = address[-5:].replace(":", "")
    words = profile.split("_")
    title = " ".join(w.title() for w in words)
    return f"{title} {suffix}" if len(title) + 5 <= 20 else f"{''.join(w[0] for w in words).upper()} {suffix}"

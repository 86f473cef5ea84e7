"""A bleak backend over bumble: bleak's public API driving virtual peripherals on a `VirtualRadio`.

bleak picks a backend class per platform (BlueZ over D-Bus on Linux) unless `BleakScanner(backend=…)` /
`BleakClient(backend=…)` names one; these are such classes, built on bleak's `BaseBleakScanner` and
`BaseBleakClient`. The agent's BLE source is the same code on a Pi and here: only the classes passed
differ. `bumble_backend(radio)` returns them bound to one radio (bleak constructs backends itself, so the
radio travels as a class attribute, and in `BLEDevice.details` for devices our scanner found).

Semantics follow what bleak documents for every backend: scanners clear `seen_devices` on start and
filter by service UUID; notifications are preferred over indications when a characteristic has both;
GATT operations on a dropped link raise `BleakError`; the disconnected callback fires once per link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar, cast

from bleak.args import SizedBuffer
from bleak.assigned_numbers import CHARACTERISTIC_PROPERTIES, CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError
from bleak.uuids import normalize_uuid_str
from bumble import core, hci
from bumble.att import ATT_Error
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Peer
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy

from edge_agent.sources.ble import BleBackend
from simulators.ble.radio import VirtualRadio

log = logging.getLogger("carechain.sim.ble")

T = TypeVar("T")
MTU = 247  # what BlueZ asks for (its default for LE)

_UUID_LISTS = (
    AdvertisingData.Type.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
    AdvertisingData.Type.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
    AdvertisingData.Type.COMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS,
    AdvertisingData.Type.INCOMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS,
    AdvertisingData.Type.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
    AdvertisingData.Type.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
)
_SERVICE_DATA = (
    AdvertisingData.Type.SERVICE_DATA_16_BIT_UUID,
    AdvertisingData.Type.SERVICE_DATA_32_BIT_UUID,
    AdvertisingData.Type.SERVICE_DATA_128_BIT_UUID,
)


def bumble_backend(radio: VirtualRadio) -> BleBackend:
    """bleak backend classes (scanner, client) bound to `radio`, ready for `BleakScanner(backend=…)`."""
    scanner = type("BumbleScanner", (BumbleScanner,), {"radio": radio})
    client = type("BumbleClient", (BumbleClient,), {"radio": radio})
    return BleBackend(scanner=scanner, client=client)


def _uuid_str(uuid: core.UUID) -> str:
    return normalize_uuid_str(uuid.to_hex_str("-"))


def _address_str(address: hci.Address) -> str:
    return address.to_string(with_type_qualifier=False)


def advertisement_data(advertisement: Advertisement) -> AdvertisementData:
    """bleak's view of one bumble advertisement (names, service UUIDs, service and manufacturer data)."""
    data = advertisement.data
    names = data.get_all(AdvertisingData.Type.COMPLETE_LOCAL_NAME) or data.get_all(
        AdvertisingData.Type.SHORTENED_LOCAL_NAME
    )
    # bumble types `get_all` as the union of every AD type's value; these kinds hold UUID lists and
    # (UUID, bytes) pairs.
    service_uuids = [_uuid_str(u) for kind in _UUID_LISTS
                     for uuids in cast(list[list[UUID]], data.get_all(kind)) for u in uuids]
    service_data = {_uuid_str(u): bytes(v) for kind in _SERVICE_DATA
                    for u, v in cast(list[tuple[UUID, bytes]], data.get_all(kind))}
    manufacturer = {company: bytes(v) for company, v in data.get_all(AdvertisingData.Type.MANUFACTURER_SPECIFIC_DATA)}
    tx_power = data.get(AdvertisingData.Type.TX_POWER_LEVEL)
    return AdvertisementData(
        local_name=names[0] if names else None,
        manufacturer_data=manufacturer,
        service_data=service_data,
        service_uuids=service_uuids,
        tx_power=tx_power,
        rssi=advertisement.rssi,
        platform_data=(advertisement,),
    )


class BumbleScanner(BaseBleakScanner):
    """bleak scanner backend listening on a `VirtualRadio`'s central."""

    radio: ClassVar[VirtualRadio]

    def __init__(self, detection_callback: Any, service_uuids: list[str] | None, scanning_mode: str = "active",
                 **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)
        self._scanning = False

    async def start(self) -> None:
        self.seen_devices = {}
        if not self._scanning:
            self._scanning = True
            await self.radio.add_listener(self._on_advertisement)

    async def stop(self) -> None:
        if self._scanning:
            self._scanning = False
            await self.radio.remove_listener(self._on_advertisement)

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        if not advertisement.is_connectable and not advertisement.is_scan_response:
            return
        adv = advertisement_data(advertisement)
        if not self.is_allowed_uuid(adv.service_uuids):
            return
        address = _address_str(advertisement.address)
        details = {"radio": self.radio, "address": advertisement.address}
        device = self.create_or_update_device(address, address, adv.local_name, details, adv)
        self.call_detection_callbacks(device, adv)


class BumbleClient(BaseBleakClient):
    """bleak client backend: a GATT client over one LE connection of a `VirtualRadio`'s central."""

    radio: ClassVar[VirtualRadio]

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=kwargs.pop("disconnected_callback", None),
            timeout=kwargs.pop("timeout", 10.0),
        )
        details = address_or_ble_device.details if isinstance(address_or_ble_device, BLEDevice) else None
        self._bumble_address: hci.Address | None = details.get("address") if isinstance(details, dict) else None
        self._name = address_or_ble_device.name if isinstance(address_or_ble_device, BLEDevice) else None
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}

    # -- connection ----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name or self.address

    @property
    def mtu_size(self) -> int:
        return self._connection.att_mtu if self._connection is not None else 23

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if self._connection is not None:
            return
        address = self._bumble_address or self.radio.address_of(self.address)
        try:
            connection = await self.radio.connect(address, timeout=self._timeout)
        except core.TimeoutError as exc:
            raise BleakDeviceNotFoundError(self.address, f"{self.address}: no connection within {self._timeout} s") \
                from exc
        except core.BaseBumbleError as exc:
            raise BleakError(f"{self.address}: connection failed: {exc}") from exc
        self._connection = connection
        self._peer = Peer(connection)
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            # BlueZ exchanges the ATT MTU on every connection; do the same, so values longer than 20 bytes
            # arrive whole here as they would on a Pi.
            await self._guard(self._peer.request_mtu(MTU))
            if pair:
                await self._pair()
            self.services = await self._guard(self._discover())
        except BaseException:
            await self.disconnect()
            raise

    def _on_disconnection(self, reason: int) -> None:
        log.debug("%s: link down (HCI reason 0x%02X)", self.address, reason)
        self._connection = None
        self._peer = None
        self._subscribers.clear()
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            await connection.disconnect()
        except core.BaseBumbleError as exc:  # already gone: the link-down handler has run or will
            log.debug("%s: disconnect: %s", self.address, exc)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        await self._pair()

    async def _pair(self) -> None:
        if self._connection is None:
            raise BleakError("Not connected")
        try:
            await self._guard(self._connection.pair())
        except core.BaseBumbleError as exc:
            raise BleakError(f"{self.address}: pairing failed: {exc}") from exc

    async def unpair(self) -> None:
        keystore = self.radio.central.keystore
        if keystore is not None:
            await keystore.delete(self.address)

    # -- GATT ----------------------------------------------------------------------------------------

    async def _discover(self) -> BleakGATTServiceCollection:
        peer = self._require_peer()
        collection = BleakGATTServiceCollection()
        await peer.discover_services()
        for service in peer.services:
            await service.discover_characteristics()
            bleak_service = BleakGATTService(service, service.handle, _uuid_str(service.uuid))
            collection.add_service(bleak_service)
            for proxy in service.characteristics:
                await proxy.discover_descriptors()
                char = BleakGATTCharacteristic(
                    proxy, proxy.handle, _uuid_str(proxy.uuid), _properties(proxy.properties),
                    lambda: self.mtu_size - 3, bleak_service,
                )
                collection.add_characteristic(char)
                for descriptor in proxy.descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(descriptor, descriptor.handle, _uuid_str(descriptor.type), char)
                    )
        return collection

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, **kwargs: Any) -> bytearray:
        proxy: CharacteristicProxy = characteristic.obj
        return bytearray(await self._guard(self._require_peer().read_value(proxy)))

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, **kwargs: Any) -> bytearray:
        proxy: DescriptorProxy = descriptor.obj
        return bytearray(await self._guard(self._require_peer().read_value(proxy)))

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: SizedBuffer,
                              response: bool) -> None:
        proxy: CharacteristicProxy = characteristic.obj
        await self._guard(self._require_peer().write_value(proxy, bytes(data), with_response=response))

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        proxy: DescriptorProxy = descriptor.obj
        await self._guard(self._require_peer().write_value(proxy, bytes(data), with_response=True))

    async def start_notify(self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback,
                           **kwargs: Any) -> None:
        proxy: CharacteristicProxy = characteristic.obj

        def subscriber(value: bytes) -> None:
            callback(bytearray(value))

        self._subscribers[characteristic.handle] = subscriber
        await self._guard(self._require_peer().subscribe(proxy, subscriber, prefer_notify=True))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        proxy: CharacteristicProxy = characteristic.obj
        subscriber = self._subscribers.pop(characteristic.handle, None)
        await self._guard(self._require_peer().unsubscribe(proxy, subscriber))

    # -- helpers -------------------------------------------------------------------------------------

    def _require_peer(self) -> Peer:
        if self._peer is None:
            raise BleakError("Not connected")
        return self._peer

    async def _guard(self, operation: Awaitable[T]) -> T:
        """Run a GATT operation, turning bumble's failures into bleak's.

        bumble cancels a pending ATT request when the link drops; that CancelledError is not ours to
        propagate (our task was not cancelled), so it becomes a BleakError like any other lost link.
        """
        task = asyncio.current_task()
        try:
            return await operation
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise
            raise BleakError(f"{self.address}: link lost during a GATT operation") from None
        except ATT_Error as exc:
            raise BleakError(f"{self.address}: ATT error: {exc}") from exc
        except core.BaseBumbleError as exc:
            raise BleakError(f"{self.address}: {exc}") from exc


def _properties(flags: int) -> list[CharacteristicPropertyName]:
    return [name for bit, name in CHARACTERISTIC_PROPERTIES.items() if flags & bit]


"""The virtual air: one bumble `LocalLink` that virtual peripherals and one central share.

Each party is a bumble `Device` over its own virtual `Controller` on the link, as on a real radio: the
peripherals advertise and serve GATT, the central scans and connects through the bleak backend in
`simulators.ble.bleak_backend`. Addresses are random static ones (top two bits set), fixed by index so a
run is reproducible.

The central is shared by every bleak scanner and client of one process, like the one adapter of a Pi:
scanning is reference-counted (on while any scanner runs) and LE connections are made one at a time
(a controller has a single pending LE connection, in bumble as in BlueZ).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

log = logging.getLogger("carechain.sim.ble")

CENTRAL_ADDRESS = "F0:CA:8E:00:00:01"
AdvertisementListener = Callable[[Advertisement], None]


def peripheral_address(index: int) -> str:
    """The random static address of the `index`-th virtual peripheral (C0:CA:8E:00:xx:xx)."""
    if not 0 <= index <= 0xFFFF:
        raise ValueError(f"peripheral index {index} is out of range 0..65535")
    return f"C0:CA:8E:00:{index >> 8:02X}:{index & 0xFF:02X}"


def make_device(link: LocalLink, name: str, address: str) -> tuple[Device, Controller]:
    """A bumble Device on its own virtual controller attached to `link` (not yet powered on)."""
    controller = Controller(name, link=link, public_address=address)
    return Device(name=name, address=Address(address), host=Host(controller, AsyncPipeSink(controller))), controller


class VirtualRadio:
    """A LocalLink with a powered-on central; peripherals attach with `make_device(radio.link, …)`."""

    def __init__(self, central_address: str = CENTRAL_ADDRESS) -> None:
        self.link = LocalLink()
        self.central, _ = make_device(self.link, "carechain-central", central_address)
        self.connect_lock = asyncio.Lock()  # one pending LE connection at a time
        self._listeners: list[AdvertisementListener] = []
        self._scan_lock = asyncio.Lock()
        self._known: dict[str, Address] = {}  # address string (upper case) → address, from advertisements
        self.central.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)

    async def start(self) -> None:
        await self.central.power_on()

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a half-started radio must not mask the real error
            if self.central.is_scanning:
                await self.central.stop_scanning()
        with contextlib.suppress(Exception):
            await self.central.power_off()

    # -- scanning, shared by every scanner ---------------------------------------------------------------

    async def add_listener(self, listener: AdvertisementListener) -> None:
        async with self._scan_lock:
            self._listeners.append(listener)
            if not self.central.is_scanning:
                await self.central.start_scanning(filter_duplicates=False)

    async def remove_listener(self, listener: AdvertisementListener) -> None:
        async with self._scan_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
            if not self._listeners and self.central.is_scanning:
                await self.central.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        self._known[_key(advertisement.address)] = advertisement.address
        for listener in list(self._listeners):
            listener(advertisement)

    def address_of(self, address: str) -> Address:
        """The bumble address for a textual one: as last advertised, else a random static address."""
        known = self._known.get(address.upper())
        if known is not None:
            return known
        return Address(address, Address.RANDOM_DEVICE_ADDRESS)

    # -- connections -------------------------------------------------------------------------------------

    async def connect(self, address: Address, timeout: float) -> Connection:
        async with self.connect_lock:
            return await self.central.connect(address, timeout=timeout)


def _key(address: Address) -> str:
    return address.to_string(with_type_qualifier=False).upper()

"""A fleet of virtual BLE health devices on one virtual radio, for `carechain demo --ble` and tests.

    async with VirtualFleet(profiles, seed=7) as fleet:
        source = BleSource(profile, on_readings, address=fleet.peripherals[0].address, backend=fleet.backend)

`fleet.backend` is the bleak backend (scanner and client classes) bound to this fleet's radio: pass it
to `edge_agent.sources.ble.BleSource` and the agent's unchanged BLE code drives the virtual devices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from types import TracebackType

from carechain.profiles import DeviceProfile
from edge_agent.sources.ble import BleBackend
from simulators.ble.bleak_backend import bumble_backend
from simulators.ble.peripherals import VirtualPeripheral
from simulators.ble.radio import VirtualRadio, peripheral_address


class VirtualFleet:
    """Starts a radio, a central and one peripheral per BLE profile given; stops them on exit.

    `profiles`: profiles (a profile listed twice makes two devices of that type) or a name → profile
    mapping; non-BLE profiles (the pharmacy terminal) are skipped. With `autorun`, each peripheral emits
    on its own, its readings `speedup` times faster than the profile's sampling intervals; without it,
    tests call `peripheral.emit()` themselves and nothing depends on the wall clock.
    """

    def __init__(self, profiles: Iterable[DeviceProfile] | Mapping[str, DeviceProfile], seed: int | str = 0, *,
                 autorun: bool = False, speedup: float = 1.0) -> None:
        items = list(profiles.values()) if isinstance(profiles, Mapping) else list(profiles)
        self.profiles = [p for p in items if p.transport == "ble" and p.gatt is not None]
        self.seed = seed
        self.autorun = autorun
        self.speedup = speedup
        self.radio: VirtualRadio | None = None
        self.peripherals: list[VirtualPeripheral] = []
        self._runners: list[asyncio.Task[None]] = []

    @property
    def backend(self) -> BleBackend:
        if self.radio is None:
            raise RuntimeError("the fleet is not started: use `async with VirtualFleet(...) as fleet`")
        return self._backend

    @property
    def addresses(self) -> dict[str, str]:
        """Peripheral name → address."""
        return {p.name: p.address for p in self.peripherals}

    def by_profile(self, name: str) -> list[VirtualPeripheral]:
        return [p for p in self.peripherals if p.profile.name == name]

    async def __aenter__(self) -> VirtualFleet:
        self.radio = VirtualRadio()
        try:
            await self.radio.start()
            self._backend = bumble_backend(self.radio)
            for i, profile in enumerate(self.profiles):
                # Free-running devices keep the wall clock's date; driven ones a fixed one, for repeatability.
                start_ms = int(time.time() * 1000) if self.autorun else 1_700_000_000_000
                peripheral = VirtualPeripheral(profile, self.radio.link, peripheral_address(i + 1),
                                               seed=f"{self.seed}/{i}/{profile.name}", start_ms=start_ms)
                self.peripherals.append(peripheral)
                await peripheral.start()
            if self.autorun:
                for peripheral in self.peripherals:
                    self._runners.append(asyncio.create_task(peripheral.run(self._period(peripheral))))
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    def _period(self, peripheral: VirtualPeripheral) -> float:
        profile = peripheral.profile
        shortest = min(profile.interval_s(kind) for kind in profile.events)
        return max(0.05, shortest / self.speedup)

    async def _close(self) -> None:
        for task in self._runners:
            task.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners.clear()
        for peripheral in self.peripherals:
            await peripheral.stop()
        if self.radio is not None:
            await self.radio.close()

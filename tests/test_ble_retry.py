"""BLE on real hosts: BlueZ's transient connect errors are retried inside one attempt (bleak-retry-connector),
other failures end the attempt under the session backoff, and the configured adapter reaches bleak.

Virtual peripherals on a bumble link (simulators.ble) with the real `BleSource`; the bleak backend classes are
the simulator's, wrapped to fail a connect the way BlueZ does, or to record what bleak hands them. Waits are
bounded, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from bleak.exc import BleakDBusError, BleakError

from carechain.config import ConfigError, load_config
from carechain.profiles import load_profiles
from edge_agent.sources.ble import CONNECT_ATTEMPTS, BleBackend, BleSource
from simulators.ble import VirtualFleet
from tests.test_ble_source import BOUND_S, FAST, until

PROFILE = load_profiles()["heart_rate_band"]


def flaky(backend: BleBackend, failures: list[BaseException]) -> tuple[BleBackend, list[int]]:
    """`backend` whose client raises `failures` (in order, consumed) on its first connects; and the count of
    connect calls it saw."""
    attempts: list[int] = [0]
    assert backend.client is not None

    class FlakyClient(backend.client):  # type: ignore[name-defined]
        async def connect(self, pair: bool, **kwargs: Any) -> None:
            attempts[0] += 1
            if failures:
                raise failures.pop(0)
            await super().connect(pair, **kwargs)

    return BleBackend(scanner=backend.scanner, client=FlakyClient), attempts


@contextlib.asynccontextmanager
async def running(source: BleSource) -> AsyncIterator[BleSource]:
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        yield source
    finally:
        stop.set()
        await asyncio.wait_for(task, BOUND_S)


async def test_bluez_transient_connect_errors_are_retried_without_failing_the_session() -> None:
    async with VirtualFleet([PROFILE], seed=1) as fleet:
        band = fleet.peripherals[0]
        failures: list[BaseException] = [
            BleakDBusError("org.bluez.Error.Failed", ["le-connection-abort-by-local"]),
            BleakDBusError("org.bluez.Error.InProgress", ["Operation already in progress"])]
        backend, attempts = flaky(fleet.backend, failures)
        received: list[tuple[str, object]] = []
        source = BleSource(band.profile, received.extend, address=band.address, backend=backend, policy=FAST,
                           scan_timeout_s=5)
        async with running(source):
            await until(source.connected.is_set, "connected after two refused connects")
            await band.emit()
            await until(lambda: len(received) == 1, "the reading after the retried connect")
        assert attempts[0] == 3  # two refused, the third taken: all inside one attempt of the session
        assert source.stats.connects == 1 and source.stats.failures == 0 and source.stats.scans == 1


async def test_a_connect_that_keeps_failing_ends_the_attempt_and_the_session_backs_off_then_recovers() -> None:
    async with VirtualFleet([PROFILE], seed=2) as fleet:
        band = fleet.peripherals[0]
        # Not a transient BlueZ error: bleak-retry-connector gives up after CONNECT_ATTEMPTS of them.
        failures: list[BaseException] = [BleakError("GATT services discovery failed")
                                          for _ in range(CONNECT_ATTEMPTS)]
        backend, attempts = flaky(fleet.backend, failures)
        source = BleSource(band.profile, lambda _r: None, address=band.address, backend=backend, policy=FAST,
                           scan_timeout_s=5)
        async with running(source):
            await until(source.connected.is_set, "connected in a later session")
        assert attempts[0] == CONNECT_ATTEMPTS + 1
        assert source.stats.failures == 1  # one failed session, retried by the session backoff
        assert source.stats.scans == 2 and source.stats.connects == 1


class _Recorded:
    """The BlueZ arguments bleak handed the backend classes."""

    scanner: ClassVar[list[dict[str, Any]]] = []
    client: ClassVar[list[dict[str, Any]]] = []


def recording(backend: BleBackend) -> BleBackend:
    assert backend.scanner is not None and backend.client is not None

    class Scanner(backend.scanner):  # type: ignore[name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _Recorded.scanner.append(dict(kwargs.get("bluez", {})))
            super().__init__(*args, **kwargs)

    class Client(backend.client):  # type: ignore[name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _Recorded.client.append(dict(kwargs.get("bluez", {})))
            super().__init__(*args, **kwargs)

    return BleBackend(scanner=Scanner, client=Client)


@pytest.mark.parametrize("adapter", ["hci1", None])
async def test_the_configured_adapter_reaches_the_bleak_scanner_and_client(adapter: str | None) -> None:
    _Recorded.scanner.clear()
    _Recorded.client.clear()
    async with VirtualFleet([PROFILE], seed=3) as fleet:
        band = fleet.peripherals[0]
        # No address: the source scans for the profile's service, so the scanner is used too.
        source = BleSource(band.profile, lambda _r: None, backend=recording(fleet.backend), policy=FAST,
                           scan_timeout_s=5, adapter=adapter)
        async with running(source):
            await until(source.connected.is_set, "connected")
    wanted = {"adapter": adapter} if adapter else {}
    assert _Recorded.scanner and all(args == wanted for args in _Recorded.scanner)
    assert _Recorded.client and all(args == wanted for args in _Recorded.client)


def test_the_adapter_setting_takes_a_bluez_adapter_name_only() -> None:
    assert load_config(None, env={"CARECHAIN_AGENT__BLE_ADAPTER": "hci1"}).agent.ble_adapter == "hci1"
    with pytest.raises(ConfigError, match=r"CARECHAIN_AGENT__BLE_ADAPTER: agent.ble_adapter: String should match"):
        load_config(None, env={"CARECHAIN_AGENT__BLE_ADAPTER": "/org/bluez/hci1"})

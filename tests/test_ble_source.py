"""The agent's BLE source against virtual peripherals: real bleak API, real bumble stack, no mocks.

Each test starts virtual devices on a bumble link (simulators.ble), and the unchanged
`edge_agent.sources.ble.BleSource` reaches them through bleak with the bumble backend. Peripherals are
driven step by step (`emit()`), so nothing depends on the wall clock; waits are bounded, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from carechain.profiles import DeviceProfile, load_profiles
from carechain.retry import ReconnectPolicy
from edge_agent.gatt import registry as gatt_registry
from edge_agent.paired_devices import PairedDevices
from edge_agent.sources.ble import BleSource, run_sources
from simulators.ble import Emission, VirtualFleet, VirtualPeripheral

PROFILES = load_profiles()
BLE_PROFILES = [p for p in PROFILES.values() if p.transport == "ble"]
FAST = ReconnectPolicy(initial_s=0.01, max_s=0.05, jitter=0.1, stable_s=60)
BOUND_S = 20.0  # an upper bound on any wait, not a timing claim



async def until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(BOUND_S):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"still waiting for: {what}") from None


class Run:
    """Sources for some peripherals, running; readings collected per address."""

    def __init__(self, sources: list[BleSource], received: dict[str, list[tuple[str, object]]]) -> None:
        self.sources = sources
        self.received = received

    def source(self, peripheral: VirtualPeripheral) -> BleSource:
        return next(s for s in self.sources if s.address == peripheral.address.upper())


@contextlib.asynccontextmanager
async def streaming(fleet: VirtualFleet, peripherals: Sequence[VirtualPeripheral], *,
                    registry: PairedDevices | None = None) -> AsyncIterator[Run]:
    """One source per peripheral (pinned to its address), running until the block ends."""
    registry = registry if registry is not None else PairedDevices()
    received: dict[str, list[tuple[str, object]]] = {p.address.upper(): [] for p in peripherals}
    sources = [BleSource(p.profile, received[p.address.upper()].extend, address=p.address, backend=fleet.backend,
                         registry=registry, policy=FAST, scan_timeout_s=5, racp_timeout_s=BOUND_S)
               for p in peripherals]
    stop = asyncio.Event()
    task = asyncio.create_task(run_sources(sources, stop))
    try:
        for s in sources:
            await until(s.connected.is_set, f"{s.profile.name} connected")
        for s in sources:
            if s.profile.name == "glucose_meter":
                await until(lambda s=s: s.stats.stored_fetches >= 1, "first stored-records fetch")
        yield Run(sources, received)
    finally:
        stop.set()
        await asyncio.wait_for(task, BOUND_S)


def expected(emission: Emission) -> list[tuple[str, object]]:
    """What the agent must get for one emission: the readings of the very measurement that was encoded."""
    return gatt_registry.to_readings(emission.parser, emission.measurement)


def assert_arrived_exactly(peripheral: VirtualPeripheral, got: list[tuple[str, object]],
                           emitted: Sequence[Emission] | None = None) -> None:
    emitted = list(peripheral.emitted if emitted is None else emitted)
    assert [k for k, _ in got] == [e.kind for e in emitted], peripheral.name
    for emission, (kind, body) in zip(emitted, got, strict=True):
        assert [(kind, body)] == expected(emission), f"{peripheral.name}: {emission.measurement}"
        # and every value the simulated person produced is in the reading, unrounded
        simulated = emission.body.model_dump(exclude_none=True)
        assert simulated.items() <= body.model_dump().items(), f"{peripheral.name}: {simulated} vs {body}"


async def test_every_emitted_value_arrives_decoded_exactly_from_every_kind_of_device() -> None:
    async with VirtualFleet(BLE_PROFILES, seed=11) as fleet, streaming(fleet, fleet.peripherals) as run:
        for _ in range(8):
            for p in fleet.peripherals:
                await p.emit()
        await until(lambda: all(len(run.received[p.address]) == len(p.emitted) for p in fleet.peripherals),
                    "every emission received")
        for p in fleet.peripherals:
            assert p.emitted, f"{p.name} emitted nothing"
            assert_arrived_exactly(p, run.received[p.address])
            source = run.source(p)
            assert source.stats.malformed == 0 and source.stats.duplicates == 0
            assert source.status is not None and source.status.battery_pct == p.battery_pct
            assert source.status.info["model"] == p.profile.name
        kinds = {e.parser for p in fleet.peripherals for e in p.emitted}
        assert {"plx_spot_check", "plx_continuous"} <= kinds  # both PLX characteristics were exercised


async def test_glucose_records_taken_while_out_of_range_arrive_after_reconnect_without_duplicates() -> None:
    registry = PairedDevices()
    async with VirtualFleet([PROFILES["glucose_meter"]], seed=3) as fleet:
        meter = fleet.peripherals[0]
        async with streaming(fleet, [meter], registry=registry) as run:
            source = run.source(meter)
            for _ in range(3):
                await meter.emit()
            await until(lambda: len(run.received[meter.address]) == 3, "live records")
            async with meter.offline():
                await until(lambda: not source.connected.is_set(), "link loss noticed")
                for _ in range(4):
                    await meter.emit()  # stored only: nobody is connected
            await until(lambda: len(run.received[meter.address]) == 7, "stored records fetched")
            for _ in range(2):
                await meter.emit()
            await until(lambda: len(run.received[meter.address]) == 9, "live records after reconnect")
            assert_arrived_exactly(meter, run.received[meter.address])
            seqs = [body.record_seq for _, body in run.received[meter.address]]
            assert seqs == [e.record_seq for e in meter.emitted] and len(set(seqs)) == 9
            assert source.stats.link_losses >= 1 and source.stats.stored_fetches >= 2
            assert source.stats.stored_records == 4
        assert registry.get(meter.address).last_record_seq == seqs[-1]


async def test_a_transfer_cut_midway_resumes_after_the_last_record_handed_on() -> None:
    async with VirtualFleet([PROFILES["glucose_meter"]], seed=5) as fleet:
        meter = fleet.peripherals[0]
        for _ in range(6):
            await meter.emit()  # measured before the agent ever connected: all stored
        meter.drop_link_after_records = 2  # the first transfer breaks after two records
        async with streaming(fleet, [meter]) as run:
            await until(lambda: len(run.received[meter.address]) == 6, "all stored records")
            source = run.source(meter)
            assert_arrived_exactly(meter, run.received[meter.address])
            assert source.stats.link_losses == 1 and source.stats.duplicates == 0


async def test_an_agent_restart_asks_only_for_records_it_has_not_handed_on(tmp_path) -> None:
    path = tmp_path / "paired-devices.json"
    async with VirtualFleet([PROFILES["glucose_meter"]], seed=8) as fleet:
        meter = fleet.peripherals[0]
        for _ in range(3):
            await meter.emit()
        async with streaming(fleet, [meter], registry=PairedDevices(path)) as run:
            await until(lambda: len(run.received[meter.address]) == 3, "first records")
        for _ in range(2):
            await meter.emit()
        async with streaming(fleet, [meter], registry=PairedDevices(path)) as run:
            await until(lambda: len(run.received[meter.address]) == 2, "records after restart")
            assert_arrived_exactly(meter, run.received[meter.address], meter.emitted[3:])
            assert run.source(meter).stats.duplicates == 0  # the meter was not even asked for the old ones
    assert PairedDevices(path).get(meter.address).last_record_seq == meter.emitted[-1].record_seq


async def test_a_stream_whose_link_drops_reconnects_and_goes_on() -> None:
    async with VirtualFleet([PROFILES["heart_rate_band"], PROFILES["thermometer"]], seed=2) as fleet:
        band, thermometer = fleet.peripherals
        async with streaming(fleet, fleet.peripherals) as run:
            for _ in range(3):
                await band.emit()
                await thermometer.emit()
            await until(lambda: len(run.received[band.address]) == 3, "first heart rates")
            await band.drop_link()
            await thermometer.drop_link()
            await until(lambda: run.source(band).stats.connects == 2 and run.source(band).connected.is_set(),
                        "band reconnected")
            await until(lambda: run.source(thermometer).stats.connects == 2, "thermometer reconnected")
            await until(lambda: run.source(thermometer).connected.is_set(), "thermometer subscribed")
            for _ in range(3):
                await band.emit()
                await thermometer.emit()
            await until(lambda: len(run.received[band.address]) == 6, "heart rates after reconnect")
            await until(lambda: len(run.received[thermometer.address]) == 6, "temperatures")
            assert_arrived_exactly(band, run.received[band.address])
            assert_arrived_exactly(thermometer, run.received[thermometer.address])


async def test_indicated_measurements_taken_while_disconnected_are_kept_for_the_collector() -> None:
    async with VirtualFleet([PROFILES["blood_pressure_cuff"]], seed=4) as fleet:
        cuff = fleet.peripherals[0]
        for _ in range(3):
            await cuff.emit()  # nobody subscribed yet: the cuff keeps them
        async with streaming(fleet, [cuff]) as run:
            await until(lambda: len(run.received[cuff.address]) == 3, "kept measurements")
            assert_arrived_exactly(cuff, run.received[cuff.address])


async def test_a_malformed_notification_is_counted_and_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    async with VirtualFleet([PROFILES["heart_rate_band"]], seed=6) as fleet:
        band = fleet.peripherals[0]
        hrm = PROFILES["heart_rate_band"].gatt.characteristics[0].uuid
        async with streaming(fleet, [band]) as run:
            source = run.source(band)
            await band.emit()
            await band.send_raw(hrm, b"\x10\x48\x01")  # RR intervals promised, one byte of one given
            await band.send_raw(hrm, b"")
            await band.emit()
            await until(lambda: len(run.received[band.address]) == 2, "readings around the garbage")
            assert source.stats.malformed == 2
            assert source.stats.link_losses == 0 and source.connected.is_set()
            assert_arrived_exactly(band, run.received[band.address])
        assert "malformed Heart Rate Measurement value 104801" in caplog.text


async def test_several_devices_of_one_type_each_get_their_own_source() -> None:
    twins: list[DeviceProfile] = [PROFILES["thermometer"], PROFILES["thermometer"], PROFILES["scale"]]
    async with VirtualFleet(twins, seed=9) as fleet:
        received: list[list[tuple[str, object]]] = [[], [], []]
        sources = [BleSource(p.profile, received[i].extend, backend=fleet.backend, policy=FAST, scan_timeout_s=5)
                   for i, p in enumerate(fleet.peripherals)]
        stop = asyncio.Event()
        task = asyncio.create_task(run_sources(sources, stop))
        try:
            for s in sources:
                await until(s.connected.is_set, "connected")
            bound = {s.address for s in sources}
            assert bound == {p.address.upper() for p in fleet.peripherals}  # no device taken twice
            for p in fleet.peripherals:
                await p.emit()
                await p.emit()
            await until(lambda: all(len(r) == 2 for r in received), "two readings each")
            for s, got in zip(sources, received, strict=True):
                peripheral = next(p for p in fleet.peripherals if p.address.upper() == s.address)
                assert_arrived_exactly(peripheral, got)
        finally:
            stop.set()
            await asyncio.wait_for(task, BOUND_S)


async def test_a_free_running_fleet_feeds_agent_record_into_the_outbox(tmp_path) -> None:
    """The demo's path: autorun peripherals → BleSource → Agent.record → signed events in the outbox."""
    from carechain.config import BrokerConfig
    from carechain.identity import Identity
    from edge_agent.agent import Agent, AgentDevice
    from edge_agent.outbox import Outbox

    profiles = [PROFILES["pulse_oximeter"], PROFILES["heart_rate_band"]]
    identities = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(len(profiles))]
    outbox = Outbox(tmp_path / "outbox.db")
    agent = Agent([AgentDevice(ident, None) for ident in identities], outbox, BrokerConfig(), b"\x00" * 32)
    async with VirtualFleet(profiles, seed=12, autorun=True, speedup=1000) as fleet:
        sources = [BleSource(p.profile, functools.partial(agent.record, ident.device_id), address=p.address,
                             backend=fleet.backend, policy=FAST, scan_timeout_s=5)
                   for p, ident in zip(fleet.peripherals, identities, strict=True)]
        stop = asyncio.Event()
        task = asyncio.create_task(run_sources(sources, stop))
        try:
            await until(lambda: all(s.stats.readings >= 3 for s in sources), "three readings from each device")
        finally:
            stop.set()
            await asyncio.wait_for(task, BOUND_S)
    assert agent.stats.signed == sum(s.stats.readings for s in sources) == outbox.depth()

"""bleak's public API over the bumble backend behaves as bleak documents for every backend.

The agent's BLE source only uses bleak's API; these tests pin the parts it relies on, so that passing
here means the same calls behave alike on BlueZ: scanning filtered by service UUID, connecting from a
scanned device or an address, service discovery, reads, writes with response, notify and indicate,
the disconnected callback on a link the device drops, BleakError after that, and pairing.
"""

from __future__ import annotations

import asyncio

import pytest
from bleak import BleakClient, BleakScanner
from bleak.exc import BleakError

from carechain.profiles import bluetooth_uuid, load_profiles
from edge_agent.gatt import record_access as racp
from edge_agent.gatt import registry as gatt_registry
from simulators.ble import VirtualFleet

PROFILES = load_profiles()
THERMOMETER, GLUCOSE, HEART_RATE = PROFILES["thermometer"], PROFILES["glucose_meter"], PROFILES["heart_rate_band"]
BOUND_S = 20.0


@pytest.fixture
async def fleet():
    async with VirtualFleet([THERMOMETER, GLUCOSE, HEART_RATE], seed=1) as f:
        yield f


async def test_scanning_filters_by_service_uuid_and_reports_the_advertisement(fleet: VirtualFleet) -> None:
    thermometer = fleet.by_profile("thermometer")[0]
    found = await BleakScanner.find_device_by_filter(
        lambda d, adv: True, timeout=BOUND_S, service_uuids=[THERMOMETER.gatt.service], backend=fleet.backend.scanner)
    assert found is not None and found.address == thermometer.address and found.name == thermometer.name
    async with BleakScanner(service_uuids=[THERMOMETER.gatt.service], backend=fleet.backend.scanner) as scanner:
        async for _device, adv in scanner.advertisement_data():
            assert adv.service_uuids == [THERMOMETER.gatt.service] and adv.local_name == thermometer.name
            break
        assert {d.address for d in scanner.discovered_devices} == {thermometer.address}
    missing = await BleakScanner.find_device_by_filter(
        lambda d, adv: True, timeout=0.2, service_uuids=[bluetooth_uuid(0x1810)], backend=fleet.backend.scanner)
    assert missing is None  # no blood-pressure cuff in this fleet


async def test_connect_discover_read_and_indicate(fleet: VirtualFleet) -> None:
    thermometer = fleet.by_profile("thermometer")[0]
    device = await BleakScanner.find_device_by_address(thermometer.address, timeout=BOUND_S,
                                                       backend=fleet.backend.scanner)
    assert device is not None
    measurement = THERMOMETER.gatt.characteristics[0]
    async with BleakClient(device, backend=fleet.backend.client) as client:
        assert client.is_connected and client.backend_id == "BumbleClient"
        assert client.mtu_size == 247
        service = client.services.get_service(THERMOMETER.gatt.service)
        char = service.get_characteristic(measurement.uuid)
        assert char.properties == ["indicate"]
        assert [d.uuid for d in char.descriptors] == [bluetooth_uuid(0x2902)]
        battery = await client.read_gatt_char(bluetooth_uuid(0x2A19))
        assert gatt_registry.parse("battery_level", bytes(battery)) == thermometer.battery_pct
        got: list[bytes] = []
        await client.start_notify(char, lambda _c, data: got.append(bytes(data)))
        emission = (await thermometer.emit())[0]
        await asyncio.wait_for(_until(lambda: got), BOUND_S)
        assert got == [emission.data]
        await client.stop_notify(char)
        assert not thermometer.subscribed(measurement.uuid)


async def test_write_with_response_and_notifications_on_the_record_access_control_point(fleet: VirtualFleet) -> None:
    meter = fleet.by_profile("glucose_meter")[0]
    for _ in range(3):
        await meter.emit()
    async with BleakClient(meter.address, backend=fleet.backend.client, timeout=BOUND_S) as client:
        records: list[bytes] = []
        answers: list[bytes] = []
        await client.start_notify(bluetooth_uuid(0x2A18), lambda _c, data: records.append(bytes(data)))
        await client.start_notify(bluetooth_uuid(0x2A52), lambda _c, data: answers.append(bytes(data)))
        request = racp.racp_report_number_of_stored_records(meter.emitted[1].record_seq)
        await client.write_gatt_char(bluetooth_uuid(0x2A52), gatt_registry.encode("record_access_control_point",
                                                                                  request), response=True)
        await asyncio.wait_for(_until(lambda: answers), BOUND_S)
        assert gatt_registry.parse("record_access_control_point", answers[0]) == racp.RacpNumberOfRecords(count=2)
        request = racp.racp_report_stored_records(meter.emitted[1].record_seq)
        await client.write_gatt_char(bluetooth_uuid(0x2A52), gatt_registry.encode("record_access_control_point",
                                                                                  request), response=True)
        await asyncio.wait_for(_until(lambda: len(answers) == 2), BOUND_S)
        assert records == [e.data for e in meter.emitted[1:]]
        assert gatt_registry.parse("record_access_control_point", answers[1]) == racp.RacpResponse(
            request_op_code=racp.RacpOpCode.REPORT_STORED_RECORDS, response_code=racp.RacpResponseCode.SUCCESS)


async def test_a_link_the_device_drops_calls_back_once_and_later_calls_fail(fleet: VirtualFleet) -> None:
    band = fleet.by_profile("heart_rate_band")[0]
    lost: list[BleakClient] = []
    client = BleakClient(band.address, disconnected_callback=lost.append, backend=fleet.backend.client,
                         timeout=BOUND_S)
    await client.connect()
    await band.drop_link()
    await asyncio.wait_for(_until(lambda: lost), BOUND_S)
    assert lost == [client] and not client.is_connected
    with pytest.raises(BleakError):
        await client.read_gatt_char(bluetooth_uuid(0x2A19))
    await client.connect()  # the device advertises again: the same client reconnects
    assert client.is_connected
    await client.disconnect()


async def test_pairing_encrypts_the_link(fleet: VirtualFleet) -> None:
    meter = fleet.by_profile("glucose_meter")[0]
    async with BleakClient(meter.address, backend=fleet.backend.client, pair=True, timeout=BOUND_S) as client:
        assert client.is_connected
        connection = next(iter(meter.device.connections.values()))
        assert connection.is_encrypted


async def _until(predicate) -> None:  # noqa: ANN001 - a tiny local helper
    while not predicate():
        await asyncio.sleep(0.005)

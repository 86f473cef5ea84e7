"""What a virtual peripheral sends: simulated readings as `edge_agent.gatt` measurements, and their bytes.

The byte layouts are `edge_agent.gatt`'s encoders, never written here; this module only says how a
simulated body (`carechain.events`) becomes a measurement dataclass as a device would fill it in (units
of the specification, the device clock as timestamp, the sample site), and which characteristic of a
profile carries it. Routes are looked up by the profile's parser name, so a profile that names a parser
this module knows gets a working virtual device without code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import BaseModel

from carechain.events import BloodPressure, Glucose, HeartRate, SpO2, Temperature, Weight
from carechain.profiles import DeviceProfile
from edge_agent.gatt import battery
from edge_agent.gatt import blood_pressure as bp
from edge_agent.gatt import device_information as dis
from edge_agent.gatt import glucose as glu
from edge_agent.gatt import health_thermometer as ht
from edge_agent.gatt import heart_rate as hr
from edge_agent.gatt import pulse_oximeter as plx
from edge_agent.gatt import record_access as ra
from edge_agent.gatt import registry as gatt_registry
from edge_agent.gatt import weight_scale as ws
from edge_agent.gatt.date_time import DateTime
from edge_agent.gatt.errors import GattError
from edge_agent.gatt.ieee11073 import Special, float32, sfloat
from edge_agent.gatt.readings import MG_DL_PER_KG_L


@dataclass(frozen=True)
class Route:
    """How readings of one kind travel: on `characteristic`, built by `measurement`, written by `encode`."""

    characteristic: str  # 128-bit UUID from the profile
    parser: str
    measurement: Callable[[BaseModel, int], object]  # (body, device time in ms) → measurement dataclass
    encode: Callable[[object], bytes]
    stored: bool = False  # numbered records kept by the device (glucose)


def device_time(now_ms: int) -> DateTime:
    """The device clock at `now_ms` (simulated devices keep UTC)."""
    return DateTime.from_datetime(datetime.fromtimestamp(now_ms / 1000, UTC))


def _heart_rate(body: BaseModel, now_ms: int) -> hr.HeartRateMeasurement:
    assert isinstance(body, HeartRate)
    return hr.HeartRateMeasurement(bpm=body.bpm, sensor_contact=body.sensor_contact,
                                   energy_expended_kj=body.energy_kj, rr_intervals_1024=tuple(body.rr_intervals_1024))


def _temperature(body: BaseModel, now_ms: int) -> ht.TemperatureMeasurement:
    assert isinstance(body, Temperature)
    return ht.TemperatureMeasurement(value=float32(body.celsius), unit=ht.TemperatureUnit.CELSIUS,
                                     timestamp=device_time(now_ms), temperature_type=_site(body.site))


def _site(site: str | None) -> ht.TemperatureType | None:
    if site is None:
        return None
    try:
        return ht.TemperatureType[site.upper()]
    except KeyError:
        raise ValueError(f"temperature site {site!r} has no Temperature Type; known: "
                         f"{', '.join(t.name.lower() for t in ht.TemperatureType)}") from None


def _blood_pressure(body: BaseModel, now_ms: int) -> bp.BloodPressureMeasurement:
    assert isinstance(body, BloodPressure)
    return bp.BloodPressureMeasurement(
        systolic=sfloat(body.systolic_mmhg), diastolic=sfloat(body.diastolic_mmhg),
        mean_arterial_pressure=sfloat(body.mean_mmhg) if body.mean_mmhg is not None else Special.NAN,
        unit=bp.BloodPressureUnit.MMHG, timestamp=device_time(now_ms),
        pulse_rate=sfloat(body.pulse_bpm) if body.pulse_bpm is not None else None,
    )


def _pulse(body: SpO2) -> object:
    return sfloat(body.pulse_bpm) if body.pulse_bpm is not None else Special.NAN


def _plx_spot_check(body: BaseModel, now_ms: int) -> plx.PlxSpotCheckMeasurement:
    assert isinstance(body, SpO2)
    return plx.PlxSpotCheckMeasurement(spo2=sfloat(body.spo2_pct), pulse_rate=_pulse(body),  # type: ignore[arg-type]
                                       timestamp=device_time(now_ms))


def _plx_continuous(body: BaseModel, now_ms: int) -> plx.PlxContinuousMeasurement:
    assert isinstance(body, SpO2)
    return plx.PlxContinuousMeasurement(spo2=sfloat(body.spo2_pct), pulse_rate=_pulse(body))  # type: ignore[arg-type]


def _glucose(body: BaseModel, now_ms: int) -> glu.GlucoseMeasurement:
    assert isinstance(body, Glucose) and body.record_seq is not None
    kind = glu.GlucoseType[body.sample.upper()] if body.sample else glu.GlucoseType.CAPILLARY_WHOLE_BLOOD
    concentration = glu.GlucoseConcentration(
        value=sfloat(Decimal(repr(body.mg_dl)) / MG_DL_PER_KG_L), unit=glu.GlucoseConcentrationUnit.KG_PER_L,
        type=kind, sample_location=glu.SampleLocation.FINGER,
    )
    return glu.GlucoseMeasurement(sequence_number=body.record_seq, base_time=device_time(now_ms),
                                  time_offset_minutes=0, concentration=concentration)


def _weight(body: BaseModel, now_ms: int) -> ws.WeightMeasurement:
    assert isinstance(body, Weight)
    bmi = height = None
    if body.bmi is not None:
        # The scale sends BMI with the height it used; the body keeps BMI only, so recover the height.
        bmi = Decimal(repr(body.bmi))
        height = (Decimal(repr(body.kg)) / bmi).sqrt().quantize(ws.HEIGHT_RESOLUTION[ws.MeasurementSystem.SI])
    return ws.WeightMeasurement(weight=Decimal(repr(body.kg)), units=ws.MeasurementSystem.SI,
                                timestamp=device_time(now_ms), bmi=bmi, height=height)


_MEASUREMENTS: dict[str, tuple[Callable[[BaseModel, int], object], bool]] = {  # parser → (builder, stored)
    "heart_rate_measurement": (_heart_rate, False),
    "temperature_measurement": (_temperature, False),
    "blood_pressure_measurement": (_blood_pressure, False),
    "plx_spot_check": (_plx_spot_check, False),
    "plx_continuous": (_plx_continuous, False),
    "glucose_measurement": (_glucose, True),
    "weight_measurement": (_weight, False),
}


def routes(profile: DeviceProfile) -> dict[str, list[Route]]:
    """Event kind → the routes of the profile's characteristics that carry it (spot-check first for PLX)."""
    out: dict[str, list[Route]] = {}
    for ch in profile.gatt.characteristics if profile.gatt else ():
        known = _MEASUREMENTS.get(ch.parser)
        if ch.event is None or known is None:
            continue
        make, stored = known
        encode = functools.partial(gatt_registry.encode, ch.parser)
        out.setdefault(ch.event, []).append(Route(ch.uuid, ch.parser, make, encode, stored))
    return out


def battery_level(percent: int) -> bytes:
    return battery.encode_battery_level(percent)


DEVICE_INFORMATION = {  # 16-bit UUID → encoder, for the strings a virtual device reports
    0x2A29: dis.encode_manufacturer_name,
    0x2A24: dis.encode_model_number,
    0x2A25: dis.encode_serial_number,
    0x2A26: dis.encode_firmware_revision,
}


def read_value(parser: str, profile: DeviceProfile) -> bytes | None:
    """The value of a read-only characteristic (features, sensor location), or None if unknown."""
    if parser == "blood_pressure_feature":
        return bp.encode_blood_pressure_feature(
            bp.BloodPressureFeature.BODY_MOVEMENT_DETECTION | bp.BloodPressureFeature.IRREGULAR_PULSE_DETECTION)
    if parser == "glucose_feature":
        return glu.encode_glucose_feature(
            glu.GlucoseFeature.LOW_BATTERY_DETECTION | glu.GlucoseFeature.SENSOR_STRIP_INSERTION_ERROR_DETECTION)
    if parser == "plx_features":
        return plx.encode_plx_features(plx.PlxFeatures(supported=plx.PlxSupportedFeatures.SPOT_CHECK_TIMESTAMP))
    if parser == "weight_scale_feature":
        return ws.encode_weight_scale_feature(ws.WeightScaleFeature(
            timestamp_supported=True, bmi_supported=True, weight_resolution=ws.WeightResolution.KG_0_1_OR_LB_0_2,
            height_resolution=ws.HeightResolution.M_0_001_OR_IN_0_1))
    if parser == "temperature_type":
        sim = profile.sampling.simulate.temperature if profile.sampling.simulate else None
        site = _site(sim.site) if sim is not None else None
        return ht.encode_temperature_type(site) if site is not None else None
    return None


# -- Record Access Control Point, the meter's side ----------------------------------------------------------


@dataclass(frozen=True)
class RacpOutcome:
    """A meter's answer to one RACP request: the records to send (sequence numbers, in order), then `response`."""

    records: list[int]
    response: bytes


def _racp_response(op_code: int, code: ra.RacpResponseCode) -> bytes:
    return ra.encode_record_access_control_point(ra.RacpResponse(request_op_code=op_code, response_code=code))


def racp_busy(request: bytes) -> bytes:
    """The answer to a request written while another procedure runs."""
    return _racp_response(request[0] if request else 0, ra.RacpResponseCode.PROCEDURE_NOT_COMPLETED)


def racp_answer(request: bytes, stored: list[int]) -> RacpOutcome:
    """What a glucose meter holding records `stored` (oldest first) does for the RACP value `request`.

    Supports what collectors use: report stored records and report their number, for all records, the
    first, the last, or by sequence number (≤, ≥, range). Deleting is refused (a meter keeps its memory);
    a user-facing-time filter is refused as unsupported, as many meters do.
    """
    try:
        message = ra.parse_record_access_control_point(request)
    except GattError:
        op = request[0] if request and request[0] in {c.value for c in ra.RacpOpCode} else 0
        code = ra.RacpResponseCode.OP_CODE_NOT_SUPPORTED if op == 0 else ra.RacpResponseCode.INVALID_OPERAND
        return RacpOutcome([], _racp_response(op, code))
    if not isinstance(message, ra.RacpRequest):
        return RacpOutcome([], _racp_response(int(request[0]), ra.RacpResponseCode.OP_CODE_NOT_SUPPORTED))
    op = message.op_code
    if op == ra.RacpOpCode.ABORT_OPERATION:  # nothing runs (a running transfer answers "busy" above)
        return RacpOutcome([], _racp_response(op, ra.RacpResponseCode.SUCCESS))
    if op not in (ra.RacpOpCode.REPORT_STORED_RECORDS, ra.RacpOpCode.REPORT_NUMBER_OF_STORED_RECORDS):
        return RacpOutcome([], _racp_response(op, ra.RacpResponseCode.OP_CODE_NOT_SUPPORTED))
    selected = _select(message, stored)
    if isinstance(selected, ra.RacpResponseCode):
        return RacpOutcome([], _racp_response(op, selected))
    if op == ra.RacpOpCode.REPORT_NUMBER_OF_STORED_RECORDS:
        count = ra.encode_record_access_control_point(ra.RacpNumberOfRecords(count=len(selected)))
        return RacpOutcome([], count)
    if not selected:
        return RacpOutcome([], _racp_response(op, ra.RacpResponseCode.NO_RECORDS_FOUND))
    return RacpOutcome(selected, _racp_response(op, ra.RacpResponseCode.SUCCESS))


def _select(request: ra.RacpRequest, stored: list[int]) -> list[int] | ra.RacpResponseCode:
    operator = request.operator
    if operator == ra.RacpOperator.NULL:
        return ra.RacpResponseCode.INVALID_OPERATOR
    if operator == ra.RacpOperator.ALL_RECORDS:
        return list(stored)
    if operator == ra.RacpOperator.FIRST_RECORD:
        return stored[:1]
    if operator == ra.RacpOperator.LAST_RECORD:
        return stored[-1:]
    if request.filter_type != ra.RacpFilterType.SEQUENCE_NUMBER:
        return ra.RacpResponseCode.OPERAND_NOT_SUPPORTED
    low = request.minimum if isinstance(request.minimum, int) else None
    high = request.maximum if isinstance(request.maximum, int) else None
    if low is not None and high is not None and low > high:
        return ra.RacpResponseCode.INVALID_OPERAND
    return [s for s in stored if (low is None or s >= low) and (high is None or s <= high)]

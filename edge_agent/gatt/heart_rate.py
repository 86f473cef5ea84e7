"""Heart Rate Measurement (0x2A37), Heart Rate Service.

Flags (uint8): bit 0 value format (0 uint8, 1 uint16); bits 1-2 sensor contact (bit 2 = supported,
bit 1 = detected, meaningful only when supported); bit 3 Energy Expended present (uint16, kJ); bit 4 RR
intervals present (one or more uint16, in 1/1024 s, filling the rest of the value); bits 5-7 reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.gatt._codec import Reader, Writer, flag_bits

CHARACTERISTIC = "Heart Rate Measurement"
UUID = 0x2A37

_UINT16 = 0x01
_CONTACT_DETECTED = 0x02
_CONTACT_SUPPORTED = 0x04
_ENERGY = 0x08
_RR = 0x10
_KNOWN = 0x1F


@dataclass(frozen=True, kw_only=True)
class HeartRateMeasurement:
    """One Heart Rate Measurement notification."""

    bpm: int
    sensor_contact: bool | None = None  # None: the sensor does not report contact
    energy_expended_kj: int | None = None  # accumulated since the last reset; 65535 means "at least"
    rr_intervals_1024: tuple[int, ...] = ()  # beat-to-beat intervals, oldest first, in 1/1024 s


def parse_heart_rate_measurement(data: bytes) -> HeartRateMeasurement:
    """Bytes of a 0x2A37 value → `HeartRateMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, CHARACTERISTIC)
    flags = r.flags(_KNOWN)
    bpm = r.u16("heart rate (uint16)") if flags & _UINT16 else r.u8("heart rate (uint8)")
    contact = bool(flags & _CONTACT_DETECTED) if flags & _CONTACT_SUPPORTED else None
    energy = r.u16("energy expended (uint16, kJ)") if flags & _ENERGY else None
    rr: list[int] = []
    if flags & _RR:
        rr.append(r.u16("RR interval (uint16, 1/1024 s)"))  # the flag promises at least one
        while r.remaining:
            rr.append(r.u16("RR interval (uint16, 1/1024 s)"))
    r.end()
    return HeartRateMeasurement(bpm=bpm, sensor_contact=contact, energy_expended_kj=energy, rr_intervals_1024=tuple(rr))


def encode_heart_rate_measurement(m: HeartRateMeasurement) -> bytes:
    """`HeartRateMeasurement` → bytes; the heart rate is written as uint8 when it fits, else uint16."""
    w = Writer(CHARACTERISTIC)
    wide = isinstance(m.bpm, int) and m.bpm > 0xFF
    if m.sensor_contact not in (None, True, False):
        raise w.fail("sensor_contact", f"expected True, False or None, got {m.sensor_contact!r}")
    flags = flag_bits(
        {
            _UINT16: wide,
            _CONTACT_SUPPORTED: m.sensor_contact is not None,
            _CONTACT_DETECTED: m.sensor_contact is True,
            _ENERGY: m.energy_expended_kj is not None,
            _RR: bool(m.rr_intervals_1024),
        }
    )
    w.u8(flags, "flags")
    w.uint(m.bpm, 2 if wide else 1, "bpm")
    if m.energy_expended_kj is not None:
        w.u16(m.energy_expended_kj, "energy_expended_kj")
    for i, rr in enumerate(m.rr_intervals_1024):
        w.u16(rr, f"rr_intervals_1024[{i}]")
    return w.getvalue()

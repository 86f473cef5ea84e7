"""Battery Level (0x2A19), Battery Service: one uint8, the charge in percent (0-100; 101-255 reserved)."""

from __future__ import annotations

from edge_agent.gatt._codec import Reader, Writer

CHARACTERISTIC = "Battery Level"
UUID = 0x2A19


def parse_battery_level(data: bytes) -> int:
    """Bytes of a 0x2A19 value → percent (0…100); `GattParseError` for reserved values or a bad length."""
    r = Reader(data, CHARACTERISTIC)
    percent = r.u8("battery level (uint8, %)")
    if percent > 100:
        raise r.fail("a battery level 0…100 %", f"{percent} (reserved)", offset=0)
    r.end()
    return percent


def encode_battery_level(percent: int) -> bytes:
    """Percent (0…100) → the 1-byte 0x2A19 value."""
    w = Writer(CHARACTERISTIC)
    w.check(percent, 0, 100, "percent")
    w.u8(percent, "percent")
    return w.getvalue()

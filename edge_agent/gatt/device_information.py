"""Device Information Service (0x180A): the identification strings and the System ID.

The strings (manufacturer 0x2A29, model 0x2A24, serial 0x2A25, firmware 0x2A26, hardware 0x2A27,
software 0x2A28) are UTF-8 without a terminator. Many devices pad them with NUL bytes or end them with
one, so trailing NULs are stripped; a NUL inside the text, or bytes that are not UTF-8, are an error.

System ID (0x2A23, 8 bytes): Manufacturer Identifier (uint40) then Organizationally Unique Identifier
(uint24), little-endian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.gatt._codec import Reader, Writer

MANUFACTURER_NAME = ("Manufacturer Name String", 0x2A29)
MODEL_NUMBER = ("Model Number String", 0x2A24)
SERIAL_NUMBER = ("Serial Number String", 0x2A25)
FIRMWARE_REVISION = ("Firmware Revision String", 0x2A26)
HARDWARE_REVISION = ("Hardware Revision String", 0x2A27)
SOFTWARE_REVISION = ("Software Revision String", 0x2A28)
SYSTEM_ID_CHARACTERISTIC = "System ID"
SYSTEM_ID_UUID = 0x2A23


def parse_utf8_string(data: bytes, characteristic: str) -> str:
    """A Device Information string value → text (trailing NUL padding removed)."""
    r = Reader(data, characteristic)
    raw = r.rest().rstrip(b"\x00")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise r.fail("UTF-8 text", f"byte 0x{raw[exc.start]:02X} ({exc.reason})", offset=exc.start) from None
    if "\x00" in text:
        raise r.fail("text without NUL characters", "a NUL before the end", offset=raw.index(b"\x00"))
    return text


def encode_utf8_string(text: str, characteristic: str) -> bytes:
    """Text → a Device Information string value (UTF-8, no terminator)."""
    w = Writer(characteristic)
    if not isinstance(text, str):
        raise w.fail("text", f"expected str, got {type(text).__name__}")
    if "\x00" in text:
        raise w.fail("text", "contains a NUL character, which readers take for padding")
    w.raw(text.encode("utf-8"))
    return w.getvalue()


def _string_codec(spec: tuple[str, int]) -> tuple[Callable[[bytes], str], Callable[[str], bytes]]:
    name = spec[0]

    def parse(data: bytes) -> str:
        return parse_utf8_string(data, name)

    def encode(text: str) -> bytes:
        return encode_utf8_string(text, name)

    parse.__doc__ = f"Bytes of a {name} (0x{spec[1]:04X}) value → text."
    encode.__doc__ = f"Text → a {name} (0x{spec[1]:04X}) value."
    return parse, encode


parse_manufacturer_name, encode_manufacturer_name = _string_codec(MANUFACTURER_NAME)
parse_model_number, encode_model_number = _string_codec(MODEL_NUMBER)
parse_serial_number, encode_serial_number = _string_codec(SERIAL_NUMBER)
parse_firmware_revision, encode_firmware_revision = _string_codec(FIRMWARE_REVISION)
parse_hardware_revision, encode_hardware_revision = _string_codec(HARDWARE_REVISION)
parse_software_revision, encode_software_revision = _string_codec(SOFTWARE_REVISION)


@dataclass(frozen=True, kw_only=True)
class SystemId:
    manufacturer_identifier: int  # 40 bits
    organizationally_unique_identifier: int  # 24 bits (the IEEE OUI)


def parse_system_id(data: bytes) -> SystemId:
    """Bytes of a 0x2A23 value → `SystemId`."""
    r = Reader(data, SYSTEM_ID_CHARACTERISTIC)
    manufacturer = r.uint(5, "manufacturer identifier (uint40)")
    oui = r.u24("organizationally unique identifier (uint24)")
    r.end()
    return SystemId(manufacturer_identifier=manufacturer, organizationally_unique_identifier=oui)


def encode_system_id(system_id: SystemId) -> bytes:
    """`SystemId` → the 8-byte 0x2A23 value."""
    w = Writer(SYSTEM_ID_CHARACTERISTIC)
    w.uint(system_id.manufacturer_identifier, 5, "manufacturer_identifier")
    w.u24(system_id.organizationally_unique_identifier, "organizationally_unique_identifier")
    return w.getvalue()

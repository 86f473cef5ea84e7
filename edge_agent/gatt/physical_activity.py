"""Physical Activity Monitor Service (PAMS, 0x183E): Step Counter Activity Summary Data (0x2B40) — a
documented SUBSET.

We could not check this layout against the adopted PAMS 1.0 text (only its title page was at hand); it
follows pre-adoption reference firmware and our reading of the service, and is meant first of all to be
symmetric with our own simulated peripherals. What we implement:

    Header (uint8)          bit 0 first segment, bit 1 last segment, bits 2-7 rolling segment counter.
                            Only unsegmented values (first AND last set) are accepted; a segmented
                            summary raises GattParseError (reassemble the segments first).
    Flags (uint8)           bit 0 Normal Walking Steps, bit 1 Intensity Steps, bit 2 Floor Steps,
                            bit 3 Distance present; bits 4-7 refused as reserved.
    Session ID (uint16), Sub-Session ID (uint16), Relative Timestamp (uint32, s), Sequence Number (uint32)
    Normal Walking Steps (uint24), Intensity Steps (uint24), Floor Steps (uint24), Distance (uint24)

Distance is kept raw (`distance`): its unit is not verified, and no event body carries it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.gatt._codec import Reader, Writer, flag_bits

CHARACTERISTIC = "Step Counter Activity Summary Data"
UUID = 0x2B40

_FIRST_SEGMENT = 0x01
_LAST_SEGMENT = 0x02


@dataclass(frozen=True, kw_only=True)
class StepCounterActivitySummary:
    """One (unsegmented) Step Counter Activity Summary Data value."""

    session_id: int
    sub_session_id: int
    relative_timestamp_s: int
    sequence_number: int
    normal_walking_steps: int | None = None
    intensity_steps: int | None = None
    floor_steps: int | None = None
    distance: int | None = None  # raw uint24; unit unverified (see the module docstring)
    segment_counter: int = 0  # header bits 2-7

    @property
    def steps(self) -> int | None:
        """Normal walking + intensity steps (floor steps are not added: they are counted apart)."""
        parts = [s for s in (self.normal_walking_steps, self.intensity_steps) if s is not None]
        return sum(parts) if parts else None


def parse_step_counter_activity_summary(data: bytes) -> StepCounterActivitySummary:
    """Bytes of a 0x2B40 value → `StepCounterActivitySummary`; `GattParseError` if malformed or segmented."""
    r = Reader(data, CHARACTERISTIC)
    header = r.u8("header (uint8)")
    if header & (_FIRST_SEGMENT | _LAST_SEGMENT) != _FIRST_SEGMENT | _LAST_SEGMENT:
        raise r.fail(
            "an unsegmented value (header bits 0 and 1 set)",
            f"header 0x{header:02X}; reassemble segments first",
            offset=0,
        )
    flags = r.flags(0x0F)
    session = r.u16("session ID (uint16)")
    sub_session = r.u16("sub-session ID (uint16)")
    timestamp = r.u32("relative timestamp (uint32, s)")
    sequence = r.u32("sequence number (uint32)")
    normal = r.u24("normal walking steps (uint24)") if flags & 0x01 else None
    intensity = r.u24("intensity steps (uint24)") if flags & 0x02 else None
    floor = r.u24("floor steps (uint24)") if flags & 0x04 else None
    distance = r.u24("distance (uint24)") if flags & 0x08 else None
    r.end()
    return StepCounterActivitySummary(
        session_id=session,
        sub_session_id=sub_session,
        relative_timestamp_s=timestamp,
        sequence_number=sequence,
        normal_walking_steps=normal,
        intensity_steps=intensity,
        floor_steps=floor,
        distance=distance,
        segment_counter=header >> 2,
    )


def encode_step_counter_activity_summary(m: StepCounterActivitySummary) -> bytes:
    """`StepCounterActivitySummary` → bytes (one unsegmented value)."""
    w = Writer(CHARACTERISTIC)
    w.check(m.segment_counter, 0, 63, "segment_counter")
    w.u8(_FIRST_SEGMENT | _LAST_SEGMENT | (m.segment_counter << 2), "header")
    fields = (m.normal_walking_steps, m.intensity_steps, m.floor_steps, m.distance)
    w.u8(flag_bits({1 << i: value is not None for i, value in enumerate(fields)}), "flags")
    w.u16(m.session_id, "session_id")
    w.u16(m.sub_session_id, "sub_session_id")
    w.u32(m.relative_timestamp_s, "relative_timestamp_s")
    w.u32(m.sequence_number, "sequence_number")
    for name, value in zip(("normal_walking_steps", "intensity_steps", "floor_steps", "distance"), fields, strict=True):
        if value is not None:
            w.u24(value, name)
    return w.getvalue()

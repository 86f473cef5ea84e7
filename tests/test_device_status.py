"""The device status report's wire format (carechain.device_status): what it carries, what it refuses and why,
and that a status and an event can never pass for each other."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carechain import cbor, envelope, topics
from carechain.device_status import (
    MAX_STATUS_BYTES,
    STATUS_MARKER,
    StatusError,
    StatusReason,
    StatusReport,
    parse_status,
    sign_status,
)
from carechain.errors import Reason
from carechain.events import PayloadError, make_payload, validate_payload
from carechain.identity import Identity
from edge_agent.status_report import StatusReporter

DEVICE = Identity.from_seed(b"\x01" * 32)
OTHER = Identity.from_seed(b"\x02" * 32)
NOW = 1_760_000_000_000


def _signed_raw(identity: Identity, payload: object) -> bytes:
    return envelope.sign(identity, payload)


def _reason(data: bytes, topic_device: str = DEVICE.device_id, key: bytes = DEVICE.public_key,
            now: int = NOW) -> str:
    with pytest.raises(StatusError) as caught:
        parse_status(data, topic_device).verified(key, now)
    return caught.value.reason


@given(outbox=st.integers(0, 2**32 - 1), battery=st.none() | st.integers(0, 100),
       ts=st.integers(0, 2**63 - 1))
def test_a_signed_status_reads_back_as_it_was_made(outbox: int, battery: int | None, ts: int) -> None:
    data = sign_status(DEVICE, ts, outbox, battery)
    assert len(data) <= MAX_STATUS_BYTES
    report = parse_status(data, DEVICE.device_id).verified(DEVICE.public_key, ts)
    assert report == StatusReport(DEVICE.device_id, ts, outbox, battery)


def test_the_payload_is_the_documented_deterministic_map() -> None:
    sign1 = envelope.parse(sign_status(DEVICE, NOW, 7, 81))
    assert sign1.kid == DEVICE.device_id
    assert sign1.payload == {"v": 1, "msg": STATUS_MARKER, "dev": DEVICE.device_id, "ts": NOW, "outbox": 7,
                             "battery": 81}
    assert sign1.payload_bytes == cbor.encode(sign1.payload)
    assert "battery" not in envelope.parse(sign_status(DEVICE, NOW, 0)).payload  # absent, not null


@pytest.mark.parametrize("kwargs", [{"outbox": -1}, {"outbox": 2**32}, {"outbox": True}, {"battery_pct": 101},
                                    {"battery_pct": -1}, {"ts_ms": -5}])
def test_signing_refuses_values_outside_the_ranges(kwargs: dict[str, int]) -> None:
    args = {"ts_ms": NOW, "outbox": 0, "battery_pct": None, **kwargs}
    with pytest.raises(ValueError):
        sign_status(DEVICE, **args)  # type: ignore[arg-type]


def test_an_event_is_never_accepted_as_a_status() -> None:
    event = envelope.sign(DEVICE, make_payload(DEVICE.device_id, 0, NOW, "heart_rate", {"bpm": 60}))
    assert _reason(event) == StatusReason.NOT_STATUS


def test_a_status_is_never_accepted_as_an_event() -> None:
    status = envelope.parse(sign_status(DEVICE, NOW, 3))
    with pytest.raises(PayloadError) as caught:
        validate_payload(status.payload)
    assert caught.value.reason == Reason.BAD_PAYLOAD


def test_each_malformed_status_is_refused_with_its_own_reason() -> None:
    good = {"v": 1, "msg": STATUS_MARKER, "dev": DEVICE.device_id, "ts": NOW, "outbox": 1}
    assert _reason(b"\x00" * (MAX_STATUS_BYTES + 1)) == StatusReason.TOO_LARGE
    assert _reason(b"\xa0") == StatusReason.MALFORMED
    assert _reason(_signed_raw(DEVICE, {**good, "v": 2})) == StatusReason.UNSUPPORTED_VERSION
    assert _reason(_signed_raw(DEVICE, {**good, "v": True})) == StatusReason.UNSUPPORTED_VERSION
    for bad in ({**good, "outbox": -1}, {**good, "outbox": "1"}, {**good, "battery": 101},
                {**good, "battery": None}, {**good, "ts": 1.5}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "outbox"}):
        assert _reason(_signed_raw(DEVICE, bad)) == StatusReason.BAD_STATUS, bad
    assert _reason(_signed_raw(DEVICE, {**good, "dev": OTHER.device_id})) == StatusReason.TOPIC_MISMATCH


def test_topic_payload_and_signer_must_name_one_device() -> None:
    own = sign_status(DEVICE, NOW, 0)
    assert _reason(own, topic_device=OTHER.device_id) == StatusReason.TOPIC_MISMATCH
    kid_other = envelope.sign(DEVICE, {"v": 1, "msg": STATUS_MARKER, "dev": DEVICE.device_id, "ts": NOW,
                                       "outbox": 0}, kid=OTHER.device_id)
    assert _reason(kid_other) == StatusReason.TOPIC_MISMATCH


def test_signature_and_time_are_checked_against_the_callers_key_and_clock() -> None:
    assert _reason(sign_status(DEVICE, NOW, 0), key=OTHER.public_key) == StatusReason.BAD_SIGNATURE
    forged = bytearray(sign_status(DEVICE, NOW, 0))
    forged[-1] ^= 1
    assert _reason(bytes(forged)) == StatusReason.BAD_SIGNATURE
    assert _reason(sign_status(DEVICE, NOW + 300_001, 0)) == StatusReason.CLOCK_SKEW
    assert _reason(sign_status(DEVICE, NOW - 900_001, 0)) == StatusReason.TOO_OLD
    parse_status(sign_status(DEVICE, NOW + 300_000, 0), DEVICE.device_id).verified(DEVICE.public_key, NOW)


def test_status_topics_are_their_own_kind() -> None:
    topic = topics.status(DEVICE.device_id)
    assert topic == f"cc/v1/dev/{DEVICE.device_id}/status"
    assert topics.device_of_status_topic(topic) == DEVICE.device_id
    assert topics.device_of_event_topic(topic) is None
    assert topics.device_of_status_topic(topics.events(DEVICE.device_id)) is None
    assert topics.device_of_status_topic("cc/v1/dev/NOT-AN-ID/status") is None
    assert topics.device_of_status_topic(topic + "\n") is None
    with pytest.raises(ValueError):
        topics.status("x/y")


# -- the agent's side: when a device reports, and what it says (edge_agent.status_report) ----------------

class _Clock:
    def __init__(self) -> None:
        self.ms, self.mono = NOW, 100.0

    def wall(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.mono


def _reporter(depth: int | dict[str, int], clock: _Clock, battery: dict[str, int | None] | None = None
              ) -> StatusReporter:
    levels = battery or {}
    return StatusReporter({DEVICE.device_id: DEVICE, OTHER.device_id: OTHER}, lambda: depth, levels.get,
                          interval_s=30, clock_ms=clock.wall, monotonic=clock.monotonic)


def _published(reporter: StatusReporter, connected: set[str],
               devices: Sequence[str] = (DEVICE.device_id, OTHER.device_id)) -> list[tuple[str, StatusReport]]:
    out: list[tuple[str, StatusReport]] = []

    def publish(device_id: str, topic: str, payload: bytes) -> bool:
        assert topic == topics.status(device_id)
        out.append((device_id, parse_status(payload, device_id).verified(
            DEVICE.public_key if device_id == DEVICE.device_id else OTHER.public_key, NOW)))
        return True

    reporter.report(devices, connected, publish)
    return out


def test_only_connected_devices_report_and_the_offline_ones_are_skipped_not_queued() -> None:
    clock = _Clock()
    reporter = _reporter(4, clock, {DEVICE.device_id: 55})
    sent = _published(reporter, {DEVICE.device_id})
    assert sent == [(DEVICE.device_id, StatusReport(DEVICE.device_id, NOW, 4, 55))]
    assert reporter.stats.offline == 1
    clock.mono += 5
    assert [d for d, _ in _published(reporter, {DEVICE.device_id, OTHER.device_id})] == [DEVICE.device_id,
                                                                                       OTHER.device_id]


def test_per_device_depths_are_reported_per_device_and_reports_are_spaced_and_ordered() -> None:
    clock = _Clock()
    reporter = _reporter({DEVICE.device_id: 9}, clock)
    both = {DEVICE.device_id, OTHER.device_id}
    assert [r.outbox for _, r in _published(reporter, both)] == [9, 0]
    clock.mono += 0.5
    assert _published(reporter, both) == []  # a link that flaps does not trip the bridge's rate limit
    clock.mono += 0.5
    clock.ms -= 10_000  # the wall clock stepped back: the report's ts still moves forward
    assert [r.ts_ms for _, r in _published(reporter, both)] == [NOW + 1, NOW + 1]


def test_a_failing_outbox_or_battery_read_never_raises_into_the_agent() -> None:
    clock = _Clock()

    def broken() -> int:
        raise OSError("disk I/O error")

    reporter = StatusReporter({DEVICE.device_id: DEVICE}, broken, lambda _d: 250, clock_ms=clock.wall,
                              monotonic=clock.monotonic)
    assert reporter.report([DEVICE.device_id], {DEVICE.device_id}, lambda *_: True) == 0
    assert reporter.stats.failed == 1
    ok = StatusReporter({DEVICE.device_id: DEVICE}, lambda: 1, lambda _d: 250, clock_ms=clock.wall,
                        monotonic=clock.monotonic)
    assert [r.battery_pct for _, r in _published(ok, {DEVICE.device_id}, [DEVICE.device_id])] == [None]


async def test_devices_whose_links_come_up_together_report_together_with_one_outbox_query() -> None:
    # A fleet reconnecting after an outage: 1,000 link-ups must not each scan a large outbox.
    queries: list[int] = []

    def depth() -> dict[str, int]:
        queries.append(1)
        return {DEVICE.device_id: 3, OTHER.device_id: 5}

    reporter = StatusReporter({DEVICE.device_id: DEVICE, OTHER.device_id: OTHER}, depth, lambda _d: None,
                              interval_s=30)
    sent: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(reporter.run(stop, lambda: {DEVICE.device_id, OTHER.device_id},
                                            lambda d, _t, _p: sent.append(d) is None))
    reporter.link_up(DEVICE.device_id)
    reporter.link_up(OTHER.device_id)
    for _ in range(60):  # within MIN_SPACING_S (1 s): both reported, in one turn
        await asyncio.sleep(0.05)
        if len(sent) == 2:
            break
    stop.set()
    await task
    assert sorted(sent) == sorted([DEVICE.device_id, OTHER.device_id])
    assert len(queries) == 1

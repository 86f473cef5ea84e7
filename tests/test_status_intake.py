"""The bridge's book of device status reports (chain_bridge.status_intake): what it keeps, and every way a
status is refused — each counted under its own reason, none changing what the console shows."""

from __future__ import annotations

import logging
import threading

import pytest

from carechain import envelope
from carechain.device_status import STATUS_MARKER, StatusReason, sign_status
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.ledger.store import DeviceRecord
from chain_bridge.status_intake import ACCEPTED, DeviceStatus, DeviceStatusBook, StatusLimits

NOW = 1_760_000_000_000
A = Identity.from_seed(b"\x0a" * 32)
B = Identity.from_seed(b"\x0b" * 32)
STRANGER = Identity.from_seed(b"\x0c" * 32)


class Clock:
    def __init__(self) -> None:
        self.ms = NOW

    def __call__(self) -> int:
        return self.ms


def _record(ident: Identity, revoked: bool = False) -> DeviceRecord:
    return DeviceRecord(ident.device_id, ident.public_key, "scale", "patient:x", "ward 3", 1,
                        5 if revoked else None)


@pytest.fixture
def registry() -> dict[str, DeviceRecord]:
    return {A.device_id: _record(A), B.device_id: _record(B)}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(registry: dict[str, DeviceRecord], clock: Clock) -> DeviceStatusBook:
    return DeviceStatusBook(registry.get, StatusLimits(), clock)


def _refusals(book: DeviceStatusBook) -> dict[str, int]:
    return {k: v for k, v in book.counts().items() if v and k != ACCEPTED}


def test_a_valid_status_is_kept_with_the_bridges_receive_time(book: DeviceStatusBook, clock: Clock) -> None:
    book.receive(A.device_id, sign_status(A, NOW - 2_000, 12, 64))
    clock.ms += 1_000
    book.receive(B.device_id, sign_status(B, NOW - 1_000, 0))
    assert book.snapshot() == {A.device_id: DeviceStatus(A.device_id, 12, 64, NOW),
                               B.device_id: DeviceStatus(B.device_id, 0, None, NOW + 1_000)}
    assert book.counts()[ACCEPTED] == 2 and _refusals(book) == {}
    clock.ms += 1_000
    book.receive(A.device_id, sign_status(A, NOW, 3, 63))
    assert book.snapshot()[A.device_id] == DeviceStatus(A.device_id, 3, 63, NOW + 2_000)


def test_each_refusal_is_counted_under_its_own_reason_and_changes_nothing(
        book: DeviceStatusBook, clock: Clock, registry: dict[str, DeviceRecord]) -> None:
    registry[STRANGER.device_id] = _record(STRANGER, revoked=True)
    book.receive(A.device_id, sign_status(A, NOW - 10_000, 5, 50))
    kept = book.snapshot()
    clock.ms += 5_000
    forged = bytearray(sign_status(A, NOW, 99))
    forged[-3] ^= 0x40
    wrong_key = envelope.sign(B, {"v": 1, "msg": STATUS_MARKER, "dev": A.device_id, "ts": NOW, "outbox": 99},
                              kid=A.device_id)
    event = envelope.sign(A, make_payload(A.device_id, 0, NOW, "heart_rate", {"bpm": 60}))
    unregistered = Identity.generate()
    cases = {
        StatusReason.BAD_SIGNATURE: [(A.device_id, bytes(forged)), (A.device_id, wrong_key)],
        StatusReason.TOPIC_MISMATCH: [(B.device_id, sign_status(A, NOW, 99))],
        StatusReason.UNREGISTERED: [(unregistered.device_id, sign_status(unregistered, NOW, 1))],
        StatusReason.REVOKED: [(STRANGER.device_id, sign_status(STRANGER, NOW, 1))],
        StatusReason.TOO_LARGE: [(A.device_id, b"\x00" * 513)],
        StatusReason.CLOCK_SKEW: [(A.device_id, sign_status(A, NOW + 5_000 + 300_001, 99))],
        StatusReason.REPLAYED: [(A.device_id, sign_status(A, NOW - 10_000, 99)),
                                (A.device_id, sign_status(A, NOW - 20_000, 99))],
        StatusReason.NOT_STATUS: [(A.device_id, event)],
    }
    for reason, messages in cases.items():
        for device, payload in messages:
            book.receive(device, payload)
        assert book.counts()[reason] == len(messages), reason
    assert book.snapshot() == kept  # nothing refused touched the book
    assert _refusals(book) == {r.value: len(m) for r, m in cases.items()}
    assert book.counts()[ACCEPTED] == 1


def test_a_device_reporting_too_often_is_rate_limited(book: DeviceStatusBook, clock: Clock) -> None:
    book.receive(A.device_id, sign_status(A, NOW, 1))
    clock.ms += 499
    book.receive(A.device_id, sign_status(A, NOW + 499, 2))  # newer, genuine, but too soon
    assert book.counts()[StatusReason.RATE_LIMITED] == 1
    assert book.snapshot()[A.device_id].outbox_depth == 1
    clock.ms += 1
    book.receive(A.device_id, sign_status(A, NOW + 500, 3))
    assert book.snapshot()[A.device_id].outbox_depth == 3
    assert book.counts()[ACCEPTED] == 2


def test_the_book_holds_only_registered_devices_and_drops_revoked_ones(
        book: DeviceStatusBook, clock: Clock, registry: dict[str, DeviceRecord]) -> None:
    for n in range(50):  # a flood of ids the registry does not know leaves nothing behind
        ident = Identity.generate()
        book.receive(ident.device_id, sign_status(ident, NOW, n))
    book.receive(A.device_id, sign_status(A, NOW, 1))
    book.receive(B.device_id, sign_status(B, NOW, 2))
    assert set(book.snapshot()) == {A.device_id, B.device_id}
    registry[B.device_id] = _record(B, revoked=True)
    assert set(book.snapshot()) == {A.device_id}
    del registry[A.device_id]
    assert book.snapshot() == {}


def test_refusals_are_logged_at_most_once_per_device_per_minute(
        book: DeviceStatusBook, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="carechain.bridge.status")
    for _ in range(20):
        book.receive(A.device_id, b"garbage")
    book.receive(B.device_id, b"garbage")
    assert len(caplog.records) == 2 and book.counts()[StatusReason.MALFORMED] == 21
    clock.ms += 60_000
    book.receive(A.device_id, b"garbage")
    assert len(caplog.records) == 3


def test_readers_and_a_writer_on_other_threads_see_consistent_state(book: DeviceStatusBook, clock: Clock) -> None:
    messages = [sign_status(A, NOW - 100_000 + i, i) for i in range(200)]
    stop = threading.Event()
    seen: list[list[int]] = [[], []]

    def read(depths: list[int]) -> None:
        while not stop.is_set():
            snap = book.snapshot()
            book.counts()
            if A.device_id in snap:
                depths.append(snap[A.device_id].outbox_depth)

    readers = [threading.Thread(target=read, args=(depths,)) for depths in seen]
    for t in readers:
        t.start()
    for m in messages:
        clock.ms += 500
        book.receive(A.device_id, m)
    stop.set()
    for t in readers:
        t.join(timeout=10)
    assert book.snapshot()[A.device_id].outbox_depth == 199 and book.counts()[ACCEPTED] == 200
    assert all(depths == sorted(depths) for depths in seen)  # never an older status after a newer one

"""The ingest spine's stages one at a time: receive, check, guards, sequence (dedup), append, receipt."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carechain import envelope
from carechain.config import Limits
from carechain.entries import Registration, event_entry, registration_entry
from carechain.errors import Reason
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.receipts import event_digest
from chain_bridge.ingest import EventCandidate, Inbox, Receiver, Rejection, Sequencer, check_batch
from chain_bridge.ledger.dedup import Anchored, Conflict, Dedup, Duplicate
from chain_bridge.ledger.store import Ledger

OPERATOR = Identity.from_seed(b"\x11" * 32)
DEV = Identity.from_seed(b"\x12" * 32)
LATE = Identity.from_seed(b"\x13" * 32)


def now_ms() -> int:
    return int(time.time() * 1000)


def event(ident: Identity, seq: int, bpm: int = 70) -> bytes:
    return envelope.sign(ident, make_payload(ident.device_id, seq, now_ms(), "heart_rate", {"bpm": bpm}))


def topic(ident: Identity) -> str:
    return f"cc/v1/dev/{ident.device_id}/ev"


def register(ledger: Ledger, ident: Identity) -> None:
    reg = Registration(dev=ident.device_id, pk=ident.public_key, profile="heart_rate_band", owner="patient:a",
                       site="ward", ts=now_ms())
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])


def candidate(raw: bytes, ident: Identity, seq: int) -> EventCandidate:
    return EventCandidate(ident.device_id, seq, event_entry(raw).encode(), event_digest(raw), "heart_rate")


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    register(led, DEV)
    return led


def test_the_inbox_hands_over_at_most_batch_max_and_nothing_when_idle() -> None:
    inbox = Inbox()
    assert inbox.drain(0.01, 10) == []
    for i in range(5):
        inbox.put(f"t/{i}", b"x")
    first = inbox.drain(0.01, 3)
    assert [m.topic for m in first] == ["t/0", "t/1", "t/2"]
    assert [m.topic for m in inbox.drain(0.01, 3)] == ["t/3", "t/4"]


def test_a_message_on_a_non_event_topic_is_a_bad_topic_rejection_for_nobody(ledger: Ledger) -> None:
    receiver = Receiver(ledger, Limits(), batch_max=10)
    [verdict] = check_batch(receiver.ingest, [("cc/v1/dev/UPPER/ev", event(DEV, 0))], now_ms())
    assert isinstance(verdict, Rejection)
    assert (verdict.reason, verdict.device_id, verdict.receipted) == (Reason.BAD_TOPIC, None, False)


def test_the_receiver_sees_a_registration_committed_after_it_started(ledger: Ledger, tmp_path: Path) -> None:
    receiver = Receiver(ledger, Limits(), batch_max=10)
    receiver.inbox.put(topic(LATE), event(LATE, 0))
    [before] = receiver.receive(0.01)
    assert isinstance(before, Rejection) and before.reason == Reason.UNREGISTERED and before.retryable
    register(Ledger(tmp_path / "ledger.db"), LATE)  # `carechain register` from another process
    receiver.inbox.put(topic(LATE), event(LATE, 0))
    [after] = receiver.receive(0.01)
    assert isinstance(after, EventCandidate) and after.device_id == LATE.device_id


def test_every_rejection_the_check_stage_gives_is_a_listed_reason(ledger: Ledger) -> None:
    receiver = Receiver(ledger, Limits(max_event_bytes=600), batch_max=10)
    stale = envelope.sign(DEV, make_payload(DEV.device_id, 1, 1, "heart_rate", {"bpm": 70}))
    too_fast = envelope.sign(DEV, {"v": 1, "dev": DEV.device_id, "seq": 2, "ts": now_ms(), "kind": "heart_rate",
                                   "body": {"bpm": 900}})  # signed, but outside the body's model
    hostile = [(topic(DEV), b"\xa0"), (topic(DEV), b"x" * 700), (topic(LATE), event(DEV, 0)),
               (topic(LATE), event(LATE, 0)), (topic(DEV), stale), (topic(DEV), too_fast)]
    verdicts = receiver.check(hostile)
    assert all(isinstance(v, Rejection) for v in verdicts)
    reasons = [v.reason for v in verdicts if isinstance(v, Rejection)]
    assert reasons == [Reason.NOT_COSE_SIGN1, Reason.TOO_LARGE, Reason.TOPIC_MISMATCH, Reason.UNREGISTERED,
                       Reason.TOO_OLD, Reason.BAD_BODY]
    assert all(isinstance(r, Reason) for r in reasons)


def test_dedup_tells_a_resend_from_a_reused_seq_in_the_log_and_in_the_batch(ledger: Ledger) -> None:
    raw = event(DEV, 0)
    [appended] = ledger.append_events([candidate(raw, DEV, 0)])
    anchored = ledger._anchored_among([(DEV.device_id, 0), (DEV.device_id, 1)])  # the batch's one read of the log
    dedup = Dedup(lambda device_id, seq: anchored.get((device_id, seq)))
    same = leaf_hash(event_entry(raw).encode())
    assert dedup.check(DEV.device_id, 0, same) == Duplicate(appended.index)
    assert dedup.check(DEV.device_id, 0, b"\x00" * 32) == Conflict(appended.index)
    assert dedup.check(DEV.device_id, 1, b"\x01" * 32) is None
    dedup.remember(DEV.device_id, 1, Anchored(99, b"\x01" * 32))  # appended earlier in this batch
    assert dedup.check(DEV.device_id, 1, b"\x01" * 32) == Duplicate(99)
    assert dedup.check(DEV.device_id, 1, b"\x02" * 32) == Conflict(99)


def test_dedup_composes_with_another_index() -> None:
    calls: list[tuple[str, int]] = []

    def index(device_id: str, seq: int) -> Anchored | None:
        calls.append((device_id, seq))
        return Anchored(7, b"h") if seq == 3 else None

    dedup = Dedup(index)
    assert dedup.check("d", 3, b"h") == Duplicate(7) and dedup.check("d", 4, b"h") is None
    assert calls == [("d", 3), ("d", 4)]


def test_the_sequencer_receipts_only_what_it_committed_and_reacks_resends(ledger: Ledger) -> None:
    seq = Sequencer(ledger, Limits(max_seq_gap=10))
    e0, e1, far = event(DEV, 0), event(DEV, 1), event(DEV, 50)
    size = ledger.size
    batch = seq.sequence([candidate(e0, DEV, 0), candidate(e1, DEV, 1), candidate(far, DEV, 50),
                          candidate(e0, DEV, 0)], now_ms())
    assert (batch.anchored, batch.duplicates, ledger.size) == (2, 1, size + 2)
    [rcpt] = batch.receipts.values()
    assert rcpt.ok == [(0, size), (1, size + 1), (0, size)]
    assert [(r.seq, r.reason, r.retryable) for r in rcpt.rejected] == [(50, "seq_gap", False)]
    reused = seq.sequence([candidate(event(DEV, 1, bpm=71), DEV, 1)], now_ms())
    assert [r.reason for r in reused.rejections] == [Reason.SEQ_REUSED] and ledger.size == size + 2

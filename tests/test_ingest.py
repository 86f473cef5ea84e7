"""Bridge ingest + ledger without a broker: each hostile input gets its reason and changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carechain import envelope
from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.receipts import event_digest
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import Ledger

OPERATOR = Identity.from_seed(b"\x01" * 32)
LOG_KEY = Identity.from_seed(b"\x02" * 32)
DEV = Identity.from_seed(b"\x03" * 32)
ROGUE = Identity.from_seed(b"\x04" * 32)


def now_ms() -> int:
    return int(time.time() * 1000)


def event(ident: Identity, seq: int, *, ts: int | None = None, bpm: int = 70, kid: str | None = None) -> bytes:
    payload = make_payload(kid or ident.device_id, seq, now_ms() if ts is None else ts, "heart_rate", {"bpm": bpm})
    return envelope.sign(ident, payload, kid=kid)


def topic(dev: str) -> str:
    return f"cc/v1/dev/{dev}/ev"


@pytest.fixture
def bridge(tmp_path: Path) -> Bridge:
    ledger = Ledger(tmp_path / "ledger.db")
    reg = Registration(dev=DEV.device_id, pk=DEV.public_key, profile="heart_rate_band", owner="patient:a",
                       site="ward", ts=now_ms())
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])
    cfg = BridgeConfig(data_dir=tmp_path, limits=Limits(max_event_bytes=1024, max_seq_gap=100))
    return Bridge(cfg, BrokerConfig(), LOG_KEY, ledger)  # not started: process() is driven directly


def test_valid_events_are_appended_once_and_duplicates_reacknowledged(bridge: Bridge) -> None:
    e0, e1 = event(DEV, 0), event(DEV, 1)
    bridge.process([(topic(DEV.device_id), e0), (topic(DEV.device_id), e1), (topic(DEV.device_id), e0)])
    assert bridge.stats.anchored == 2 and bridge.stats.duplicates == 1
    size = bridge.ledger.size
    bridge.process([(topic(DEV.device_id), e1)])
    assert bridge.ledger.size == size  # re-acknowledged, not appended
    assert bridge.ledger.event_index(DEV.device_id, 1) == 2  # leaf 0 is the registration


def test_a_resend_is_found_among_dense_and_scattered_seqs_of_a_batch(bridge: Bridge) -> None:
    """Dedup reads a batch's (device, seq) rows as one key range per device when its seqs are dense, one key at a
    time when they are scattered: either way a resend gets its own leaf back and a new seq gets a new one."""
    sent = {seq: event(DEV, seq) for seq in [*range(10), 60]}
    bridge.process([(topic(DEV.device_id), e) for e in sent.values()])
    leaves = {seq: bridge.ledger.event_index(DEV.device_id, seq) for seq in sent}
    for resend in ([0, 3, 9, 10, 11], [0, 60, 12], [60]):  # dense, scattered, alone
        before = bridge.stats.duplicates
        fresh = [seq for seq in resend if seq not in sent]
        sent.update({seq: event(DEV, seq) for seq in fresh})
        bridge.process([(topic(DEV.device_id), sent[seq]) for seq in resend])
        assert bridge.stats.duplicates - before == len(resend) - len(fresh)
        for seq in resend:
            leaves.setdefault(seq, bridge.ledger.event_index(DEV.device_id, seq))
            assert bridge.ledger.event_index(DEV.device_id, seq) == leaves[seq]
    assert bridge.ledger.count_events() == len(sent) == len(set(leaves.values()))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (DEV.device_id, event(ROGUE, 5, kid=DEV.device_id)), "bad_signature"),
        (lambda: (ROGUE.device_id, event(ROGUE, 0)), "unregistered"),
        (lambda: (DEV.device_id, b"\x00" * 2048), "too_large"),
        (lambda: (DEV.device_id, b"\xff\xfe garbage"), "malformed"),
        (lambda: (ROGUE.device_id, event(DEV, 0)), "topic_mismatch"),
        (lambda: (DEV.device_id, event(DEV, 0, ts=now_ms() + 3_600_000)), "clock_skew"),
        (lambda: (DEV.device_id, event(DEV, 0, ts=now_ms() - 90 * 86_400_000)), "too_old"),
        (lambda: (DEV.device_id, event(DEV, 500)), "seq_gap"),
    ],
)
def test_hostile_input_is_rejected_with_its_reason_and_changes_nothing(bridge: Bridge, make, reason: str) -> None:
    device, raw = make()
    before = bridge.ledger.size
    bridge.process([(topic(device), raw)])
    assert dict(bridge.stats.rejected) == {reason: 1}
    assert bridge.ledger.size == before
    assert bridge.stats.anchored == 0


def test_a_different_event_with_a_used_seq_is_rejected_as_seq_reused(bridge: Bridge) -> None:
    bridge.process([(topic(DEV.device_id), event(DEV, 0, bpm=70))])
    size = bridge.ledger.size
    replayed = event(DEV, 0, bpm=99)
    bridge.process([(topic(DEV.device_id), replayed)])
    assert dict(bridge.stats.rejected) == {"seq_reused": 1}
    assert bridge.ledger.size == size


def test_rejections_carry_the_digest_of_the_refused_bytes(bridge: Bridge) -> None:
    raw = event(ROGUE, 5, kid=DEV.device_id)
    verdict = bridge.ingest.check(DEV.device_id, raw, now_ms())
    assert verdict.digest == event_digest(raw)


def test_a_revoked_device_is_refused(bridge: Bridge) -> None:
    from carechain.entries import Revocation, revocation_entry

    rev = Revocation(dev=DEV.device_id, reason="lost", ts=now_ms())
    bridge.ledger.append_revocation(revocation_entry(OPERATOR, rev), rev)
    bridge.process([(topic(DEV.device_id), event(DEV, 0))])
    assert dict(bridge.stats.rejected) == {"revoked": 1}


def test_a_revocation_committed_after_the_check_still_stops_the_append(bridge: Bridge, tmp_path: Path) -> None:
    from carechain.entries import Revocation, revocation_entry

    checked = bridge.ingest.check(DEV.device_id, event(DEV, 0), now_ms())  # registry says: registered
    other = Ledger(tmp_path / "ledger.db")  # e.g. `carechain` revoking from another process, meanwhile
    rev = Revocation(dev=DEV.device_id, reason="stolen", ts=now_ms())
    revoked_at = other.append_revocation(revocation_entry(OPERATOR, rev), rev)
    size = other.size
    bridge.sequence([checked])
    assert dict(bridge.stats.rejected) == {"revoked": 1} and bridge.stats.anchored == 0
    assert bridge.ledger.size == size == revoked_at + 1


def test_a_non_event_topic_is_counted(bridge: Bridge) -> None:
    bridge.process([("cc/v1/dev/UPPER/ev", event(DEV, 0))])
    assert dict(bridge.stats.rejected) == {"bad_topic": 1}


def test_ledger_reopens_with_the_same_root(bridge: Bridge, tmp_path: Path) -> None:
    bridge.process([(topic(DEV.device_id), event(DEV, s)) for s in range(20)])
    root, size = bridge.ledger.tree.root(), bridge.ledger.size
    reopened = Ledger(tmp_path / "ledger.db")
    assert (reopened.tree.root(), reopened.size) == (root, size)

"""The durable outbox: seq never repeats, events leave only on receipt or quarantine, and the disk quota
policy is applied as configured — every loss counted and persisted, never silent."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox, OutboxFull, Quota, QuotaPolicy

DEV = "aaaaaaaaaaaaaaaa"


def blob(seq: int, size: int = 400) -> bytes:
    return seq.to_bytes(8, "big") * (size // 8)


def fill(box: Outbox, n: int, device: str = DEV, batch: int = 50) -> list[int]:
    seqs: list[int] = []
    for _ in range(0, n, batch):
        seqs += box.add_many(device, [lambda s: blob(s) for _ in range(batch)])
    return seqs


def test_seq_survives_reopen_and_never_repeats(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert fill(box, 100) == list(range(100))
    box.ack(DEV, range(100))
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert again.add(DEV, blob) == 100
    assert again.depth() == 1


def test_ack_deletes_only_the_named_events_and_reports_how_many(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    fill(box, 100)
    assert box.ack(DEV, [3, 4, 5, 999]) == 3
    assert box.ack(DEV, [3]) == 0  # a re-acknowledgement deletes nothing
    assert box.depth() == 97


def test_refuse_new_keeps_every_signed_event_and_counts_the_refused(tmp_path: Path, caplog) -> None:
    box = Outbox(tmp_path / "o.db", Quota(max_bytes=256 * 1024, policy=QuotaPolicy.REFUSE_NEW))
    signed = 0
    refused = 0
    with caplog.at_level(logging.ERROR, "carechain.agent.outbox"):
        for _ in range(40):
            try:
                signed += len(box.add_many(DEV, [blob] * 50))
            except OutboxFull as exc:
                assert "refuse_new" in str(exc)
                refused += 50
    assert refused > 0 and signed + refused == 2000
    assert box.depth() == signed  # nothing signed was deleted
    assert box.next_seq(DEV) == signed  # no seq was burnt on refused readings
    assert box.losses() == {"refuse_new": refused}
    assert sum("refused" in r.message for r in caplog.records) == 1  # logged once a minute, counted always
    box.ack(DEV, range(signed))
    assert box.add_many(DEV, [blob]) == [signed]  # room again after the drain


def test_drop_oldest_keeps_the_newest_and_records_exactly_which_seqs_went(tmp_path: Path) -> None:
    quota = 256 * 1024
    box = Outbox(tmp_path / "o.db", Quota(max_bytes=quota, policy=QuotaPolicy.DROP_OLDEST))
    fill(box, 2000)
    assert box.used_bytes() <= quota
    kept = {row.seq for row in box.pending_after(0, 10_000)}
    assert 1999 in kept and 0 not in kept
    dropped: set[int] = set()
    for loss in box.loss_records():
        assert loss.policy == "drop_oldest" and loss.first_seq is not None and loss.last_seq is not None
        dropped |= set(range(loss.first_seq, loss.last_seq + 1))
    assert dropped | kept == set(range(2000)) and not dropped & kept  # every event accounted for
    assert box.losses() == {"drop_oldest": len(dropped)}
    box.close()
    assert Outbox(tmp_path / "o.db").losses() == {"drop_oldest": len(dropped)}  # persisted


@pytest.mark.parametrize("policy", list(QuotaPolicy))
def test_under_the_quota_nothing_is_lost(tmp_path: Path, policy: QuotaPolicy) -> None:
    box = Outbox(tmp_path / "o.db", Quota(max_bytes=64 << 20, policy=policy))
    fill(box, 1000)
    assert box.depth() == 1000 and box.losses() == {}

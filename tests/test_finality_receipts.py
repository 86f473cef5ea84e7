"""Receipts and the agent's outbox say whether an anchored event is final.

A receipt carries `fin`, the tree size of the latest final checkpoint the bridge knows; a receipt without
entries tells a device that its earlier leaves became final. The outbox keeps each receipted event's leaf
until a final checkpoint covers it, so a terminal can wait for finality before handing over an Rx drug.
Real keys, real COSE receipts, a real SQLite outbox.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from carechain import envelope, topics
from carechain.config import BrokerConfig
from carechain.identity import Identity
from carechain.receipts import Receipt, ReceiptError, open_receipt
from edge_agent import outbox as outbox_module
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox

BRIDGE = Identity.from_seed(b"\x25" * 32)
DEV = Identity.from_seed(b"\x26" * 32)


def test_a_receipt_says_which_leaves_were_final_and_older_readers_ignore_it() -> None:
    receipt = Receipt(DEV.device_id, 7, ok=[(0, 10), (1, 12)], ok_digests=[b"\x01" * 32, b"\x02" * 32], final_size=11)
    data = receipt.seal(BRIDGE)
    back = open_receipt(data, BRIDGE.public_key, DEV.device_id)
    assert back.final_size == 11 and back.is_final(10) and not back.is_final(12)
    assert all(p.final_size == 11 for p in Receipt(DEV.device_id, 1, ok=[(s, s) for s in range(600)],
                                                   final_size=11).split())
    assert envelope.parse(data).payload["fin"] == 11
    plain = open_receipt(Receipt(DEV.device_id, 7, ok=[(0, 10)]).seal(BRIDGE), BRIDGE.public_key, DEV.device_id)
    assert plain.final_size is None and not plain.is_final(0)  # a bridge that does not track finality


def test_a_receipt_with_a_bad_fin_is_refused() -> None:
    bad = envelope.sign(BRIDGE, {"v": 1, "ok": [], "ts": 1, "dev": DEV.device_id, "fin": -1, "rej": []})
    with pytest.raises(ReceiptError, match="fin"):
        open_receipt(bad, BRIDGE.public_key, DEV.device_id)


def test_the_outbox_keeps_receipted_leaves_until_a_final_checkpoint_covers_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert box.record_anchored(DEV.device_id, [(0, 10), (1, 11), (2, 20)], final_size=11) == 1  # leaf 10 is final
    assert [box.anchored(DEV.device_id, s).final for s in range(3)] == [True, False, False]  # type: ignore[union-attr]
    assert box.awaiting_finality(DEV.device_id) == 2 and box.final_size() == 11
    assert box.mark_final(21) == 2 and box.awaiting_finality() == 0
    assert box.mark_final(15) == 0 and box.final_size() == 21  # finality never goes back
    assert box.record_anchored(DEV.device_id, [(3, 19)], final_size=None) == 1  # a leaf already covered: final at once
    assert box.anchored(DEV.device_id, 3).final  # type: ignore[union-attr]
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert again.final_size() == 21 and again.anchored(DEV.device_id, 2) is not None


def test_only_the_newest_final_rows_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "KEEP_FINAL", 3)
    box = Outbox(tmp_path / "o.db")
    box.record_anchored(DEV.device_id, [(s, s) for s in range(10)], final_size=None)
    box.mark_final(8)
    kept = [s for s in range(10) if box.anchored(DEV.device_id, s) is not None]
    assert kept == [5, 6, 7, 8, 9]  # three final ones, and the two not final yet


def test_at_most_max_anchored_rows_are_kept_while_nothing_becomes_final(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bridge whose miners stopped cosigning must not fill the agent's disk: the oldest receipted rows go."""
    monkeypatch.setattr(outbox_module, "KEEP_FINAL", 2)
    monkeypatch.setattr(outbox_module, "MAX_ANCHORED", 10)
    monkeypatch.setattr(outbox_module, "PRUNE_EVERY", 4)
    box = Outbox(tmp_path / "o.db")
    for first in range(0, 40, 4):
        box.record_anchored(DEV.device_id, [(s, s) for s in range(first, first + 4)], final_size=None)
    assert box.awaiting_finality() == 8 and box.anchored(DEV.device_id, 31) is None
    box.close()
    again = Outbox(tmp_path / "o.db")  # a restarted agent does not know the count: it counts at its first pruning
    again.record_anchored(DEV.device_id, [(s, s) for s in range(40, 44)], final_size=None)
    assert again.awaiting_finality() == 8 and [s for s in range(44) if again.anchored(DEV.device_id, s)] == \
        list(range(36, 44))


def test_a_healthy_agent_does_not_walk_the_rows_not_final_at_each_pruning(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Far below MAX_ANCHORED, pruning deletes old final rows only: the walk over MAX_ANCHORED index entries that
    bounds the rows not final (milliseconds each time) runs once, to count them, not at every receipt."""
    monkeypatch.setattr(outbox_module, "PRUNE_EVERY", 1)
    box = Outbox(tmp_path / "o.db")
    statements: list[str] = []
    box._acks.set_trace_callback(statements.append)
    for seq in range(20):
        box.record_anchored(DEV.device_id, [(seq, seq)], final_size=seq)
    walks = [s for s in statements if "final = 0 ORDER BY" in s]
    assert len(walks) == 1 and box.awaiting_finality() == 1  # leaf 19: not yet covered by a final size of 19


def test_the_agent_marks_its_events_final_from_receipts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    agent = Agent([AgentDevice(DEV, None)], box, BrokerConfig(), BRIDGE.public_key)
    seqs = box.add_many(DEV.device_id, [lambda s: b"sale-%d" % s] * 2)
    digests = [hashlib.sha256(b"sale-%d" % s).digest() for s in seqs]
    topic = topics.receipts(DEV.device_id)
    receipt = Receipt(DEV.device_id, 1, final_size=5)
    receipt.acknowledge(seqs[0], 7, digests[0])
    receipt.acknowledge(seqs[1], 8, digests[1])
    agent._on_receipt(DEV.device_id, topic, receipt.seal(BRIDGE))
    assert box.depth() == 0 and box.awaiting_finality(DEV.device_id) == 2
    # Later, the bridge tells the device that a final checkpoint of 8 leaves covers leaf 7 only.
    agent._on_receipt(DEV.device_id, topic, Receipt(DEV.device_id, 2, final_size=8).seal(BRIDGE))
    assert box.anchored(DEV.device_id, seqs[0]).final and not box.anchored(DEV.device_id, seqs[1]).final  # type: ignore[union-attr]
    forged = Receipt(DEV.device_id, 3, final_size=100).seal(Identity.generate())  # not the bridge's key
    agent._on_receipt(DEV.device_id, topic, forged)
    assert box.awaiting_finality(DEV.device_id) == 1 and agent.stats.bad_receipts == 1
    agent._on_receipt(DEV.device_id, topic, Receipt(DEV.device_id, 4, final_size=9).seal(BRIDGE))
    assert box.awaiting_finality(DEV.device_id) == 0 and agent.stats.final == 2

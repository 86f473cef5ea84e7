"""An `ok` receipt is bound to the event's bytes: it names their digest, and an agent deletes an event only
when the digest is its own. A clone of the device (its key, its disk image) that publishes other bytes
under a pending seq gets its forgery anchored — but can no longer get the genuine reading deleted: the
agent quarantines it as `receipt_mismatch` and raises the alarm.

Receipts stay readable both ways across an upgrade: the digests (`okd`) and the highest anchored seq
(`hi`) are extra keys of version 1 that readers of the first layout ignore.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

import pytest

from carechain import envelope, topics
from carechain.config import BrokerConfig
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.receipts import Receipt, Rejected, open_receipt
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import RECEIPT_MISMATCH, Outbox
from tests.test_pipeline import register

BRIDGE = Identity.from_seed(b"\x15" * 32)
DEV = Identity.from_seed(b"\x16" * 32)


def _first_layout_reader(data: bytes, bridge_pk: bytes, device: str) -> tuple[list[tuple[int, int]], list[tuple]]:
    """What an agent of the first receipt layout reads (carechain.receipts.open_receipt before `okd`/`hi`)."""
    msg = envelope.parse(data, max_bytes=1 << 20)
    assert msg.verify(bridge_pk)
    p = msg.payload
    assert p["v"] == 1 and p["dev"] == device
    ok = [(int(s), int(i)) for s, i in p["ok"]]
    rej = [(s, str(r), str(d), bool(t), bytes(h)) for s, r, d, t, h in p["rej"]]
    return ok, rej


def test_a_bound_receipt_round_trips_and_an_agent_of_the_first_layout_still_reads_it() -> None:
    digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    receipt = Receipt(DEV.device_id, 7, ok=[(0, 10), (1, 11), (2, 12)], ok_digests=digests,
                      rejected=[Rejected(5, "seq_reused", "x", False, b"\x01" * 32)], highest_seq=41)
    data = receipt.seal(BRIDGE)
    back = open_receipt(data, BRIDGE.public_key, DEV.device_id)
    assert back.bound and back.acknowledged() == [(0, 10, digests[0]), (1, 11, digests[1]), (2, 12, digests[2])]
    assert back.highest_seq == 41
    old_ok, old_rej = _first_layout_reader(data, BRIDGE.public_key, DEV.device_id)
    assert old_ok == receipt.ok and [r[0] for r in old_rej] == [5]


def test_a_receipt_of_an_older_bridge_is_read_as_unbound() -> None:
    old = Receipt(DEV.device_id, 7, ok=[(0, 10)]).seal(BRIDGE)  # no `okd`, as a bridge before this change
    back = open_receipt(old, BRIDGE.public_key, DEV.device_id)
    assert not back.bound and back.acknowledged() == [(0, 10, None)] and back.highest_seq is None


def test_split_keeps_each_digest_with_its_seq() -> None:
    n = 1100
    big = Receipt("abc", 1, ok=[(s, s + 3) for s in range(n)],
                  ok_digests=[hashlib.sha256(s.to_bytes(4, "big")).digest() for s in range(n)])
    opened = [open_receipt(p.seal(BRIDGE), BRIDGE.public_key, "abc") for p in big.split()]
    assert [a for r in opened for a in r.acknowledged()] == big.acknowledged()


def test_outbox_deletes_on_our_digest_and_quarantines_on_another(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    seqs = box.add_many(DEV.device_id, [lambda s: b"genuine-%d" % s] * 3)
    ours = [hashlib.sha256(b"genuine-%d" % s).digest() for s in seqs]
    deleted, mismatched = box.ack_bound(DEV.device_id, [(0, ours[0]), (1, b"\x00" * 32), (9, ours[2])])
    assert (deleted, mismatched) == ([0], [1])
    assert box.depth() == 1 and box.quarantined() == 1
    row = box._db.execute("SELECT seq, reason FROM quarantine").fetchone()
    assert tuple(row) == (1, RECEIPT_MISMATCH)
    assert box.ack_bound(DEV.device_id, [(0, ours[0])]) == ([], [])  # a re-ack deletes nothing


def test_outbox_acks_scattered_seqs_as_well_as_a_run_of_them(tmp_path: Path) -> None:
    """A receipt's seqs are read in one range when dense and one by one when scattered: both delete the same."""
    box = Outbox(tmp_path / "o.db")
    seqs = box.add_many(DEV.device_id, [lambda s: b"e-%d" % s] * 200)
    digest = {s: hashlib.sha256(b"e-%d" % s).digest() for s in seqs}
    scattered = [3, 97, 150, 199]  # spread over 197 seqs: looked up one by one
    assert box.ack_bound(DEV.device_id, [(s, digest[s]) for s in scattered]) == (scattered, [])
    run = list(range(10, 60))
    assert box.ack_bound(DEV.device_id, [(s, digest[s]) for s in run] + [(3, digest[3])]) == (run, [])
    assert box.depth() == 200 - len(scattered) - len(run)


@pytest.mark.integration
async def test_a_clones_forgery_under_a_pending_seq_does_not_delete_the_genuine_reading(
        tmp_path: Path, broker, running_bridge, caplog: pytest.LogCaptureFixture) -> None:
    bridge = running_bridge
    device = Identity.generate()
    register(bridge.ledger, [device])
    outbox = Outbox(tmp_path / "agent" / "outbox.db")
    # window=0: the agent listens for receipts but sends nothing, so the clone's event lands first.
    agent = Agent([AgentDevice(device, None)], outbox, broker.config, bridge.log_key.public_key, window=0,
                  client_id=f"binding-{tmp_path.name}")
    assert agent.record(device.device_id, [("heart_rate", {"bpm": 71})]) == [0]
    forged = envelope.sign(device, make_payload(device.device_id, 0, int(time.time() * 1000), "heart_rate",
                                                {"bpm": 180}))
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, "carechain.agent"):
        task = asyncio.create_task(agent.run(stop))
        deadline = time.monotonic() + 20
        while device.device_id not in agent.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the receipt subscription is in place
        clone = agent._clients[device.device_id]  # the clone publishes as the device does
        clone.publish(topics.events(device.device_id), forged, qos=1)
        while outbox.depth() and time.monotonic() < deadline:  # until the forgery's receipt is applied
            await asyncio.sleep(0.05)
        stop.set()
        await task
    assert bridge.ledger.event_index(device.device_id, 0) is not None  # the forgery is anchored...
    assert outbox.depth() == 0 and outbox.quarantined() == 1  # ...but the genuine reading is kept
    assert agent.stats.receipt_mismatches == 1 and agent.stats.acked == 0
    kept = bytes(outbox._db.execute("SELECT envelope FROM quarantine").fetchone()[0])
    assert envelope.parse(kept).payload["body"] == {"bpm": 71}
    assert any("ALARM" in r.message and device.device_id in r.message for r in caplog.records)


def test_a_new_agent_still_deletes_on_an_older_bridges_unbound_receipt_and_counts_it(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    agent = Agent([AgentDevice(DEV, None)], outbox, BrokerConfig(), BRIDGE.public_key)
    agent.record(DEV.device_id, [("heart_rate", {"bpm": 70})] * 2)
    old = Receipt(DEV.device_id, 1, ok=[(0, 4), (1, 5)]).seal(BRIDGE)  # no `okd`
    agent._on_receipt(DEV.device_id, topics.receipts(DEV.device_id), old)
    assert outbox.depth() == 0 and agent.stats.acked == 2 and agent.stats.unbound_acks == 2

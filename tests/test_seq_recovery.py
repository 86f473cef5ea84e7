"""Losing or restoring the outbox costs no readings: the seq counter lives in outbox.db, so an agent that
starts on a fresh (or restored) outbox signs seqs the bridge has anchored already. The bridge refuses them
as `seq_reused` and says, in the signed receipt, the device's highest anchored seq; the agent moves its
counter past it and re-signs the refused readings. Real processes: mosquitto, `carechain bridge`,
`carechain agent`.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from carechain import envelope
from carechain.identity import Identity
from carechain.receipts import Receipt, Rejected, open_receipt
from edge_agent.outbox import Outbox
from simulators import fault_harness as faults
from simulators.mosquitto import REPO, mosquitto_binary

DEV = Identity.from_seed(b"\x21" * 32)


def test_resign_moves_the_counter_past_the_anchored_seq_and_keeps_the_reading(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")

    def sign(seq: int) -> bytes:
        return envelope.sign(DEV, {"v": 1, "dev": DEV.device_id, "seq": seq, "ts": 5, "kind": "k", "body": {}})

    box.add_many(DEV.device_id, [sign, sign, sign])  # seqs 0, 1, 2: a fresh outbox after a loss
    row = box.pending_after(0, 10)[1]
    digest = hashlib.sha256(row.envelope).digest()

    def resign(old: bytes, seq: int) -> bytes:
        payload = dict(envelope.parse(old).payload)
        payload["seq"] = seq
        return envelope.sign(DEV, payload)

    assert box.resign(DEV.device_id, 1, b"\x00" * 32, 40, resign) is None  # not our bytes: untouched
    assert box.resign(DEV.device_id, 1, digest, 40, resign) == 41
    assert box.next_seq(DEV.device_id) == 42
    assert sorted(p.seq for p in box.pending_after(0, 10)) == [0, 2, 41]
    assert box.advance(DEV.device_id, 10) == 42  # never back
    assert box.advance(DEV.device_id, 99) == 100


def test_a_seq_reused_refusal_carries_the_highest_anchored_seq() -> None:
    key = Identity.generate()
    r = Receipt(DEV.device_id, 1, rejected=[Rejected(3, "seq_reused", "x", False, b"\x02" * 32)], highest_seq=977)
    assert open_receipt(r.seal(key), key.public_key, DEV.device_id).highest_seq == 977


def _quarantined(outbox: Path) -> int:
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])
    finally:
        db.close()


def _depth(agent: faults.AgentProcess) -> int | None:
    try:
        return agent.depth_and_signed()[0] if agent.outbox.exists() else None
    except sqlite3.OperationalError:  # the new outbox is being created
        return None


@pytest.mark.integration
@pytest.mark.skipif(mosquitto_binary() is None, reason="needs a real mosquitto")
def test_an_agent_whose_outbox_was_deleted_keeps_getting_its_readings_anchored(tmp_path: Path) -> None:
    with faults.Fleet(tmp_path, agents=1, devices_per_agent=2) as fleet:
        agent = fleet.agents[0]
        fleet.start(produce_s=3.0)
        first = fleet.wait_drained("first run", time.monotonic(), timeout=90)
        assert first.drained and first.lost == 0
        agent.stop()
        signed_first = sum(agent.depth_and_signed()[1].values())
        assert signed_first > 50
        for suffix in ("", "-wal", "-shm"):  # the outbox is lost (or a stale backup would be restored)
            Path(f"{agent.outbox}{suffix}").unlink(missing_ok=True)

        proc = subprocess.Popen(faults._cli("agent", "--config", str(agent.config), "--produce-seconds", "3"),
                                stdout=subprocess.PIPE, stderr=agent.log.open("ab"), cwd=REPO, env=faults._env())
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                said = agent.log.read_text(errors="replace").count("stopped producing")
                if said >= 2 and _depth(agent) == 0:
                    break
                time.sleep(0.25)
            time.sleep(1.0)  # the last receipts settle
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        summary = json.loads(out.strip().splitlines()[-1])
        counts = faults.ledger_event_counts(fleet.ledger_file)
        quarantined = _quarantined(agent.outbox)
    assert summary["signed"] > 0
    assert quarantined == 0, f"{quarantined} readings refused after the outbox was lost"
    assert summary["resigned"] > 0  # some new readings did collide with anchored seqs and were re-signed
    assert max(counts.values()) == 1  # nothing anchored twice
    # The first run anchored a key for this epoch: the new outbox's epoch_key is refused (one per device; none if
    # the hour turned in between), and the agent re-keys under the next key epoch instead of quarantining anything
    # (tests/test_agent_sealing.py checks the re-keying itself). Every reading of both runs is in the log.
    assert summary["rekeyed"] <= len(agent.device_ids)
    assert sum(counts.values()) == signed_first + summary["signed"] - summary["rekeyed"]
    assert summary["outbox_left"] == 0

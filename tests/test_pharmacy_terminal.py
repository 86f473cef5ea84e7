"""The pharmacy terminal simulator: every sale line arrives in the log signed by the terminal's own key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from carechain import envelope
from carechain.entries import Entry
from carechain.events import validate_payload
from carechain.identity import Identity
from simulators.pharmacy_terminal import ring_up
from tests.test_pipeline import register

pytestmark = pytest.mark.integration


def test_every_sale_is_anchored_exactly_as_rung_up(tmp_path: Path, broker, running_bridge) -> None:
    bridge = running_bridge
    terminal = Identity.generate()
    register(bridge.ledger, [terminal])
    summary = asyncio.run(ring_up(terminal, broker.config, bridge.log_key.public_key, tmp_path / "t", 15))
    assert summary["receipted"] == 15 and summary["pending"] == 0 and summary["quarantined"] == 0
    anchored = []
    for seq in range(15):
        cose = Entry.decode(bridge.ledger.entry(bridge.ledger.event_index(terminal.device_id, seq))).cose
        msg = envelope.parse(cose)
        assert msg.verify(terminal.public_key)  # the terminal's own key, not the bridge's
        event = validate_payload(msg.payload)
        assert event.kind == "purchase"
        anchored.append({k: v for k, v in event.body.items() if v is not None})
    assert anchored == summary["sales"]
    assert all(line["rx_ref"] for line in anchored if line["rx_only"])
    assert {line["code_system"] for line in anchored} <= {"ndc", "rxnorm", "gtin"}

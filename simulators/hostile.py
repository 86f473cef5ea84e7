"""Shared material for fuzzing the ingest path (tests/test_fuzz.py and bench/fuzz.py use the same).

`documented_reasons()` reads the rejection table of docs/protocol.md — the contract with device makers — so a
fuzzer's verdicts are checked against the documentation, not against a copy of it. `SAMPLE_BODIES` are one
valid body per event kind, the seeds that mutation starts from.
"""

from __future__ import annotations

import re
from pathlib import Path

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

SAMPLE_BODIES: list[tuple[str, dict[str, object]]] = [
    ("heart_rate", {"bpm": 72}), ("heart_rate", {"bpm": 61, "rr_intervals_1024": [800, 815], "sensor_contact": True}),
    ("temperature", {"celsius": 36.6, "site": "ear"}), ("blood_pressure", {"systolic_mmhg": 120, "diastolic_mmhg": 80}),
    ("spo2", {"spo2_pct": 97.5}), ("glucose", {"mg_dl": 104.0, "sample": "capillary"}), ("weight", {"kg": 71.2}),
    ("activity", {"steps": 5400, "active_minutes": 31}),
    ("purchase", {"item_code": "0002-8215", "code_system": "ndc", "rx_only": False, "quantity": 1,
                  "price_minor": 1299, "currency": "EUR", "patient_token": "p-1", "payment_method": "card"}),
]


def documented_reasons() -> set[str]:
    """The rejection reasons in the table of docs/protocol.md (bad_topic never reaches a receipt)."""
    section = PROTOCOL_DOC.read_text().split("## Rejection reasons", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, re.MULTILINE)) - {"bad_topic"}

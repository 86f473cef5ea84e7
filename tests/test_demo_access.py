"""`carechain demo`'s private records: a doctor opens Alice's last hour through 3-of-5 miners; nothing is in clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
# The live market and trial scenarios run in tests/test_demo_market.py (and the file-mode test); not again here.
SKIP = frozenset({"market", "trial"})
PLAIN_HEART_RATE = b"\x63bpm"  # the CBOR text key of a heart-rate body: only a plain reading carries it


@pytest.fixture(scope="module")
def cli_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One `carechain demo --json --data-dir DIR` process (market and trial skipped): its summary and DIR. The
    second-run test runs the demo once more on DIR (a user's second `carechain demo` on a kept data dir) instead of
    making a first run of its own; the file checks below hold whether or not that second run happened first."""
    work = tmp_path_factory.mktemp("demo-access")
    data = work / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "carechain.cli", "demo", "--json", "--seconds", "2",
                           "--data-dir", str(data), "--skip", "market", "--skip", "trial"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout), data


def test_demo_opens_a_granted_hour_logs_it_refuses_an_outsider_and_keeps_no_reading_in_clear(
        cli_demo: tuple[dict[str, Any], Path]) -> None:
    summary, data = cli_demo
    assert summary["access_opened"] is True
    assert summary["access_logged"] == 1
    assert summary["access_refused_without_grant"] is True
    # Five registered, bonded miners make checkpoints final; the formulary refused a mislabelled Rx-only sale.
    assert summary["miners"] == 5 and summary["final_checkpoints"] >= 1 and summary["formulary_refusals"] >= 1
    # the live market and trial were left out (--skip): their keys say so, and nothing failed for it
    assert summary["study_verified"] is None and summary["trial_verified"] is None
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "ledger.db" for p in files) and any(p.name == "outbox.db" for p in files)
    assert len({p.parent.name for p in files if p.name == "witness.json"}) == 5  # the five miners' replicas
    in_clear = [str(p.relative_to(data)) for p in files if PLAIN_HEART_RATE in p.read_bytes()]
    assert in_clear == [], f"plain heart-rate readings in {in_clear}"


def test_a_second_run_on_the_same_data_dir_logs_both_accesses(cli_demo: tuple[dict[str, Any], Path]) -> None:
    """Idempotent set-up (parties, devices, miners) and a new access record per run, both in the log. The first run
    is the module's `carechain demo --data-dir` process (same seconds, speedup and skips)."""
    from carechain.demo.pipeline import run_demo

    first, data = cli_demo
    second = run_demo(broker=None, seconds=2, data_dir=data, speedup=20, skip=SKIP)
    assert first["access_opened"] and second["access_opened"], (first, second["access"])
    assert (first["access_logged"], second["access_logged"]) == (1, 2)
    assert [e["requester_role"] for e in second["access"]["log"]] == ["doctor", "doctor"]
    assert second["skipped"] == ["market", "trial"]
    assert first["study_verified"] is None and first["trial_verified"] is None  # the first run skipped them too

"""A full disk never silently stops an agent: real mosquitto, `carechain bridge` and `carechain agent` processes.

While the outbox's disk is full the agent keeps running, says at ERROR level what happened and what to do,
counts every reading it could not store in its `losses` table (`disk_full`: written as soon as there is
room for the row) and retries with backoff; when space returns it signs again by itself, and every event
it signed reaches the log exactly once. Twice: on a really full filesystem (a small tmpfs the test mounts,
skipped where mounting is not permitted) and with SQLite's disk-full error injected, which always runs.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators import fault_harness as faults
from simulators.mosquitto import mosquitto_binary

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(mosquitto_binary() is None, reason="the disk-full runs use a real mosquitto")]


def check(result: faults.Result) -> None:
    assert result.detail["alive_while_full"], "the agent died on the full disk"
    assert result.events > 100
    assert result.drained and result.lost == 0 and result.duplicated == 0  # nothing it signed is lost
    assert result.detail["readings_not_stored"] > 0  # what it could not store is on record
    assert result.detail["resume_s"] is not None, "signing did not resume after space returned"
    log = (Path(result.detail["work"]) / "agent0.log").read_text(errors="replace")
    assert "outbox disk full" in log and "signing resumes by itself" in log  # ERROR, with what to do


@pytest.fixture
def agent_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted where the fleet keeps the agent's data directory (skipped if not permitted)."""
    mount = tmp_path / "agent0"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", f"cc-agent-{uuid.uuid4().hex[:8]}",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}; "
                    "the injected disk-full test covers the same path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_agent_on_a_really_full_filesystem_records_its_losses_and_resumes(tmp_path: Path, agent_tmpfs: Path) -> None:
    result = faults.agent_disk_full(tmp_path, mount=agent_tmpfs)
    result.detail["work"] = str(tmp_path)
    check(result)


def test_agent_with_injected_sqlite_full_records_its_losses_and_resumes(
        agent_disk_full_injected: faults.Result) -> None:
    # The session's one injected run (tests/conftest.py), also the fault table's row in tests/test_faults.py.
    check(agent_disk_full_injected)

"""A full disk under the bridge: real mosquitto, `carechain bridge` and `carechain agent` processes.

While its ledger's disk is full the bridge stays up and connected, logs each failed write at error level
with what to do, counts it and retries the same batch with backoff; once space returns it resumes by
itself: nothing is lost or duplicated and `carechain verify --full` passes. The disk really fills where
the test may mount a small tmpfs (we run as root in CI); an injected SQLITE_FULL
(`CARECHAIN_DISK_FULL_WHILE`, test-only) covers the same path everywhere. And if the sequencer thread ever
dies, the process exits non-zero so that its supervisor restarts it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain_bridge.bridge import EXIT_SEQUENCER_DIED
from simulators import fault_harness as faults
from simulators.mosquitto import REPO, mosquitto_binary

needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="the disk-full runs use a real mosquitto")


def verify_full(bridge_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carechain.cli", "verify", "--full", "--data-dir", str(bridge_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def check_resumed(result: faults.Result, bridge_dir: Path) -> None:
    print("\n" + faults.table([result]))  # the row for docs/reliability.md (shown with -s)
    assert result.events > 100, "the scenario produced too little traffic to mean anything"
    assert result.detail["alive_while_full"], "the bridge process died while the disk was full"
    assert result.drained, f"{result.scenario}: outboxes did not drain after space returned ({result})"
    assert result.lost == 0 and result.anchored == result.events and result.duplicated == 0
    assert result.detail["bridge"]["storage_errors"] > 0, "the disk never looked full to the bridge"
    audit = verify_full(bridge_dir)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    log = (bridge_dir.parent / "bridge.log").read_text()
    assert "cannot write the ledger" in log and "free space on the filesystem" in log
    assert "no transaction is active" not in log and "sequencer thread died" not in log


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted where the fleet keeps the bridge's data directory (skipped if not permitted)."""
    try:
        with faults.small_tmpfs(tmp_path / "bridge") as mount:
            yield mount
    except faults.MountRefused as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {exc}; "
                    "the injected-ENOSPC test covers the same path")


@pytest.mark.integration
@needs_broker
def test_bridge_on_a_really_full_filesystem_resumes_by_itself_when_space_returns(
        tmp_path: Path, small_tmpfs: Path) -> None:
    result = faults.bridge_disk_full(tmp_path, mount=small_tmpfs)
    check_resumed(result, small_tmpfs)


@pytest.mark.integration
@needs_broker
def test_bridge_with_injected_sqlite_full_resumes_by_itself_and_loses_nothing(
        bridge_disk_full_injected: faults.Result) -> None:
    # The session's one injected run (tests/conftest.py), also the fault table's row in tests/test_faults.py.
    check_resumed(bridge_disk_full_injected, Path(bridge_disk_full_injected.detail["work"]) / "bridge")


def test_a_dead_sequencer_thread_ends_the_bridge_process_with_a_non_zero_status(tmp_path: Path) -> None:
    # A real process: its sequencer thread meets something no handler is for (here SystemExit from its
    # source); the process must not linger connected and idle.
    script = textwrap.dedent("""
        import sys, threading, time
        from pathlib import Path
        from carechain.config import BridgeConfig, BrokerConfig
        from carechain.identity import Identity
        from chain_bridge.bridge import Bridge
        from chain_bridge.ledger.store import Ledger

        data = Path(sys.argv[1])
        bridge = Bridge(BridgeConfig(data_dir=data), BrokerConfig(), Identity.generate(), Ledger(data / "ledger.db"))

        def receive(timeout):
            raise SystemExit("a library gave up")

        bridge.receiver.receive = receive
        threading.Thread(target=bridge._run, daemon=True).start()
        time.sleep(60)
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == EXIT_SEQUENCER_DIED, done.stderr
    assert "sequencer thread died" in done.stderr and "supervisor restarts" in done.stderr

"""Long-running commands as real processes: one per data directory, and a quiet, counted exit on a signal.

No broker is needed: the processes point at a loopback port where nothing listens, which is also how a
bridge "that never connected" is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from carechain.identity import Identity
from carechain.reencryption import PreKey
from simulators.ports import free_port

REPO = Path(__file__).resolve().parent.parent
CARECHAIN = [sys.executable, "-m", "carechain.cli"]
# The demo's live market and trial scenarios run in tests/test_demo_market.py; these tests are about exiting.
SKIP_LIVE_SCENARIOS = ["--skip", "market", "--skip", "trial"]


def start(*args: str | Path, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("CARECHAIN_CONFIG", None)
    return subprocess.Popen([*CARECHAIN, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def assert_quiet_exit(proc: subprocess.Popen[str], sig: int) -> tuple[dict[str, object], str]:
    """Send `sig`; the process must exit 0 by itself, print its counters as the last stdout line, and
    write no traceback nor multiprocessing warning."""
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "leaked semaphore" not in stderr, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def test_a_second_bridge_on_the_same_data_dir_is_refused_and_the_first_exits_quietly(tmp_path: Path) -> None:
    broker = f"127.0.0.1:{free_port()}"  # nothing listens there
    first = start("bridge", "--data-dir", tmp_path / "bridge", "--broker", broker, cwd=tmp_path)
    try:
        wait_until(lambda: (tmp_path / "bridge" / ".lock").exists()
                      and "bridge pid" in (tmp_path / "bridge" / ".lock").read_text(), "the first bridge's lock")
        second = start("bridge", "--data-dir", tmp_path / "bridge", "--broker", broker, cwd=tmp_path)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert "in use by another carechain process" in err and f"bridge pid {first.pid}" in err
        assert "Traceback" not in err
    finally:
        if first.poll() is None:
            stats, err = assert_quiet_exit(first, signal.SIGTERM)
    assert stats["received"] == 0 and "checkpoints" in stats
    assert "never connected to broker" in err


def test_the_data_dir_is_free_again_once_the_bridge_has_exited(tmp_path: Path) -> None:
    broker = f"127.0.0.1:{free_port()}"
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = start("bridge", "--data-dir", tmp_path / "bridge", "--broker", broker, cwd=tmp_path)
        # started: its first connection attempt failed (a signal sent earlier could hit its imports)
        wait_until(lambda p=proc: "cannot connect to broker" in _peek(p), "the bridge to start")  # type: ignore[misc]
        assert_quiet_exit(proc, sig)


_stderr_seen: dict[int, str] = {}


def _peek(proc: subprocess.Popen[str]) -> str:
    """What the process wrote on stderr so far (non-blocking), accumulated per process."""
    import selectors

    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    text = _stderr_seen.get(proc.pid, "")
    while sel.select(timeout=0):
        chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        if not chunk:
            break
        text += chunk
    _stderr_seen[proc.pid] = text
    return text


def test_a_bridge_with_ingest_workers_and_no_broker_stops_them_on_sigterm_without_killing_them(tmp_path: Path) -> None:
    broker = f"127.0.0.1:{free_port()}"  # nothing listens: the workers never get their first connection
    proc = start("bridge", "--data-dir", tmp_path / "bridge", "--broker", broker, "--workers", "2", cwd=tmp_path)
    try:
        wait_until(lambda: (tmp_path / "bridge" / "instance-id").exists(), "the bridge's instance id")
        bridge_id = f"carechain-bridge-{(tmp_path / 'bridge' / 'instance-id').read_text().strip()}"
        # each worker is trying to connect, under an id derived from the bridge's own
        wait_until(lambda: all(f"{bridge_id}-w{i}: cannot connect to broker" in _peek(proc) for i in (0, 1)),
                   "both ingest workers to try the broker")
    except BaseException:
        proc.kill()
        raise
    stats, err = assert_quiet_exit(proc, signal.SIGTERM)
    assert "did not stop" not in err and "killed" not in err, err  # the workers left when asked
    assert stats["received"] == 0


def test_a_miner_stops_on_sigint_with_its_counters_and_refuses_a_twin(tmp_path: Path) -> None:
    broker = f"127.0.0.1:{free_port()}"
    log_key = Identity.generate().public_key.hex()
    args = ("miner", "--data-dir", tmp_path / "miner", "--broker", broker, "--log-public-key", log_key)
    proc = start(*args, cwd=tmp_path)
    try:
        wait_until(lambda: "cannot connect to broker" in _peek(proc), "the miner to start")
        twin = start(*args, cwd=tmp_path)
        _, err = twin.communicate(timeout=60)
        assert twin.returncode == 2 and "in use by another carechain process" in err
    finally:
        stats, _ = assert_quiet_exit(proc, signal.SIGINT)
    assert "miner" in stats


def test_an_agent_stops_on_sigterm_with_its_counters(tmp_path: Path) -> None:
    key = tmp_path / "band.key"
    Identity.generate().save(key)
    owner, owner_pre = Identity.generate().device_id, PreKey.generate().public_key.hex()  # protocol 2 seals to her
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"broker: {{host: 127.0.0.1, port: {free_port()}}}\n"
                   f"agent:\n  data_dir: '{tmp_path / 'agent'}'\n  bridge_public_key: '{'ab' * 32}'\n"
                   f"  devices:\n    - {{key_file: '{key}', profile: heart_rate_band, owner: {owner}, "
                   f"owner_pre_key: '{owner_pre}'}}\n")
    proc = start("agent", "--config", cfg, cwd=tmp_path)
    wait_until(lambda: (tmp_path / "agent" / "outbox.db").exists(), "the agent's outbox")
    twin = start("agent", "--config", cfg, cwd=tmp_path)
    _, err = twin.communicate(timeout=60)
    assert twin.returncode == 2 and "in use by another carechain process (agent pid" in err
    wait_until(lambda: _signed(tmp_path / "agent" / "outbox.db") > 0, "the agent to sign a reading")
    stats, _ = assert_quiet_exit(proc, signal.SIGTERM)
    assert stats["signed"] > 0 and stats["outbox_left"] == stats["signed"]  # nothing receipted: all kept


def _signed(outbox: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        try:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0


@pytest.mark.integration
def test_demo_json_exits_by_itself_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    """With the embedded broker: its thread must not keep the process alive, nor the demo leave data."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    done = subprocess.run([*CARECHAIN, "demo", "--json", "--seconds", "2", *SKIP_LIVE_SCENARIOS], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["proof_verified"] is True
    assert list(tmp.glob("carechain-demo-*")) == []


@pytest.mark.integration
def test_demo_with_a_data_dir_keeps_it_and_its_hint_names_the_log_key(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    done = subprocess.run([*CARECHAIN, "demo", "--seconds", "2", "--data-dir", str(tmp_path / "demo"),
                           *SKIP_LIVE_SCENARIOS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo" / "bridge" / "ledger.db").exists()
    log_key = Identity.load(tmp_path / "demo" / "bridge" / "keys" / "log.key").public_key.hex()
    assert f"carechain verify p.json --log-key {log_key}" in done.stdout
    assert "{" not in done.stdout.split("summary", 1)[1]  # no Python dict reprs in the tables

"""systemd notifications over a real AF_UNIX datagram socket: READY=1 once `carechain miner` / `carechain agent`
have started, WATCHDOG=1 only while the health check passes, STOPPING=1 on SIGTERM; a no-op outside systemd."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from carechain import sd_notify
from carechain.identity import Identity
from carechain.reencryption import PreKey
from simulators.ports import free_port

REPO = Path(__file__).resolve().parent.parent
CARECHAIN = [sys.executable, "-m", "carechain.cli"]


class NotifySocket:
    """What systemd listens on: every datagram received, in order."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.received: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.put(data.decode())

    def wait_for(self, wanted: str, timeout: float = 60) -> str:
        """The first datagram (after those already seen) holding the line `wanted`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.received.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(message)
            if wanted in message.split("\n"):
                return message
        raise AssertionError(f"no {wanted} from the service; got {self.seen}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, NotifySocket]]:
    name = f"carechain-test-{uuid.uuid4().hex}"
    listener = NotifySocket("\0" + name)
    yield f"@{name}", listener
    listener.close()


@pytest.fixture
def path_socket() -> Iterator[tuple[str, NotifySocket]]:
    # AF_UNIX paths are limited to 108 bytes: a short directory of its own, not pytest's long tmp_path.
    with tempfile.TemporaryDirectory(prefix="cc-") as short:
        path = str(Path(short) / "notify")
        listener = NotifySocket(path)
        yield path, listener
        listener.close()


def test_outside_systemd_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert sd_notify.ready() is False and sd_notify.stopping() is False and sd_notify.status("x") is False
    assert sd_notify.Watchdog.from_env(lambda: True) is None


def test_the_abstract_namespace_is_reached_and_a_status_cannot_smuggle_an_assignment(
        monkeypatch: pytest.MonkeyPatch, abstract_socket: tuple[str, NotifySocket]) -> None:
    address, listener = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sd_notify.status("all good\nREADY=1")
    assert listener.wait_for("STATUS=all good READY=1", timeout=10)
    assert sd_notify.ready("up")
    assert listener.wait_for("READY=1", timeout=10) == "READY=1\nSTATUS=up"


def test_the_watchdog_pings_while_healthy_and_stops_for_good_once_unhealthy(
        monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, NotifySocket]) -> None:
    address, listener = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy = threading.Event()
    healthy.set()
    watchdog = sd_notify.Watchdog.from_env(healthy.is_set)
    assert watchdog is not None and watchdog.interval_s == pytest.approx(0.05)
    watchdog.start()
    try:
        for _ in range(3):
            listener.wait_for("WATCHDOG=1", timeout=10)
        healthy.clear()
        listener.wait_for("STATUS=unhealthy: watchdog pings stopped; waiting for systemd to restart the service",
                          timeout=10)
        assert watchdog._thread is not None
        watchdog._thread.join(timeout=10)
        assert not watchdog._thread.is_alive()  # no thread left that could ping again
        pings = watchdog.pings
        healthy.set()  # even a recovery does not resume it: systemd restarts the process instead
        assert watchdog.pings == pings
    finally:
        watchdog.stop()
    # Meant for another process (systemd names the main pid): a child never keeps its parent alive.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sd_notify.Watchdog.from_env(lambda: True) is None


def _start(args: list[str], cwd: Path, address: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    env.pop("CARECHAIN_CONFIG", None)
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([*CARECHAIN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _stop(proc: subprocess.Popen[str], listener: NotifySocket) -> dict[str, object]:
    proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def test_a_miner_notifies_ready_pings_its_watchdog_and_notifies_stopping(
        tmp_path: Path, broker, abstract_socket: tuple[str, NotifySocket]) -> None:
    address, listener = abstract_socket
    metrics = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "miner.yaml"
    cfg.write_text(f"broker: {{host: {broker.host}, port: {broker.port}}}\nminer:\n  metrics_listen: '{metrics}'\n")
    proc = _start(["miner", "--config", str(cfg), "--data-dir", str(tmp_path / "miner"),
                   "--log-public-key", Identity.generate().public_key.hex()], tmp_path, address)
    try:
        assert "connected to" in listener.wait_for("READY=1")
        for _ in range(2):
            listener.wait_for("WATCHDOG=1", timeout=10)
        assert _get(f"http://{metrics}/readyz")[0] == 200
        assert "carechain_miner_lag 0.0" in _get(f"http://{metrics}/metrics")[1]
    except BaseException:
        proc.kill()
        raise
    stats = _stop(proc, listener)
    assert "miner" in stats


def test_an_agent_notifies_ready_once_its_links_are_up_and_stopping_on_sigterm(
        tmp_path: Path, broker, abstract_socket: tuple[str, NotifySocket]) -> None:
    address, listener = abstract_socket
    key = tmp_path / "band.key"
    Identity.generate().save(key)
    owner, owner_pre = Identity.generate().device_id, PreKey.generate().public_key.hex()
    metrics = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"broker: {{host: {broker.host}, port: {broker.port}}}\n"
                   f"agent:\n  data_dir: '{tmp_path / 'agent'}'\n  bridge_public_key: '{'ab' * 32}'\n"
                   f"  metrics_listen: '{metrics}'\n"
                   f"  devices:\n    - {{key_file: '{key}', profile: heart_rate_band, owner: {owner}, "
                   f"owner_pre_key: '{owner_pre}'}}\n")
    proc = _start(["agent", "--config", str(cfg)], tmp_path, address)
    try:
        assert "STATUS=agent: 1 of 1 device link(s) up" in listener.wait_for("READY=1")
        listener.wait_for("WATCHDOG=1", timeout=10)
        assert _get(f"http://{metrics}/readyz") == (200, "ready: 1 device link(s) up\n")
    except BaseException:
        proc.kill()
        raise
    stats = _stop(proc, listener)
    assert "signed" in stats


def test_a_bridge_notifies_ready_once_subscribed_pings_while_its_sequencer_runs_and_notifies_stopping(
        tmp_path: Path, broker, abstract_socket: tuple[str, NotifySocket]) -> None:
    address, listener = abstract_socket
    proc = _start(["bridge", "--broker", f"{broker.host}:{broker.port}", "--data-dir", str(tmp_path / "bridge")],
                  tmp_path, address)
    try:
        assert f"STATUS=bridge: subscribed to {broker.host}:{broker.port}, tree size 0" in \
            listener.wait_for("READY=1").split("\n")
        for _ in range(2):
            listener.wait_for("WATCHDOG=1", timeout=10)
    except BaseException:
        proc.kill()
        raise
    stats = _stop(proc, listener)
    assert stats["role"] == "leader"

"""Start a private mosquitto on a free loopback port from a config file kept in the repo.

Used by the tests and the benchmarks so that neither depends on the machine's shared broker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from simulators.ports import free_port

REPO = Path(__file__).resolve().parent.parent
TEST_CONF = REPO / "tests" / "broker" / "mosquitto-test.conf"


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {host}:{port} within {timeout} s")


@dataclass
class Mosquitto:
    """`conf` (a file in the repo), then `extra` lines (e.g. password_file, acl_file), then a plain
    `listener <port> <host>` followed by `listener_options` (e.g. `use_username_as_clientid true`: listener
    options before any `listener` line would open a default listener on port 1883), then `listeners`: more
    listener blocks, e.g. a TLS one; their ports in `wait_ports` are awaited too."""

    workdir: Path
    port: int = 0
    conf: Path = TEST_CONF
    extra: str = ""
    host: str = "127.0.0.1"
    listeners: str = ""
    listener_options: str = ""
    wait_ports: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.port = self.port or free_port(self.host)
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        # Started as root, mosquitto would switch to the `mosquitto` user and could not read the 0600 files
        # (password file, TLS keys) this process wrote; keep it as the user who started it.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{self.conf.read_text()}\n{run_as}{self.extra}\nlistener {self.port} {self.host}\n"
                        f"{self.listener_options}\n{self.listeners}\n")
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        for port in (self.port, *self.wait_ports):
            try:
                wait_listening(self.host, port)
            except RuntimeError:
                self.stop()
                raise RuntimeError(f"mosquitto did not start; its log: {self.log_text()[-2000:]}") from None
        return self

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads password_file and acl_file and disconnects clients no longer allowed."""
        assert self.process is not None and self.process.poll() is None, "mosquitto is not running"
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

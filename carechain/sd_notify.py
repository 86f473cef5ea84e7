"""systemd service notifications (sd_notify(3)): READY=1, STOPPING=1, STATUS=…, and a health-gated watchdog.

An I/O shell: one AF_UNIX datagram per notification to the socket systemd names in $NOTIFY_SOCKET (a path, or
`@name` in the abstract namespace); without $NOTIFY_SOCKET (not run by systemd, or not `Type=notify`) every call
is a no-op, so the same code runs under a terminal, a container and a unit.

Written here rather than taken from PyPI: `sdnotify` (0.3.2, last release 2017) is unmaintained and has no
watchdog, and `systemd-python` needs libsystemd's headers and a C compiler to install (not on a Raspberry Pi
image, nor in our wheel-only venvs). The protocol is one datagram of `KEY=VALUE` lines; that is all this is.

The watchdog pings WATCHDOG=1 only while the process's health callable says it is healthy (e.g. the bridge's
sequencer thread is alive). A process whose main work has hung must stop pinging, so that systemd kills and
restarts it (`WatchdogSec=`, `Restart=on-failure`); a ping from a timer alone would prove only that the timer runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("carechain.sd_notify")

__all__ = ["Watchdog", "notify", "ready", "status", "stopping"]

# systemd reads at most one datagram of this size; a STATUS longer than this is cut, never split.
MAX_STATUS_CHARS = 200


def _socket_address() -> str | None:
    """The socket address from $NOTIFY_SOCKET (abstract namespace for `@name`), or None when unset or unusable."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract: systemd notifications are not sent",
                path)
    return None


def notify(state: str) -> bool:
    """Send `state` (newline-separated `KEY=VALUE` assignments) to systemd; False when not under systemd or the
    datagram could not be sent (logged: the service still runs, systemd may then time it out)."""
    address = _socket_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s (%s): %s", os.environ.get("NOTIFY_SOCKET"), state.split("\n")[0],
                    exc)
        return False
    return True


def ready(text: str | None = None) -> bool:
    """Tell systemd that start-up is complete (`Type=notify` units count as started only then)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(text)}" if text else ""))


def stopping(text: str | None = None) -> bool:
    """Tell systemd that the service is shutting down (it then waits up to `TimeoutStopSec=`)."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(text)}" if text else ""))


def status(text: str) -> bool:
    """Set the one-line status `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}")


def _one_line(text: str) -> str:
    # A newline would start another assignment: a status text must never be able to send READY or WATCHDOG.
    return " ".join(text.split())[:MAX_STATUS_CHARS]


class Watchdog:
    """Pings WATCHDOG=1 every half watchdog interval from a daemon thread, while `healthy()` is true.

    Once `healthy()` returns false (or raises) the pings stop for good: the process is hung or broken, and
    systemd's restart is the remedy, not a ping that would keep a broken process alive.
    """

    def __init__(self, interval_s: float, healthy: Callable[[], bool]) -> None:
        if interval_s <= 0:
            raise ValueError(f"watchdog interval must be positive, not {interval_s}")
        self.interval_s = interval_s
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    @classmethod
    def from_env(cls, healthy: Callable[[], bool]) -> Watchdog | None:
        """A watchdog for this process when systemd asks for one ($WATCHDOG_USEC, and $WATCHDOG_PID when set
        names this process); None otherwise. The pings come every WATCHDOG_USEC / 2."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec or _socket_address() is None:
            return None
        if pid and pid != str(os.getpid()):
            return None  # meant for another process (e.g. our parent): a child must not keep it alive
        try:
            micros = int(usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not an integer: the systemd watchdog is not pinged", usec)
            return None
        if micros <= 0:
            return None
        return cls(micros / 1_000_000 / 2, healthy)

    def start(self) -> None:
        """Ping once now (if healthy), then every interval on a daemon thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging (at shutdown, after STOPPING=1: systemd then waits for `TimeoutStopSec=`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                healthy = self._healthy()
            except Exception:
                log.exception("the health check of the systemd watchdog failed; watchdog pings stop")
                healthy = False
            if not healthy:
                log.critical("unhealthy: systemd watchdog pings stop, so that systemd restarts this service")
                status("unhealthy: watchdog pings stopped; waiting for systemd to restart the service")
                return
            if notify("WATCHDOG=1"):
                self.pings += 1
            self._stop.wait(self.interval_s)

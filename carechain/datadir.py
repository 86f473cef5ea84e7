"""One process per data directory: an OS file lock that a second bridge, agent or miner meets at start,
and the directory's instance id that makes MQTT client ids unique per instance.

Locking a data directory also makes it mode 0700 (`carechain.files.private_dir`): it holds keys and
health data, so nobody but its owner may list or read it. The lock is `fcntl.flock` on `<data dir>/.lock`,
held for the life of the process: the kernel releases it when the process exits, however it exits
(kill -9 included), so a stale lock never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from pathlib import Path

from carechain.files import PRIVATE, private_dir, write_atomic

LOCK_FILE = ".lock"
INSTANCE_FILE = "instance-id"
_INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")


class DataDirLocked(RuntimeError):
    """Another process holds the data directory."""

    def __init__(self, path: Path, party: str, holder: str) -> None:
        self.path, self.party, self.holder = path, party, holder
        super().__init__(f"{path} is in use by another carechain process ({holder}); run one {party} per data "
                         f"directory, or give this one its own --data-dir")


class DataDirLock:
    """Holds `<path>/.lock` until `release()` (or process exit)."""

    def __init__(self, path: Path, party: str) -> None:
        self.path = private_dir(Path(path))  # 0700: it holds keys and health data
        self._fd: int | None = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(self._fd)
            self._fd = None
            raise DataDirLocked(self.path, party, holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{party} pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def lock_data_dir(path: Path, party: str) -> DataDirLock:
    """Lock `path` for `party` ("bridge", "agent", "miner"), or raise `DataDirLocked` naming the holder."""
    return DataDirLock(path, party)


def instance_id(path: Path) -> str:
    """This data directory's instance id: 8 random hex digits, made on first use and kept in
    `<path>/instance-id`. Client ids built on it are unique per instance (two bridges, or two agents, get
    different ids) and stable across restarts of one instance, which a persistent MQTT session needs.
    A copied data directory copies its id too: keep data directories per host."""
    path = Path(path)
    file = path / INSTANCE_FILE
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        text = ""
    if _INSTANCE_ID.match(text):
        return text
    new = secrets.token_hex(4)
    private_dir(path)
    write_atomic(file, f"{new}\n".encode(), PRIVATE)
    return new

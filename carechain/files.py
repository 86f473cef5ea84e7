"""Writing and reading files that hold secrets: atomic replacement, explicit modes, refusal of lax ones.

Used for broker passwords, provisioning files and TLS keys. (Ed25519 key files keep their own format and
rules in `carechain.identity`.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


class FilePermissionError(PermissionError):
    """A secret file that group or others can read."""


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Write `data` to `path` with `mode` so that a reader sees the old file or the new one, never half.

    The temporary file is created with the final mode (never wider, whatever the umask), fsynced, then
    renamed over `path`; the directory is fsynced so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; be explicit
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others can access (like ssh does with keys)."""
    path = Path(path)
    st = path.stat()  # FileNotFoundError is the caller's to word
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FilePermissionError(
            f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open for a file holding a secret; "
            f"run `chmod 600 {path}`")


def read_private(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others can access."""
    check_private(path)
    return Path(path).read_bytes()

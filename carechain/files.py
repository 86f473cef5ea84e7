"""Writing and reading files that hold secrets: atomic replacement, explicit modes, refusal of lax ones.

Used for broker passwords, provisioning files, TLS keys, health data written by the CLI, and the SQLite
files that hold health data (`make_private` once a store has opened them). (Ed25519 key files keep their own
format and rules in `carechain.identity`.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from carechain.systemd_credentials import managed_by_systemd

PRIVATE = 0o600
PUBLIC = 0o644
PRIVATE_DIR = 0o700
_LAX = stat.S_IRWXG | stat.S_IRWXO


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
    """Refuse a secret file that group or others can access (like ssh does with keys), unless systemd
    manages it (`managed_by_systemd`)."""
    path = Path(path)
    st = path.stat()  # FileNotFoundError is the caller's to word
    if st.st_mode & _LAX and not managed_by_systemd(path):
        raise FilePermissionError(
            f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open for a file holding a secret; "
            f"run `chmod 600 {path}`")


def read_private(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others can access."""
    check_private(path)
    return Path(path).read_bytes()


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing and make it 0700: a party's data directory, readable by its
    owner only whatever the umask. An existing directory with group or other bits loses them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if stat.S_IMODE(path.stat().st_mode) & _LAX:
        os.chmod(path, PRIVATE_DIR)
    return path


def make_private(path: Path) -> Path:
    """Give a SQLite database that holds health data, and its `-wal`, `-shm` and `-journal` files, mode 0600.

    Call it right after the store opened (created) the database, in a directory made 0700 before
    (`private_dir`), so nobody else could reach the file in between. SQLite creates later `-wal` and `-shm`
    files with the main file's mode, so they stay private. It does not create a missing file: the stores
    refuse an empty database file as truncated (`carechain.sqlite_store`). Contents are never touched.
    """
    path = Path(path)
    for file in (path, *(path.with_name(path.name + side) for side in ("-wal", "-shm", "-journal"))):
        try:
            if stat.S_IMODE(file.stat().st_mode) & _LAX:
                os.chmod(file, PRIVATE)
        except FileNotFoundError:
            pass
    return path

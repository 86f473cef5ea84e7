"""The console's operator accounts: names, argon2id password hashes and roles in one private JSON file.

The file (`bridge.console.accounts_file`, default DATA_DIR/console/accounts.json) is written by
`carechain console user …` and read by the running bridge, which re-reads it whenever it changes on disk, so
accounts can be added, changed or removed without a restart (docs/console-access.md). It is replaced atomically
with mode 0600, and refused when group or others can read it. Read-modify-write cycles take an advisory lock
(`accounts.json.lock`), so the CLI and a bridge that rehashes a password at login never lose each other's change.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from carechain.config import BridgeConfig
from carechain.files import PRIVATE, PRIVATE_DIR, FilePermissionError, check_private, write_atomic

log = logging.getLogger("carechain.console.auth")

FILE_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_PASSWORD_CHARS = 12
# argon2 pre-hashes its input, so length costs little; the bound keeps a form post from carrying megabytes.
MAX_PASSWORD_CHARS = 1024
_HASH_PREFIX = "$argon2id$"


class Role(StrEnum):
    """What an account may see: the fleet and its counters, or the access log (one account may hold both)."""

    OPERATOR = "operator"
    PRIVACY_OFFICER = "privacy_officer"


_ROLE_VALUES = frozenset(r.value for r in Role)


class AccountError(ValueError):
    """An account operation that cannot be done, worded for the operator who asked for it."""


@dataclass(frozen=True)
class Account:
    """One account as stored, without its hash. `changed_ms` moves on every password or role change, so a
    session opened before such a change can tell that it no longer holds."""

    name: str
    roles: frozenset[Role]
    created_ms: int
    changed_ms: int


def accounts_path(bridge: BridgeConfig, data_dir: Path | None = None) -> Path:
    """Where the bridge keeps its console accounts: `bridge.console.accounts_file`, or
    DATA_DIR/console/accounts.json (`data_dir` overrides `bridge.data_dir`, as `--data-dir` does)."""
    if bridge.console.accounts_file is not None:
        return bridge.console.accounts_file
    return (data_dir or bridge.data_dir) / "console" / "accounts.json"


def check_name(name: str) -> str:
    """`name` if it is a valid account name, else AccountError saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        raise AccountError(f"account name {name[:80]!r} is not allowed: use 1 to 64 letters, digits, '.', '_' or '-'")
    return name


def check_password(password: str) -> str:
    """`password` if it is long enough (and not absurdly long), else AccountError."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters "
                           "(a passphrase of several words is easiest to remember)")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"the password is too long: at most {MAX_PASSWORD_CHARS} characters")
    return password


def _check_roles(roles: Iterable[Role | str]) -> frozenset[Role]:
    try:
        checked = frozenset(Role(r) for r in roles)
    except ValueError as exc:
        raise AccountError(f"{exc}; roles are: {', '.join(Role)}") from None
    if not checked:
        raise AccountError(f"give the account at least one role ({', '.join(Role)})")
    return checked


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class AccountBook:
    """The accounts file at `path`: add, change, remove and list accounts, and check a login.

    Thread-safe. Reads are cached until the file's modification time, size or inode changes; a missing file is
    an empty book (nobody can log in until `carechain console user add`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) defaults
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}
        self._dummy_hash: str | None = None

    # -- reading ---------------------------------------------------------------------------------------------

    def _read(self) -> dict[str, dict[str, Any]]:
        """The users as on disk now (cached while the file is unchanged). Call with `_lock` held."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return self._users
        except OSError as exc:
            raise AccountError(f"cannot read the console accounts file {self.path}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self._users
        try:
            check_private(self.path)
            raw = self.path.read_bytes()
        except FilePermissionError as exc:
            raise AccountError(f"{exc} (it holds the console's password hashes)") from None
        except OSError as exc:
            raise AccountError(f"cannot read the console accounts file {self.path}: {exc.strerror}") from None
        self._users = self._parse(raw)
        self._stamp = stamp
        return self._users

    def _parse(self, raw: bytes) -> dict[str, dict[str, Any]]:
        def damaged(why: str) -> AccountError:
            return AccountError(f"the console accounts file {self.path} is damaged ({why}): restore it from a backup, "
                                "or move it away and add the accounts again with `carechain console user add`")

        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise damaged(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION or not isinstance(doc.get("users"), dict):
            raise damaged(f'expected {{"version": {FILE_VERSION}, "users": {{...}}}}')
        users: dict[str, dict[str, Any]] = {}
        for name, entry in doc["users"].items():
            if not NAME_PATTERN.fullmatch(name) or not isinstance(entry, dict):
                raise damaged(f"bad entry {name[:80]!r}")
            hashed, roles = entry.get("hash"), entry.get("roles")
            if not isinstance(hashed, str) or not hashed.startswith(_HASH_PREFIX):
                raise damaged(f"account {name!r} has no argon2id hash")
            if not isinstance(roles, list) or not all(r in _ROLE_VALUES for r in roles):
                raise damaged(f"account {name!r} has unknown roles {roles!r}")
            created, changed = entry.get("created_ms"), entry.get("changed_ms")
            if not isinstance(created, int) or not isinstance(changed, int):
                raise damaged(f"account {name!r} lacks created_ms/changed_ms")
            users[name] = {"hash": hashed, "roles": sorted(set(roles)), "created_ms": created, "changed_ms": changed}
        return users

    def current(self, name: str) -> Account | None:
        """The account called `name` as the file says now, or None if there is none."""
        with self._lock:
            entry = self._read().get(name)
        if entry is None:
            return None
        return Account(name, frozenset(Role(r) for r in entry["roles"]), entry["created_ms"], entry["changed_ms"])

    def list(self) -> builtins.list[tuple[str, frozenset[Role]]]:  # `list` is this method inside the class
        """Every account's name and roles, by name."""
        with self._lock:
            users = self._read()
            return [(name, frozenset(Role(r) for r in users[name]["roles"])) for name in sorted(users)]

    # -- changing --------------------------------------------------------------------------------------------

    @contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The users, fresh from disk under the file lock; what the block leaves in them is written back."""
        parent = self.path.parent
        try:
            if not parent.exists():
                parent.mkdir(parents=True, mode=PRIVATE_DIR)  # 0700 before the first secret lands in it
                os.chmod(parent, PRIVATE_DIR)  # mkdir's mode is masked by the umask
            lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, PRIVATE)
        except OSError as exc:
            raise AccountError(f"cannot write the console accounts file {self.path}: {exc.strerror} (run the "
                               "command as the user the bridge runs as)") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            with self._lock:
                users = {name: dict(entry) for name, entry in self._read().items()}
                yield users
                data = json.dumps({"version": FILE_VERSION, "users": users}, indent=2, sort_keys=True) + "\n"
                try:
                    write_atomic(self.path, data.encode(), PRIVATE)
                except OSError as exc:
                    raise AccountError(f"cannot write the console accounts file {self.path}: {exc.strerror}") \
                        from None
                self._stamp = None  # re-read our own write: the cache then holds exactly what is on disk
        finally:
            os.close(lock_fd)  # releases the flock

    def _hash(self, password: str) -> str:
        return self._hasher.hash(check_password(password))

    def add(self, name: str, password: str, roles: Iterable[Role]) -> None:
        """Create an account; refuses a name already in use, a short password and an empty role set."""
        check_name(name)
        checked = _check_roles(roles)
        hashed = self._hash(password)  # before the lock: hashing takes a while
        with self._editing() as users:
            if name in users:
                raise AccountError(f"account {name!r} already exists: use `carechain console user passwd` or "
                                   "`carechain console user roles` to change it")
            now = _now_ms()
            users[name] = {"hash": hashed, "roles": sorted(checked), "created_ms": now, "changed_ms": now}

    def set_password(self, name: str, password: str) -> None:
        """Give `name` a new password; the account's open console sessions end."""
        hashed = self._hash(password)
        self._change(name, lambda entry: entry.update(hash=hashed))

    def set_roles(self, name: str, roles: Iterable[Role]) -> None:
        """Replace `name`'s roles; the account's open console sessions end (they were opened with the old ones)."""
        checked = _check_roles(roles)
        self._change(name, lambda entry: entry.update(roles=sorted(checked)))

    def _change(self, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        with self._editing() as users:
            entry = users.get(name)
            if entry is None:
                raise AccountError(f"no console account {name!r} in {self.path}; `carechain console user list` "
                                   "shows them")
            change(entry)
            entry["changed_ms"] = max(_now_ms(), entry["changed_ms"] + 1)  # strictly later: sessions notice

    def remove(self, name: str) -> None:
        """Delete the account; its open console sessions end at their next request."""
        with self._editing() as users:
            if users.pop(name, None) is None:
                raise AccountError(f"no console account {name!r} in {self.path}; `carechain console user list` "
                                   "shows them")

    # -- logging in ------------------------------------------------------------------------------------------

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(32))
        return self._dummy_hash

    def verify(self, name: str, password: str) -> frozenset[Role] | None:
        """The account's roles if `password` is its password, else None.

        An unknown (or malformed) name costs one argon2 verification against a dummy hash, like a known one, so
        the answer's timing does not tell which names exist. A hash made with weaker parameters than today's
        defaults is replaced after a successful check."""
        dummy = self._dummy()
        with self._lock:
            entry = self._read().get(name) if NAME_PATTERN.fullmatch(name) else None
        hashed = entry["hash"] if entry is not None else dummy
        try:
            self._hasher.verify(hashed, password[:MAX_PASSWORD_CHARS + 1])
        except (VerificationError, InvalidHashError):
            return None
        if entry is None or len(password) > MAX_PASSWORD_CHARS:
            return None
        if self._hasher.check_needs_rehash(hashed):
            self._rehash(name, hashed, password)
        return frozenset(Role(r) for r in entry["roles"])

    def _rehash(self, name: str, old_hash: str, password: str) -> None:
        new_hash = self._hasher.hash(password)
        try:
            with self._editing() as users:
                entry = users.get(name)
                if entry is not None and entry["hash"] == old_hash:  # not changed meanwhile by `user passwd`
                    entry["hash"] = new_hash  # changed_ms stays: the same password, so sessions stand
        except (OSError, AccountError) as exc:
            log.warning("console account %r: could not store its upgraded password hash in %s (%s); the old one "
                        "still works", name, self.path, exc)


__all__ = ["Account", "AccountBook", "AccountError", "Role", "accounts_path", "check_name", "check_password",
           "MIN_PASSWORD_CHARS", "MAX_PASSWORD_CHARS"]

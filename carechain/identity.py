"""Ed25519 identities and key files: the one module that touches private keys.

Every party (device, patient, prescriber, pharmacy, insurer, miner, bridge log key) is an Ed25519 key
pair. Private keys live in files created with mode 0600 and never leave their host; everything else in
carechain handles only public keys and the opaque `Identity.sign`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from carechain.errors import FixedReasonError
from carechain.systemd_credentials import managed_by_systemd

KEY_FILE_HEADER = "carechain-ed25519-seed-v1"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# 80 bits of SHA-256 over the public key: short enough to read aloud, long enough that a collision
# needs ~2^40 keys; the full public key is what the registry binds, so a collision cannot be used to
# impersonate anyone, only to confuse a human.
_DEVICE_ID_BYTES = 10


class KeyFileError(Exception):
    """A key file is missing, malformed or readable by others."""


@functools.lru_cache(maxsize=65536)  # on every sign and every registry lookup; keys are few
def device_id_for(public_key: bytes) -> str:
    """Stable, human-readable fingerprint of a public key: 16 lowercase base32 characters, topic-safe."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    digest = hashlib.sha256(b"carechain/device-id/v1\x00" + public_key).digest()[:_DEVICE_ID_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()


class PublicKeyError(FixedReasonError):
    """Text that is not an Ed25519 public key (64 hex digits); the message names whose key it was meant to be."""

    REASON = "bad_public_key"


def parse_public_key_hex(text: str, what: str = "public key") -> bytes:
    """The 32 bytes of an Ed25519 public key written as 64 hex digits (either case, surrounding space ignored).

    Raises PublicKeyError (a ValueError) saying what `what` held and what was expected.
    """
    if not isinstance(text, str):
        raise PublicKeyError(f"{what}: expected {2 * PUBLIC_KEY_SIZE} hex digits, got a {type(text).__name__}")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise PublicKeyError(f"{what}: {text!r:.80} is not hex; expected {2 * PUBLIC_KEY_SIZE} hex digits") from None
    if len(key) != PUBLIC_KEY_SIZE:
        raise PublicKeyError(f"{what}: an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes "
                             f"({2 * PUBLIC_KEY_SIZE} hex digits), got {len(key)}")
    return key


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` under `public_key`."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        # libsodium's crypto_sign_open, as VerifyKey.verify calls it, without building a VerifyKey per call
        # (the bridge verifies every event; the wrapper cost ~1 % of each verification).
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair. Only `sign` and the public parts are exposed."""

    _signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests and reproducible simulations only)."""
        return cls(nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def device_id(self) -> str:
        return device_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return self._signing_key.sign(message).signature

    def sealed_box_private_key(self) -> nacl.public.PrivateKey:
        """The X25519 private key of this Ed25519 key (RFC 7748 birational map, as libsodium does), to open
        what others sealed to `public_key` (`carechain.access.open_sealed_kfrag`). Only this module holds it.
        """
        return self._signing_key.to_curve25519_private_key()

    def __repr__(self) -> str:  # never print key material
        return f"Identity(device_id={self.device_id})"

    # -- key files -----------------------------------------------------------------------------

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the private seed to `path`, created with mode 0600 (atomically, fsynced)."""
        write_seed_file(path, KEY_FILE_HEADER, bytes(self._signing_key), overwrite=overwrite)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file; refuse one that group or others can read (like ssh does)."""
        return cls.from_seed(read_seed_file(path, KEY_FILE_HEADER, "`carechain keys new`"))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident


# -- seed files: every private key carechain writes (Ed25519 here, re-encryption in carechain.reencryption) --
# Written with `os`, not carechain.files: the contract rules import these modules and stay free of the I/O shells.

def write_seed_file(path: Path, header: str, seed: bytes, *, overwrite: bool = False) -> None:
    """`header` and the base64 seed, in a file created 0600 (atomically, fsynced); never overwrite a key unasked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path}: key file already exists; refusing to overwrite a private key")
    text = f"{header}\n{base64.b64encode(seed).decode()}\n"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask; be explicit
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_seed_file(path: Path, header: str, create_with: str) -> bytes:
    """The 32-byte seed of a key file with `header`; refuse one that group or others can read (like ssh does)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (create one with {create_with})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and not managed_by_systemd(path):
        raise KeyFileError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open; run `chmod 600 {path}`")
    lines = path.read_text(encoding="ascii", errors="replace").split()
    if len(lines) != 2 or lines[0] != header:
        raise KeyFileError(f"{path}: not a carechain key file (expected header {header!r})")
    try:
        seed = base64.b64decode(lines[1], validate=True)
    except ValueError:
        raise KeyFileError(f"{path}: key is not valid base64") from None
    if len(seed) != 32:
        raise KeyFileError(f"{path}: key seed must be 32 bytes, found {len(seed)}")
    return seed

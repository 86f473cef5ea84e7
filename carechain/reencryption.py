"""Threshold proxy re-encryption of data keys (umbral-pre, the NuCypher/TACo scheme): the one module that
touches umbral objects. Callers handle bytes and two opaque verified values; nothing else leaks out.

The key hierarchy (docs/protocol.md, "Protocol v2: sealed readings"): each (device, epoch) data key is
encapsulated to its owner's delegating key (`encapsulate`); to let a requester open it, the owner splits a
re-encryption key into n key fragments (`make_kfrags`), m of which — held by m distinct miners — turn the
capsule into capsule fragments (`reencrypt`) that only the requester can combine (`open_data_key`). Every
fragment is signed by the owner's signing key and checked by whoever receives it (`verify_kfrag`,
`verify_cfrag`), so a miner that returns garbage is caught and named.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import umbral_pre

from carechain.errors import FixedReasonError
from carechain.identity import read_seed_file, write_seed_file

__all__ = ["PRE_PUBLIC_SIZE", "PreKey", "ReencryptionError", "VerifiedCfrag", "VerifiedKfrag", "encapsulate",
           "make_kfrags", "open_data_key", "owner_decrypt", "reencrypt", "verify_cfrag", "verify_kfrag"]

PRE_PUBLIC_SIZE = 33  # a compressed secp256k1 point
PRE_SEED_SIZE = 32
KEY_FILE_HEADER = "carechain-pre-seed-v1"
MAX_THRESHOLD = 16  # the access rule's bound on n (and so on m)
# Serialized sizes in umbral-pre 0.11 are ~105 (capsule), ~310 (kfrag), ~381 (cfrag) bytes; the limits leave
# room and stop a hostile peer from handing the Rust decoder megabytes.
MAX_CAPSULE_BYTES = 256
MAX_KEY_CT_BYTES = 256
MAX_KFRAG_BYTES = 1024
MAX_CFRAG_BYTES = 1024
_DELEGATING_LABEL = b"carechain/pre/delegating"
_SIGNING_LABEL = b"carechain/pre/signing"
# Raised by KeyFrag.verify and CapsuleFrag.verify; umbral-pre 0.11's own stub (__init__.pyi) omits it.
_VerificationError: type[Exception] = umbral_pre.VerificationError  # type: ignore[attr-defined]


class ReencryptionError(FixedReasonError):
    """A key, capsule, key fragment or capsule fragment that is malformed or does not verify."""

    REASON = "bad_reencryption"


@dataclass(frozen=True)
class PreKey:
    """A party's re-encryption key pair (delegating/decrypting key and kfrag signing key), from one seed."""

    _seed: bytes = field(repr=False)
    _delegating: umbral_pre.SecretKey = field(repr=False, compare=False)
    _signer: umbral_pre.Signer = field(repr=False, compare=False)

    @classmethod
    def from_seed(cls, seed: bytes) -> PreKey:
        """The key pair of a 32-byte secret seed (deterministic: tests and reproducible simulations)."""
        if len(seed) != PRE_SEED_SIZE:
            raise ValueError(f"a re-encryption key seed has {PRE_SEED_SIZE} bytes, got {len(seed)}")
        factory = umbral_pre.SecretKeyFactory.from_secure_randomness(bytes(seed))
        return cls(bytes(seed), factory.make_key(_DELEGATING_LABEL),
                   umbral_pre.Signer(factory.make_key(_SIGNING_LABEL)))

    @classmethod
    def generate(cls) -> PreKey:
        return cls.from_seed(os.urandom(PRE_SEED_SIZE))  # the OS CSPRNG, as `secrets` uses

    @property
    def public_key(self) -> bytes:
        """The delegating public key (33 bytes): what data keys are encapsulated to."""
        return self._delegating.public_key().to_compressed_bytes()

    @property
    def verifying_key(self) -> bytes:
        """The verifying key (33 bytes) of the signer of this party's key fragments."""
        return self._signer.verifying_key().to_compressed_bytes()

    def __repr__(self) -> str:  # never print key material
        return f"PreKey(public_key={self.public_key.hex()})"

    # -- key files (the same rules and code as carechain.identity: 0600, no overwrite, refuse lax modes) -------

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the seed to `path`, created 0600, atomically and fsynced; refuse to overwrite an existing key."""
        write_seed_file(path, KEY_FILE_HEADER, self._seed, overwrite=overwrite)

    @classmethod
    def load(cls, path: Path) -> PreKey:
        """Read a key file; refuse one that group or others can read (like ssh does)."""
        return cls.from_seed(read_seed_file(path, KEY_FILE_HEADER, "`carechain keys new --pre`"))


@dataclass(frozen=True)
class VerifiedKfrag:
    """A key fragment checked against the owner's keys and the requester's key (opaque; see `verify_kfrag`)."""

    _kfrag: umbral_pre.VerifiedKeyFrag = field(repr=False)

    def __bytes__(self) -> bytes:
        return bytes(self._kfrag)


@dataclass(frozen=True)
class VerifiedCfrag:
    """A capsule fragment checked against its capsule and the three keys (opaque; see `verify_cfrag`)."""

    _cfrag: umbral_pre.VerifiedCapsuleFrag = field(repr=False)

    def __bytes__(self) -> bytes:
        return bytes(self._cfrag)


def encapsulate(owner_pk: bytes, data_key: bytes) -> tuple[bytes, bytes]:
    """(capsule, key ciphertext): `data_key` encrypted to the owner's delegating key (fresh randomness)."""
    capsule, key_ct = umbral_pre.encrypt(_public_key(owner_pk, "owner key"), bytes(data_key))
    return bytes(capsule), bytes(key_ct)


def owner_decrypt(owner: PreKey, capsule: bytes, key_ct: bytes) -> bytes:
    """The data key, opened directly by its owner. Not on the access path (which logs every open): tests, and the
    owner's own agent computing on her own data (record_access.contributing)."""
    try:
        return bytes(umbral_pre.decrypt_original(owner._delegating, _capsule(capsule), _bounded(key_ct)))
    except ValueError as exc:
        raise ReencryptionError(f"the owner's key does not open this capsule: {exc}") from None


def make_kfrags(owner: PreKey, requester_pk: bytes, threshold: int, shares: int) -> list[bytes]:
    """`shares` key fragments letting any `threshold` miners re-encrypt the owner's capsules to `requester_pk`.

    Both the delegating and the receiving key are signed into each fragment, so a fragment cannot be
    redirected to another requester or passed off as another owner's.
    """
    if not 1 <= threshold <= shares <= MAX_THRESHOLD:
        raise ValueError(f"need 1 <= threshold <= shares <= {MAX_THRESHOLD}, got {threshold} of {shares}")
    kfrags = umbral_pre.generate_kfrags(owner._delegating, _public_key(requester_pk, "requester key"), owner._signer,
                                        threshold, shares, True, True)
    return [bytes(k) for k in kfrags]


def verify_kfrag(kfrag: bytes, owner_pk: bytes, owner_vk: bytes, requester_pk: bytes) -> VerifiedKfrag:
    """Check a key fragment was made by the owner (`owner_vk`) from `owner_pk` for `requester_pk`."""
    if len(kfrag) > MAX_KFRAG_BYTES:
        raise ReencryptionError(f"key fragment of {len(kfrag)} bytes exceeds the limit of {MAX_KFRAG_BYTES}")
    try:
        parsed = umbral_pre.KeyFrag.from_bytes(bytes(kfrag))
    except ValueError as exc:
        raise ReencryptionError(f"not a key fragment: {exc}") from None
    try:
        return VerifiedKfrag(parsed.verify(_public_key(owner_vk, "owner verifying key"),
                                           _public_key(owner_pk, "owner key"),
                                           _public_key(requester_pk, "requester key")))
    except _VerificationError:
        raise ReencryptionError("key fragment does not verify with the owner's keys for this requester") from None


def reencrypt(capsule: bytes, kfrag: VerifiedKfrag) -> bytes:
    """The capsule fragment of `capsule` under one verified key fragment (a miner's share of the work)."""
    return bytes(umbral_pre.reencrypt(_capsule(capsule), kfrag._kfrag))


def verify_cfrag(cfrag: bytes, capsule: bytes, owner_pk: bytes, owner_vk: bytes, requester_pk: bytes) -> VerifiedCfrag:
    """Check a miner's capsule fragment is a correct re-encryption of `capsule` (its proof of correctness)."""
    if len(cfrag) > MAX_CFRAG_BYTES:
        raise ReencryptionError(f"capsule fragment of {len(cfrag)} bytes exceeds the limit of {MAX_CFRAG_BYTES}")
    try:
        parsed = umbral_pre.CapsuleFrag.from_bytes(bytes(cfrag))
    except ValueError as exc:
        raise ReencryptionError(f"not a capsule fragment: {exc}") from None
    try:
        return VerifiedCfrag(parsed.verify(_capsule(capsule), _public_key(owner_vk, "owner verifying key"),
                                           _public_key(owner_pk, "owner key"),
                                           _public_key(requester_pk, "requester key")))
    except _VerificationError:
        raise ReencryptionError("capsule fragment does not verify against the capsule and the owner's keys") from None


def open_data_key(requester: PreKey, owner_pk: bytes, capsule: bytes, cfrags: Sequence[VerifiedCfrag],
                  key_ct: bytes) -> bytes:
    """The data key, from at least `threshold` verified capsule fragments of distinct key fragments."""
    if not cfrags:
        raise ReencryptionError("no capsule fragments to open the data key with")
    try:
        key = umbral_pre.decrypt_reencrypted(requester._delegating, _public_key(owner_pk, "owner key"),
                                             _capsule(capsule), [c._cfrag for c in cfrags], _bounded(key_ct))
    except ValueError as exc:
        raise ReencryptionError(f"cannot open the data key with {len(cfrags)} capsule fragment(s) "
                                f"(too few for the threshold, or not for this requester): {exc}") from None
    if key is None:
        raise ReencryptionError("cannot open the data key with these capsule fragments")
    return bytes(key)


def _public_key(data: bytes, what: str) -> umbral_pre.PublicKey:
    if not isinstance(data, bytes | bytearray) or len(data) != PRE_PUBLIC_SIZE:
        size = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
        raise ReencryptionError(f"{what}: a re-encryption public key has {PRE_PUBLIC_SIZE} bytes, got {size}")
    try:
        return umbral_pre.PublicKey.from_compressed_bytes(bytes(data))
    except ValueError:
        raise ReencryptionError(f"{what}: not a compressed secp256k1 point") from None


def _capsule(data: bytes) -> umbral_pre.Capsule:
    if len(data) > MAX_CAPSULE_BYTES:
        raise ReencryptionError(f"capsule of {len(data)} bytes exceeds the limit of {MAX_CAPSULE_BYTES}")
    try:
        return umbral_pre.Capsule.from_bytes(bytes(data))
    except ValueError as exc:
        raise ReencryptionError(f"not a capsule: {exc}") from None


def _bounded(key_ct: bytes) -> bytes:
    if len(key_ct) > MAX_KEY_CT_BYTES:
        raise ReencryptionError(f"key ciphertext of {len(key_ct)} bytes exceeds the limit of {MAX_KEY_CT_BYTES}")
    return bytes(key_ct)

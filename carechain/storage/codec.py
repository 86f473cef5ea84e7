"""Segments, encryption and erasure coding of a dataset, and the Merkle commitments to its shares.

A dataset is cut into segments of `segment_size` plaintext bytes (the last may be shorter). Each segment is
sealed with AES-256-GCM under the owner's per-dataset key, then zfec cuts the ciphertext into `k` primary
blocks and adds `n - k` check blocks: any `k` of the `n` shares rebuild the ciphertext. Each share is cut
into `chunk_size` chunks whose RFC 9162 Merkle root is recorded in the manifest; audits ask for one chunk
and its inclusion proof, and a share is checked against its root before it is used for decoding.

Nonces are never chosen by callers: the nonce of a segment is `index (4 bytes) ‖ version (8 bytes)`, which
is injective, so it never repeats under a key as long as a (segment, version) pair is sealed only once.
`manifest.plan_update` guarantees that by taking every new version from the dataset's revision counter;
the owner must persist a planned manifest before uploading its shares (see docs/storage.md).

This module is pure: the key file's format is here, but making a key (randomness) and reading or writing its
file (disk) live in the shell `carechain.storage.keyfile`. zfec is imported when a segment is first coded, so
that reading a manifest or checking an audit answer works on hosts installed without the `storage` extra.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carechain import cbor
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree

KEY_SIZE = 32
TAG_SIZE = 16
# 1 MiB of ciphertext per segment: with k = 4 each share is exactly 256 KiB = 256 chunks of 1 KiB, a full
# Merkle tree (8-hash proofs) with no padding. Big enough that per-segment overhead (tag, manifest row,
# n roots on the ledger) is < 0.1 %, small enough that a one-record update rewrites 2 MiB of shares.
SEGMENT_SIZE = (1 << 20) - TAG_SIZE
CHUNK_SIZE = 1024
K = 4
N = 8
MAX_SEGMENTS = 1 << 32  # the nonce holds the segment index in 4 bytes
MAX_VERSION = (1 << 63) - 1

_AAD_DOMAIN = b"carechain/storage/segment/v1"
_MAC_DOMAIN = b"carechain/storage/plaintext-mac/v1"
_KEY_FILE_FORMAT = "carechain-dataset-key/v1"


class StorageError(ValueError):
    """A dataset, segment or share that cannot be encoded, decoded or verified; the message says which."""


class CorruptShareError(StorageError):
    """A share whose bytes do not match the Merkle root (or length) recorded for it."""

    def __init__(self, segment: int, share: int, detail: str) -> None:
        super().__init__(f"segment {segment} share {share}: {detail}")
        self.segment = segment
        self.share = share


class TooFewSharesError(StorageError):
    """Fewer than k intact shares of a segment: it cannot be rebuilt from what was supplied."""

    def __init__(self, segment: int, k: int, intact: Sequence[int], corrupt: Sequence[int]) -> None:
        bad = f"; corrupt and excluded: {sorted(corrupt)}" if corrupt else ""
        super().__init__(
            f"segment {segment}: {len(intact)} intact shares {sorted(intact)}, need {k}{bad}; "
            "fetch more shares from other miners or run a repair")
        self.segment = segment
        self.intact = tuple(sorted(intact))
        self.corrupt = tuple(sorted(corrupt))


class SegmentAuthenticationError(StorageError):
    """The rebuilt ciphertext failed AES-GCM authentication: tampered, wrong key, or wrong dataset/version."""


@dataclass(frozen=True)
class StorageParams:
    """Shape of a dataset's encoding; recorded in its manifest."""

    segment_size: int = SEGMENT_SIZE
    k: int = K
    n: int = N
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.k < self.n <= 256:
            raise StorageError(f"need 1 <= k < n <= 256 (zfec's limit), got k={self.k} n={self.n}")
        if self.segment_size <= 0 or self.chunk_size <= 0:
            raise StorageError(
                f"segment_size and chunk_size must be positive, got {self.segment_size} and {self.chunk_size}")

    def share_length(self, ciphertext_length: int) -> int:
        return -(-ciphertext_length // self.k)


@dataclass(frozen=True)
class SegmentLayout:
    """What a reader must know about one stored segment version (taken from the manifest)."""

    index: int
    version: int
    plaintext_length: int
    ciphertext_length: int
    roots: Mapping[int, bytes]  # share index -> Merkle root
    share_length: int


@dataclass(frozen=True)
class EncodedSegment:
    """One sealed, erasure-coded segment version, ready to upload: `shares[i]` has root `roots[i]`."""

    index: int
    version: int
    plaintext_length: int
    ciphertext_length: int
    plaintext_mac: bytes
    shares: tuple[bytes, ...]
    roots: tuple[bytes, ...]


class DatasetKey:
    """The owner's AES-256-GCM key for one dataset. Owns nonce and AAD derivation: callers never see them."""

    def __init__(self, dataset_id: str, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise StorageError(f"a dataset key is {KEY_SIZE} bytes, got {len(key)}")
        self.dataset_id = _check_dataset_id(dataset_id)
        self._aead = AESGCM(key)
        self._mac_key = hmac.digest(key, _MAC_DOMAIN, "sha256")
        self._key = bytes(key)

    def key_file_bytes(self) -> bytes:
        """The key file's content (the secret key included); `carechain.storage.keyfile` writes it 0600."""
        return cbor.encode({"format": _KEY_FILE_FORMAT, "dataset": self.dataset_id, "key": self._key})

    @classmethod
    def from_key_file_bytes(cls, data: bytes, source: str, dataset_id: str | None = None) -> DatasetKey:
        """Parse a key file's content read from `source` (named in errors), refusing one for another dataset."""
        try:
            doc = cbor.decode(data)
        except cbor.CBORError as e:
            raise StorageError(f"{source}: not a carechain dataset key file ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != _KEY_FILE_FORMAT:
            raise StorageError(f"{source}: not a carechain dataset key file (format {_KEY_FILE_FORMAT} expected)")
        if dataset_id is not None and doc.get("dataset") != dataset_id:
            raise StorageError(f"{source}: key is for dataset {doc.get('dataset')!r}, not {dataset_id!r}")
        found, key = doc.get("dataset"), doc.get("key")
        if not isinstance(found, str) or not isinstance(key, bytes):
            raise StorageError(f"{source}: not a carechain dataset key file (dataset or key missing)")
        return cls(found, key)

    def plaintext_mac(self, index: int, plaintext: bytes) -> bytes:
        """Keyed digest of a segment's plaintext: lets `plan_update` spot unchanged segments without
        revealing anything about the plaintext to whoever reads the manifest."""
        return hmac.digest(self._mac_key, index.to_bytes(4, "big") + plaintext, "sha256")

    def seal(self, index: int, version: int, plaintext: bytes) -> bytes:
        return self._aead.encrypt(_nonce(index, version), plaintext, self._aad(index, version))

    def open(self, index: int, version: int, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(_nonce(index, version), ciphertext, self._aad(index, version))
        except InvalidTag:
            raise SegmentAuthenticationError(
                f"dataset {self.dataset_id!r} segment {index} version {version}: ciphertext failed AES-GCM "
                "authentication (tampered shares that matched their roots, a wrong key file, or a manifest "
                "naming the wrong version)") from None

    def _aad(self, index: int, version: int) -> bytes:
        ds = self.dataset_id.encode()
        return _AAD_DOMAIN + len(ds).to_bytes(2, "big") + ds + index.to_bytes(4, "big") + version.to_bytes(8, "big")


def _zfec() -> ModuleType:
    """zfec, imported on first use: it is the `storage` extra, which an edge agent does not install."""
    try:
        import zfec
    except ImportError as exc:
        raise StorageError(
            "erasure coding needs zfec, which carechain installs with its `storage` extra: "
            "pip install 'carechain[storage]' (on a Raspberry Pi it builds from source: see docs/raspberry-pi.md)"
        ) from exc
    module: ModuleType = zfec  # zfec ships no types
    return module


def _nonce(index: int, version: int) -> bytes:
    if not 0 <= index < MAX_SEGMENTS:
        raise StorageError(f"segment index {index} does not fit the 4-byte nonce field")
    if not 1 <= version <= MAX_VERSION:
        raise StorageError(f"segment version must be 1..2**63-1, got {version}")
    return index.to_bytes(4, "big") + version.to_bytes(8, "big")


def _check_dataset_id(dataset_id: str) -> str:
    if not isinstance(dataset_id, str) or not 0 < len(dataset_id.encode()) <= 255:
        raise StorageError(f"a dataset id is 1..255 bytes of UTF-8, got {dataset_id!r}")
    return dataset_id


def split_segments(data: bytes, segment_size: int) -> list[bytes]:
    """Cut `data` into segments of `segment_size` (the last may be shorter; empty data has none)."""
    view = memoryview(data)
    return [bytes(view[i:i + segment_size]) for i in range(0, len(data), segment_size)]


def chunks(share: bytes, chunk_size: int) -> list[bytes]:
    """The audit chunks of a share (the last may be shorter)."""
    view = memoryview(share)
    return [bytes(view[i:i + chunk_size]) for i in range(0, len(share), chunk_size)]


def share_tree(share: bytes, chunk_size: int) -> MerkleTree:
    """The RFC 9162 tree over a share's chunks (leaf i = H(0x00 ‖ chunk i))."""
    if not share:
        raise StorageError("an empty share has no chunks to commit to")
    return MerkleTree(leaf_hash(c) for c in chunks(share, chunk_size))


def share_root(share: bytes, chunk_size: int) -> bytes:
    return share_tree(share, chunk_size).root()


def encode_segment(
    key: DatasetKey, index: int, version: int, plaintext: bytes, params: StorageParams
) -> EncodedSegment:
    """Seal one segment version and cut it into n shares with their Merkle roots."""
    if len(plaintext) > params.segment_size:
        raise StorageError(f"segment {index} has {len(plaintext)} bytes, more than segment_size {params.segment_size}")
    ciphertext = key.seal(index, version, plaintext)
    size = params.share_length(len(ciphertext))
    padded = ciphertext + bytes(size * params.k - len(ciphertext))
    blocks = tuple(padded[i * size:(i + 1) * size] for i in range(params.k))
    shares = tuple(bytes(s) for s in _zfec().Encoder(params.k, params.n).encode(blocks))
    return EncodedSegment(
        index=index, version=version, plaintext_length=len(plaintext), ciphertext_length=len(ciphertext),
        plaintext_mac=key.plaintext_mac(index, plaintext), shares=shares,
        roots=tuple(share_root(s, params.chunk_size) for s in shares))


def encode_dataset(key: DatasetKey, data: bytes, params: StorageParams, version: int = 1) -> list[EncodedSegment]:
    """Encode every segment of `data` at `version`."""
    segments = split_segments(data, params.segment_size)
    return [encode_segment(key, i, version, seg, params) for i, seg in enumerate(segments)]


def check_share(layout: SegmentLayout, share_index: int, share: bytes, chunk_size: int) -> None:
    """Raise `CorruptShareError` unless `share` is the share the manifest committed to."""
    root = layout.roots.get(share_index)
    if root is None:
        raise CorruptShareError(layout.index, share_index, "the manifest records no such share")
    if len(share) != layout.share_length:
        raise CorruptShareError(
            layout.index, share_index, f"{len(share)} bytes, the manifest records {layout.share_length}")
    if not hmac.compare_digest(share_root(share, chunk_size), root):
        raise CorruptShareError(
            layout.index, share_index, "Merkle root differs from the manifest's: the miner's copy is corrupt")


def intact_shares(layout: SegmentLayout, shares: Mapping[int, bytes], params: StorageParams) -> dict[int, bytes]:
    """The first k shares (by index) that match their roots; `TooFewSharesError` if fewer than k do.

    Checks shares lazily: once k intact ones are found, the rest are not hashed.
    """
    intact: dict[int, bytes] = {}
    corrupt: list[int] = []
    for i in sorted(shares):
        try:
            check_share(layout, i, shares[i], params.chunk_size)
        except CorruptShareError:
            corrupt.append(i)
            continue
        intact[i] = shares[i]
        if len(intact) == params.k:
            return intact
    raise TooFewSharesError(layout.index, params.k, list(intact), corrupt)


def _ciphertext(layout: SegmentLayout, shares: Mapping[int, bytes], params: StorageParams) -> bytes:
    good = intact_shares(layout, shares, params)
    nums = tuple(good)
    primary = _zfec().Decoder(params.k, params.n).decode(tuple(good[i] for i in nums), nums)
    return b"".join(primary)[:layout.ciphertext_length]


def decode_segment(key: DatasetKey, layout: SegmentLayout, shares: Mapping[int, bytes], params: StorageParams) -> bytes:
    """Rebuild one segment's plaintext from any k intact shares (share index -> bytes).

    Corrupt shares are detected by their roots and skipped; raises `TooFewSharesError` if fewer than k
    remain and `SegmentAuthenticationError` if the ciphertext fails AES-GCM.
    """
    plaintext = key.open(layout.index, layout.version, _ciphertext(layout, shares, params))
    if len(plaintext) != layout.plaintext_length:
        raise StorageError(
            f"segment {layout.index}: decrypted {len(plaintext)} bytes, the manifest records {layout.plaintext_length}")
    return plaintext


def regenerate_shares(
    layout: SegmentLayout, shares: Mapping[int, bytes], params: StorageParams, wanted: Sequence[int]
) -> dict[int, bytes]:
    """Rebuild the shares `wanted` from any k intact ones, without the dataset key (used by repair).

    zfec is deterministic, so a regenerated share is byte-identical to the lost one and matches its root.
    """
    ciphertext = _ciphertext(layout, shares, params)
    size = layout.share_length
    padded = ciphertext + bytes(size * params.k - len(ciphertext))
    blocks = tuple(padded[i * size:(i + 1) * size] for i in range(params.k))
    nums = tuple(sorted(set(wanted)))
    if any(not 0 <= i < params.n for i in nums):
        raise StorageError(f"share indexes must be in 0..{params.n - 1}, got {list(nums)}")
    out = _zfec().Encoder(params.k, params.n).encode(blocks, nums)
    return {i: bytes(s) for i, s in zip(nums, out, strict=True)}


"""The manifest of a stored dataset, and planning of puts and updates.

The manifest is public (its share roots go on the ledger): it names the dataset, its owner and encoding,
and per segment its current version, lengths, a keyed plaintext MAC (`DatasetKey.plaintext_mac`, reveals
nothing without the key) and, per share, the miner holding it, its Merkle root and length.

Versions: the manifest has a `revision`, incremented by every update; a segment written by revision r has
version r. So (segment, version) pairs, and thus AES-GCM nonces, are never reused, provided the owner
persists each planned manifest *before* uploading its shares (an abandoned plan's revision is then never
planned again). Old versions replaced by an update are listed in `reclaimable` until the new shares are
confirmed; then `Manifest.reclaimed()` drops them and the miners may delete them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carechain.storage.codec import (
    DatasetKey,
    EncodedSegment,
    SegmentLayout,
    StorageError,
    StorageParams,
    decode_segment,
    encode_segment,
    split_segments,
)
from carechain.storage.placement import place_shares

_Hex32 = Field(pattern=r"^[0-9a-f]{64}$")


class ShareRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int = Field(ge=0, le=255)
    miner: str = Field(min_length=1)
    root: str = _Hex32
    length: int = Field(gt=0)


class SegmentRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int = Field(ge=0)
    version: int = Field(ge=1)
    plaintext_length: int = Field(ge=0)
    ciphertext_length: int = Field(gt=0)
    plaintext_mac: str = _Hex32
    shares: tuple[ShareRecord, ...]

    def layout(self) -> SegmentLayout:
        """What `codec.decode_segment` needs to rebuild and check this segment."""
        return SegmentLayout(
            index=self.index, version=self.version, plaintext_length=self.plaintext_length,
            ciphertext_length=self.ciphertext_length, roots={s.index: bytes.fromhex(s.root) for s in self.shares},
            share_length=self.shares[0].length)

    def holders(self) -> dict[int, str]:
        return {s.index: s.miner for s in self.shares}


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal[1] = 1
    dataset_id: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    segment_size: int = Field(gt=0)
    k: int
    n: int
    chunk_size: int = Field(gt=0)
    revision: int = Field(ge=1)
    length: int = Field(ge=0)
    segments: tuple[SegmentRecord, ...]
    # Old segment versions superseded by this revision; delete them from their miners once confirmed.
    reclaimable: tuple[SegmentRecord, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """A manifest read from the ledger or a file must describe a decodable dataset."""
        params = self.params  # checks k and n
        if [s.index for s in self.segments] != list(range(len(self.segments))):
            raise ValueError("segments must be listed in order 0, 1, 2, … with no gaps")
        if sum(s.plaintext_length for s in self.segments) != self.length:
            raise ValueError(f"segment lengths do not add up to the dataset length {self.length}")
        for s in self.segments:
            if s.version > self.revision:
                raise ValueError(f"segment {s.index} has version {s.version}, after the manifest's revision")
            if s.plaintext_length > self.segment_size:
                raise ValueError(f"segment {s.index} is longer than segment_size")
            if [sh.index for sh in s.shares] != list(range(self.n)):
                raise ValueError(f"segment {s.index} must list shares 0..{self.n - 1} in order")
            if {sh.length for sh in s.shares} != {params.share_length(s.ciphertext_length)}:
                raise ValueError(f"segment {s.index}: share lengths do not match its ciphertext length and k")
            if len({sh.miner for sh in s.shares}) != self.n:
                raise ValueError(f"segment {s.index}: two shares on one miner (each share needs its own)")
        return self

    @property
    def params(self) -> StorageParams:
        return StorageParams(segment_size=self.segment_size, k=self.k, n=self.n, chunk_size=self.chunk_size)

    def reclaimed(self) -> Manifest:
        """This manifest once the new versions are confirmed and the old ones deleted."""
        return self.model_copy(update={"reclaimable": ()})

    def segments_touching(self, offset: int, length: int) -> list[int]:
        """Indexes of the segments that bytes [offset, offset + length) fall in (for range updates)."""
        if offset < 0 or length < 0:
            raise StorageError(f"a byte range needs offset >= 0 and length >= 0, got {offset}, {length}")
        if length == 0:
            return []
        return list(range(offset // self.segment_size, (offset + length - 1) // self.segment_size + 1))


@dataclass(frozen=True)
class UpdatePlan:
    """A planned revision: the new manifest (persist it first), the segments to upload, the versions to reclaim."""

    manifest: Manifest
    upload: tuple[EncodedSegment, ...]
    reclaim: tuple[SegmentRecord, ...]


def _record(enc: EncodedSegment, miners: tuple[str, ...]) -> SegmentRecord:
    return SegmentRecord(
        index=enc.index, version=enc.version, plaintext_length=enc.plaintext_length,
        ciphertext_length=enc.ciphertext_length, plaintext_mac=enc.plaintext_mac.hex(),
        shares=tuple(ShareRecord(index=i, miner=m, root=r.hex(), length=len(s))
                     for i, (m, r, s) in enumerate(zip(miners, enc.roots, enc.shares, strict=True))))


def _encode_and_place(
    key: DatasetKey, index: int, version: int, plaintext: bytes, params: StorageParams, miners: list[str], seed: bytes
) -> tuple[EncodedSegment, SegmentRecord]:
    enc = encode_segment(key, index, version, plaintext, params)
    placed = place_shares(seed, key.dataset_id, index, version, miners, params.n)
    return enc, _record(enc, placed)


def plan_put(
    key: DatasetKey, owner: str, data: bytes, miners: Iterable[str], seed: bytes, params: StorageParams | None = None
) -> UpdatePlan:
    """Revision 1 of a dataset: every segment at version 1, placed by `seed` (a final checkpoint's)."""
    params = params or StorageParams()
    pool = sorted(set(miners))
    upload, records = [], []
    for i, seg in enumerate(split_segments(data, params.segment_size)):
        enc, rec = _encode_and_place(key, i, 1, seg, params, pool, seed)
        upload.append(enc)
        records.append(rec)
    manifest = Manifest(
        dataset_id=key.dataset_id, owner=owner, segment_size=params.segment_size, k=params.k, n=params.n,
        chunk_size=params.chunk_size, revision=1, length=len(data), segments=tuple(records))
    return UpdatePlan(manifest=manifest, upload=tuple(upload), reclaim=())


def plan_update(
    old: Manifest, key: DatasetKey, new: bytes | Mapping[int, bytes], miners: Iterable[str], seed: bytes
) -> UpdatePlan:
    """The next revision of `old`: re-encode only segments whose plaintext changed, at version revision + 1.

    `new` is either the whole new content, or a map from segment index to that segment's new plaintext
    (every segment but the last must stay exactly `segment_size` long; a new index may extend the
    dataset by one segment). Unchanged segments keep their version and placement; segments that
    disappear (the data got shorter) and replaced versions are listed for reclamation.
    """
    if key.dataset_id != old.dataset_id:
        raise StorageError(f"key is for dataset {key.dataset_id!r}, manifest for {old.dataset_id!r}")
    params = old.params
    current = {s.index: s for s in old.segments}
    if isinstance(new, bytes | bytearray | memoryview):
        segments = dict(enumerate(split_segments(bytes(new), params.segment_size)))
        count = len(segments)
    else:
        segments = dict(new)
        count = max([len(old.segments), *(i + 1 for i in segments)])
        missing = [i for i in range(count) if i not in current and i not in segments]
        if missing:
            raise StorageError(f"segments {missing} are neither in the dataset nor in the update")
    for i in range(count - 1):
        if i not in segments and current[i].plaintext_length != params.segment_size:
            raise StorageError(f"segment {i} is short ({current[i].plaintext_length} bytes) and must be rewritten "
                               "in full before the dataset can grow past it")
    for i, new_seg in segments.items():
        if len(new_seg) > params.segment_size or (i < count - 1 and len(new_seg) != params.segment_size):
            raise StorageError(
                f"segment {i} would be {len(new_seg)} bytes; "
                f"every segment but the last is exactly {params.segment_size}")
    version = old.revision + 1
    pool = sorted(set(miners))
    upload: list[EncodedSegment] = []
    records: list[SegmentRecord] = []
    reclaim: list[SegmentRecord] = [s for s in old.segments if s.index >= count]
    length = 0
    for i in range(count):
        prev = current.get(i)
        seg = segments.get(i)
        if seg is not None and (prev is None or key.plaintext_mac(i, seg).hex() != prev.plaintext_mac):
            enc, rec = _encode_and_place(key, i, version, seg, params, pool, seed)
            upload.append(enc)
            records.append(rec)
            if prev is not None:
                reclaim.append(prev)
        elif prev is not None:
            records.append(prev)
        length += records[-1].plaintext_length
    manifest = Manifest.model_validate(old.model_dump() | {
        "revision": version, "length": length, "segments": [r.model_dump() for r in records],
        "reclaimable": [r.model_dump() for r in old.reclaimable + tuple(reclaim)]})
    return UpdatePlan(manifest=manifest, upload=tuple(upload), reclaim=tuple(reclaim))


def decode_dataset(key: DatasetKey, manifest: Manifest, shares: Mapping[int, Mapping[int, bytes]]) -> bytes:
    """Rebuild the whole dataset from `shares[segment][share index]` (any k intact shares per segment)."""
    params = manifest.params
    return b"".join(decode_segment(key, s.layout(), shares.get(s.index, {}), params) for s in manifest.segments)

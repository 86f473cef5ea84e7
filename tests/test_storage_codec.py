"""Storage codec: AES-256-GCM segments, zfec k-of-n shares and their Merkle roots (issue 7)."""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain import cbor
from carechain.files import FilePermissionError
from carechain.storage.codec import (
    CorruptShareError,
    DatasetKey,
    SegmentAuthenticationError,
    SegmentLayout,
    StorageError,
    StorageParams,
    TooFewSharesError,
    check_share,
    decode_segment,
    encode_segment,
    regenerate_shares,
    share_root,
)
from carechain.storage.keyfile import load_dataset_key, new_dataset_key, save_dataset_key

KEY = DatasetKey("patient-42/telemetry", bytes(range(32)))
SMALL = StorageParams(segment_size=4096, k=3, n=6, chunk_size=64)


def layout(enc, share_length=None) -> SegmentLayout:
    return SegmentLayout(
        index=enc.index, version=enc.version, plaintext_length=enc.plaintext_length,
        ciphertext_length=enc.ciphertext_length, roots=dict(enumerate(enc.roots)),
        share_length=share_length or len(enc.shares[0]))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=4096), k=st.integers(1, 5), extra=st.integers(1, 4), pick=st.randoms())
def test_any_bytes_round_trip_through_any_k_of_n_shares(data, k, extra, pick):
    params = StorageParams(segment_size=4096, k=k, n=k + extra, chunk_size=64)
    enc = encode_segment(KEY, 7, 3, data, params)
    chosen = pick.sample(range(params.n), k)
    assert decode_segment(KEY, layout(enc), {i: enc.shares[i] for i in chosen}, params) == data


@pytest.mark.parametrize("params", [SMALL, StorageParams(segment_size=4096, k=4, n=8, chunk_size=64)])
def test_every_k_subset_of_n_shares_decodes_exactly(params):
    data = os.urandom(3001)
    enc = encode_segment(KEY, 0, 1, data, params)
    subsets = list(itertools.combinations(range(params.n), params.k))
    assert len(subsets) in (20, 70)
    for subset in subsets:
        assert decode_segment(KEY, layout(enc), {i: enc.shares[i] for i in subset}, params) == data


def test_shares_are_balanced_and_roots_commit_to_them():
    enc = encode_segment(KEY, 0, 1, os.urandom(4000), SMALL)
    assert len(enc.shares) == 6 and len({len(s) for s in enc.shares}) == 1
    assert enc.ciphertext_length == 4000 + 16
    assert all(share_root(s, 64) == r for s, r in zip(enc.shares, enc.roots, strict=True))


def test_default_parameters_give_full_256_chunk_shares():
    params = StorageParams()
    enc = encode_segment(KEY, 0, 1, bytes(params.segment_size), params)
    assert enc.ciphertext_length == 1 << 20
    assert {len(s) for s in enc.shares} == {256 * 1024} and len(enc.shares) == 8


def test_losing_n_minus_k_shares_still_decodes():
    data = os.urandom(4096)
    enc = encode_segment(KEY, 1, 1, data, SMALL)
    survivors = {i: enc.shares[i] for i in (1, 4, 5)}  # shares 0, 2, 3 lost
    assert decode_segment(KEY, layout(enc), survivors, SMALL) == data
    with pytest.raises(TooFewSharesError, match=r"2 intact shares \[4, 5\], need 3"):
        decode_segment(KEY, layout(enc), {4: enc.shares[4], 5: enc.shares[5]}, SMALL)


def test_a_corrupted_share_is_detected_by_its_root_and_excluded():
    data = os.urandom(2000)
    enc = encode_segment(KEY, 2, 5, data, SMALL)
    bad = bytearray(enc.shares[0])
    bad[10] ^= 1
    with pytest.raises(CorruptShareError, match="segment 2 share 0: Merkle root differs"):
        check_share(layout(enc), 0, bytes(bad), 64)
    shares = {i: s for i, s in enumerate(enc.shares)} | {0: bytes(bad)}
    assert decode_segment(KEY, layout(enc), shares, SMALL) == data
    with pytest.raises(TooFewSharesError) as e:
        decode_segment(KEY, layout(enc), {0: bytes(bad), 1: enc.shares[1], 2: enc.shares[2]}, SMALL)
    assert e.value.corrupt == (0,) and e.value.intact == (1, 2)
    with pytest.raises(CorruptShareError, match="bytes, the manifest records"):
        check_share(layout(enc), 1, enc.shares[1][:-1], 64)


def test_aes_gcm_detects_tampering_that_matches_the_recorded_roots():
    # Someone who can also rewrite the manifest's roots (a lying bridge) still cannot forge plaintext.
    enc = encode_segment(KEY, 0, 1, b"blood pressure 120/80", SMALL)
    forged = [bytearray(s) for s in enc.shares]
    forged[0][0] ^= 0x80  # share 0 is the first primary block of the ciphertext
    roots = {i: share_root(bytes(s), 64) for i, s in enumerate(forged)}
    lay = SegmentLayout(0, 1, enc.plaintext_length, enc.ciphertext_length, roots, len(enc.shares[0]))
    with pytest.raises(SegmentAuthenticationError, match="segment 0 version 1: ciphertext failed AES-GCM"):
        decode_segment(KEY, lay, {i: bytes(forged[i]) for i in range(3)}, SMALL)


def test_the_aad_binds_dataset_segment_and_version():
    enc = encode_segment(KEY, 3, 2, b"x" * 100, SMALL)
    shares = dict(enumerate(enc.shares))
    for other_key, idx, version in [(DatasetKey("another", bytes(range(32))), 3, 2), (KEY, 4, 2), (KEY, 3, 1)]:
        lay = SegmentLayout(idx, version, 100, enc.ciphertext_length, dict(enumerate(enc.roots)), len(enc.shares[0]))
        with pytest.raises(SegmentAuthenticationError):
            decode_segment(other_key, lay, shares, SMALL)


def test_nonces_differ_per_segment_and_version():
    a = encode_segment(KEY, 0, 1, bytes(64), SMALL).shares[0]
    assert a != encode_segment(KEY, 0, 2, bytes(64), SMALL).shares[0]
    assert a != encode_segment(KEY, 1, 1, bytes(64), SMALL).shares[0]
    assert a == encode_segment(KEY, 0, 1, bytes(64), SMALL).shares[0]  # deterministic: same inputs, same bytes
    with pytest.raises(StorageError, match="version must be"):
        encode_segment(KEY, 0, 0, b"", SMALL)


def test_regenerated_shares_match_their_roots_without_the_key():
    enc = encode_segment(KEY, 0, 1, os.urandom(3000), SMALL)
    rebuilt = regenerate_shares(layout(enc), {i: enc.shares[i] for i in (2, 3, 5)}, SMALL, [0, 1, 4])
    assert rebuilt == {i: enc.shares[i] for i in (0, 1, 4)}


def test_key_file_is_private_and_bound_to_its_dataset(tmp_path):
    path = tmp_path / "keys" / "ds.key"
    save_dataset_key(KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_dataset_key(path, KEY.dataset_id)
    enc = encode_segment(KEY, 0, 1, b"hello", SMALL)
    assert decode_segment(loaded, layout(enc), dict(enumerate(enc.shares)), SMALL) == b"hello"
    with pytest.raises(StorageError, match="is for dataset"):
        load_dataset_key(path, "other")
    path.chmod(0o644)
    with pytest.raises(FilePermissionError, match="chmod 600"):
        load_dataset_key(path)


def test_new_keys_are_random_and_round_trip_through_their_file(tmp_path):
    first, second = new_dataset_key("ds"), new_dataset_key("ds")
    assert first.key_file_bytes() != second.key_file_bytes()
    save_dataset_key(first, tmp_path / "ds.key")
    assert load_dataset_key(tmp_path / "ds.key").key_file_bytes() == first.key_file_bytes()


@pytest.mark.parametrize("content", [b"", b"\xa1\x61x\x01", cbor.encode({"format": "carechain-dataset-key/v1"})])
def test_a_file_that_is_not_a_key_file_is_named(content: bytes) -> None:
    with pytest.raises(StorageError, match="^ds.key: not a carechain dataset key file"):
        DatasetKey.from_key_file_bytes(content, "ds.key")


def test_coding_without_zfec_names_the_extra_to_install():
    # A host installed without the `storage` extra (an edge agent) can still import the storage cores;
    # only coding a segment needs zfec, and the error says what to install.
    code = (
        "import sys; sys.modules['zfec'] = None\n"
        "from carechain.storage.codec import DatasetKey, StorageError, StorageParams, encode_segment\n"
        "import carechain.storage.manifest, carechain.storage.audit, carechain.storage.repair\n"
        "try:\n"
        "    encode_segment(DatasetKey('ds', bytes(32)), 0, 1, b'x', StorageParams())\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert "pip install 'carechain[storage]'" in out


def test_parameters_are_checked():
    with pytest.raises(StorageError, match="1 <= k < n <= 256"):
        StorageParams(k=4, n=4)
    with pytest.raises(StorageError, match="more than segment_size"):
        encode_segment(KEY, 0, 1, bytes(4097), SMALL)

"""Threshold re-encryption of epoch data keys (umbral-pre): m of n miners open a key for the requester the
owner named, fewer cannot, and every fragment is checked before it is used."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain.identity import KeyFileError
from carechain.reencryption import (
    PRE_PUBLIC_SIZE,
    PreKey,
    ReencryptionError,
    VerifiedCfrag,
    encapsulate,
    make_kfrags,
    open_data_key,
    owner_decrypt,
    reencrypt,
    verify_cfrag,
    verify_kfrag,
)

OWNER = PreKey.from_seed(b"\x01" * 32)
DOCTOR = PreKey.from_seed(b"\x02" * 32)
MALLORY = PreKey.from_seed(b"\x03" * 32)
DATA_KEY = bytes(range(32))
GOOD_CAPSULE, _ = encapsulate(OWNER.public_key, DATA_KEY)
GOOD_CFRAG = reencrypt(GOOD_CAPSULE, verify_kfrag(make_kfrags(OWNER, DOCTOR.public_key, 1, 1)[0], OWNER.public_key,
                                                  OWNER.verifying_key, DOCTOR.public_key))


@pytest.fixture(scope="module")
def epoch() -> tuple[bytes, bytes]:
    return encapsulate(OWNER.public_key, DATA_KEY)


@pytest.fixture(scope="module")
def kfrags() -> list[bytes]:
    return make_kfrags(OWNER, DOCTOR.public_key, 3, 5)


def _cfrags(kfrags: list[bytes], capsule: bytes, requester: PreKey = DOCTOR) -> list[VerifiedCfrag]:
    """What each miner does (verify its kfrag, re-encrypt) and then the requester (verify each cfrag)."""
    out = []
    for kfrag in kfrags:
        cfrag = reencrypt(capsule, verify_kfrag(kfrag, OWNER.public_key, OWNER.verifying_key, requester.public_key))
        out.append(verify_cfrag(cfrag, capsule, OWNER.public_key, OWNER.verifying_key, requester.public_key))
    return out


def test_any_three_of_five_miners_open_the_data_key_for_the_requester(epoch: tuple[bytes, bytes],
                                                                     kfrags: list[bytes]) -> None:
    capsule, key_ct = epoch
    cfrags = _cfrags(kfrags, capsule)
    for chosen in itertools.combinations(cfrags, 3):
        assert open_data_key(DOCTOR, OWNER.public_key, capsule, chosen, key_ct) == DATA_KEY
    assert open_data_key(DOCTOR, OWNER.public_key, capsule, cfrags, key_ct) == DATA_KEY


def test_two_cooperating_miners_cannot_open_the_data_key(epoch: tuple[bytes, bytes], kfrags: list[bytes]) -> None:
    capsule, key_ct = epoch
    cfrags = _cfrags(kfrags, capsule)
    for pair in itertools.combinations(cfrags, 2):
        with pytest.raises(ReencryptionError, match="too few") as caught:
            open_data_key(DOCTOR, OWNER.public_key, capsule, pair, key_ct)
        assert caught.value.reason == "bad_reencryption"
    with pytest.raises(ReencryptionError):
        open_data_key(DOCTOR, OWNER.public_key, capsule, [cfrags[0]] * 3, key_ct)  # one miner, thrice
    with pytest.raises(ReencryptionError):
        open_data_key(DOCTOR, OWNER.public_key, capsule, [], key_ct)


def test_only_the_named_requester_opens_with_the_fragments(epoch: tuple[bytes, bytes], kfrags: list[bytes]) -> None:
    capsule, key_ct = epoch
    cfrags = _cfrags(kfrags, capsule)
    with pytest.raises(ReencryptionError):
        open_data_key(MALLORY, OWNER.public_key, capsule, cfrags[:3], key_ct)
    with pytest.raises(ReencryptionError):  # the miners' fragments, claimed for another requester
        verify_cfrag(bytes(cfrags[0]), capsule, OWNER.public_key, OWNER.verifying_key, MALLORY.public_key)


def test_the_owner_opens_her_own_capsule_and_nobody_else_does(epoch: tuple[bytes, bytes]) -> None:
    capsule, key_ct = epoch
    assert owner_decrypt(OWNER, capsule, key_ct) == DATA_KEY
    with pytest.raises(ReencryptionError):
        owner_decrypt(DOCTOR, capsule, key_ct)
    with pytest.raises(ReencryptionError):
        owner_decrypt(OWNER, capsule, key_ct[:-1] + bytes([key_ct[-1] ^ 1]))


def test_a_garbage_capsule_fragment_is_rejected(epoch: tuple[bytes, bytes], kfrags: list[bytes]) -> None:
    capsule, _ = epoch
    good = bytes(_cfrags(kfrags[:1], capsule)[0])
    other_capsule, _ = encapsulate(OWNER.public_key, DATA_KEY)
    other_epoch = bytes(_cfrags(kfrags[:1], other_capsule)[0])  # genuine, but of another epoch's capsule
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    for garbage in (b"", os.urandom(len(good)), bytes(flipped), good[:-1], other_epoch, b"\x00" * 2000):
        with pytest.raises(ReencryptionError):
            verify_cfrag(garbage, capsule, OWNER.public_key, OWNER.verifying_key, DOCTOR.public_key)


def test_a_key_fragment_verifies_only_for_its_owner_and_requester(kfrags: list[bytes]) -> None:
    kfrag = kfrags[0]
    verify_kfrag(kfrag, OWNER.public_key, OWNER.verifying_key, DOCTOR.public_key)
    for owner_pk, owner_vk, requester_pk in ((OWNER.public_key, OWNER.verifying_key, MALLORY.public_key),
                                             (MALLORY.public_key, OWNER.verifying_key, DOCTOR.public_key),
                                             (OWNER.public_key, MALLORY.verifying_key, DOCTOR.public_key)):
        with pytest.raises(ReencryptionError, match="does not verify"):
            verify_kfrag(kfrag, owner_pk, owner_vk, requester_pk)
    for garbage in (b"", os.urandom(len(kfrag)), kfrag[:-3], b"\x00" * 5000):
        with pytest.raises(ReencryptionError):
            verify_kfrag(garbage, OWNER.public_key, OWNER.verifying_key, DOCTOR.public_key)


@pytest.mark.parametrize("key", [b"", b"\x02" * 32, b"\x02" * 34, b"\x05" + b"\xff" * 32])
def test_malformed_public_keys_are_refused_with_a_reencryption_error(key: bytes, epoch: tuple[bytes, bytes]) -> None:
    with pytest.raises(ReencryptionError):
        encapsulate(key, DATA_KEY)
    with pytest.raises(ReencryptionError):
        make_kfrags(OWNER, key, 3, 5)


def test_malformed_capsules_are_refused(epoch: tuple[bytes, bytes], kfrags: list[bytes]) -> None:
    capsule, key_ct = epoch
    vk = verify_kfrag(kfrags[0], OWNER.public_key, OWNER.verifying_key, DOCTOR.public_key)
    for bad in (b"", capsule[:-1], b"\x00" * 300):
        with pytest.raises(ReencryptionError):
            reencrypt(bad, vk)
        with pytest.raises(ReencryptionError):
            owner_decrypt(OWNER, bad, key_ct)


@pytest.mark.parametrize(("m", "n"), [(0, 5), (4, 3), (3, 17)])
def test_impossible_thresholds_are_refused(m: int, n: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        make_kfrags(OWNER, DOCTOR.public_key, m, n)


def test_key_pairs_derive_from_their_seed_and_print_no_secret() -> None:
    again = PreKey.from_seed(b"\x01" * 32)
    assert again.public_key == OWNER.public_key and again.verifying_key == OWNER.verifying_key
    assert len(OWNER.public_key) == len(OWNER.verifying_key) == PRE_PUBLIC_SIZE
    assert OWNER.public_key != OWNER.verifying_key  # two keys from two labels
    assert PreKey.generate().public_key != PreKey.generate().public_key
    assert "01010101" not in repr(OWNER) and OWNER.public_key.hex() in repr(OWNER)
    with pytest.raises(ValueError):
        PreKey.from_seed(b"\x01" * 31)


def test_a_key_file_is_0600_not_overwritten_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "pre.key"
    key = PreKey.generate()
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PreKey.load(path).public_key == key.public_key
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        PreKey.generate().save(path)
    assert PreKey.load(path).public_key == key.public_key
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="too open"):
        PreKey.load(path)
    with pytest.raises(KeyFileError, match="no such"):
        PreKey.load(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.write_text("carechain-ed25519-seed-v1\nAAAA\n")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match="expected header 'carechain-pre-seed-v1'"):
        PreKey.load(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=200))
def test_untrusted_bytes_only_ever_raise_a_reencryption_error(frag: bytes, capsule: bytes) -> None:
    pk, vk = OWNER.public_key, OWNER.verifying_key
    for call in (lambda: verify_kfrag(frag, pk, vk, DOCTOR.public_key),
                 lambda: verify_cfrag(frag, GOOD_CAPSULE, pk, vk, DOCTOR.public_key),
                 lambda: verify_cfrag(GOOD_CFRAG, capsule, pk, vk, DOCTOR.public_key),
                 lambda: owner_decrypt(OWNER, capsule, frag),
                 lambda: owner_decrypt(OWNER, GOOD_CAPSULE, frag)):
        with pytest.raises(ReencryptionError):
            call()


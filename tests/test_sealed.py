"""Sealed readings (protocol v2): the AEAD binds each ciphertext to its event, the wire form is strict, and
v1 payloads are what they always were."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain import cbor, envelope, events, sealed
from carechain.envelope import EnvelopeError
from carechain.errors import Reason
from carechain.events import PayloadError, make_payload, make_sealed_payload, validate_payload
from carechain.identity import Identity
from carechain.sealed import (
    MAX_CIPHERTEXT_BYTES,
    SealedError,
    associated_data,
    ciphertext_hash,
    encode_sealed,
    epoch_of,
    open_body,
    seal_body,
    split_wire,
)

KEY = bytes(range(32))
NONCE = b"\x01" * 12
DEV = Identity.from_seed(b"\x05" * 32)
FIELDS = ("abcdefgh", 7, 1_700_000_000_000, "heart_rate", 472_222)

keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=12, max_size=12)
devs = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=64)
ints = st.integers(min_value=0, max_value=2**63 - 1)
kinds = st.sampled_from(sorted(events.SEALED_KINDS))
bodies = st.dictionaries(st.text(max_size=16), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=32),
                                                         st.booleans(), st.binary(max_size=32)), max_size=8)


@settings(max_examples=150)
@given(keys, nonces, devs, ints, ints, kinds, ints, bodies)
def test_a_sealed_body_opens_under_its_key_and_event_fields(key: bytes, nonce: bytes, dev: str, seq: int, ts: int,
                                                           kind: str, epoch: int, body: dict[str, Any]) -> None:
    ct = seal_body(key, nonce, dev, seq, ts, kind, epoch, body)
    assert ct[:12] == nonce and len(ct) == 12 + len(cbor.encode(body)) + 16
    assert open_body(key, dev, seq, ts, kind, epoch, ct) == body


@settings(max_examples=200)
@given(st.data())
def test_any_flipped_bit_of_a_ciphertext_is_detected(data: st.DataObject) -> None:
    ct = seal_body(KEY, NONCE, *FIELDS, {"bpm": 61})
    bit = data.draw(st.integers(min_value=0, max_value=8 * len(ct) - 1))
    tampered = bytearray(ct)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SealedError) as caught:
        open_body(KEY, *FIELDS, bytes(tampered))
    assert caught.value.reason == "bad_ciphertext"


@settings(max_examples=150)
@given(st.data())
def test_a_ciphertext_does_not_open_as_another_event(data: st.DataObject) -> None:
    ct = seal_body(KEY, NONCE, *FIELDS, {"bpm": 61})
    position = data.draw(st.integers(min_value=0, max_value=4))
    other = data.draw([devs, ints, ints, kinds, ints][position].filter(lambda x: x != FIELDS[position]))
    fields: list[Any] = list(FIELDS)
    fields[position] = other
    dev, seq, ts, kind, epoch = fields
    with pytest.raises(SealedError, match="does not open"):
        open_body(KEY, dev, seq, ts, kind, epoch, ct)


def test_a_ciphertext_does_not_open_under_another_epoch_key() -> None:
    ct = seal_body(KEY, NONCE, *FIELDS, {"bpm": 61})
    with pytest.raises(SealedError):
        open_body(bytes(32), *FIELDS, ct)


@pytest.mark.parametrize("ct", [b"", b"\x00" * 27, b"\x00" * (MAX_CIPHERTEXT_BYTES + 1)])
def test_a_ciphertext_of_impossible_length_is_refused_before_decryption(ct: bytes) -> None:
    with pytest.raises(SealedError, match="bytes"):
        open_body(KEY, *FIELDS, ct)


def test_a_sealed_plaintext_that_is_not_a_deterministic_map_is_refused() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    aad = associated_data(*FIELDS)
    for plain in (cbor.encode([1, 2]), b"\xbf\x61a\x01\xff"):  # an array; an indefinite-length map
        ct = NONCE + ChaCha20Poly1305(KEY).encrypt(NONCE, plain, aad)
        with pytest.raises(SealedError):
            open_body(KEY, *FIELDS, ct)


def test_keys_and_nonces_of_the_wrong_size_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="data key"):
        seal_body(KEY[:16], NONCE, *FIELDS, {})
    with pytest.raises(ValueError, match="nonce"):
        seal_body(KEY, NONCE[:8], *FIELDS, {})
    with pytest.raises(ValueError, match="limit"):
        seal_body(KEY, NONCE, *FIELDS, {"x": "y" * MAX_CIPHERTEXT_BYTES})


def test_the_associated_data_is_the_domain_and_the_cbor_of_the_event_fields() -> None:
    assert associated_data(*FIELDS) == b"carechain/sealed/v2\x00" + cbor.encode(list(FIELDS))


def test_the_ciphertext_hash_is_domain_separated_sha256() -> None:
    ct = seal_body(KEY, NONCE, *FIELDS, {"bpm": 61})
    assert ciphertext_hash(ct) == hashlib.sha256(b"carechain/ct/v2\x00" + ct).digest()
    assert ciphertext_hash(ct) != hashlib.sha256(ct).digest() and len(ciphertext_hash(ct)) == 32


def test_epochs_count_whole_periods_from_the_unix_epoch() -> None:
    assert epoch_of(0, sealed.DEFAULT_EPOCH_MS) == 0
    assert epoch_of(3_599_999, 3_600_000) == 0 and epoch_of(3_600_000, 3_600_000) == 1
    with pytest.raises(ValueError):
        epoch_of(5, 0)


# -- wire form ----------------------------------------------------------------------------------------------

def _cose(seq: int = 0) -> bytes:
    return envelope.sign(DEV, make_sealed_payload(DEV.device_id, seq, 1_700_000_000_000, "heart_rate", 5,
                                                  b"\x11" * 32))


@settings(max_examples=100)
@given(st.binary(min_size=1, max_size=MAX_CIPHERTEXT_BYTES))
def test_a_sealed_event_splits_back_into_its_envelope_and_ciphertext(ct: bytes) -> None:
    cose = _cose()
    raw = encode_sealed(cose, ct)
    assert raw[0] == 0xA2 and raw == cbor.encode({"ct": ct, "ev": cose})
    assert split_wire(raw) == (cose, ct)


@pytest.mark.parametrize("raw", [b"\xd2", b"\xd2\x84 not even cbor", b"\xff\xfe garbage", b"\x84\x01", b""])
def test_a_plain_envelope_or_non_map_passes_through_undecoded(raw: bytes) -> None:
    # The envelope parser names what is wrong with it, with the reasons v1 always gave.
    assert split_wire(raw) == (raw, None)


def test_a_v1_event_passes_through_unchanged() -> None:
    cose = envelope.sign(DEV, make_payload(DEV.device_id, 0, 1, "heart_rate", {"bpm": 60}))
    assert split_wire(cose) == (cose, None)


@pytest.mark.parametrize(("raw", "says"), [
    (cbor.encode({"ct": b"x", "ev": _cose(), "extra": 1}), "exactly"),
    (cbor.encode({"ct": b"x"}), "exactly"),
    (cbor.encode({"ct": "x", "ev": _cose()}), "byte strings"),
    (cbor.encode({"ct": b"x", "ev": [1]}), "well-formed"),  # nested: refused by depth
    (cbor.encode({"ct": b"x" * (MAX_CIPHERTEXT_BYTES + 1), "ev": _cose()}), "exceeds"),
    (cbor.encode({"ct": b"x", "ev": b"\x84\x01"}), "COSE_Sign1"),
    (cbor.encode({1: b"x", 2: b"y"}), "exactly"),
    (b"\xa2\x62ct\x41x\x62ev\x41", "well-formed"),  # truncated
    (cbor.encode({"ct": b"x", "ev": _cose()}) + b"\x00", "well-formed"),  # trailing byte
    (b"\xa2\x62ev\x41\xd2\x62ct\x41x", "deterministically"),  # keys out of order
    (b"\xa2\x62ct\x58\x01x\x62ev\x41\xd2", "deterministically"),  # long-form length
    (b"\xbf\x62ct\x41x\x62ev\x41\xd2\xff", "well-formed"),  # indefinite-length map (first byte 0xbf, a map)
])
def test_a_map_that_is_not_exactly_the_sealed_form_is_a_bad_envelope(raw: bytes, says: str) -> None:
    with pytest.raises(EnvelopeError, match=says) as caught:
        split_wire(raw)
    assert caught.value.reason == Reason.BAD_ENVELOPE and not caught.value.retryable


@settings(max_examples=300)
@given(st.binary(max_size=256))
def test_split_wire_refuses_any_bytes_only_with_an_envelope_error(raw: bytes) -> None:
    try:
        cose, ct = split_wire(raw)
    except EnvelopeError as exc:
        assert exc.reason == Reason.BAD_ENVELOPE
    else:
        assert (cose, ct) == (raw, None) or raw == encode_sealed(cose, ct or b"")


def test_encode_sealed_refuses_what_split_wire_would() -> None:
    with pytest.raises(ValueError):
        encode_sealed(_cose(), b"x" * (MAX_CIPHERTEXT_BYTES + 1))
    with pytest.raises(ValueError):
        encode_sealed(b"\x84not a cose", b"x")


# -- payloads: v2 rules, v1 unchanged ---------------------------------------------------------------------

CT_HASH = b"\x22" * 32
EPOCH_KEY = {"epoch": 5, "epoch_ms": 3_600_000, "owner": "a" * 16, "capsule": b"\x01" * 98, "key_ct": b"\x02" * 72}
WEEKLY = {"week": "2026-W07", "active_minutes": 300, "policy": "wellness-1"}


def test_a_sealed_reading_signs_only_its_epoch_and_ciphertext_hash() -> None:
    payload = make_sealed_payload("abc", 1, 2, "spo2", 3, CT_HASH)
    assert payload == {"v": 2, "dev": "abc", "seq": 1, "ts": 2, "kind": "spo2", "body": {"epoch": 3, "ct": CT_HASH}}
    event = validate_payload(cbor.decode(cbor.encode(payload)))
    assert event.sealed and event.parsed_body() == events.SealedBody(epoch=3, ct=CT_HASH)


@pytest.mark.parametrize("body", [{"bpm": 60}, {"epoch": 3}, {"epoch": 3, "ct": b"\x00" * 31},
                                  {"epoch": -1, "ct": CT_HASH}, {"epoch": 3, "ct": CT_HASH, "bpm": 60},
                                  {"epoch": 3, "ct": CT_HASH.hex()}])
def test_a_v2_reading_carries_no_clear_body_and_nothing_but_a_sealed_body(body: dict[str, Any]) -> None:
    raw = {"v": 2, "dev": "abc", "seq": 1, "ts": 2, "kind": "heart_rate", "body": body}
    with pytest.raises(PayloadError) as caught:
        validate_payload(raw)
    assert caught.value.reason == Reason.BAD_BODY


def test_the_v2_clear_kinds_and_purchases_validate() -> None:
    for kind, body in (("epoch_key", EPOCH_KEY), ("weekly_activity", WEEKLY)):
        payload = make_payload("abc", 1, 2, kind, body, v=2)
        event = validate_payload(payload)
        assert not event.sealed and event.parsed_body().model_dump() == body
    purchase = {"item_code": "1", "code_system": "ndc", "rx_only": False, "quantity": 1, "price_minor": 100,
                "currency": "EUR", "patient_token": "t", "payment_method": "card"}
    assert not validate_payload(make_payload("abc", 1, 2, "purchase", purchase, v=2)).sealed


@pytest.mark.parametrize(("kind", "body"), [
    ("epoch_key", {**EPOCH_KEY, "epoch_ms": 59_999}), ("epoch_key", {**EPOCH_KEY, "epoch_ms": 86_400_001}),
    ("epoch_key", {**EPOCH_KEY, "owner": "a" * 15}), ("epoch_key", {**EPOCH_KEY, "capsule": b"\x01" * 257}),
    ("epoch_key", {**EPOCH_KEY, "key_ct": b""}), ("weekly_activity", {**WEEKLY, "week": "2026-W54"}),
    ("weekly_activity", {**WEEKLY, "active_minutes": 7 * 1440 + 1}), ("weekly_activity", {**WEEKLY, "policy": ""}),
])
def test_v2_clear_bodies_outside_their_model_are_bad_bodies(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(PayloadError) as caught:
        validate_payload({"v": 2, "dev": "abc", "seq": 1, "ts": 2, "kind": kind, "body": body})
    assert caught.value.reason == Reason.BAD_BODY


@pytest.mark.parametrize(("kind", "body"), [("epoch_key", EPOCH_KEY), ("weekly_activity", WEEKLY)])
def test_v1_cannot_carry_the_v2_kinds(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(PayloadError) as caught:
        validate_payload({"v": 1, "dev": "abc", "seq": 1, "ts": 2, "kind": kind, "body": body})
    assert caught.value.reason == Reason.BAD_PAYLOAD
    with pytest.raises(PayloadError):
        make_payload("abc", 1, 2, kind, body)


def test_a_sealed_kind_cannot_be_made_clear_under_v2_nor_a_clear_kind_sealed() -> None:
    with pytest.raises(PayloadError, match="make_sealed_payload"):
        make_payload("abc", 1, 2, "heart_rate", {"bpm": 60}, v=2)
    with pytest.raises(PayloadError, match="not a sealed kind"):
        make_sealed_payload("abc", 1, 2, "purchase", 3, CT_HASH)


def test_v1_payloads_are_built_and_validated_as_before() -> None:
    payload = make_payload("abc", 1, 2, "heart_rate", {"bpm": 60})
    assert payload == {"v": 1, "dev": "abc", "seq": 1, "ts": 2, "kind": "heart_rate", "body": {"bpm": 60}}
    event = validate_payload(payload)
    assert not event.sealed and event.parsed_body() == events.HeartRate(bpm=60)
    with pytest.raises(PayloadError) as caught:  # a v1 reading whose body is a v2 sealed body
        validate_payload({**payload, "body": {"epoch": 3, "ct": CT_HASH}})
    assert caught.value.reason == Reason.BAD_BODY
    for v in (0, 3, True, 2.0):
        with pytest.raises(PayloadError) as caught:
            validate_payload({**payload, "v": v})
        assert caught.value.reason == Reason.UNSUPPORTED_VERSION

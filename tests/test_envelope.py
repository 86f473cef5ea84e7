"""COSE_Sign1 envelope: round trip, interop with pycose both ways, and every structural rejection."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from carechain import cbor, envelope
from carechain.events import make_payload
from carechain.identity import Identity

DEVICE = Identity.from_seed(bytes(range(32)))
OTHER = Identity.from_seed(b"\x07" * 32)


def _event(seq: int = 1) -> dict:
    return make_payload(DEVICE.device_id, seq, 1_700_000_000_000, "heart_rate", {"bpm": 72})


def test_sign_then_parse_round_trips_and_verifies() -> None:
    msg = envelope.parse(envelope.sign(DEVICE, _event()))
    assert msg.kid == DEVICE.device_id
    assert msg.payload == _event()
    assert msg.verify(DEVICE.public_key)
    assert not msg.verify(OTHER.public_key)


def test_pycose_verifies_our_envelope() -> None:
    decoded = Sign1Message.decode(envelope.sign(DEVICE, _event()))
    decoded.key = OKPKey(crv=Ed25519, x=DEVICE.public_key)
    assert decoded.verify_signature()
    assert decoded.phdr[KID] == DEVICE.device_id.encode()
    assert cbor2.loads(decoded.payload) == _event()


def test_we_verify_an_envelope_pycose_produced() -> None:
    seed = b"\x42" * 32
    ident = Identity.from_seed(seed)
    msg = Sign1Message(phdr={Algorithm: EdDSA, KID: ident.device_id.encode()}, payload=cbor.encode(_event()))
    msg.key = OKPKey(crv=Ed25519, d=seed, x=ident.public_key)
    parsed = envelope.parse(msg.encode())
    assert parsed.kid == ident.device_id
    assert parsed.verify(ident.public_key)


def test_signing_is_deterministic() -> None:
    assert envelope.sign(DEVICE, _event()) == envelope.sign(DEVICE, _event())


def test_any_flipped_bit_breaks_verification_or_parsing() -> None:
    data = envelope.sign(DEVICE, _event())
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            mutated = bytearray(data)
            mutated[i] ^= bit
            try:
                msg = envelope.parse(bytes(mutated))
            except envelope.EnvelopeError:
                continue
            assert not msg.verify(DEVICE.public_key), f"byte {i} bit {bit:#x} went unnoticed"


def _raw_sign1(protected: object, payload: object, signature: object = b"\x00" * 64, tag: int = 18) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, [protected, {}, payload, signature]))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\x00garbage", "malformed"),
        (cbor2.dumps([1, 2, 3]), "not_cose_sign1"),
        (_raw_sign1(cbor.encode({1: -8, 4: b"x"}), cbor.encode({}), tag=98), "malformed"),
        (_raw_sign1(cbor.encode({1: -7, 4: b"x"}), cbor.encode({})), "bad_alg"),
        (_raw_sign1(cbor.encode({1: -8}), cbor.encode({})), "bad_header"),
        (_raw_sign1(cbor.encode({1: -8, 4: b"x"}), None), "bad_payload"),
        (_raw_sign1(cbor.encode({1: -8, 4: b"x"}), cbor.encode({}), b"short"), "bad_signature"),
        # {"b": 1, "a": 2} in insertion order is valid CBOR but not the deterministic encoding
        (_raw_sign1(cbor.encode({1: -8, 4: b"x"}), cbor2.dumps({"b": 1, "a": 2})), "bad_payload"),
        (_raw_sign1(cbor.encode({1: -8, 4: b"x"}), cbor.encode({}) + b"\x00"), "bad_payload"),
    ],
)
def test_structural_rejections_have_specific_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(envelope.EnvelopeError) as err:
        envelope.parse(data)
    assert err.value.reason == reason


def test_oversized_input_is_rejected_before_decoding() -> None:
    with pytest.raises(envelope.EnvelopeError) as err:
        envelope.parse(b"\x00" * 5000, max_bytes=4096)
    assert err.value.reason == "too_large"


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        envelope.parse(data)
    except envelope.EnvelopeError as exc:
        assert exc.reason


@given(st.binary(max_size=70_000), st.binary(max_size=300))
def test_hand_built_sig_structure_equals_cbor2_encoding(payload: bytes, protected: bytes) -> None:
    assert envelope._sig_structure(protected, payload) == cbor2.dumps(["Signature1", protected, b"", payload])


@given(st.binary(max_size=300), st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=64))
def test_hand_built_cose_sign1_equals_cbor2_encoding(payload_bytes: bytes, kid: str) -> None:
    data = envelope.sign(DEVICE, {"p": payload_bytes}, kid=kid)
    tag = cbor2.loads(data)
    assert cbor2.dumps(cbor2.CBORTag(18, tag.value), canonical=True) == data
    assert envelope.parse(data).kid == kid


@given(st.sampled_from(["event", "device.register", "device.revoke"]), st.binary(max_size=70_000))
def test_hand_built_entry_equals_cbor2_encoding(entry_type: str, cose: bytes) -> None:
    from carechain.entries import Entry

    assert Entry(entry_type, cose).encode() == cbor2.dumps({"t": entry_type, "cose": cose}, canonical=True)

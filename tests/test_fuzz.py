"""Hostile input: property tests of the decoders and the bridge's ingest check, then the bugs they found.

Property: every input is either refused with a reason from the table in docs/protocol.md, or accepted as
an event that an independent check (cbor2's canonical encoding, a hand-built Sig_structure, the registered
key) confirms is valid and signed. Never another exception, never a hang (hypothesis' deadline).

Inputs: (a) arbitrary bytes and arbitrary CBOR values; (b) real signed events, mutated at the byte level
(bit flips, truncation, insertion, deletion, splicing of two events), and payloads rebuilt with hostile
fields (wrong types, deep nesting, huge declared lengths, indefinite lengths, duplicate keys, long-form
encodings, tags, NaN/inf, negative/huge seq and ts, odd Unicode in kid/dev) and then *signed with the real
key*, so they get past the signature check to the payload validation behind it. bench/fuzz.py runs the same
generators 100,000+ times.
"""

from __future__ import annotations

import gc
import hashlib
import re
import time
import tracemalloc
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as count_as
from hypothesis import strategies as st

from carechain import cbor, envelope, topics
from carechain.batch import BatchError, decode_batch, events_in
from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.entries import Entry, EntryError, Registration, event_entry, registration_entry
from carechain.events import EventPayload, PayloadError, make_payload, validate_payload
from carechain.identity import Identity, verify_signature
from chain_bridge.bridge import Bridge
from chain_bridge.ingest import Ingest, Rejection, check_batch
from chain_bridge.ledger.store import DeviceRecord, EventCandidate, Ledger
from simulators.hostile import SAMPLE_BODIES, documented_reasons

DEVICE = Identity.from_seed(b"\x05" * 32)
OTHER = Identity.from_seed(b"\x06" * 32)
OPERATOR = Identity.from_seed(b"\x01" * 32)
LOG_KEY = Identity.from_seed(b"\x02" * 32)
NOW_MS = 1_800_000_000_000
REGISTRY = {DEVICE.device_id: DeviceRecord(DEVICE.device_id, DEVICE.public_key, "wearable", "patient:a", "ward",
                                           0, None)}
INGEST = Ingest(Limits(), REGISTRY.get)
CBOR_REASONS = {"malformed_cbor", "trailing_bytes", "unexpected_tag", "int_out_of_range", "too_deep",
                "bad_map_key", "unexpected_type"}
# Bounded: the whole module runs in well under a minute; deadline = a hang.
FUZZ = settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])




REASONS = documented_reasons()


def test_the_documented_reasons_are_read_from_the_docs() -> None:
    assert {"malformed", "bad_payload", "bad_signature", "rate_limited", "seq_gap"} <= REASONS


# -- building events ----------------------------------------------------------------------------------



def sign_raw(ident: Identity, payload_bytes: bytes, kid: bytes | None = None) -> bytes:
    """A COSE_Sign1 in its deterministic form over *arbitrary* payload bytes, really signed by `ident`."""
    protected = cbor2.dumps({1: -8, 4: kid if kid is not None else ident.device_id.encode()})
    signature = ident.sign(cbor2.dumps(["Signature1", protected, b"", payload_bytes]))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload_bytes, signature]))


valid_payloads = st.builds(
    lambda kb, seq, dt: make_payload(DEVICE.device_id, seq, NOW_MS + dt, kb[0], kb[1]),
    st.sampled_from(SAMPLE_BODIES), st.integers(0, 10_000), st.integers(-86_400_000, 60_000))
valid_events = valid_payloads.map(lambda p: envelope.sign(DEVICE, p))

odd_text = st.sampled_from([
    "", "\u0000", "A" * 65, DEVICE.device_id.upper(), DEVICE.device_id + "\n", DEVICE.device_id + "\u200b",
    "\u0430" + DEVICE.device_id[1:],  # Cyrillic a: looks the same
    "\ufeff" + DEVICE.device_id, "e\u0301", "\U0001f600", "\ud7ff", DEVICE.device_id[::-1], OTHER.device_id,
]) | st.text(max_size=20)
hostile_values = st.recursive(
    st.none() | st.booleans() | odd_text | st.binary(max_size=16)
    | st.integers(-(2**64), 2**64) | st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1])
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([float("nan"), float("inf"), -0.0, 1e308])
    | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 4, 5, 24, 30, 32, 35, 37, 258, 1004, 55799, 99]),
                st.none() | st.integers(-5, 5) | st.text(max_size=4) | st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner,
                                                                max_size=3),
    max_leaves=8,
)
FIELDS = ["v", "dev", "seq", "ts", "kind", "body"]


@st.composite
def hostile_payload_bytes(draw: st.DrawFn) -> bytes:
    """Payload bytes that are CBOR-level or schema-level hostile (then signed for real by the caller)."""
    payload = dict(draw(valid_payloads))
    how = draw(st.sampled_from(["field", "drop", "add", "body", "range", "raw"]))
    if how == "field":
        payload[draw(st.sampled_from(FIELDS))] = draw(hostile_values)
    elif how == "drop":
        del payload[draw(st.sampled_from(FIELDS))]
    elif how == "add":
        payload[draw(st.text(max_size=6) | st.integers(-3, 3))] = draw(hostile_values)
    elif how == "body":
        body = dict(payload["body"])
        body[draw(st.sampled_from([*body, "bpm", "extra"]))] = draw(hostile_values)
        payload["body"] = body
    elif how == "range":  # plausible types, values around the physiological limits: bad_body or accepted
        body = dict(payload["body"])
        body[draw(st.sampled_from(sorted(body)))] = draw(st.integers(-10, 1200) | st.floats(-10, 1200))
        payload["body"] = body
    else:
        return draw(raw_payload_tricks(payload))
    return cbor2.dumps(payload, canonical=draw(st.booleans()))


@st.composite
def raw_payload_tricks(draw: st.DrawFn, payload: dict) -> bytes:
    """Hand-made encodings cbor2 never produces: the decoder must refuse them, or the canonical check."""
    items = [(cbor2.dumps(k), cbor2.dumps(v, canonical=True)) for k, v in sorted(
        payload.items(), key=lambda kv: (len(kv[0]), kv[0]))]
    trick = draw(st.sampled_from(["dup_key", "indefinite_map", "long_int", "deep", "huge_len", "tag", "nan",
                                  "indef_text", "decimal_tag", "trailing", "half_float", "simple"]))
    key = cbor2.dumps(draw(st.sampled_from(FIELDS)))
    head = bytes([0xA0 + len(items) + 1])
    body = b"".join(k + v for k, v in items)
    value = {
        "dup_key": cbor2.dumps(draw(hostile_values), canonical=True),
        "deep": b"\x81" * draw(st.integers(10, 3000)) + b"\x00",
        "huge_len": draw(st.sampled_from([b"\x5b" + b"\xff" * 8, b"\x9b\x7f" + b"\xff" * 7, b"\x7a\xff\xff\xff\xff",
                                          b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00"])),
        "tag": bytes([0xD8, draw(st.integers(0, 255))]) + cbor2.dumps(draw(hostile_values)),
        "nan": draw(st.sampled_from([b"\xf9\x7e\x00", b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xf9\x7c\x00",
                                     b"\xf9\xfc\x00", b"\xfa\x7f\xc0\x00\x01"])),
        "indef_text": b"\x7f\x61a\x61b\xff",
        "decimal_tag": draw(st.sampled_from([b"\xc4\x82\x01\x61x", b"\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",
                                             b"\xc4\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",
                                             b"\xd8\x1e\x82\x01\x00", b"\xd8\x23\x61("])),
        "half_float": b"\xf9\x00\x01",
        "simple": draw(st.sampled_from([b"\xf7", b"\xf0", b"\xf8\xff", b"\xff"])),
    }
    if trick == "indefinite_map":
        return b"\xbf" + body + b"\xff"
    if trick == "long_int":  # seq with a needlessly long head: same number, other bytes
        payload = dict(payload)
        seq = payload.pop("seq")
        items = [(k, v) for k, v in items if k != cbor2.dumps("seq")] + [(cbor2.dumps("seq"),
                                                                          b"\x1b" + seq.to_bytes(8, "big"))]
        return bytes([0xA0 + len(items)]) + b"".join(k + v for k, v in items)
    if trick == "trailing":
        return bytes([0xA0 + len(items)]) + body + b"\x00"
    return head + body + key + value.get(trick, value["dup_key"])


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """Real signed events, mutated at the byte level."""
    data = bytearray(draw(valid_events))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "overwrite"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\xff", b"\x9f", b"\x5f", b"\xbf", b"\xc4\x82\x01\x61x", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff"]))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "splice":
            other = draw(valid_events)
            data = bytearray(bytes(data[:pos]) + other[draw(st.integers(0, len(other))):])
        else:
            data[pos:pos + 1] = bytes([draw(st.sampled_from([0x00, 0x18, 0x1b, 0x40, 0x5b, 0x7f, 0x9f, 0xbf, 0xc0,
                                                             0xd8, 0xf7, 0xf9, 0xfb, 0xff]))])
    return bytes(data)


@st.composite
def resigned_hostile_events(draw: st.DrawFn) -> bytes:
    """Hostile payloads and kids, validly signed by the registered key: only the payload checks remain."""
    payload_bytes = draw(hostile_payload_bytes())
    kid = None if draw(st.integers(0, 9)) < 8 else draw(st.sampled_from([
        b"", DEVICE.device_id.upper().encode(), "é".encode() * 8, DEVICE.device_id.encode() + b"\x00", b"a" * 65,
        OTHER.device_id.encode()]))
    return sign_raw(DEVICE, payload_bytes, kid)


# -- the property -------------------------------------------------------------------------------------


def assert_refused_or_valid(raw: bytes, topic_device: str = DEVICE.device_id) -> EventCandidate | Rejection:
    verdict = INGEST.check(topic_device, raw, NOW_MS)
    count_as(verdict.reason if isinstance(verdict, Rejection) else "accepted")  # --hypothesis-show-statistics
    if isinstance(verdict, Rejection):
        assert verdict.reason in REASONS, verdict
        assert verdict.digest == hashlib.sha256(raw).digest()
        return verdict
    assert isinstance(verdict, EventCandidate)
    # Independently of carechain's parser: the bytes are the one canonical encoding of a tag-18 array...
    tag = cbor2.loads(raw)
    assert tag.tag == 18 and cbor2.dumps(tag, canonical=True) == raw
    protected, unprotected, payload_bytes, signature = tag.value
    assert cbor2.loads(protected) == {1: -8, 4: topic_device.encode()} and unprotected == {}
    # ... signed by the registered key over an RFC 9052 Sig_structure built here ...
    sig_structure = cbor2.dumps(["Signature1", protected, b"", payload_bytes])
    assert verify_signature(REGISTRY[topic_device].public_key, sig_structure, signature)
    # ... with a canonical payload that is a valid event of this device.
    payload = cbor2.loads(payload_bytes)
    assert cbor2.dumps(payload, canonical=True) == payload_bytes
    event = EventPayload.model_validate(payload)
    event.parsed_body()
    assert (event.dev, event.seq) == (verdict.device_id, verdict.seq) == (topic_device, payload["seq"])
    assert verdict.leaf == event_entry(raw).encode()
    return verdict


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_with_a_documented_reason(data: bytes) -> None:
    assert isinstance(assert_refused_or_valid(data), Rejection)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_a_cose_head_are_refused_with_a_documented_reason(tail: bytes) -> None:
    assert isinstance(assert_refused_or_valid(b"\xd2\x84" + tail), Rejection)


@FUZZ
@given(valid_events)
def test_genuine_events_are_accepted(raw: bytes) -> None:
    assert isinstance(assert_refused_or_valid(raw), EventCandidate)


@FUZZ
@given(mutated_events())
def test_mutated_events_are_refused_or_still_valid(raw: bytes) -> None:
    assert_refused_or_valid(raw)


@FUZZ
@given(resigned_hostile_events())
def test_hostile_payloads_signed_by_the_real_key_are_refused_or_valid(raw: bytes) -> None:
    assert_refused_or_valid(raw)


@FUZZ
@given(st.one_of(mutated_events(), resigned_hostile_events()), st.sampled_from([DEVICE.device_id, OTHER.device_id]))
def test_the_topic_never_makes_a_hostile_event_acceptable_for_another_device(raw: bytes, topic_device: str) -> None:
    if topic_device in REGISTRY:
        assert_refused_or_valid(raw, topic_device)
    else:  # OTHER is not registered: nothing it sends, or anything sent on its topic, is accepted
        verdict = INGEST.check(topic_device, raw, NOW_MS)
        assert isinstance(verdict, Rejection) and verdict.reason in REASONS


# -- each decoder on its own --------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600) | mutated_events() | resigned_hostile_events())
def test_cbor_decode_returns_plain_data_or_a_cbor_error(data: bytes) -> None:
    for kwargs in ({}, {"allow_tag": 18, "max_depth": 4, "check_plain": False}, {"max_depth": 1}):
        try:
            cbor.decode(data, **kwargs)
        except cbor.CBORError as exc:
            assert exc.reason in CBOR_REASONS


@FUZZ
@given(st.binary(max_size=600) | mutated_events() | resigned_hostile_events())
def test_envelope_parse_returns_a_sign1_or_a_documented_reason(data: bytes) -> None:
    try:
        msg = envelope.parse(data)
    except envelope.EnvelopeError as exc:
        assert exc.reason in REASONS
        return
    assert re.fullmatch(r"[a-z2-7]{1,64}", msg.kid)
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


@FUZZ
@given(st.binary(max_size=300) | mutated_events() | resigned_hostile_events())
def test_the_fast_envelope_split_agrees_with_the_decoder(data: bytes) -> None:
    """envelope.parse splits the exact deterministic layout without a decoder; it must mean what cbor2 reads."""
    parts = envelope._split_deterministic(data)
    if parts is not None:
        protected, payload, signature = parts
        decoded = cbor2.loads(data)  # cbor2 6 returns a tuple inside a tag, cbor2 5 a list
        assert decoded.tag == 18 and list(decoded.value) == [protected, {}, payload, signature]
        assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


@FUZZ
@given(hostile_values | valid_payloads | valid_payloads.flatmap(
    lambda p: st.sampled_from(FIELDS).flatmap(lambda f: hostile_values.map(lambda v: {**p, f: v}))))
def test_validate_payload_returns_an_event_or_a_documented_reason(value: object) -> None:
    try:
        validate_payload(value)
    except PayloadError as exc:
        assert exc.reason in REASONS


@FUZZ
@given(st.binary(max_size=300) | hostile_values.map(lambda v: cbor2.dumps({"t": v, "cose": b""})))
def test_entry_decode_returns_an_entry_or_an_entry_error(data: bytes) -> None:
    try:
        entry = Entry.decode(data)
    except EntryError:
        return
    assert entry.encode() == data


_plain_scalars = (st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8) | st.binary(max_size=8) | st.booleans()
                  | st.none() | st.floats(allow_nan=False) | st.floats(width=16, allow_nan=False)
                  | st.floats(width=32, allow_nan=False))
_plain_values = st.recursive(_plain_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=4) | st.integers(-300, 300), inner, max_size=4), max_leaves=12)


@st.composite
def loose_encodings(draw: st.DrawFn) -> bytes:
    """A plain value encoded with a random head width wherever one may be wider, map keys in a random order and
    floats in a random width: now and then canonical, mostly not (what an attacker may send)."""
    wide = draw(st.booleans())  # else every head in its shortest form: only the key order can be wrong

    def head(major: int, arg: int) -> bytes:
        sizes = [s for s in (0, 1, 2, 4, 8) if (arg < 24 if s == 0 else arg < 1 << (8 * s))]
        size = draw(st.sampled_from(sizes)) if wide else sizes[0]
        if size == 0:
            return bytes([major << 5 | arg])
        return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[size]]) + arg.to_bytes(size, "big")

    def enc(v: object) -> bytes:
        if isinstance(v, bool) or v is None or isinstance(v, float):
            return cbor2.dumps(v) if not isinstance(v, float) else draw(st.sampled_from(
                [cbor2.dumps(v), cbor2.dumps(v, canonical=True)]))
        if isinstance(v, int):
            return head(0, v) if v >= 0 else head(1, -1 - v)
        if isinstance(v, bytes):
            return head(2, len(v)) + v
        if isinstance(v, str):
            b = v.encode()
            return head(3, len(b)) + b
        if isinstance(v, list):
            return head(4, len(v)) + b"".join(enc(x) for x in v)
        assert isinstance(v, dict)
        items = draw(st.permutations(list(v.items())))
        return head(5, len(items)) + b"".join(enc(k) + enc(x) for k, x in items)

    return enc(draw(_plain_values))


@FUZZ
@given(loose_encodings() | _plain_values.map(lambda v: cbor2.dumps(v, canonical=True)) | st.binary(max_size=40))
def test_a_canonical_decode_accepts_exactly_the_bytes_encode_writes(data: bytes) -> None:
    """The payload's canonical check is judged from the heads while scanning (shortest forms, key order, no
    repeated key), by re-encoding only around floats: it must agree with `encode(decode(data)) == data`."""
    try:
        value = cbor.decode(data)
    except cbor.CBORError:
        reference = None
    else:
        reference = cbor.encode(value) == data
    try:
        got = cbor.decode(data, canonical=True)
    except cbor.CBORError as exc:
        assert reference is not True, exc  # refused only what the reference refuses
        assert reference is None or exc.reason == "not_canonical"
        return
    assert reference is True and got == value


@FUZZ
@given(valid_events | mutated_events())
def test_parse_checked_reads_what_parse_accepted_exactly_as_parse_does(data: bytes) -> None:
    try:
        msg = envelope.parse(data)
    except envelope.EnvelopeError:
        return
    assert envelope.parse_checked(data) == msg


@FUZZ
@given(st.text(max_size=30), st.binary(max_size=300), st.integers(0, 3), st.binary(max_size=3), st.integers(0, 40))
def test_the_entry_layout_fast_path_accepts_only_what_the_cbor_decode_accepts(
        type_: str, cose: bytes, cut: int, junk: bytes, flip: int) -> None:
    data = Entry(type_, cose).encode()
    tampered = bytearray(data[:len(data) - cut] + junk)
    if flip < len(tampered):
        tampered[flip] ^= 0x01
    for candidate in (data, bytes(tampered)):
        fast = Entry._decode_layout(candidate)
        if fast is None:
            continue
        assert cbor2.loads(candidate) == {"t": fast.type, "cose": fast.cose}
        assert cbor2.dumps({"t": fast.type, "cose": fast.cose}, canonical=True) == candidate


# -- bugs the fuzzing found (regressions) -------------------------------------------------------------


@st.composite
def hostile_batches(draw: st.DrawFn) -> bytes:
    """Batch messages of genuine, mutated and hostile events, some then mutated at the byte level themselves."""
    events = draw(st.lists(valid_events | mutated_events() | resigned_hostile_events() | st.binary(max_size=40),
                           max_size=7))
    data = bytearray(cbor2.dumps({"batch": events}))
    for _ in range(draw(st.integers(0, 2))):
        pos = draw(st.integers(0, max(0, min(len(data) - 1, 12))))  # the heads, where the batch's shape is
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        else:
            data[pos:pos + 1] = bytes([draw(st.sampled_from([0x40, 0x5f, 0x80, 0x98, 0x9f, 0xa1, 0xa2, 0xd2, 0xff]))])
    return bytes(data)


@FUZZ
@given(hostile_batches() | st.binary(max_size=300).map(lambda b: b"\xa1" + b))
def test_a_hostile_batch_is_refused_whole_or_each_of_its_events_on_its_own(message: bytes) -> None:
    limits = INGEST.limits
    verdicts = check_batch(INGEST, [(topics.events(DEVICE.device_id), message)], NOW_MS)
    assert events_in(message) >= 1
    try:
        events = decode_batch(message, limits.max_batch_events, 1 << 17)
    except BatchError as exc:
        count_as("bad_batch")
        assert exc.reason in REASONS
        [verdict] = verdicts
        assert isinstance(verdict, Rejection) and verdict.reason == exc.reason and verdict.seq is None
        assert verdict.digest == hashlib.sha256(message).digest()
        return
    if events is None:  # no longer a batch at all: checked as one single-event message
        assert verdicts == [assert_refused_or_valid(message)]
        return
    assert message == cbor2.dumps({"batch": events}, canonical=True)  # only the one deterministic form passes
    assert verdicts == [assert_refused_or_valid(raw) for raw in events]


@pytest.mark.parametrize("reencode", [
    lambda raw: b"\xd2\x9f" + raw[2:] + b"\xff",  # indefinite-length array
    lambda raw: b"\xd8\x12" + raw[1:],  # tag 18 in a long-form head
    lambda raw: raw.replace(b"\xa0", b"\xbf\xff", 1),  # the empty unprotected map, indefinite
    lambda raw: raw[:2] + b"\x58" + bytes([raw[2] - 0x40]) + raw[3:],  # protected header: long-form length
])
def test_a_reencoded_genuine_event_is_refused(reencode) -> None:  # noqa: ANN001
    """Bug: the signature does not cover the envelope around it, so anyone who saw a genuine event could
    re-encode it into other bytes that still verified: a second leaf for the same event, and the genuine
    one then refused as seq_reused (and quarantined by its agent)."""
    raw = envelope.sign(DEVICE, make_payload(DEVICE.device_id, 1, NOW_MS, "heart_rate", {"bpm": 70}))
    other = reencode(raw)
    assert other != raw and cbor2.loads(other) == cbor2.loads(raw)
    verdict = INGEST.check(DEVICE.device_id, other, NOW_MS)
    assert isinstance(verdict, Rejection) and verdict.reason == "malformed"


@pytest.mark.parametrize("payload_bytes", [
    b"\xc4\x82\x01\x61x",  # tag 4 decimal fraction [1, "x"]: decimal.InvalidOperation escaped cbor2
    b"\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",  # tag 5 bigfloat 2**(2**63-1): decimal.Overflow
    b"\xc4\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",  # tag 4 with a huge exponent
])
def test_decimal_tags_are_bad_payload_not_a_crash(payload_bytes: bytes) -> None:
    """Bug: these raised decimal exceptions out of `cbor.decode`, failing the bridge's whole batch. Now no
    tag but COSE_Sign1's reaches cbor2's semantic decoders at all."""
    with pytest.raises(cbor.CBORError) as err:
        cbor.decode(payload_bytes)
    assert err.value.reason == "unexpected_tag"
    verdict = INGEST.check(DEVICE.device_id, sign_raw(DEVICE, payload_bytes), NOW_MS)
    assert isinstance(verdict, Rejection) and verdict.reason == "bad_payload"


def test_refused_input_does_not_leak_memory() -> None:
    """Bug: cbor2's C decoder leaks ~700 bytes each time it fails on invalid UTF-8 (agronholm/cbor2#257) or
    in a tag decoder (regex, rational, epoch): a bridge fed such events would grow without bound."""
    hostile = [b"\x82\x63fo\x90\x01", b"\xd8\x23\x41(", b"\xd8\x1e\x82\x01\x00", b"\xc1\xf9\x7e\x00"]
    events = [sign_raw(DEVICE, h) for h in hostile] + [b"\xd2\x84" + h for h in hostile]

    def refuse_all() -> None:
        for h in hostile:
            with pytest.raises(cbor.CBORError):
                cbor.decode(h)
        for raw in events:
            assert isinstance(INGEST.check(DEVICE.device_id, raw, NOW_MS), Rejection)

    refuse_all()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(500):
            refuse_all()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after refusing {500 * 12} inputs"


@pytest.mark.parametrize("v", [[1], {"a": 1}, True, 1.0])
def test_a_version_of_the_wrong_type_is_unsupported(v: object) -> None:
    """Bug: an unhashable `v` ([1]) raised TypeError in the version lookup; True and 1.0 passed it."""
    payload = {**make_payload(DEVICE.device_id, 1, NOW_MS, "heart_rate", {"bpm": 70}), "v": v}
    with pytest.raises(PayloadError) as err:
        validate_payload(payload)
    assert err.value.reason == "unsupported_version"


def test_an_entry_with_an_unhashable_type_is_an_entry_error() -> None:
    """Bug: a leaf {"t": [..], "cose": ..} raised TypeError, so `carechain verify` crashed on such a bundle."""
    with pytest.raises(EntryError):
        Entry.decode(cbor2.dumps({"t": ["event"], "cose": b""}, canonical=True))


@pytest.mark.parametrize(("header", "reason"), [
    ({1: -8, 4: DEVICE.device_id.encode(), 2: [99]}, "bad_header"),  # crit: a parameter we do not know
    ({1: -8.0, 4: DEVICE.device_id.encode()}, "bad_alg"),  # -8.0 == -8 in Python
    ({1: -8, 4: DEVICE.device_id.encode().upper()}, "bad_header"),
    ({1: -8, 4: "é".encode() * 8}, "bad_header"),  # was decoded with replacement characters
])
def test_the_protected_header_is_exactly_alg_and_kid(header: dict, reason: str) -> None:
    payload = cbor.encode(make_payload(DEVICE.device_id, 1, NOW_MS, "heart_rate", {"bpm": 70}))
    protected = cbor2.dumps(header)
    signature = DEVICE.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    raw = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))
    with pytest.raises(envelope.EnvelopeError) as err:
        envelope.parse(raw)
    assert err.value.reason == reason


def test_one_hostile_event_does_not_fail_the_batch_it_arrives_in(tmp_path: Path) -> None:
    """What the decimal-tag crash did in the bridge: the whole batch failed and nothing in it was receipted."""
    ledger = Ledger(tmp_path / "ledger.db")
    reg = Registration(dev=DEVICE.device_id, pk=DEVICE.public_key, profile="wearable", owner="patient:a",
                       site="ward", ts=int(time.time() * 1000))
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])
    bridge = Bridge(BridgeConfig(data_dir=tmp_path), BrokerConfig(), LOG_KEY, ledger)
    now = int(time.time() * 1000)
    good = envelope.sign(DEVICE, make_payload(DEVICE.device_id, 0, now, "heart_rate", {"bpm": 70}))
    topic = f"cc/v1/dev/{DEVICE.device_id}/ev"
    bridge.process([(topic, sign_raw(DEVICE, b"\xc4\x82\x01\x61x")), (topic, good),
                    (topic, b"\xd2\x9f" + good[2:] + b"\xff")])
    assert bridge.stats.anchored == 1
    assert dict(bridge.stats.rejected) == {"bad_payload": 1, "malformed": 1}

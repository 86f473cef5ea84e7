"""Access messages: key fragments sealed to one miner, miners chosen from a seed, signed capsule fragments,
records requests and pages with strict limits."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain import access, cbor, envelope, merkle, topics
from carechain.access import (
    MAX_FRAGS_PER_MESSAGE,
    MAX_RECORDS_PAGE_BYTES,
    AccessMessageError,
    GrantProof,
    Record,
    RecordsPage,
    choose_miners,
    decode_records_page,
    encode_records_page,
    open_sealed_kfrag,
    parse_capsule_fragments,
    parse_records_request,
    record_size,
    request_hash,
    seal_to_miner,
    sign_capsule_fragments,
    sign_records_request,
    signer_of,
)
from carechain.identity import Identity
from carechain.reencryption import PreKey, make_kfrags, verify_kfrag

MINERS = [Identity.from_seed(bytes([0x40 + i]) * 32) for i in range(5)]
MINER = MINERS[0]
DOCTOR = Identity.from_seed(b"\x0d" * 32)
SEED = b"\x5e" * 32
REQUEST = request_hash(b"an access.request entry")
PROOF = GrantProof(size=12, path=[b"\x01" * 32, b"\x02" * 32], checkpoint="carechain.example/log\n12\nroot\n\n— sig\n")
FRAGS = [("abcdefghijklmnop", 472_000, b"\x07" * 381), ("abcdefghijklmnop", 472_001, b"\x08" * 381)]


# -- key fragments sealed to miners -------------------------------------------------------------------------

def test_a_sealed_key_fragment_opens_only_with_the_chosen_miners_key() -> None:
    owner, doctor = PreKey.from_seed(b"\x01" * 32), PreKey.from_seed(b"\x02" * 32)
    kfrag = make_kfrags(owner, doctor.public_key, 3, 5)[0]
    sealed = seal_to_miner(MINER.public_key, kfrag)
    assert kfrag not in sealed and sealed != seal_to_miner(MINER.public_key, kfrag)  # randomized
    opened = open_sealed_kfrag(MINER, sealed)
    assert opened == kfrag
    verify_kfrag(opened, owner.public_key, owner.verifying_key, doctor.public_key)
    for other in MINERS[1:]:
        with pytest.raises(AccessMessageError, match="does not open"):
            open_sealed_kfrag(other, sealed)


def test_an_altered_or_truncated_sealed_key_fragment_is_refused() -> None:
    sealed = seal_to_miner(MINER.public_key, b"k" * 310)
    for i in (0, 31, 32, 47, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(AccessMessageError):
            open_sealed_kfrag(MINER, bytes(tampered))
    for bad in (b"", sealed[:48], b"\x00" * 5000):
        with pytest.raises(AccessMessageError):
            open_sealed_kfrag(MINER, bad)


def test_sealing_refuses_a_bad_miner_key_or_fragment() -> None:
    with pytest.raises(ValueError):
        seal_to_miner(MINER.public_key[:31], b"k")
    with pytest.raises(ValueError):
        seal_to_miner(MINER.public_key, b"")
    with pytest.raises(ValueError):
        seal_to_miner(MINER.public_key, b"k" * 4096)


# -- choosing miners ----------------------------------------------------------------------------------------

IDS = sorted(m.device_id for m in MINERS) + [f"miner{c}" for c in "abcdefghijk"]


@settings(max_examples=100)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.integers(1, len(IDS)),
       st.permutations(IDS))
def test_the_chosen_miners_are_distinct_registered_and_the_same_for_everyone(seed: bytes, req: bytes, n: int,
                                                                           order: list[str]) -> None:
    chosen = choose_miners(seed, IDS, n, req)
    assert len(chosen) == n == len(set(chosen)) and set(chosen) <= set(IDS)
    assert choose_miners(seed, order, n, req) == chosen  # independent of the order miners are listed in
    assert choose_miners(seed, IDS, len(IDS), req)[:n] == chosen  # a prefix of the full shuffle


def test_the_choice_depends_on_the_seed_and_the_request_and_spreads_over_all_miners() -> None:
    first = choose_miners(SEED, IDS, 5, REQUEST)
    assert choose_miners(b"\x5f" * 32, IDS, 5, REQUEST) != first
    assert choose_miners(SEED, IDS, 5, request_hash(b"another request")) != first
    hashes = [request_hash(i.to_bytes(2, "big")) for i in range(400)]
    counts = collections.Counter(m for h in hashes for m in choose_miners(SEED, IDS, 5, h))
    assert set(counts) == set(IDS)
    assert max(counts.values()) < 3 * min(counts.values())  # 2000 draws over 16 miners: ~125 each


def test_choosing_refuses_too_few_or_duplicate_miners_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="out of 3"):
        choose_miners(SEED, IDS[:3], 5, REQUEST)
    with pytest.raises(ValueError):
        choose_miners(SEED, IDS, 0, REQUEST)
    with pytest.raises(ValueError, match="distinct"):
        choose_miners(SEED, [IDS[0], IDS[0], IDS[1]], 2, REQUEST)
    with pytest.raises(ValueError):
        choose_miners(SEED, IDS, 2, b"short")
    with pytest.raises(ValueError):
        choose_miners(b"short", IDS, 2, REQUEST)


def test_a_request_is_named_by_the_leaf_hash_of_its_entry() -> None:
    assert request_hash(b"entry bytes") == merkle.leaf_hash(b"entry bytes")


# -- capsule fragments ----------------------------------------------------------------------------------------

def test_capsule_fragments_round_trip_signed_by_their_miner() -> None:
    raw = sign_capsule_fragments(MINER, 41, FRAGS, PROOF)
    assert signer_of(raw) == MINER.device_id
    msg = parse_capsule_fragments(raw, MINER.public_key)
    assert (msg.v, msg.access, msg.miner, msg.proof) == (1, 41, MINER.device_id, PROOF)
    assert [f.to_wire() for f in msg.frags] == [list(f) for f in FRAGS]
    assert envelope.parse(raw, max_bytes=1 << 20).payload == msg.to_wire()


def test_capsule_fragments_from_another_key_or_altered_are_refused() -> None:
    raw = sign_capsule_fragments(MINER, 41, FRAGS, PROOF)
    with pytest.raises(AccessMessageError, match="not by the expected key"):
        parse_capsule_fragments(raw, MINERS[1].public_key)
    tampered = bytearray(raw)
    tampered[-70] ^= 1  # inside the payload
    with pytest.raises(AccessMessageError):
        parse_capsule_fragments(bytes(tampered), MINER.public_key)
    with pytest.raises(AccessMessageError):
        signer_of(b"\xa0")


def _signed(payload: dict[str, Any], by: Identity = MINER) -> bytes:
    return envelope.sign(by, payload)


def _wire(**change: Any) -> dict[str, Any]:
    base = {"v": 1, "access": 41, "miner": MINER.device_id, "frags": [list(f) for f in FRAGS],
            "proof": PROOF.model_dump()}
    return {**base, **change}


@pytest.mark.parametrize(("change", "says"), [
    ({"miner": MINERS[1].device_id}, "signed by"),
    ({"v": 2}, "v"),
    ({"access": -1}, "access"),
    ({"frags": []}, "frags"),
    ({"frags": [list(FRAGS[0]), list(FRAGS[0])]}, "same"),
    ({"frags": [["abc", 1]]}, "frags"),
    ({"frags": [["ABC", 1, b"x"]]}, "frags"),
    ({"frags": [["abc", 1, "x"]]}, "frags"),
    ({"frags": [["abc", 1, b"x" * 1025]]}, "frags"),
    ({"proof": {"size": 1, "path": [b"\x00" * 31], "checkpoint": "c"}}, "proof"),
    ({"proof": {"size": 1, "path": [b"\x00" * 32] * 65, "checkpoint": "c"}}, "proof"),
    ({"proof": {"size": 1, "path": [], "checkpoint": ""}}, "proof"),
    ({"extra": 1}, "extra"),
])
def test_capsule_fragments_outside_their_model_are_refused(change: dict[str, Any], says: str) -> None:
    with pytest.raises(AccessMessageError, match=says) as caught:
        parse_capsule_fragments(_signed(_wire(**change)), MINER.public_key)
    assert caught.value.reason == "bad_access_message"


def test_a_miner_cannot_sign_more_fragments_than_one_message_carries() -> None:
    many = [("abc", e, b"\x07" * 8) for e in range(MAX_FRAGS_PER_MESSAGE + 1)]
    with pytest.raises(AccessMessageError, match="frags"):
        sign_capsule_fragments(MINER, 1, many, PROOF)
    big = [("abc", e, b"\x07" * 1000) for e in range(MAX_FRAGS_PER_MESSAGE)]
    with pytest.raises(AccessMessageError, match="exceeds"):
        sign_capsule_fragments(MINER, 1, big, PROOF)


# -- records request and page ------------------------------------------------------------------------------

def test_a_records_request_round_trips_signed_by_the_requester() -> None:
    raw = sign_records_request(DOCTOR, 41, 3)
    assert signer_of(raw) == DOCTOR.device_id
    req = parse_records_request(raw, DOCTOR.public_key)
    assert (req.v, req.access, req.page) == (1, 41, 3)
    with pytest.raises(AccessMessageError):
        parse_records_request(raw, MINER.public_key)
    with pytest.raises(AccessMessageError):
        parse_records_request(_signed({"v": 1, "access": 41, "page": -1}, DOCTOR), DOCTOR.public_key)
    with pytest.raises(AccessMessageError, match="limit"):
        parse_records_request(_signed({"v": 1, "access": 41, "page": 1, "pad": "x" * 600}, DOCTOR),
                              DOCTOR.public_key)


def _page(records: list[Record], **change: Any) -> RecordsPage:
    fields = {"v": 1, "access": 41, "page": 0, "last": True, "epochs": [b"\xd2epoch"], "registrations": [b"leaf"],
              "records": records, **change}
    fields.setdefault("pages", fields["page"] + 1 if fields["last"] else fields["page"] + 2)
    return RecordsPage(**fields)


records = st.lists(st.builds(Record, index=st.integers(0, 2**63 - 1), cose=st.binary(min_size=1, max_size=300),
                             ct=st.binary(min_size=1, max_size=300)), max_size=20)


@settings(max_examples=100)
@given(records, st.booleans(), st.integers(0, 2**31 - 2))
def test_a_records_page_round_trips(recs: list[Record], last: bool, page_no: int) -> None:
    page = _page(recs, last=last, page=page_no)
    raw = encode_records_page(page)
    assert decode_records_page(raw) == page
    empty = len(encode_records_page(_page([], last=last, page=page_no)))
    # record_size is what a record adds (give or take the array head's growth past 23 records).
    assert len(raw) - empty - sum(record_size(r.index, r.cose, r.ct) for r in recs) in (0, 1, 2)


def test_a_page_must_fit_its_answer() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        _page([], page=3, pages=3, last=False)
    with pytest.raises(ValueError, match="does not fit"):
        _page([], page=1, pages=3, last=True)


def test_a_page_over_the_limit_is_refused_both_ways() -> None:
    recs = [Record(index=i, cose=b"c" * 16_000, ct=b"x" * 4096) for i in range(45)]
    with pytest.raises(AccessMessageError, match="exceeds"):
        encode_records_page(_page(recs))
    with pytest.raises(AccessMessageError, match="exceeds"):
        decode_records_page(b"\xa0" * (MAX_RECORDS_PAGE_BYTES + 1))


@pytest.mark.parametrize("raw", [
    b"\xff",
    cbor.encode([1, 2]),
    cbor.encode({**_page([]).to_wire(), "extra": 1}),
    cbor.encode({**_page([]).to_wire(), "last": 1}),
    cbor.encode({**_page([]).to_wire(), "records": [[1, b"c"]]}),
    cbor.encode({**_page([]).to_wire(), "records": [[1, b"c", b"x" * 4097]]}),
    cbor.encode({**_page([]).to_wire(), "records": [[1, b"c", [b"deep"]]]}),
    cbor.encode({**_page([]).to_wire(), "epochs": ["text"]}),
    b"\xa7" + cbor.encode(_page([]).to_wire())[1:].replace(b"\x64last", b"\x78\x04last"),  # long-form key length
])
def test_a_page_that_is_not_exactly_the_model_is_refused(raw: bytes) -> None:
    with pytest.raises(AccessMessageError):
        decode_records_page(raw)


def test_the_access_topics() -> None:
    assert topics.party_inbox(DOCTOR.device_id) == f"cc/v1/party/{DOCTOR.device_id}/inbox"
    assert topics.party_of_inbox_topic(topics.party_inbox(DOCTOR.device_id)) == DOCTOR.device_id
    assert topics.party_of_inbox_topic("cc/v1/party/+/inbox") is None
    assert topics.party_of_inbox_topic("cc/v1/party/x/inbox/more") is None
    assert topics.ACCESS_RECORDS == "cc/v1/access/records" and topics.ACCESS_EVIDENCE == "cc/v1/access/evidence"
    with pytest.raises(ValueError):
        topics.party_inbox("a/b")


def test_the_access_module_is_exported() -> None:
    assert set(access.__all__) <= set(dir(access))

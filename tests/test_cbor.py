"""Deterministic CBOR: encoding is canonical and stable; the decoder refuses what we never send."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from carechain import cbor

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20) | st.binary(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(plain)
def test_round_trip_is_identity(value: object) -> None:
    assert cbor.decode(cbor.encode(value), max_depth=64) == value


@given(st.dictionaries(st.text(max_size=8), st.integers(), max_size=8))
def test_encoding_does_not_depend_on_insertion_order(d: dict[str, int]) -> None:
    reversed_order = dict(reversed(list(d.items())))
    assert cbor.encode(d) == cbor.encode(reversed_order)


@given(plain)
def test_encoding_is_a_fixed_point(value: object) -> None:
    data = cbor.encode(value)
    assert cbor.encode(cbor.decode(data, max_depth=64)) == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\x02", "trailing_bytes"),
        (cbor2.dumps(cbor2.CBORTag(1, 0)), "unexpected_tag"),  # epoch datetime: refused before cbor2 sees it
        (cbor2.dumps(cbor2.CBORTag(99, 0)), "unexpected_tag"),
        (cbor2.dumps({b"k": 1}), "bad_map_key"),
        (cbor2.dumps(2**63), "int_out_of_range"),
        (cbor2.dumps(2**64), "unexpected_tag"),  # a bignum (tag 2)
        (b"\x9f\x01\xff", "malformed_cbor"),  # indefinite length
        (b"\xf7", "unexpected_type"),  # undefined
        (b"\x62\xff\xfe", "malformed_cbor"),  # not UTF-8
        (b"\x81" * 20 + b"\x00", "too_deep"),
        (b"\x5a\xff\xff\xff\xff", "malformed_cbor"),  # claims 4 GiB, has none
        # The plain-data checks, made by the scan before cbor2 builds anything:
        (cbor2.dumps(-(2**63) - 1), "int_out_of_range"),
        (cbor2.dumps({"a": [{1: 2, b"k": 3}]}), "bad_map_key"),  # deep inside
        (b"\xa1\x81\x01\x02", "bad_map_key"),  # {[1]: 2}: an array as a key
        (b"\xa1\xf5\x01", "bad_map_key"),  # {true: 1}
        (b"\xa1\xfb" + bytes(8) + b"\x01", "bad_map_key"),  # {0.0: 1}
        (b"\x81" * 16 + b"\x80", "too_deep"),  # an empty array, one level too deep
        (b"\x81" * 16 + b"\xa0", "too_deep"),  # an empty map, likewise
        (b"\xa1\x61a\x62\xc3\x28", "malformed_cbor"),  # {"a": text that is not UTF-8}
    ],
)
def test_decoder_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(cbor.CBORError) as err:
        cbor.decode(data)
    assert err.value.reason == reason


def test_the_deepest_allowed_nesting_and_genuine_replacement_characters_decode() -> None:
    assert cbor.decode(b"\x81" * 15 + b"\x80") is not None  # an empty array at depth 15 of 16
    assert cbor.decode(cbor2.dumps({"a": "\ufffd"})) == {"a": "\ufffd"}  # U+FFFD itself is valid text
    assert cbor.decode(cbor2.dumps([2**63 - 1, -(2**63)])) == [2**63 - 1, -(2**63)]


@given(st.lists(plain, max_size=4))
def test_arrays_and_maps_inside_the_allowed_tag_decode_as_lists_and_dicts(items: list[object]) -> None:
    # cbor2 6 returns them as tuples and frozendicts, cbor2 5 as lists and dicts: callers see one shape.
    value = [b"protected", {}, items, {"k": items}]
    decoded = cbor.decode(cbor.encode(cbor.CBORTag(18, value)), max_depth=64, allow_tag=18)
    assert decoded == cbor.CBORTag(18, value)
    stack = [decoded.value]
    while stack:
        item = stack.pop()
        assert type(item) not in (tuple, cbor2.CBORTag)
        if isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, str | bytes | int | float | bool | type(None)):
            assert type(item) is dict
            stack.extend(item.values())


def test_unchecked_tagged_arrays_decode_as_lists_too() -> None:
    # envelope parsing skips the plain-data walk (check_plain=False) and tests `isinstance(body, list)`.
    decoded = cbor.decode(cbor.encode(cbor.CBORTag(18, [b"", {}, b"p", b"s"])), allow_tag=18, check_plain=False)
    assert type(decoded.value) is list and type(decoded.value[1]) is dict

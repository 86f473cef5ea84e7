"""IEEE 11073 SFLOAT/FLOAT: exact decimal values, special values kept apart from numbers, lossless codes.

Vectors: the special codes from ISO/IEEE 11073-20601 as Wireshark's ftype-ieee-11073-float.c lists them;
numbers from Nordic's Android-BLE-Common-Library tests (BP 18.9 kPa = BD F0, temperature 37.60 °C =
B0 0E 00 FE), Stanford Spezi's MedFloat/PLX tests (0xF3DE = 99.0, 0xE37A = 8.90, 123000 → 1230e2).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.gatt import (
    Float11073,
    GattEncodeError,
    Special,
    decode_float,
    decode_sfloat,
    encode_float,
    encode_sfloat,
    float32,
    sfloat,
)

SFLOAT_SPECIALS = {
    0x07FF: Special.NAN,
    0x0800: Special.NRES,
    0x07FE: Special.POSITIVE_INFINITY,
    0x0802: Special.NEGATIVE_INFINITY,
    0x0801: Special.RESERVED,
}
FLOAT_SPECIALS = {
    0x007FFFFF: Special.NAN,
    0x00800000: Special.NRES,
    0x007FFFFE: Special.POSITIVE_INFINITY,
    0x00800002: Special.NEGATIVE_INFINITY,
    0x00800001: Special.RESERVED,
}


def sfloat_numbers() -> st.SearchStrategy[Float11073]:
    return st.builds(Float11073, st.integers(-2048, 2047), st.integers(-8, 7)).filter(
        lambda n: n.exponent != 0 or -2045 <= n.mantissa <= 2045
    )


def float_numbers() -> st.SearchStrategy[Float11073]:
    return st.builds(Float11073, st.integers(-(2**23), 2**23 - 1), st.integers(-128, 127)).filter(
        lambda n: n.exponent != 0 or -(2**23) + 3 <= n.mantissa <= 2**23 - 3
    )


def test_every_sfloat_code_decodes_and_encodes_back_to_itself():
    for raw in range(0x10000):
        assert encode_sfloat(decode_sfloat(raw)) == raw


@pytest.mark.parametrize(("raw", "special"), sorted(SFLOAT_SPECIALS.items()))
def test_sfloat_special_codes_decode_to_special_values_not_numbers(raw, special):
    value = decode_sfloat(raw)
    assert value is special
    assert not isinstance(value, Float11073)
    assert encode_sfloat(special) == raw


@pytest.mark.parametrize(("raw", "special"), sorted(FLOAT_SPECIALS.items()))
def test_float_special_codes_decode_to_special_values_not_numbers(raw, special):
    value = decode_float(raw)
    assert value is special
    assert encode_float(special) == raw


def test_special_codes_are_specials_only_with_exponent_zero():
    assert decode_sfloat(0x17FF) == Float11073(2047, 1)  # NaN's mantissa, exponent 1: the number 20470
    assert decode_sfloat(0xF800) == Float11073(-2048, -1)
    assert decode_float(0x017FFFFF) == Float11073(2**23 - 1, 1)


@given(st.integers(0, 0xFFFFFFFF))
def test_every_float_code_decodes_and_encodes_back_to_itself(raw):
    assert encode_float(decode_float(raw)) == raw


@given(sfloat_numbers())
def test_sfloat_numbers_round_trip(number):
    assert decode_sfloat(encode_sfloat(number)) == number


@given(float_numbers())
def test_float_numbers_round_trip(number):
    assert decode_float(encode_float(number)) == number


@pytest.mark.parametrize(
    ("raw", "decimal"),
    [
        (0xF0BD, "18.9"),  # Nordic BPM test: systolic 18.9 kPa, bytes BD F0
        (0x000B, "11"),
        (0xF3DE, "99.0"),  # Spezi PLX test: SpO2 99
        (0xE37A, "8.90"),  # Spezi PLX test: pulse amplitude index 8.9
        (0xE4D2, "12.34"),  # Spezi MedFloat test: exponent -2, mantissa 1234
        (0x207B, "123E+2"),
        (0xFFFF, "-0.1"),  # mantissa -1, exponent -1
        (0x8000, "0E-8"),
        (0x0000, "0"),
    ],
)
def test_sfloat_values_are_exact_decimals(raw, decimal):
    value = decode_sfloat(raw)
    assert isinstance(value, Float11073)
    assert value.to_decimal() == Decimal(decimal)
    assert value.to_decimal().as_tuple() == Decimal(decimal).as_tuple()  # same digits, same exponent


def test_float_value_from_a_thermometer_is_exact():
    # Nordic TemperatureMeasurement test: B0 0E 00 FE = 3760 × 10^-2 °C
    value = decode_float(int.from_bytes(bytes([0xB0, 0x0E, 0x00, 0xFE]), "little"))
    assert value == Float11073(3760, -2)
    assert value.to_decimal() == Decimal("37.60")
    assert float(value) == 37.6


def test_extreme_float_exponents_stay_exact():
    assert Float11073(1, 127).to_decimal() == Decimal("1E+127")
    assert Float11073(-(2**23), -128).to_decimal() == Decimal(-(2**23)).scaleb(-128)


@pytest.mark.parametrize(
    ("value", "bits", "expected"),
    [
        ("36.6", 16, Float11073(366, -1)),
        (36.6, 32, Float11073(366, -1)),  # a float is read as its shortest repr
        ("36.60", 32, Float11073(3660, -2)),  # the given decimal places are kept
        (120, 16, Float11073(120, 0)),
        (123000, 16, Float11073(1230, 2)),  # as Spezi's MedFloat16(123000)
        (20470, 16, Float11073(2047, 1)),
        ("0.0000012", 16, Float11073(12, -7)),
        (Decimal("0E-20"), 16, Float11073(0, 0)),
        ("-2045", 16, Float11073(-2045, 0)),
        ("1E+9", 16, Float11073(100, 7)),
    ],
)
def test_from_number_finds_an_exact_representation(value, bits, expected):
    assert Float11073.from_number(value, bits=bits) == expected


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (2047, 16),  # would be the NaN code: no exact SFLOAT exists
        (2046, 16),  # +INF's code
        (-2048, 16),  # NRes' code
        ("12345", 16),  # five significant digits
        (0.1 + 0.2, 32),  # 0.30000000000000004
        ("1E-20", 16),
        ("1E+200", 32),
        (float("nan"), 16),
        (float("inf"), 32),
        ("NaN", 16),
        ("not a number", 16),
    ],
)
def test_from_number_refuses_values_without_an_exact_representation(value, bits):
    with pytest.raises(GattEncodeError):
        Float11073.from_number(value, bits=bits)


def test_from_number_refuses_bools_and_other_types():
    with pytest.raises(TypeError):
        sfloat(True)
    with pytest.raises(TypeError):
        float32([1])  # type: ignore[arg-type]


@given(sfloat_numbers())
def test_from_number_preserves_every_sfloat_value(number):
    assert sfloat(number.to_decimal()).to_decimal() == number.to_decimal()


@given(float_numbers())
def test_from_number_preserves_every_float_value(number):
    assert float32(number.to_decimal()).to_decimal() == number.to_decimal()


@pytest.mark.parametrize(
    "number",
    [Float11073(2048, 0), Float11073(-2049, 1), Float11073(1, 8), Float11073(1, -9), Float11073(2047, 0)],
)
def test_encode_sfloat_refuses_values_that_do_not_fit(number):
    with pytest.raises(GattEncodeError, match="SFLOAT"):
        encode_sfloat(number)


def test_encode_refuses_plain_numbers():
    with pytest.raises(GattEncodeError, match="Float11073 or Special"):
        encode_sfloat(36.6)  # type: ignore[arg-type]
    with pytest.raises(GattEncodeError, match="Float11073 or Special"):
        encode_float(None)  # type: ignore[arg-type]


def test_special_values_explain_themselves():
    assert "no valid value" in Special.NAN.describe()
    assert {s.value for s in Special} == {"NaN", "NRes", "+INF", "-INF", "reserved"}

"""Hex public keys are parsed in one place, and its errors say whose key was wrong and how."""

from __future__ import annotations

import pytest

from carechain.errors import ProtocolError
from carechain.identity import PUBLIC_KEY_SIZE, Identity, PublicKeyError, parse_public_key_hex

KEY = Identity.from_seed(b"\x21" * 32).public_key


def test_a_hex_public_key_is_its_32_bytes_in_either_case_and_with_spaces_around() -> None:
    assert parse_public_key_hex(KEY.hex()) == KEY
    assert parse_public_key_hex(f"  {KEY.hex().upper()}\n") == KEY


@pytest.mark.parametrize(("text", "says"), [
    ("zz" * 32, "is not hex"),
    (KEY.hex()[:-2], f"has {PUBLIC_KEY_SIZE} bytes"),
    (KEY.hex() + "00", f"has {PUBLIC_KEY_SIZE} bytes"),
    ("", f"has {PUBLIC_KEY_SIZE} bytes"),
])
def test_a_malformed_key_is_refused_naming_what_it_was_for(text: str, says: str) -> None:
    with pytest.raises(PublicKeyError) as caught:
        parse_public_key_hex(text, "miner m3")
    assert str(caught.value).startswith("miner m3: ") and says in str(caught.value)
    assert isinstance(caught.value, ProtocolError) and isinstance(caught.value, ValueError)
    assert caught.value.reason == "bad_public_key" and not caught.value.retryable


def test_a_key_that_is_not_text_is_refused() -> None:
    with pytest.raises(PublicKeyError, match="expected 64 hex digits, got a bytes"):
        parse_public_key_hex(KEY, "log key")  # type: ignore[arg-type]

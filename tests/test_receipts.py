"""Receipts: signed by the bridge, deterministic, and refused when forged or for another device."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from carechain import envelope
from carechain.identity import Identity
from carechain.receipts import MAX_ITEMS, Receipt, ReceiptError, Rejected, open_receipt

BRIDGE = Identity.from_seed(b"\x05" * 32)
DEV = Identity.from_seed(b"\x06" * 32).device_id

seqs = st.integers(0, 2**63 - 1)


@given(
    st.lists(st.tuples(seqs, seqs), max_size=20),
    st.lists(st.builds(Rejected, st.none() | seqs, st.text(max_size=20), st.text(max_size=300), st.booleans(),
                       st.binary(min_size=32, max_size=32)), max_size=5),
    st.integers(0, 2**63 - 1),
)
def test_receipt_payload_is_deterministic_cbor_and_round_trips(ok, rejected, ts) -> None:
    data = Receipt(DEV, ts, ok, rejected).seal(BRIDGE)
    payload_bytes = envelope.parse(data, max_bytes=1 << 20).payload_bytes
    assert cbor2.dumps(cbor2.loads(payload_bytes), canonical=True) == payload_bytes
    back = open_receipt(data, BRIDGE.public_key, DEV)
    assert back.ok == [tuple(p) for p in ok]
    assert [(r.seq, r.reason, r.retryable, r.digest) for r in back.rejected] == \
        [(r.seq, r.reason, r.retryable, r.digest) for r in rejected]


def test_a_receipt_not_signed_by_the_bridge_is_refused() -> None:
    forged = Receipt(DEV, 1, [(0, 5)]).seal(Identity.from_seed(b"\x09" * 32))
    with pytest.raises(ReceiptError, match="signature"):
        open_receipt(forged, BRIDGE.public_key, DEV)


def test_a_receipt_for_another_device_is_refused() -> None:
    other = Identity.from_seed(b"\x0a" * 32).device_id
    with pytest.raises(ReceiptError, match="expected"):
        open_receipt(Receipt(other, 1, [(0, 5)]).seal(BRIDGE), BRIDGE.public_key, DEV)


def test_a_large_receipt_is_split_and_every_entry_survives_sealing() -> None:
    key = Identity.generate()
    big = Receipt("abc", 1, ok=[(s, s + 10) for s in range(1200)],
                  rejected=[Rejected(s, "bad_signature", "x" * 500, False, b"\x01" * 32) for s in range(700)])
    parts = big.split()
    assert all(len(p.ok) + len(p.rejected) <= MAX_ITEMS for p in parts)
    opened = [open_receipt(p.seal(key), key.public_key, "abc") for p in parts]
    assert [ok for r in opened for ok in r.ok] == big.ok
    assert [r.seq for o in opened for r in o.rejected] == list(range(700))
    assert max(len(p.seal(key)) for p in parts) < 256 * 1024
    assert Receipt("abc", 1, ok=[(1, 2)]).split() == [Receipt("abc", 1, ok=[(1, 2)])]

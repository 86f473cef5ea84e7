"""The data market's computation, sans-IO: what one contributor inputs, how it is shared among a study's
aggregators, and the result they sign (docs/market.md, "The computation").

A contributor turns its value into a short vector of integers (`contribution`: for a value, the bits of
value − lo, so the aggregators can check exactly that it lies in lo..hi), splits every element into
Shamir shares in MPyC's `SecInt(32)` field (`split_contribution`: row i is exactly the share MPyC party i holds
for a secint, so an aggregator uses it as is), encodes each row (`encode_shares`) and seals it to one
aggregator's Ed25519 key (`seal_share`). It anchors `commitment(vector, salt)` so an audit can later open it.
The aggregators (`chain_miner.aggregator`) check every vector's validity inside the MPC, apply the cohort rule
(`cohort`) and sign `result_payload` in a `study.result` entry.

No clock, disk or network here. The only randomness is the Shamir coefficients, drawn by
`mpyc.thresha.random_split` (imported when first used, as importing mpyc reads the command line and sets up
logging; the contract rules import this module for `cohort` and must not pay that).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carechain import cbor, envelope
from carechain.access import _SEALED_BOX_OVERHEAD, _open_sealed_box, _seal_to_ed25519
from carechain.entries import STUDY_RESULT, Entry
from carechain.errors import FixedReasonError
from carechain.identity import PUBLIC_KEY_SIZE, Identity

__all__ = ["FIELD_MODULUS", "MAX_BINS", "QUERY_TYPES", "SCALAR_QUERIES", "VALUE_BOUND", "MarketShareError", "Query",
           "cohort", "commitment", "contribution", "decode_shares", "encode_shares", "is_valid", "open_share",
           "geometric_bit_thresholds", "plain_answer", "result_entry", "result_payload", "seal_share", "sensitivity",
           "shares_consistent", "signed", "split_contribution", "threshold_for", "value_bits", "value_of"]

# The prime field of MPyC's `mpc.SecInt(32)` (bit length 32 + security parameter 30 + 2: a 64-bit prime);
# tests/test_market_mpc.py checks it equals `mpc.SecInt(32).field.modulus`.
FIELD_MODULUS = 18446744073709551427
# Bounds of one contributor's value: hi - lo ≤ 2**31, so value - lo has at most 32 bits (MAX_BINS elements)
# and the range check's comparison of those bits' sum with hi - lo stays within MPyC's exact 32-bit range.
VALUE_BOUND = 2**30
MAX_BINS = 32
MAX_AGGREGATORS = 7
QUERY_TYPES = ("count", "sum", "mean", "histogram", "resting_heart_rate", "time_in_range")
# Derived measures are a per-contributor value (bpm, minutes) averaged like `mean`.
SCALAR_QUERIES = frozenset({"sum", "mean", "resting_heart_rate", "time_in_range"})
COMMITMENT_DOMAIN = b"carechain/market/contribution/v1\x00"
SALT_BYTES = 16
MAX_SEALED_SHARE_BYTES = 1024  # 32 elements of ≤ 9 bytes + the list head + the sealed-box overhead


class MarketShareError(FixedReasonError):
    """A contributor's share an aggregator cannot use: not sealed to it, altered, or not a list of field
    elements of the query's length. The aggregators drop such a contribution and count it invalid."""

    REASON = "bad_market_share"


class Query(BaseModel):
    """A study's question: which measure, the bounds of one contributor's value, and histogram bin edges.

    Bin k holds bins[k] ≤ value < bins[k+1]; the last bin also holds its upper edge.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["count", "sum", "mean", "histogram", "resting_heart_rate", "time_in_range"]
    kind: str = Field(min_length=1, max_length=32)
    lo: int = Field(ge=-VALUE_BOUND, le=VALUE_BOUND)
    hi: int = Field(ge=-VALUE_BOUND, le=VALUE_BOUND)
    bins: list[int] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Query:
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) must not exceed hi ({self.hi})")
        if self.type == "histogram":
            if self.bins is None or not 2 <= len(self.bins) <= MAX_BINS + 1:
                raise ValueError(f"a histogram declares 2 to {MAX_BINS + 1} ascending bin edges")
            if any(a >= b for a, b in zip(self.bins, self.bins[1:], strict=False)):
                raise ValueError("histogram bin edges must be strictly ascending")
        elif self.bins is not None:
            raise ValueError(f"only a histogram declares bins, not a {self.type} query")
        return self

    @property
    def width(self) -> int:
        """The number of integers one contributor inputs."""
        if self.type == "count":
            return 1
        return len(self.bins) - 1 if self.bins is not None else value_bits(self)


def value_bits(query: Query) -> int:
    """k, the number of bits a value query's input has: the bit length of hi − lo (at least 1)."""
    return max(1, (query.hi - query.lo).bit_length())


def threshold_for(m: int) -> int:
    """Shamir degree for m aggregators: honest majority, as MPyC's default threshold (m-1)//2."""
    return (m - 1) // 2


def contribution(query: Query, value: int | None = None) -> list[int]:
    """The vector one contributor inputs: count → [1]; sum, mean, derived measures → the k = `value_bits`
    bits of value − lo, least significant first; histogram → one-hot over the bins. ValueError when the value
    lies outside the query's bounds or bins.

    A value is input as bits because the field holds far more than ±2**31: a single shared element could be
    one the aggregators' 32-bit comparison misjudges. Bits are checked to be 0/1 exactly, so their weighted
    sum is an honest integer in 0..2**k − 1 and the comparison with hi − lo is exact."""
    if query.type == "count":
        return [1]
    if value is None:
        raise ValueError(f"a {query.type} query needs the contributor's value")
    if not query.lo <= value <= query.hi:
        raise ValueError(f"value {value} outside the query's bounds {query.lo}..{query.hi}")
    if query.bins is None:
        return [(value - query.lo) >> i & 1 for i in range(value_bits(query))]
    edges = query.bins
    if not edges[0] <= value <= edges[-1]:
        raise ValueError(f"value {value} outside the histogram's bins {edges[0]}..{edges[-1]}")
    k = next(i for i in range(len(edges) - 1) if value < edges[i + 1] or i == len(edges) - 2)
    return [int(i == k) for i in range(len(edges) - 1)]


def is_valid(query: Query, vector: Sequence[int]) -> bool:
    """The check the aggregators run inside the MPC, in the clear: right length; count: [1]; a value: every
    element 0/1 and lo + Σ 2**i·bᵢ ≤ hi; a histogram: entries 0/1 summing to 1."""
    if len(vector) != query.width:
        return False
    if query.type == "count":
        return list(vector) == [1]
    if query.type == "histogram":
        return all(x in (0, 1) for x in vector) and sum(vector) == 1
    return all(x in (0, 1) for x in vector) and value_of(query, vector) <= query.hi


def value_of(query: Query, vector: Sequence[int]) -> int:
    """The value a value query's bit vector encodes: lo + Σ 2**i·vector[i]."""
    return query.lo + sum(b << i for i, b in enumerate(vector))


def plain_answer(query: Query, vectors: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The answer over `vectors` (all assumed valid) in the clear: what the MPC opens without noise."""
    if query.type == "count":
        return {"count": len(vectors)}
    if query.type == "histogram":
        return {"histogram": [sum(col) for col in zip(*vectors, strict=True)] if vectors else [0] * query.width}
    total = sum(value_of(query, v) for v in vectors)
    return {"sum": total} if query.type == "sum" else {"sum": total, "n": len(vectors)}


# -- shares ---------------------------------------------------------------------------------------------


def split_contribution(vector: Sequence[int], m: int) -> list[list[int]]:
    """Shamir shares of every element of `vector` for m aggregators (degree (m-1)//2): row i is what MPyC
    party i (evaluation point i+1) holds for that secint. Negative values are taken mod the field."""
    if not 3 <= m <= MAX_AGGREGATORS:
        raise ValueError(f"a study has 3 to {MAX_AGGREGATORS} aggregators, not {m}")
    if not 1 <= len(vector) <= MAX_BINS:
        raise ValueError(f"a contribution has 1 to {MAX_BINS} elements, got {len(vector)}")
    from mpyc import finfields, thresha  # noqa: PLC0415 - see the module docstring

    field = finfields.GF(FIELD_MODULUS)
    rows = thresha.random_split(field, [x % FIELD_MODULUS for x in vector], threshold_for(m), m)
    return [[int(s) for s in row] for row in rows]


def encode_shares(row: Sequence[int]) -> bytes:
    """One aggregator's row of shares as deterministic CBOR (a list of unsigned ints below the modulus)."""
    if not 1 <= len(row) <= MAX_BINS or any(not 0 <= s < FIELD_MODULUS for s in row):
        raise ValueError(f"a row of shares has 1 to {MAX_BINS} field elements (0 ≤ s < {FIELD_MODULUS})")
    return cbor.encode([int(s) for s in row])


def decode_shares(data: bytes, width: int) -> list[int]:
    """The row `encode_shares` made, checked: a list of `width` field elements; MarketShareError otherwise."""
    try:
        # check_plain=False: shares reach 2**64 - 190, beyond the signed range the plain walk enforces;
        # every element is type- and range-checked below instead.
        row = cbor.decode(data, max_depth=2, check_plain=False)
    except cbor.CBORError as exc:
        raise MarketShareError(f"a row of shares is not CBOR: {exc}") from None
    if not isinstance(row, list) or len(row) != width:
        raise MarketShareError(f"a row of shares is a list of {width} field elements")
    if any(type(s) is not int or not 0 <= s < FIELD_MODULUS for s in row):
        raise MarketShareError(f"a share is an integer 0 ≤ s < {FIELD_MODULUS}")
    if cbor.encode(row) != bytes(data):
        raise MarketShareError("a row of shares is not in deterministic CBOR")
    return row


def seal_share(aggregator_pk: bytes, data: bytes) -> bytes:
    """`data` (an encoded row) sealed to one aggregator's Ed25519 key: only that aggregator opens it."""
    if len(aggregator_pk) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an aggregator's Ed25519 key has {PUBLIC_KEY_SIZE} bytes, got {len(aggregator_pk)}")
    if not 0 < len(data) <= MAX_SEALED_SHARE_BYTES - _SEALED_BOX_OVERHEAD:
        raise ValueError(f"a row of shares has 1 to {MAX_SEALED_SHARE_BYTES - _SEALED_BOX_OVERHEAD} bytes")
    return _seal_to_ed25519(aggregator_pk, data)


def open_share(identity: Identity, sealed: bytes) -> bytes:
    """The row sealed to `identity`; MarketShareError when sealed to another key, altered or oversized."""
    if not _SEALED_BOX_OVERHEAD < len(sealed) <= MAX_SEALED_SHARE_BYTES:
        raise MarketShareError(f"a sealed share has {_SEALED_BOX_OVERHEAD + 1} to {MAX_SEALED_SHARE_BYTES} bytes")
    opened = _open_sealed_box(identity, sealed)
    if opened is None:
        raise MarketShareError(f"the sealed share does not open with aggregator {identity.device_id}'s key "
                               "(sealed to another aggregator, or altered)")
    return opened


def shares_consistent(points: Sequence[int], t: int) -> bool:
    """Whether the m shares (party i at evaluation point i+1) lie on one polynomial of degree ≤ t: the
    aggregators check this on shares of input + random mask, so an inconsistent sharing is caught without
    any input being revealed."""
    xs = list(range(1, t + 2))
    p = FIELD_MODULUS
    for x in range(t + 2, len(points) + 1):  # interpolate from the first t+1 points, compare the others
        y = 0
        for i, xi in enumerate(xs):
            num, den = 1, 1
            for xj in xs:
                if xj != xi:
                    num, den = num * (x - xj) % p, den * (xi - xj) % p
            y = (y + points[i] * num * pow(den, -1, p)) % p
        if y != points[x - 1] % p:
            return False
    return True


# -- differential privacy ------------------------------------------------------------------------------

NOISE_RANDOM_BITS = 30  # each noise bit is Bernoulli(q) with q rounded to a multiple of 2**-30
NOISE_TAIL_BITS = 40  # the geometric variable is cut at 2**J where P(G ≥ 2**J) ≤ 2**-40


def sensitivity(query: Query) -> int:
    """How much one contributor can move each noised total: 1 per histogram bin (one contributor adds 1 to
    exactly one bin), max(|lo|, |hi|) for a sum. Count and n are not noised: who is included is public."""
    return 1 if query.type == "histogram" else max(abs(query.lo), abs(query.hi), 1)


def geometric_bit_thresholds(epsilon_milli: int, sens: int) -> list[int]:
    """Thresholds c_j such that a uniform 30-bit u gives bit j of a geometric variable as [u < c_j].

    G with P(G = g) ∝ α**g (α = exp(-ε/Δ)) has independent binary digits: bit j is 1 with probability
    α**(2**j) / (1 + α**(2**j)). Two such G, subtracted, are discrete-Laplace noise, which makes the opened
    total ε-differentially private for sensitivity Δ. J is the first j with α**(2**j) ≤ 2**-40.
    """
    if epsilon_milli <= 0 or sens <= 0:
        raise ValueError("noise needs epsilon_milli > 0 and a positive sensitivity")
    log_alpha = -(epsilon_milli / 1000) / sens
    thresholds = []
    j = 0
    while (2**j) * log_alpha > -NOISE_TAIL_BITS * math.log(2):
        a = math.exp((2**j) * log_alpha)
        thresholds.append(round(a / (1 + a) * 2**NOISE_RANDOM_BITS))
        j += 1
    return thresholds


def signed(value: int) -> int:
    """A field element as the signed integer it encodes (|x| < p/2)."""
    value %= FIELD_MODULUS
    return value - FIELD_MODULUS if value > FIELD_MODULUS // 2 else value


def commitment(vector: Sequence[int], salt: bytes) -> str:
    """Hex SHA-256(domain ‖ CBOR([salt, vector])): binds the contributor to its vector; the salt (16 random
    bytes the contributor keeps) hides it until an audit opens it."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"a commitment salt has {SALT_BYTES} bytes, got {len(salt)}")
    return hashlib.sha256(COMMITMENT_DOMAIN + cbor.encode([bytes(salt), [int(x) for x in vector]])).hexdigest()


# -- the cohort rule and the result -------------------------------------------------------------------


def cohort(valid_with_min: Sequence[tuple[int, int]]) -> list[int]:
    """The included contributions: the largest S of the valid (leaf index, min_cohort) pairs such that |S| is
    at least the min_cohort of every member — sorted by min_cohort, the longest prefix P with |P| ≥ the
    largest min_cohort in P. Leaf indexes ascending; empty when no prefix qualifies (the study is unanswered).
    """
    ordered = sorted(valid_with_min, key=lambda pair: (pair[1], pair[0]))
    best = 0
    for size in range(1, len(ordered) + 1):
        if size >= ordered[size - 1][1]:
            best = size
    return sorted(index for index, _ in ordered[:best])


def result_payload(study_id: str, *, valid: Sequence[int], invalid: int, included: Sequence[int],
                   answer: dict[str, Any] | None, epsilon_milli: int, ts: int) -> dict[str, Any]:
    """The `study.result` payload (docs/market.md): equal across honest aggregators for equal inputs."""
    return {"v": 1, "study_id": study_id, "valid": sorted(valid), "invalid": invalid, "included": sorted(included),
            "answer": answer, "noise": {"epsilon_milli": epsilon_milli}, "ts": ts}


def result_entry(aggregator: Identity, payload: dict[str, Any]) -> Entry:
    """The aggregator's signed `study.result` ledger entry."""
    return Entry(STUDY_RESULT, envelope.sign(aggregator, payload))

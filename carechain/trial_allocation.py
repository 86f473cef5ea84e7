"""Randomisation of a clinical trial by commitment: seeds, the allocation key, stratified permuted blocks, kit
labels and seed escrow (issue 16; CONSORT items 8–10).

Sans-IO and deterministic: no clock, disk, network or randomness. Every random value (a party's seed, the escrow
polynomial's coefficients) is drawn by the caller and passed in, so the contract, `carechain verify trial` and an
outside reviewer all recompute the same allocation from the ledger alone.

- Each party commits to a 32-byte seed (`seed_commitment`) before enrolment closes and reveals it after the
  database lock (`check_reveal`). The commitment covers the trial and the party, so it cannot be replayed
  for another trial or claimed by another party.
- `allocation_key` combines every revealed seed with a final checkpoint's cosignature seed: one honest seed,
  or the cosigned checkpoint, is enough to make the key unpredictable, so no party, the sponsor included,
  can predict or steer the sequence. The key is not one secret but one per (stratum, block) and one per
  stratum for the block sizes, each combining a per-party key derived from that party's seed
  (`party_block_key`, `party_sizes_key`): so for an emergency unblinding of one participant every party can
  release the keys of her block alone (`released_key`), which open that block and its stratum's block
  boundaries and nothing else, without releasing its seed.
- `arm_of`/`allocation` draw stratified permuted blocks from the key: within each stratum, blocks of a size
  drawn from `Design.block_sizes`, each a uniformly random permutation of the ratio-exact multiset of arms.
- `escrow_shares`/`recover_seed`: Shamir shares of a seed, so a party that does not reveal cannot block
  unblinding.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, model_validator

from carechain import cbor
from carechain.seed import uniform_below

__all__ = ["COMMIT_DOMAIN", "FIELD_PRIME", "KEY_DOMAIN", "PARTY_BLOCK_DOMAIN", "PARTY_SIZES_DOMAIN", "SEED_BYTES",
           "SIZES_DOMAIN", "AllocationKey", "Block", "Design", "allocation", "allocation_key", "arm_of", "block_of",
           "check_reveal", "escrow_shares", "kit_label", "party_block_key", "party_sizes_key", "recover_seed",
           "released_key", "seed_commitment", "strata", "stratum_index", "stratum_key"]

SEED_BYTES = 32
COMMIT_DOMAIN = b"carechain/trial/seed-commitment/v1"
# v2: one key per (stratum, block) and per stratum's sizes, so one block can be unblinded alone.
KEY_DOMAIN = b"carechain/trial/block-key/v2"
SIZES_DOMAIN = b"carechain/trial/sizes-key/v2"
PARTY_BLOCK_DOMAIN = b"carechain/trial/party-block-key/v2"
PARTY_SIZES_DOMAIN = b"carechain/trial/party-sizes-key/v2"
# The Mersenne prime 2**521 - 1: a field larger than any 32-byte seed, so a seed is one field element.
FIELD_PRIME = 2**521 - 1
# The block PRF is carechain.seed's SHA-256 counter-mode derivation under this purpose (with rejection
# sampling in `uniform_below`): one audited way to turn a key into unbiased integers.
_PRF_PURPOSE = "trial.allocation"
MAX_ARMS, MIN_ARMS = 4, 2
MAX_BLOCK_SIZES = 8
# Every miner re-executes the allocation: a bound on a block keeps one `arm_of` cheap (trials use 2–12).
MAX_BLOCK_SIZE = 256
MAX_FACTORS = 4
MIN_LEVELS, MAX_LEVELS = 2, 8
# Characters that structure a stratum key ("age=65+|sex=f"); a name holding one would make keys ambiguous.
_KEY_SEPARATORS = ("|", "=")


# -- seeds and commitments ----------------------------------------------------------------------------


def _check_seed(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != SEED_BYTES:
        size = len(value) if isinstance(value, bytes) else type(value).__name__
        raise ValueError(f"{what} must be {SEED_BYTES} bytes, got {size}")


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def seed_commitment(trial_id: str, party: str, seed: bytes) -> str:
    """Hex SHA-256(COMMIT_DOMAIN ‖ CBOR([trial_id, party, seed])): `party`'s commitment to its trial seed.

    No salt: the seed is itself 32 secret random bytes, so the commitment hides it; binding comes from
    SHA-256. Naming the trial and the party means a commitment seen on the ledger cannot be copied by
    another party, or into another trial, to claim a seed it does not know.
    """
    _check_name(trial_id, "the trial id")
    _check_name(party, "the party")
    _check_seed(seed, f"{party}'s seed")
    return hashlib.sha256(COMMIT_DOMAIN + cbor.encode([trial_id, party, seed])).hexdigest()


def check_reveal(trial_id: str, party: str, seed: bytes, commitment: str) -> bool:
    """Whether `seed` is what `party` committed to for `trial_id` (False for a seed of the wrong size)."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES or not isinstance(commitment, str):
        return False
    expected = seed_commitment(trial_id, party, seed)
    return hmac.compare_digest(expected.encode(), commitment.encode())


def party_block_key(seed: bytes, trial_id: str, stratum: str, block: int) -> bytes:
    """One party's share of the key of block `block` of `stratum`: SHA-256(PARTY_BLOCK_DOMAIN ‖ CBOR([trial_id,
    stratum, block, seed])). Releasing it reveals nothing about the seed or any other block's key."""
    _check_name(trial_id, "the trial id")
    _check_seed(seed, "the seed")
    _check_position(block, "the block number")
    return hashlib.sha256(PARTY_BLOCK_DOMAIN + cbor.encode([trial_id, stratum, block, seed])).digest()


def party_sizes_key(seed: bytes, trial_id: str, stratum: str) -> bytes:
    """One party's share of the key of `stratum`'s block sizes (its block boundaries, not its arms)."""
    _check_name(trial_id, "the trial id")
    _check_seed(seed, "the seed")
    return hashlib.sha256(PARTY_SIZES_DOMAIN + cbor.encode([trial_id, stratum, seed])).digest()


def _pairs(keys: Mapping[str, bytes]) -> list[list[object]]:
    return [[party, keys[party]] for party in sorted(keys)]


@dataclass(frozen=True)
class AllocationKey:
    """What the allocation is drawn from: every revealed seed (`allocation_key`), or the per-party keys of one
    block and its stratum's sizes released for an emergency unblinding (`released_key`).

    Block j of stratum s is keyed by SHA-256(KEY_DOMAIN ‖ CBOR([trial, checkpoint_seed, s, j, sorted (party,
    party_block_key)])), and the sizes of the blocks of s by SHA-256(SIZES_DOMAIN ‖ CBOR([trial,
    checkpoint_seed, s, sorted (party, party_sizes_key)])). A released key answers for its one block only and
    raises ValueError for anything else.
    """

    trial_id: str
    checkpoint_seed: bytes
    seeds: Mapping[str, bytes] | None = None
    released_stratum: str | None = None
    released_block: int | None = None
    released_sizes: Mapping[str, bytes] = field(default_factory=dict)
    released_blocks: Mapping[str, bytes] = field(default_factory=dict)

    def sizes_key(self, stratum: str) -> bytes:
        if self.seeds is not None:
            parts = {p: party_sizes_key(s, self.trial_id, stratum) for p, s in self.seeds.items()}
        elif stratum == self.released_stratum:
            parts = dict(self.released_sizes)
        else:
            raise ValueError(f"the block sizes of stratum {stratum!r} were not released (only of "
                             f"{self.released_stratum!r})")
        return hashlib.sha256(SIZES_DOMAIN + cbor.encode([self.trial_id, self.checkpoint_seed, stratum,
                                                          _pairs(parts)])).digest()

    def block_key(self, stratum: str, block: int) -> bytes:
        if self.seeds is not None:
            parts = {p: party_block_key(s, self.trial_id, stratum, block) for p, s in self.seeds.items()}
        elif stratum == self.released_stratum and block == self.released_block:
            parts = dict(self.released_blocks)
        else:
            raise ValueError(f"the key of block {block} of stratum {stratum!r} was not released (only block "
                             f"{self.released_block} of {self.released_stratum!r})")
        return hashlib.sha256(KEY_DOMAIN + cbor.encode([self.trial_id, self.checkpoint_seed, stratum, block,
                                                        _pairs(parts)])).digest()


def allocation_key(seeds: Mapping[str, bytes], checkpoint_seed: bytes, trial_id: str) -> AllocationKey:
    """The key of the whole allocation from every revealed (party → seed) and a final checkpoint's cosignature
    seed (`carechain.seed`). The order the reveals arrived in does not matter (parties are sorted)."""
    _check_name(trial_id, "the trial id")
    if not seeds:
        raise ValueError("an allocation key needs at least one revealed seed (the sponsor's), got none")
    _check_seed(checkpoint_seed, "the checkpoint seed")
    for party, value in seeds.items():
        _check_name(party, "a party")
        _check_seed(value, f"{party}'s seed")
    return AllocationKey(trial_id, checkpoint_seed, seeds=dict(seeds))


def released_key(trial_id: str, checkpoint_seed: bytes, stratum: str, block: int, sizes_keys: Mapping[str, bytes],
                 block_keys: Mapping[str, bytes]) -> AllocationKey:
    """The key of one block, from every party's released `party_sizes_key` of `stratum` and `party_block_key` of
    `block` (party → 32 bytes; both mappings name the same parties): what an investigator holds after an
    emergency unblinding. It opens that block and the stratum's block boundaries only."""
    _check_name(trial_id, "the trial id")
    _check_seed(checkpoint_seed, "the checkpoint seed")
    if not sizes_keys or set(sizes_keys) != set(block_keys):
        raise ValueError(f"released keys must come from the same parties for the sizes and the block, got "
                         f"{sorted(sizes_keys)} and {sorted(block_keys)}")
    for party in sizes_keys:
        _check_seed(sizes_keys[party], f"{party}'s sizes key")
        _check_seed(block_keys[party], f"{party}'s block key")
    return AllocationKey(trial_id, checkpoint_seed, released_stratum=stratum, released_block=block,
                         released_sizes=dict(sizes_keys), released_blocks=dict(block_keys))


# -- the design ---------------------------------------------------------------------------------------


class Design(BaseModel):
    """The registered allocation design: arms and their ratio, permuted-block sizes, stratification factors.

    `strata` maps each factor (e.g. "sex") to its levels in a fixed order (e.g. ["f", "m"]). Factors are
    taken in name order wherever order matters (stratum keys, stratum indices), so a design read back from
    canonical CBOR or JSON, which may reorder map keys, means the same strata.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    arms: list[str]
    ratio: list[int]
    block_sizes: list[int]
    strata: dict[str, list[str]]

    @model_validator(mode="after")
    def _valid(self) -> Design:
        _validate_arms(self.arms, self.ratio)
        _validate_block_sizes(self.block_sizes, sum(self.ratio))
        _validate_strata(self.strata)
        return self


def _validate_arms(arms: list[str], ratio: list[int]) -> None:
    if not MIN_ARMS <= len(arms) <= MAX_ARMS:
        raise ValueError(f"a design has {MIN_ARMS} to {MAX_ARMS} arms, got {len(arms)}")
    if any(not arm for arm in arms) or len(set(arms)) != len(arms):
        raise ValueError(f"arm names must be distinct and non-empty, got {arms}")
    if len(ratio) != len(arms):
        raise ValueError(f"the ratio needs one entry per arm ({len(arms)}), got {len(ratio)}: {ratio}")
    if any(r < 1 for r in ratio):
        raise ValueError(f"every ratio entry must be a positive integer, got {ratio}")


def _validate_block_sizes(block_sizes: list[int], unit: int) -> None:
    if not 1 <= len(block_sizes) <= MAX_BLOCK_SIZES:
        raise ValueError(f"a design has 1 to {MAX_BLOCK_SIZES} block sizes, got {len(block_sizes)}")
    if len(set(block_sizes)) != len(block_sizes):
        # A repeated size would silently be drawn more often than the others.
        raise ValueError(f"block sizes must be distinct, got {block_sizes}")
    for size in block_sizes:
        if size < 1 or size % unit:
            raise ValueError(f"block size {size} is not a positive multiple of the ratio's sum {unit}: only such "
                             "a block holds the arms exactly in ratio")
        if size > MAX_BLOCK_SIZE:
            raise ValueError(f"block size {size} is larger than {MAX_BLOCK_SIZE}")


def _validate_strata(strata: dict[str, list[str]]) -> None:
    if len(strata) > MAX_FACTORS:
        raise ValueError(f"a design has at most {MAX_FACTORS} stratification factors, got {len(strata)}")
    for factor, levels in strata.items():
        for name in (factor, *levels):
            if not name or any(c in name for c in _KEY_SEPARATORS):
                raise ValueError(f"stratum factor {factor!r}: names must be non-empty and contain neither "
                                 f"'|' nor '=', got {name!r}")
        if not MIN_LEVELS <= len(levels) <= MAX_LEVELS or len(set(levels)) != len(levels):
            raise ValueError(f"stratum factor {factor!r} needs {MIN_LEVELS} to {MAX_LEVELS} distinct levels, "
                             f"got {levels}")


def stratum_key(design: Design, attributes: Mapping[str, str]) -> str:
    """The canonical key of a participant's stratum, e.g. "age=65+|sex=f" (factors in name order).

    `attributes` must give exactly the design's factors, each one of its declared levels. An unstratified
    design has one stratum, "".
    """
    missing = sorted(set(design.strata) - set(attributes))
    unknown = sorted(set(attributes) - set(design.strata))
    if missing or unknown:
        raise ValueError(f"participant attributes must give exactly the factors {sorted(design.strata)}: "
                         f"missing {missing}, unknown {unknown}")
    for factor in sorted(design.strata):
        if attributes[factor] not in design.strata[factor]:
            raise ValueError(f"{attributes[factor]!r} is not a level of stratum factor {factor!r} "
                             f"(levels: {design.strata[factor]})")
    return "|".join(f"{factor}={attributes[factor]}" for factor in sorted(design.strata))


def strata(design: Design) -> list[str]:
    """Every stratum key of the design, in stratum-index order (the first factor by name varies slowest)."""
    keys = [""]
    for factor in sorted(design.strata):
        part = [f"{factor}={level}" for level in design.strata[factor]]
        keys = [f"{key}|{p}" if key else p for key in keys for p in part]
    return keys


def stratum_index(design: Design, stratum: str) -> int:
    """The position of `stratum` in `strata(design)`; ValueError saying what a key of the design looks like."""
    index = 0
    parts = stratum.split("|") if stratum else []
    factors = sorted(design.strata)
    if len(parts) != len(factors):
        raise ValueError(f"{stratum!r} is not a stratum of the design: a key names the factors {factors}, "
                         f"e.g. {strata(design)[0]!r}")
    for factor, part in zip(factors, parts, strict=True):
        name, _, level = part.partition("=")
        levels = design.strata[factor]
        if name != factor or level not in levels:
            raise ValueError(f"{stratum!r} is not a stratum of the design: expected {factor}=<one of {levels}>, "
                             f"got {part!r}")
        index = index * len(levels) + levels.index(level)
    return index


# -- stratified permuted blocks -----------------------------------------------------------------------


class Block(NamedTuple):
    """One permuted block of a stratum: its number (0-based, in draw order), the stratum position of its first
    slot, and its size.

    An emergency unblinding of one slot reveals its block's composition, hence narrows the arms of the
    block's other slots (positions first … first + size - 1); docs and verify name them from this.
    """

    number: int  # not `index`, which would shadow tuple.index
    first: int
    size: int


def _check_position(position: int, what: str = "position") -> None:
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {position!r}")


def _block_size(sizes_key: bytes, design: Design, j: int) -> int:
    sizes = design.block_sizes
    return sizes[uniform_below(sizes_key, _PRF_PURPOSE, len(sizes), j, "size")]


def _block_arms(block_key: bytes, design: Design, size: int) -> list[str]:
    """A block's arms: a Fisher–Yates shuffle of the ratio-exact multiset, each swap index unbiased."""
    per_unit = size // sum(design.ratio)
    arms = [arm for arm, r in zip(design.arms, design.ratio, strict=True) for _ in range(r * per_unit)]
    for i in range(size - 1, 0, -1):
        k = uniform_below(block_key, _PRF_PURPOSE, i + 1, "shuffle", i)
        arms[i], arms[k] = arms[k], arms[i]
    return arms


def _check_key(key: AllocationKey) -> None:
    if not isinstance(key, AllocationKey):
        raise ValueError(f"the allocation key must be an AllocationKey (allocation_key or released_key), got "
                         f"{type(key).__name__}")


def block_of(key: AllocationKey, design: Design, stratum: str, position: int) -> Block:
    """The block that holds the `position`-th (0-based) participant enrolled in `stratum` (needs the stratum's
    sizes key only)."""
    _check_key(key)
    stratum_index(design, stratum)
    _check_position(position)
    sizes_key = key.sizes_key(stratum)
    j = first = 0
    while True:
        size = _block_size(sizes_key, design, j)
        if position < first + size:
            return Block(j, first, size)
        j, first = j + 1, first + size


def arm_of(key: AllocationKey, design: Design, stratum: str, position: int) -> str:
    """The arm of the `position`-th (0-based) participant enrolled in `stratum`: the label → arm secret."""
    block = block_of(key, design, stratum, position)
    return _block_arms(key.block_key(stratum, block.number), design, block.size)[position - block.first]


def allocation(key: AllocationKey, design: Design, stratum: str, n: int) -> list[str]:
    """The arms of the first `n` participants enrolled in `stratum` (O(n) draws)."""
    _check_key(key)
    stratum_index(design, stratum)
    _check_position(n, "the number of participants")
    sizes_key = key.sizes_key(stratum)
    arms: list[str] = []
    j = 0
    while len(arms) < n:
        arms += _block_arms(key.block_key(stratum, j), design, _block_size(sizes_key, design, j))
        j += 1
    return arms[:n]


def kit_label(trial_id: str, design: Design, stratum: str, position: int) -> str:
    """The public label of the kit for a stratum's `position`-th slot: "<trial>-<stratum index>-<position:04d>".

    Sequential and public, so the pharmacy dispenses the next labelled kit of the participant's stratum; the
    secret, until unblinding, is which arm a label holds (`arm_of`), not the label.
    """
    _check_name(trial_id, "the trial id")
    _check_position(position)
    return f"{trial_id}-{stratum_index(design, stratum)}-{position:04d}"


# -- seed escrow --------------------------------------------------------------------------------------


def _check_threshold(threshold: int) -> None:
    # Threshold 1 would hand every holder the seed itself, and with it the allocation before unblinding.
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
        raise ValueError(f"an escrow threshold must be an integer of at least 2, got {threshold!r}")


def escrow_shares(seed: bytes, holders: Sequence[str], threshold: int, coefficients: Sequence[int]) -> dict[str, int]:
    """Shamir shares of `seed` over GF(FIELD_PRIME): holder i (in the given order) gets f(i + 1).

    f(x) = seed + c1·x + … + c(t-1)·x^(t-1); the caller draws the t - 1 `coefficients` uniformly in
    [0, FIELD_PRIME) (e.g. `secrets.randbelow`), so any `threshold` holders recover the seed and fewer learn
    nothing about it.
    """
    _check_seed(seed, "the escrowed seed")
    _check_threshold(threshold)
    if len(set(holders)) != len(holders) or any(not h for h in holders):
        raise ValueError(f"escrow holders must be distinct and non-empty, got {list(holders)}")
    if threshold > len(holders):
        raise ValueError(f"a threshold of {threshold} needs at least {threshold} holders, got {len(holders)}")
    if len(coefficients) != threshold - 1:
        raise ValueError(f"a threshold of {threshold} needs {threshold - 1} coefficients, got {len(coefficients)}")
    if any(not 0 <= c < FIELD_PRIME for c in coefficients):
        raise ValueError("escrow coefficients must lie in [0, FIELD_PRIME)")
    poly = [int.from_bytes(seed, "big"), *coefficients]
    return {holder: _evaluate(poly, i + 1) for i, holder in enumerate(holders)}


def _evaluate(poly: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(poly):  # Horner
        y = (y * x + c) % FIELD_PRIME
    return y


def _interpolate(points: Sequence[tuple[int, int]], x: int) -> int:
    """The value at `x` of the polynomial of degree < len(points) through `points` (Lagrange)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for k, (xk, _) in enumerate(points):
            if k != i:
                num = num * (x - xk) % FIELD_PRIME
                den = den * (xi - xk) % FIELD_PRIME
        total = (total + yi * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    return total


def recover_seed(shares: Mapping[int, int], threshold: int) -> bytes:
    """The 32-byte seed from at least `threshold` shares {x: y}; the caller checks it against the commitment.

    Interpolates through the `threshold` shares with the smallest x and requires every further share to lie
    on the same polynomial, so a wrong extra share is reported rather than ignored.
    """
    _check_threshold(threshold)
    if len(shares) < threshold:
        raise ValueError(f"recovering the seed needs at least {threshold} shares, got {len(shares)}")
    for x, y in shares.items():
        if not 0 < x < FIELD_PRIME or not 0 <= y < FIELD_PRIME:
            raise ValueError(f"share x={x} is not a point of GF(FIELD_PRIME) with x > 0")
    points = sorted(shares.items())
    base, extra = points[:threshold], points[threshold:]
    wrong = [x for x, y in extra if _interpolate(base, x) != y]
    if wrong:
        raise ValueError(f"shares x={wrong} do not lie on the polynomial through x={[x for x, _ in base]}: at least "
                         "one share is wrong; recover from another subset and check the seed against its commitment")
    value = _interpolate(base, 0)
    if value >= 1 << (8 * SEED_BYTES):
        raise ValueError(f"the recovered value does not fit in {SEED_BYTES} bytes: a share is wrong, or the shares "
                         "belong to different seeds")
    return value.to_bytes(SEED_BYTES, "big")

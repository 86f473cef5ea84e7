"""Placement of a segment's n shares on n distinct miners by rendezvous (highest-random-weight) hashing.

Every miner gets a score `derive(seed, "placement", dataset, segment, version, miner)`; share i goes to the
miner with the i-th highest score. The seed comes from a final checkpoint (`seed.checkpoint_seed`), so the
bridge cannot steer shares onto miners it likes; the result is the same on every machine, shares of one
segment are on distinct miners by construction, and every miner is equally likely at every rank, which
balances load. Adding or removing one miner moves only the shares whose ranking it enters or leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from carechain.seed import derive
from carechain.storage.codec import StorageError


class PlacementError(StorageError):
    """Not enough eligible miners to place every share on a distinct one."""


def rank_miners(seed: bytes, dataset_id: str, segment: int, version: int, miners: Iterable[str]) -> list[str]:
    """Miners in rendezvous order for one segment version (best first); ties are impossible in practice
    and broken by miner id."""
    unique = set(miners)
    return sorted(unique, key=lambda m: (derive(seed, "placement", dataset_id, segment, version, m), m), reverse=True)


def place_shares(
    seed: bytes, dataset_id: str, segment: int, version: int, miners: Iterable[str], count: int,
    exclude: Iterable[str] = (),
) -> tuple[str, ...]:
    """The `count` best-ranked miners not in `exclude`, one per share, all distinct."""
    banned = set(exclude)
    eligible = [m for m in rank_miners(seed, dataset_id, segment, version, miners) if m not in banned]
    if len(eligible) < count:
        raise PlacementError(
            f"dataset {dataset_id!r} segment {segment}: {count} shares need {count} distinct miners, only "
            f"{len(eligible)} are eligible ({len(banned)} excluded); register more miners or lower n")
    return tuple(eligible[:count])


def share_counts(placements: Iterable[Sequence[str]]) -> dict[str, int]:
    """How many shares each miner holds across `placements` (for balance checks and status)."""
    counts: dict[str, int] = {}
    for row in placements:
        for m in row:
            counts[m] = counts.get(m, 0) + 1
    return counts

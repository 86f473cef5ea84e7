"""Storage placement: rendezvous hashing seeded by a final checkpoint (issue 7)."""

from __future__ import annotations

import pytest

from carechain.seed import checkpoint_seed, derive, uniform_below
from carechain.storage.placement import PlacementError, place_shares, share_counts

MINERS = [f"miner-{i:02d}" for i in range(16)]
SEED = checkpoint_seed(b"carechain.example/log\n42\nroot\n", [b"sig-b", b"sig-a"])


def test_checkpoint_seed_needs_cosignatures_and_ignores_their_order():
    assert checkpoint_seed(b"carechain.example/log\n42\nroot\n", [b"sig-a", b"sig-b"]) == SEED
    assert checkpoint_seed(b"carechain.example/log\n42\nroot\n", [b"sig-a", b"sig-c"]) != SEED
    with pytest.raises(ValueError, match="cosignatures"):
        checkpoint_seed(b"note", [])
    assert derive(SEED, "x", "ab", "c") != derive(SEED, "x", "a", "bc")  # length-prefixed parts


def test_shares_of_a_segment_go_to_distinct_miners_and_placement_is_stable():
    for seg in range(200):
        placed = place_shares(SEED, "ds", seg, 1, MINERS, 8)
        assert len(set(placed)) == 8
        assert placed == place_shares(SEED, "ds", seg, 1, list(reversed(MINERS)), 8)
    other = checkpoint_seed(b"carechain.example/log\n43\nroot\n", [b"sig-a"])
    assert [place_shares(SEED, "ds", s, 1, MINERS, 8) for s in range(20)] != \
        [place_shares(other, "ds", s, 1, MINERS, 8) for s in range(20)]


def test_placement_is_balanced_across_miners():
    counts = share_counts(place_shares(SEED, "ds", seg, 1, MINERS, 8) for seg in range(2000))
    expected = 2000 * 8 / 16  # 1000 shares each
    assert set(counts) == set(MINERS)
    # binomial(2000, 1/2): sd = 22.4; 5 sd either side
    assert all(abs(c - expected) < 112 for c in counts.values()), counts


def test_removing_a_miner_moves_only_its_shares():
    before = {s: place_shares(SEED, "ds", s, 1, MINERS, 8) for s in range(300)}
    after = {s: place_shares(SEED, "ds", s, 1, MINERS[1:], 8) for s in range(300)}
    for s in before:
        kept = [m for m in before[s] if m != MINERS[0]]
        assert after[s][:len(kept)] == tuple(kept)


def test_exclusion_and_too_few_miners():
    placed = place_shares(SEED, "ds", 0, 1, MINERS, 4, exclude=MINERS[:10])
    assert not set(placed) & set(MINERS[:10])
    with pytest.raises(PlacementError, match="8 shares need 8 distinct miners, only 6"):
        place_shares(SEED, "ds", 0, 1, MINERS, 8, exclude=MINERS[:10])


def test_uniform_below_is_in_range_and_deterministic():
    draws = [uniform_below(SEED, "t", 7, i) for i in range(700)]
    assert set(draws) == set(range(7)) and draws == [uniform_below(SEED, "t", 7, i) for i in range(700)]

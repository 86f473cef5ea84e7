"""Storage audits: seeded chunk challenges, Merkle-proof answers, and the detection math (issue 7)."""

from __future__ import annotations

import random

import pytest

from carechain.storage.audit import (
    Answer,
    AuditSchedule,
    ShareRef,
    StoredShare,
    bytes_per_challenge,
    challenges_needed,
    detection_probability,
    draw_challenges,
    verify_answer,
)
from carechain.storage.codec import DatasetKey, StorageParams, encode_segment

CHUNK = 64
PARAMS = StorageParams(segment_size=2000, k=2, n=4, chunk_size=CHUNK)
KEY = DatasetKey("ds", bytes(32))


def holdings(segments=6):
    """A miner holding share 0 of several segments: (refs, the bytes)."""
    refs, data = [], {}
    for seg in range(segments):
        enc = encode_segment(KEY, seg, 1, random.Random(seg).randbytes(1990), PARAMS)
        ref = ShareRef("ds", seg, 1, 0, enc.roots[0], len(enc.shares[0]))
        refs.append(ref)
        data[ref] = enc.shares[0]
    return refs, data


def test_challenges_needed_for_999_per_mille():
    table = {f: challenges_needed(f) for f in (0.01, 0.05, 0.10, 0.50)}
    assert table == {0.01: 688, 0.05: 135, 0.10: 66, 0.50: 10}
    for f, c in table.items():
        assert detection_probability(f, c) >= 0.999 > detection_probability(f, c - 1)
    assert challenges_needed(1.0) == 1


def test_challenges_are_deterministic_per_seed_and_cover_all_chunks():
    refs, _ = holdings()
    a = draw_challenges(bytes(32), "m1", refs, 500, CHUNK)
    assert a == draw_challenges(bytes(32), "m1", list(reversed(refs)), 500, CHUNK)
    assert a != draw_challenges(bytes([1]) * 32, "m1", refs, 500, CHUNK)
    assert a != draw_challenges(bytes(32), "m2", refs, 500, CHUNK)
    assert {c.ref for c in a} == set(refs)
    assert all(0 <= c.chunk < 16 for c in a)  # 1000-byte shares: 16 chunks, the last 40 bytes


def test_an_honest_miner_passes_every_challenge():
    refs, data = holdings()
    stored = {r: StoredShare(data[r], CHUNK) for r in refs}
    for ch in draw_challenges(bytes(32), "m1", refs, 200, CHUNK):
        v = verify_answer(ch, stored[ch.ref].answer(ch.chunk), CHUNK)
        assert v.passed, v.reason


def test_wrong_chunk_wrong_proof_and_silence_fail():
    refs, data = holdings(1)
    ch = draw_challenges(bytes(32), "m1", refs, 1, CHUNK)[0]
    good = StoredShare(data[refs[0]], CHUNK).answer(ch.chunk)
    flipped = bytes([good.chunk[0] ^ 1]) + good.chunk[1:]
    assert not verify_answer(ch, Answer(flipped, good.proof), CHUNK).passed
    assert not verify_answer(ch, Answer(good.chunk, good.proof[:-1]), CHUNK).passed
    assert not verify_answer(ch, Answer(good.chunk[:-1], good.proof), CHUNK).passed
    assert verify_answer(ch, None, CHUNK).reason.endswith("no answer")


@pytest.mark.parametrize(("f", "c"), [(0.05, 20), (0.25, 4), (0.10, 66)])
def test_a_miner_missing_chunks_is_caught_at_the_documented_rate(f, c):
    refs, data = holdings()
    stored = {r: StoredShare(data[r], CHUNK) for r in refs}
    all_chunks = [(r, i) for r in refs for i in range(16)]  # 96 chunks
    rng = random.Random(7)
    missing = set(rng.sample(all_chunks, round(f * len(all_chunks))))
    f_real = len(missing) / len(all_chunks)
    trials, caught = 1500, 0
    for _ in range(trials):
        seed = rng.randbytes(32)
        for ch in draw_challenges(seed, "lazy", refs, c, CHUNK):
            ans = None if (ch.ref, ch.chunk) in missing else stored[ch.ref].answer(ch.chunk)
            if not verify_answer(ch, ans, CHUNK).passed:
                caught += 1
                break
    p = detection_probability(f_real, c)
    sd = (p * (1 - p) / trials) ** 0.5
    assert abs(caught / trials - p) <= max(4 * sd, 0.002), (caught / trials, p)


def test_audit_cost_figures():
    # defaults: 1 KiB chunks, 256 chunks per share -> 8 proof hashes
    assert bytes_per_challenge(1024, 256) == 1024 + 8 * 32 + 128
    schedule = AuditSchedule()
    assert schedule.challenges_per_miner_epoch == 688
    assert schedule.bytes_per_miner_month(1024, 256) == 688 * 30 * 1408
    assert schedule.bytes_per_tb_month(1024, 256, tb_per_miner=0.5) == 2 * schedule.bytes_per_miner_month(1024, 256)

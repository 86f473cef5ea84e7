"""Issue 12, item 1, without a broker: proof answers are paged by bytes below the broker's packet limit,
requests are rate-limited per requester, and violation evidence over many entries is cut to fit a packet
yet still verifies."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from test_miners import Log, entries, make_witness, step

from carechain import miner_messages as messages
from carechain.evidence import EvidenceError, shrink_violation, verify_evidence
from carechain.identity import Identity
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.proof_responder import ProofResponder, RequestLimiter
from chain_miner.witness import CosignRefused, RefusalReason, Violation
from tests.conftest import LedgerFactory

LEAF = b"x" * 300


@pytest.fixture
def ledger(tmp_path: Path, ledger_factory: LedgerFactory) -> Iterator[Ledger]:
    led = ledger_factory(tmp_path / "ledger.db")
    led.append_events([EventCandidate("dev", i, LEAF + i.to_bytes(4, "big")) for i in range(2_500)])
    yield led
    led.close()


def test_an_answer_is_the_longest_prefix_that_fits_the_packet_limit(ledger: Ledger) -> None:
    limit = 64 * 1024
    responder = ProofResponder(ledger, max_packet_bytes=limit)
    topic = messages.response("m" * 64)
    got: list[bytes] = []
    while len(got) < 2_500:
        page = responder.answer(messages.ProofRequestMessage(id="p", old_size=len(got), new_size=2_500))
        size = len(page.model_dump_json().encode())
        assert page.error is None and len(page.entries) > 0 and size <= messages.payload_budget(limit, topic)
        if len(got) + len(page.entries) < 2_500:  # a page that stops early is full: one more entry would not fit
            assert size + 2 * (len(LEAF) + 4) + 3 > messages.payload_budget(limit, topic)
        got.extend(bytes.fromhex(e) for e in page.entries)
    assert got == list(ledger.leaves(0, 2_500))


def test_an_entry_larger_than_a_packet_is_refused_with_what_to_raise(tmp_path: Path,
                                                                     ledger_factory: LedgerFactory) -> None:
    led = ledger_factory(tmp_path / "big.db")
    try:
        led.append_events([EventCandidate("dev", 0, b"y" * 5_000)])
        page = ProofResponder(led, max_packet_bytes=8_192).answer(
            messages.ProofRequestMessage(id="b", old_size=0, new_size=1))
        assert page.error and "max_packet_bytes" in page.error and not page.entries
    finally:
        led.close()


def test_requests_are_limited_per_requester_and_a_flood_pushes_its_own_answers_out() -> None:
    now = [0.0]
    limiter = RequestLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5) and limiter.take("b") == 0.0  # others are not slowed
    for _ in range(100):
        limiter.take("a")
    now[0] += 0.5
    assert limiter.take("a") > 0  # still paying for the flood
    now[0] += 10
    assert limiter.take("a") == 0.0


def test_violation_evidence_cut_after_the_violating_leaf_still_verifies(log_key: Identity) -> None:
    def no_evil(old: int, new: int, batch: Sequence[bytes]) -> Violation | None:
        for i, e in enumerate(batch):
            if e.startswith(b"evil"):
                return Violation(old + i, "no-evil-sale", "an Rx-only sale without a valid Rx")
        return None

    log, w = Log(log_key, entries("a", 3)), make_witness(log_key, entry_verifier=no_evil)
    step(w, log)
    log.append(*entries("b", 5), b"evil sale", *entries("c", 500))
    d = step(w, log)
    assert isinstance(d, CosignRefused) and d.reason is RefusalReason.VIOLATION and d.evidence is not None
    leaf = d.evidence.violation_leaf
    assert leaf == 8
    short = shrink_violation(d.evidence, 3, log.proof(leaf + 1, log.tree.size))
    assert len(short.entries) == 6 and len(short.model_dump_json()) < len(d.evidence.model_dump_json()) // 4
    assert "leaf 8" in verify_evidence(short, log_key.public_key, no_evil)
    with pytest.raises(EvidenceError, match="not a prefix"):
        verify_evidence(short.model_copy(update={"consistency_path": short.consistency_path[1:]}),
                        log_key.public_key, no_evil)
    with pytest.raises(EvidenceError, match="do not take"):  # a reader of v1 evidence wants every entry
        verify_evidence(short.model_copy(update={"v": 1}), log_key.public_key, no_evil)
    swapped = short.model_copy(update={"entries": [*short.entries[:-1], b"evil other".hex()]})
    with pytest.raises(EvidenceError):
        verify_evidence(swapped, log_key.public_key, no_evil)


@pytest.fixture
def log_key() -> Identity:
    return Identity.from_seed(b"L" * 32)

"""`carechain demo`'s data market: 22 patients' sealed readings, three studies answered (or not) by the live
miners in MPC, a sample of the contributions disclosed and audited by them, paid, and verified from the log —
checked here against the ledger the demo kept."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from carechain import envelope, measures
from carechain.contribution_audit import contribution_vector
from carechain.demo.market import (
    AGGREGATORS,
    FEE_MINOR,
    GLUCOSE_READINGS,
    PATIENTS,
    PICKY,
    PRICE_MINOR,
    SMALL_REGION_PATIENTS,
    glucose_level,
    resting_level,
)
from carechain.demo.trial import certificate_lines
from carechain.entries import STUDY_AUDIT, STUDY_CONTRIBUTE, STUDY_DISCLOSE, STUDY_RESULT, Entry
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import contract_genesis, ledger_path
from contract_rules.market import CONTRIBUTIONS, audit_size, study_account, study_record

pytestmark = pytest.mark.integration


@pytest.fixture
def demo(full_demo: tuple[dict[str, Any], Path]) -> tuple[dict[str, Any], Path]:
    return full_demo  # the session's one whole demo run (tests/conftest.py)


def _ledger(root: Path) -> tuple[Any, list[Entry]]:
    bridge = root / "bridge"
    ledger = Ledger(ledger_path(bridge))
    try:
        state = replay_ledger(ledger, contract_genesis(bridge)).state
        return state, [Entry.decode(leaf) for leaf in ledger.leaves()]
    finally:
        ledger.close()


def test_the_mean_resting_heart_rate_leaves_out_the_patient_whose_minimum_cohort_is_larger(demo) -> None:
    summary, _ = demo
    market = summary["study"]
    assert market["error"] is None, market["error"]
    rhr = market["studies"][0]
    everyone_but_picky = [i for i in range(PATIENTS) if i != PICKY]
    assert rhr["contributions"] == PATIENTS and rhr["included"] == PATIENTS - 1
    assert rhr["answer"] == {"sum": sum(map(resting_level, everyone_but_picky)), "n": PATIENTS - 1}
    assert summary["study_result"] == round(rhr["answer"]["sum"] / rhr["answer"]["n"], 1)
    assert summary["study_contributors"] == PATIENTS - 1
    glucose = market["studies"][1]
    assert glucose["state"] == "answered" and glucose["included"] == PATIENTS - 1
    # How long each phase took is reported for people (a timing is a benchmark's business, not a test's).
    assert market["seconds"] > 0 and set(market["phases"]), market["phases"]


def test_every_study_verifies_from_the_log_and_the_small_one_is_unanswered(demo) -> None:
    summary, _ = demo
    assert summary["study_verified"] is True
    assert [s["verified"] for s in summary["study"]["studies"]] == [True, True, True]
    small = summary["study"]["studies"][2]
    assert small["filter"] == {"region": "annecy"}
    assert (small["state"], small["answer"], small["contributions"], small["included"]) == (
        "unanswered", None, len(SMALL_REGION_PATIENTS), 0)


def test_results_are_signed_by_the_study_aggregators_and_payments_close_every_study(demo) -> None:
    summary, root = demo
    state, entries = _ledger(root)
    ids = [s["study_id"] for s in summary["study"]["studies"]]
    for sid in ids:
        record = study_record(state, sid)
        assert record is not None and record["closed_at"] is not None
        assert state.balance(study_account(sid)) == 0  # paid out or refunded, nothing left in escrow
        # Every aggregator sends its result; the bridge appends them until a majority agrees, then refuses.
        signers = [envelope.parse(e.cose).kid for e in entries if e.type == STUDY_RESULT
                   and envelope.parse(e.cose).payload["study_id"] == sid]
        assert len(signers) == AGGREGATORS // 2 + 1 and set(signers) <= set(record["aggregators"])
    # Contributions carry only sealed shares and a commitment: no value in clear.
    contributions = [envelope.parse(e.cose).payload for e in entries if e.type == STUDY_CONTRIBUTE]
    assert len(contributions) == 2 * PATIENTS + len(SMALL_REGION_PATIENTS)
    assert all(set(c) == {"v", "study_id", "consent", "commitment", "shares", "leaves", "ts"} for c in contributions)
    # Two answered studies pay every included patient her price and the majority its fee; the third refunds.
    paid = 2 * (PATIENTS - 1) * PRICE_MINOR
    assert summary["study"]["paid"]["patients"] == paid
    deposits = sum(s["deposit"] for s in summary["study"]["studies"])
    fees = 2 * (AGGREGATORS // 2 + 1) * FEE_MINOR
    assert summary["study"]["paid"]["researcher_left"] == deposits - paid - fees


def _payloads(entries: list[Entry], entry_type: str, study_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(signer, payload) of the entries of `entry_type` about `study_id`, in log order."""
    parsed = [envelope.parse(e.cose) for e in entries if e.type == entry_type]
    return [(p.kid, p.payload) for p in parsed if p.payload["study_id"] == study_id]


def _exact_glucose_histogram(query: dict[str, Any], to_ms: int) -> list[int]:
    """What the histogram would be without noise: each included patient's mean glucose, in its bin."""
    counts = [0] * (len(query["bins"]) - 1)
    for i in range(PATIENTS):
        if i == PICKY:
            continue
        readings = [{"kind": "glucose", "mg_dl": glucose_level(i, g)} for g in range(GLUCOSE_READINGS)]
        vector = contribution_vector(query, measures.measure("histogram", "glucose", readings, to_ms))
        counts = [c + v for c, v in zip(counts, vector, strict=True)]
    return counts


def test_the_glucose_histogram_states_epsilon_1_in_study_and_result_and_its_counts_are_noisy_integers(demo) -> None:
    summary, root = demo
    glucose = summary["study"]["studies"][1]
    assert (glucose["epsilon"], glucose["result_epsilon"], summary["study"]["epsilon"]) == (1.0, 1.0, 1.0)
    state, entries = _ledger(root)
    record = study_record(state, glucose["study_id"])
    assert record is not None and record["epsilon_milli"] == 1000
    assert record["decided"]["noise"]["epsilon_milli"] == 1000
    results = _payloads(entries, STUDY_RESULT, glucose["study_id"])
    assert results and all(r["noise"]["epsilon_milli"] == 1000 for _, r in results)
    counts = glucose["answer"]["histogram"]
    assert counts == record["decided"]["answer"]["histogram"]
    assert len(counts) == len(record["query"]["bins"]) - 1 and all(isinstance(c, int) for c in counts)
    # Discrete-Laplace noise of epsilon 1 per bin (sensitivity 1): each count within a few units of the exact
    # one (|noise| > 30 has probability ~1e-13), and a count may even be negative. Noise 0 in all six bins has
    # probability ~1 %, so the test does not require a difference.
    exact = _exact_glucose_histogram(record["query"], record["to_ms"])
    assert sum(exact) == PATIENTS - 1
    assert all(abs(c - e) <= 30 for c, e in zip(counts, exact, strict=True)), (counts, exact)


def test_each_answered_study_audits_a_sample_whose_disclosed_contributions_all_match(demo) -> None:
    summary, root = demo
    state, entries = _ledger(root)
    contributions = state.table(CONTRIBUTIONS)
    for study in summary["study"]["studies"][:2]:
        sid, audit = study["study_id"], study["audit"]
        assert audit is not None, study
        assert len(audit["sample"]) == audit_size(study["included"]) > 0
        assert audit["outcomes"] == {str(i): "match" for i in audit["sample"]} and audit["forfeited"] == []
        record = study_record(state, sid)
        assert record is not None and record["audit"]["outcome"] == audit["outcomes"]
        # Each sampled patient disclosed her own contribution (the logged access); a majority of the study's
        # aggregators judged each one.
        disclosed = _payloads(entries, STUDY_DISCLOSE, sid)
        assert sorted(d["contribution"] for _, d in disclosed) == sorted(audit["sample"])
        assert all(signer == contributions[str(d["contribution"])]["owner"] for signer, d in disclosed)
        verdicts = _payloads(entries, STUDY_AUDIT, sid)
        for index in audit["sample"]:
            judges = {signer for signer, v in verdicts if v["contribution"] == index and v["verdict"] == "match"}
            assert len(judges) >= AGGREGATORS // 2 + 1 and judges <= set(record["aggregators"])


def test_the_unanswered_study_has_no_audit_sample(demo) -> None:
    summary, root = demo
    small = summary["study"]["studies"][2]
    assert small["state"] == "unanswered" and small["audit"] is None
    state, entries = _ledger(root)
    record = study_record(state, small["study_id"])
    assert record is not None and record["audit"] is None
    assert _payloads(entries, STUDY_DISCLOSE, small["study_id"]) == []


def test_the_trial_meets_its_endpoint_and_verifies_with_one_logged_unblinding(demo) -> None:
    """The demo's trial (carechain.demo.trial): 40 participants labelled by the live miners, a simulated drug that
    lowers the resting heart rate by 6 bpm, one logged emergency unblinding, verified from the log."""
    summary, root = demo
    result = summary["trial"]
    assert result["error"] is None, result
    assert summary["trial_verified"] is True and summary["trial_certificate"] == result["trial_certificate"]
    certificate = result["trial_certificate"]
    assert certificate["met"] is True
    assert certificate["n_treatment"] == certificate["n_control"] == 20
    # The simulated drug lowers the change by exactly 6 bpm (twins' noise is matched within each block).
    assert Decimal(certificate["effect"]) == Decimal("-6000.000")
    assert Decimal(certificate["p_value"]) < Decimal("0.05")
    assert result["simulated_effect_milli_bpm"] == -6000
    unblinding = result["unblinding"]
    assert unblinding["arm"] in ("treatment", "placebo") and unblinding["size"] == 4
    assert [u["participant"] for u in result["verify"]["unblinded"]] == [unblinding["participant"]]
    assert all(result["verify"]["checks"].values()), result["verify"]
    printed = "\n".join(certificate_lines(result))
    assert "effect -6.00 bpm" in printed and "endpoint MET" in printed
    assert "verified from the log alone: True" in printed
    assert set(result["phases"]) >= {"register", "commit", "enrol_and_dispense", "readings", "unblinding",
                                     "lock_and_reveal", "outcomes", "certify_and_verify"}
    # The seeds stay where their committers keep them: each labelling miner's is a 0600 file in its own data dir.
    seeds = list(root.rglob("trials/*.seed"))
    assert len(seeds) == len(result["labellers"]) and all(seed.stat().st_mode & 0o077 == 0 for seed in seeds)


def test_the_demo_picks_study_ids_whose_computations_never_share_a_port() -> None:
    # Studies run at once: parties of two studies meeting on one port would fail both (seen: run id 9552c0 put
    # rhr-… and rhr-annecy-… on offset 63).
    from carechain.config import MinerConfig
    from carechain.demo.market import SMALL_REGION, _run_id
    from chain_miner.study_runner import Job, job_port_offset

    assert _run_id(0x17C3D19552C0) != "9552c0"
    for now in range(1_796_000_000_000, 1_796_000_000_000 + 300_000, 997):
        run_id = _run_id(now)
        ids = (f"rhr-{run_id}", f"glucose-{run_id}", f"rhr-{SMALL_REGION}-{run_id}")
        offsets = [job_port_offset(Job(k, sid, 0, ()), MinerConfig().mpc_ports) for sid in ids
                   for k in ("result", "audit")]
        assert len(set(offsets)) == len(offsets)

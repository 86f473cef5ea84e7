"""The data market's computation: contributors' shares, and three real `chain_miner.aggregator` processes
(MPyC parties over loopback TCP) checking validity, applying the cohort rule and opening only the aggregate.

`build_inputs` and `run_aggregators` are also what bench/market.py drives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carechain import contribution_audit, envelope, market
from carechain.entries import STUDY_AUDIT, STUDY_RESULT, Entry
from carechain.identity import Identity
from chain_miner.mpc_tls import MpcTls, write_party_files
from simulators.mpc_parties import tls_work_dirs
from simulators.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
SALT = bytes(range(16))


@dataclass
class Contribution:
    """One contributor's input as the test or bench makes it: a vector (valid or not), its min_cohort, and
    optionally a way to spoil what one aggregator receives."""

    vector: list[int]
    min_cohort: int = 2
    spoil: str | None = None  # "garbage" | "wrong_key" | "inconsistent" | "short" (at aggregator 1)


def aggregator_keys(tmp_path: Path, m: int = 3) -> list[Identity]:
    keys = [Identity.from_seed(bytes([0xA0 + i]) * 32) for i in range(m)]
    for i, key in enumerate(keys):
        key.save(tmp_path / f"aggregator{i}.key", overwrite=True)
    return keys


def build_inputs(keys: Sequence[Identity], query: dict[str, Any], contributions: Sequence[Contribution], *,
                 epsilon_milli: int = 0, study_id: str = "study-1") -> dict[str, Any]:
    """The --inputs document: each contribution split, encoded and sealed as a contributor's agent does."""
    out = []
    for leaf, c in enumerate(contributions, start=100):
        rows = market.split_contribution(c.vector, len(keys))
        encoded = [market.encode_shares(row) for row in rows]
        if c.spoil == "inconsistent":
            encoded[1] = market.encode_shares([(s + 1) % market.FIELD_MODULUS for s in rows[1]])
        elif c.spoil == "short":
            encoded[1] = market.encode_shares(rows[1] + [0])
        sealed = [market.seal_share(k.public_key, data) for k, data in zip(keys, encoded, strict=True)]
        if c.spoil == "garbage":
            sealed[1] = os.urandom(80)
        elif c.spoil == "wrong_key":
            sealed[1] = market.seal_share(keys[0].public_key, encoded[1])
        out.append({"leaf": leaf, "min_cohort": c.min_cohort, "shares": [s.hex() for s in sealed]})
    study = {"study_id": study_id, "query": query, "epsilon_milli": epsilon_milli,
             "aggregators": [k.device_id for k in keys]}
    return {"study": study, "contributions": out}


def start_aggregators(tmp_path: Path, inputs: dict[str, Any], work: Sequence[Path] | None, *,
                      audit: bool = False, others: dict[int, dict[str, Any]] | None = None
                      ) -> list[subprocess.Popen[bytes]]:
    """Start one `python -m chain_miner.aggregator` (with --audit: its audit) per aggregator on free loopback
    ports, party i with the MPC TLS files of `work[i]` (None: --plaintext, for the benchmark's comparison) and
    `inputs`, or `others[i]` when given (a party that computes something else)."""
    m = len(inputs["study"]["aggregators"])
    peers = ",".join(f"127.0.0.1:{port}" for port in free_ports(m))
    procs = []
    for i in range(m):
        out = tmp_path / f"result{i}.json"
        out.unlink(missing_ok=True)
        mine = (others or {}).get(i, inputs)
        inputs_file = tmp_path / f"inputs{i}.json"
        inputs_file.write_text(json.dumps(mine))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "chain_miner.aggregator", "--study", mine["study"]["study_id"], "--index",
             str(i), "--peers", peers, "--key", str(tmp_path / f"aggregator{i}.key"), "--inputs",
             str(inputs_file), "--out", str(out), "--ts", "1700000000000",
             *(["--plaintext"] if work is None else ["--mpc-tls", str(work[i])]),
             *(["--audit"] if audit else [])],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def run_aggregators(tmp_path: Path, inputs: dict[str, Any], *, timeout: float = 120.0,
                    audit: bool = False, tls: bool = True) -> list[dict[str, Any]]:
    """Run the aggregators (`start_aggregators`, over TLS, every party trusting all); their outputs."""
    m = len(inputs["study"]["aggregators"])
    procs = start_aggregators(tmp_path, inputs, tls_work_dirs(tmp_path, m) if tls else None, audit=audit)
    try:
        for p in procs:
            output, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, output.decode(errors="replace")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(m)]


def agreed_payload(results: list[dict[str, Any]], keys: Sequence[Identity]) -> dict[str, Any]:
    """Every aggregator signed the same payload with its own key; that payload."""
    for result, key in zip(results, keys, strict=True):
        entry = Entry.decode(bytes.fromhex(result["entry"]))
        assert entry.type == STUDY_RESULT
        sign1 = envelope.parse(entry.cose)
        assert sign1.verify(key.public_key) and sign1.payload == result["payload"]
    payloads = [r["payload"] for r in results]
    assert payloads[0] == payloads[1] == payloads[2]
    return payloads[0]


HR = {"kind": "heart_rate", "lo": 40, "hi": 200}
BINS = [40, 60, 80, 100, 120, 200]
VALUES = [41, 55, 62, 80, 99, 100, 119, 150, 200, 73, 66, 88]


# -- three aggregator processes ----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["count", "sum", "mean", "histogram"])
def test_aggregators_open_the_plain_answer(tmp_path: Path, qtype: str) -> None:
    query = market.Query.model_validate({"type": qtype, **HR, **({"bins": BINS} if qtype == "histogram" else {})})
    vectors = [market.contribution(query, v) for v in VALUES]
    keys = aggregator_keys(tmp_path)
    inputs = build_inputs(keys, query.model_dump(exclude_none=True), [Contribution(v) for v in vectors])
    payload = agreed_payload(run_aggregators(tmp_path, inputs), keys)
    leaves = list(range(100, 100 + len(VALUES)))
    assert payload["valid"] == payload["included"] == leaves and payload["invalid"] == 0
    assert payload["answer"] == market.plain_answer(query, vectors)
    if qtype == "histogram":
        assert payload["answer"] == {"histogram": [2, 3, 3, 2, 2]}


def test_parties_told_plaintext_compute_the_same_answer(tmp_path: Path) -> None:
    """--plaintext (a rolling upgrade with older miners, miner.mpc_plaintext_with_older_peers) is the same
    computation without TLS."""
    query = market.Query.model_validate({"type": "sum", **HR})
    vectors = [market.contribution(query, v) for v in VALUES]
    keys = aggregator_keys(tmp_path)
    inputs = build_inputs(keys, query.model_dump(exclude_none=True), [Contribution(v) for v in vectors])
    payload = agreed_payload(run_aggregators(tmp_path, inputs, tls=False), keys)
    assert payload["answer"] == market.plain_answer(query, vectors)


def test_a_party_the_study_does_not_trust_cannot_join_the_computation(tmp_path: Path) -> None:
    """The MPC channels are mutually authenticated: party 0 below holds a certificate that parties 1 and 2 do not
    trust (its own trusts everyone), so they close its channels and nobody computes; with trust all round the
    same inputs compute in seconds (test_aggregators_open_the_plain_answer)."""
    query = market.Query.model_validate({"type": "count", **HR})
    keys = aggregator_keys(tmp_path)
    inputs = build_inputs(keys, query.model_dump(exclude_none=True),
                          [Contribution(market.contribution(query, v)) for v in VALUES])
    work = tls_work_dirs(tmp_path / "study", 3)
    rogue = MpcTls.generate()
    certificates = [rogue.cert_pem] + [(w / ".config" / f"party_{i}.crt").read_text() for i, w in
                                       enumerate(work) if i]
    work[0] = write_party_files(tmp_path / "rogue", 0, rogue, certificates)
    procs = start_aggregators(tmp_path, inputs, work)
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # trusted parties wait for a party they can trust
            procs[1].wait(timeout=6)
        assert procs[2].poll() is None
        assert procs[0].wait(timeout=30) != 0  # the servers closed its channels: it cannot compute
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert not any((tmp_path / f"result{i}.json").exists() for i in range(3))


def test_parties_of_two_computations_that_meet_on_one_port_compute_nothing(tmp_path: Path) -> None:
    """Two studies' computations whose ports collide can meet (docs/market.md, known limit). Party 2 below holds
    another study (same aggregators, same number of contributions, so the shapes would match): every party
    finds it out before any share is used and exits with 3, instead of mixing inputs into an answer."""
    query = market.Query.model_validate({"type": "count", **HR})
    keys = aggregator_keys(tmp_path)
    contributions = [Contribution(market.contribution(query, v)) for v in VALUES]
    inputs = build_inputs(keys, query.model_dump(exclude_none=True), contributions)
    other = build_inputs(keys, query.model_dump(exclude_none=True), contributions, study_id="study-2")
    procs = start_aggregators(tmp_path, inputs, tls_work_dirs(tmp_path, 3), others={2: other})
    try:
        outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [3, 3, 3], outputs
    assert "party/parties [2] hold another computation" in outputs[0]
    assert "party/parties [0, 1] hold another computation" in outputs[2]
    assert not any((tmp_path / f"result{i}.json").exists() for i in range(3))


def bits(offset: int, k: int = 8) -> list[int]:
    """The k low bits of `offset`, least significant first: what a contributor inputs for lo + offset."""
    return [offset >> i & 1 for i in range(k)]


def test_invalid_and_malformed_inputs_are_dropped_and_counted(tmp_path: Path) -> None:
    query = market.Query.model_validate({"type": "mean", **HR})  # 40..200: k = 8 bits of value − 40
    good = [Contribution(market.contribution(query, v)) for v in (50, 60, 70, 200, 40)]
    ninety = market.contribution(query, 90)
    bad = [Contribution(bits(201 - 40)), Contribution(bits(255)), Contribution([2, 0, 0, 0, 0, 0, 0, 0]),
           Contribution([1, 0, 0, 0, 0, 0, 0, -1]), Contribution([90]),
           Contribution(ninety, spoil="garbage"), Contribution(ninety, spoil="wrong_key"),
           Contribution(ninety, spoil="inconsistent"), Contribution(ninety, spoil="short")]
    keys = aggregator_keys(tmp_path)
    inputs = build_inputs(keys, query.model_dump(exclude_none=True), good + bad)
    payload = agreed_payload(run_aggregators(tmp_path, inputs), keys)
    assert payload["valid"] == payload["included"] == [100, 101, 102, 103, 104]
    assert payload["invalid"] == len(bad)
    assert payload["answer"] == {"sum": 420, "n": 5}


def test_a_huge_field_element_shared_consistently_is_rejected(tmp_path: Path) -> None:
    # Before inputs were bits, a value far outside ±2**31 passed MPyC's 32-bit range comparison and skewed
    # the sum. Now every input element must be a bit: each of these is shared consistently (so it passes the
    # consistency check) and must still be caught, counted invalid, and left out of the answer.
    query = market.Query.model_validate({"type": "sum", **HR})
    p = market.FIELD_MODULUS
    good = [Contribution(market.contribution(query, v)) for v in (60, 70, 80)]
    huge = [Contribution([2**62] + [0] * 7), Contribution([0] * 7 + [p - 2**40]),
            Contribution([p // 2 + 1] + [0] * 7), Contribution([p - 1] * 8),
            Contribution([(1 - 2**33) % p, 2**32, 0, 0, 0, 0, 0, 0])]  # offset 1 − 2**33 + 2**33 = 1, not bits
    keys = aggregator_keys(tmp_path)
    payload = agreed_payload(run_aggregators(tmp_path, build_inputs(keys, query.model_dump(exclude_none=True),
                                                                    good + huge)), keys)
    assert payload["valid"] == payload["included"] == [100, 101, 102]
    assert payload["invalid"] == len(huge) and payload["answer"] == {"sum": 210}


def test_histogram_rejects_inputs_that_are_not_one_hot(tmp_path: Path) -> None:
    query = market.Query.model_validate({"type": "histogram", **HR, "bins": BINS})
    good = [Contribution(market.contribution(query, v)) for v in (45, 65, 65, 130)]
    bad = [Contribution([1, 1, 0, 0, 0]), Contribution([0, 0, 0, 0, 0]), Contribution([2, -1, 0, 0, 0]),
           Contribution([0, 0, 5, 0, 0])]
    keys = aggregator_keys(tmp_path)
    payload = agreed_payload(run_aggregators(tmp_path, build_inputs(keys, query.model_dump(exclude_none=True),
                                                                    good + bad)), keys)
    assert payload["valid"] == [100, 101, 102, 103] and payload["invalid"] == 4
    assert payload["answer"] == {"histogram": [1, 2, 0, 0, 1]}


def test_below_minimum_cohort_there_is_no_answer(tmp_path: Path) -> None:
    query = market.Query.model_validate({"type": "sum", **HR})
    keys = aggregator_keys(tmp_path)
    contributions = [Contribution(market.contribution(query, 70), min_cohort=5) for _ in range(3)]
    contributions.append(Contribution(bits(500 - 40)))
    payload = agreed_payload(run_aggregators(tmp_path, build_inputs(keys, query.model_dump(exclude_none=True),
                                                                    contributions)), keys)
    assert payload["valid"] == [100, 101, 102] and payload["invalid"] == 1
    assert payload["included"] == [] and payload["answer"] is None


def test_the_aggregate_covers_only_the_included_cohort(tmp_path: Path) -> None:
    query = market.Query.model_validate({"type": "mean", **HR})
    keys = aggregator_keys(tmp_path)
    contributions = [Contribution(market.contribution(query, v), c) for v, c in ((60, 2), (70, 3), (80, 3), (190, 9))]
    payload = agreed_payload(run_aggregators(tmp_path, build_inputs(keys, query.model_dump(exclude_none=True),
                                                                    contributions)), keys)
    assert payload["valid"] == [100, 101, 102, 103]
    assert payload["included"] == [100, 101, 102] and payload["answer"] == {"sum": 210, "n": 3}


def test_dp_noise_is_drawn_inside_the_mpc_and_agreed(tmp_path: Path) -> None:
    query = market.Query.model_validate({"type": "histogram", **HR, "bins": BINS})
    vectors = [market.contribution(query, v) for v in VALUES]
    keys = aggregator_keys(tmp_path)
    inputs = build_inputs(keys, query.model_dump(exclude_none=True), [Contribution(v) for v in vectors],
                          epsilon_milli=200)
    payload = agreed_payload(run_aggregators(tmp_path, inputs), keys)
    plain = market.plain_answer(query, vectors)["histogram"]
    noisy = payload["answer"]["histogram"]
    assert payload["noise"] == {"epsilon_milli": 200}
    # Discrete Laplace with ε = 0.2: P(|noise| > 200) < 1e-16 per bin; five bins all exactly 0 has
    # probability 0.0997**5 ≈ 1e-5.
    assert all(abs(a - b) <= 200 for a, b in zip(noisy, plain, strict=True)) and noisy != plain


# -- audits: three aggregator processes open the sampled vectors to each other and judge them -------------------


def audit_inputs(tmp_path: Path) -> tuple[dict[str, Any], int, int]:
    """An audit's --inputs document (`audit_inputs_from_leaves`'s shape) over the sealed world of
    tests/test_contributing.py: her honest contribution, and a cheat that committed to her true vector but
    shared another one; both disclosed. The aggregators' keys are saved for the processes. (honest, cheat) leaves."""
    from record_access.contributing import aggregator_keys as study_keys
    from record_access.contributing import build_contribution, find_cited_data
    from tests.test_contributing import AGGREGATORS, FROM_MS, OPERATORS, OWNER, OWNER_PRE, sealed_world, study

    for i, key in enumerate(AGGREGATORS):
        key.save(tmp_path / f"aggregator{i}.key", overwrite=True)
    world = sealed_world()
    query = {"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 220}
    record = study(query)
    pks = study_keys(world.runtime.state, record)
    built = build_contribution(OWNER, "hr-audit", record, consent=3, own=world.find("heart_rate"), ts=FROM_MS,
                               aggregators=pks)
    keys, cts = find_cited_data(world.indexed(), world.cts.get, OWNER.device_id, OWNER_PRE, OPERATORS, record,
                                built.leaves)
    honest, cheat = len(world.leaves), len(world.leaves) + 1
    shared = {honest: built.vector, cheat: [1 - built.vector[0], *built.vector[1:]]}  # the cheat's other value
    contributions = []
    for leaf, vector in shared.items():
        rows = market.split_contribution(vector, 3)
        sealed_keys, blob = contribution_audit.seal_disclosure(pks, "hr-audit", leaf, built.salt, keys, cts,
                                                               os.urandom(32), os.urandom(12))
        contributions.append({"leaf": leaf, "owner": OWNER.device_id, "commitment": built.commitment,
                              "leaves": built.leaves,
                              "shares": [market.seal_share(pk, market.encode_shares(row)).hex()
                                         for pk, row in zip(pks, rows, strict=True)],
                              "epochs": [[dev, epoch] for dev, epoch in sorted(keys)],
                              "keys": [k.hex() for k in sealed_keys], "blob": blob.hex()})
    cited = contribution_audit.cited_leaves(world.indexed(), OPERATORS, built.leaves)
    inputs = {"study": {"study_id": "hr-audit", "query": query, "from_ms": record["from_ms"],
                        "to_ms": record["to_ms"], "aggregators": record["aggregators"]},
              "contributions": contributions, "cited": {str(k): v.to_json() for k, v in cited.items()}}
    return inputs, honest, cheat


def test_an_audit_judges_the_honest_contribution_a_match_and_the_cheat_a_mismatch(tmp_path: Path) -> None:
    inputs, honest, cheat = audit_inputs(tmp_path)
    outputs = run_aggregators(tmp_path, inputs, audit=True)
    from tests.test_contributing import AGGREGATORS

    for out, key in zip(outputs, AGGREGATORS, strict=True):
        assert out["verdicts"] == [{"contribution": honest, "verdict": "match", "reason": ""},
                                   {"contribution": cheat, "verdict": "mismatch", "reason": "commitment_mismatch"}]
        assert out["skipped"] == [] and len(out["entries"]) == 2
        for raw, verdict in zip(out["entries"], out["verdicts"], strict=True):
            entry = Entry.decode(bytes.fromhex(raw))
            sign1 = envelope.parse(entry.cose)
            assert entry.type == STUDY_AUDIT and sign1.verify(key.public_key)
            assert {k: sign1.payload[k] for k in ("study_id", "contribution", "verdict", "reason")} == {
                "study_id": "hr-audit", **verdict}


# -- sans-IO ------------------------------------------------------------------------------------------


def test_field_is_mpycs_secint32_field() -> None:
    out = subprocess.run([sys.executable, "-c", "from mpyc.runtime import mpc; print(mpc.SecInt(32).field.modulus)"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert int(out.stdout.split()[-1]) == market.FIELD_MODULUS


def test_one_aggregators_share_is_uniform_whatever_the_secret() -> None:
    # Chi-square over 16 equal slices of the field for aggregator 0's share of 0 and of 1,000,000 (15 degrees
    # of freedom: 37.7 is the 0.999 quantile), and a two-sample check that the two are alike.
    n, buckets = 8000, 16
    counts = {}
    for secret in (0, 1_000_000):
        c = [0] * buckets
        for _ in range(n):
            c[market.split_contribution([secret], 3)[0][0] * buckets // market.FIELD_MODULUS] += 1
        counts[secret] = c
        expected = n / buckets
        assert sum((x - expected) ** 2 / expected for x in c) < 37.7
    a, b = counts[0], counts[1_000_000]
    assert sum((x - y) ** 2 / (x + y) for x, y in zip(a, b, strict=True)) < 37.7


def test_shares_reconstruct_and_any_t_of_them_is_checked_consistent() -> None:
    rows = market.split_contribution([7, -3, 0], 5)
    assert len(rows) == 5 and all(len(r) == 3 for r in rows)
    for k, secret in enumerate([7, -3, 0]):
        points = [rows[i][k] for i in range(5)]
        assert market.shares_consistent(points, 2)
        # Lagrange at 0 from points 1..3 (degree 2)
        p = market.FIELD_MODULUS
        value = sum(points[i] * (-(j1)) * (-(j2)) * pow((i + 1 - j1) * (i + 1 - j2), -1, p)
                    for i, (j1, j2) in enumerate([(2, 3), (1, 3), (1, 2)])) % p
        assert market.signed(value) == secret
        assert not market.shares_consistent(points[:4] + [(points[4] + 1) % p], 2)


def test_share_rows_round_trip_sealed_to_one_aggregator() -> None:
    alice, bob = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    row = market.split_contribution([1, 0, 0], 3)[2]
    sealed = market.seal_share(alice.public_key, market.encode_shares(row))
    assert market.decode_shares(market.open_share(alice, sealed), 3) == row
    with pytest.raises(market.MarketShareError):
        market.open_share(bob, sealed)
    with pytest.raises(market.MarketShareError):
        market.decode_shares(market.encode_shares(row), 2)
    with pytest.raises(market.MarketShareError):
        market.decode_shares(bytes.fromhex("811bffffffffffffffff"), 1)  # 2**64 - 1 ≥ the modulus
    with pytest.raises(market.MarketShareError):
        market.decode_shares(bytes.fromhex("81190001"), 1)  # 1 in a non-shortest form


def test_contribution_vectors_and_their_validity() -> None:
    hist = market.Query.model_validate({"type": "histogram", **HR, "bins": BINS})
    assert market.contribution(hist, 40) == [1, 0, 0, 0, 0]
    assert market.contribution(hist, 119) == [0, 0, 0, 1, 0]
    assert market.contribution(hist, 200) == [0, 0, 0, 0, 1]
    assert market.contribution(market.Query.model_validate({"type": "count", **HR})) == [1]
    rhr = market.Query.model_validate({"type": "resting_heart_rate", **HR})
    assert market.contribution(rhr, 58) == [0, 1, 0, 0, 1, 0, 0, 0]  # 58 − 40 = 18, least significant first
    assert market.value_of(rhr, market.contribution(rhr, 58)) == 58 and market.is_valid(rhr, [0] * 8)
    assert market.contribution(rhr, 200) == bits(160) and market.is_valid(rhr, bits(160))
    assert not market.is_valid(rhr, bits(161)) and not market.is_valid(rhr, [2] + [0] * 7)
    assert not market.is_valid(rhr, [1] * 9)
    assert market.value_bits(rhr) == rhr.width == 8
    exact = market.Query.model_validate({"type": "sum", "kind": "steps", "lo": 0, "hi": 0})
    assert exact.width == 1 and market.contribution(exact, 0) == [0]
    widest = market.Query.model_validate({"type": "sum", "kind": "x", "lo": -2**30, "hi": 2**30})
    assert widest.width == market.MAX_BINS and market.value_of(widest, market.contribution(widest, 2**30)) == 2**30
    with pytest.raises(ValueError):
        market.contribution(hist, 201)
    assert not market.is_valid(hist, [1, 1, 0, 0, 0]) and market.is_valid(hist, [0, 1, 0, 0, 0])


@pytest.mark.parametrize("bad", [{"lo": 5, "hi": 4}, {"lo": -2**31, "hi": 0}, {"bins": [40, 40, 50]},
                                 {"bins": [40]}, {"bins": list(range(40, 75))},
                                 {"type": "mean", "bins": [40, 50]}])
def test_query_bounds_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        market.Query.model_validate({"type": "histogram", **HR, "bins": BINS, **bad})


def test_commitment_binds_vector_and_salt() -> None:
    c = market.commitment([0, 1, 0], SALT)
    assert c == market.commitment([0, 1, 0], SALT) and len(c) == 64
    assert c != market.commitment([1, 0, 0], SALT) and c != market.commitment([0, 1, 0], bytes(16))
    with pytest.raises(ValueError):
        market.commitment([1], b"short")


def test_cohort_takes_the_longest_prefix_by_min_cohort() -> None:
    assert market.cohort([(5, 2), (6, 3), (7, 3), (8, 9)]) == [5, 6, 7]
    assert market.cohort([(1, 5), (2, 5)]) == []
    assert market.cohort([(9, 4), (3, 2), (4, 4), (7, 3)]) == [3, 4, 7, 9]
    assert market.cohort([]) == []


def test_geometric_noise_bits_follow_the_discrete_laplace_law() -> None:
    # Bits drawn as the MPC draws them, in the clear: P(G = 0) = 1 - α for ε = 1, Δ = 1.
    import math
    import random
    thresholds = market.geometric_bit_thresholds(1000, 1)
    rng = random.Random(7)
    draws = [sum((rng.getrandbits(30) < c) << j for j, c in enumerate(thresholds)) for _ in range(20000)]
    alpha = math.exp(-1)
    assert abs(draws.count(0) / len(draws) - (1 - alpha)) < 0.015
    assert abs(sum(draws) / len(draws) - alpha / (1 - alpha)) < 0.03

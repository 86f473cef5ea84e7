"""Contribution audits off the ledger (carechain.contribution_audit, record_access.contributing's disclosure):
a sampled owner's disclosure sealed to the study's aggregators, and each aggregator's verdict, on real sealed
readings, real re-encryption capsules and real sealed shares (the world of tests/test_contributing.py: her
strap and meter, and another patient's strap that claims to seal to her).

The MPC that opens the sampled vectors among three real aggregator processes is in tests/test_market_mpc.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import pytest

from carechain import contribution_audit as audit
from carechain import envelope, market
from carechain.contribution_audit import CitedLeaf, Disclosure, DisclosureError, cited_leaves, judge
from carechain.record_check import Epoch
from contract_rules import transactions as ce
from record_access.contributing import (
    ContributionError,
    aggregator_keys,
    build_contribution,
    build_disclosure,
    find_cited_data,
)
from tests.test_contributing import (
    AGGREGATORS,
    FOREIGN,
    FROM_MS,
    OPERATORS,
    OTHER,
    OWNER,
    OWNER_PRE,
    STRAP,
    World,
    sealed_world,
    study,
)

QUERY = {"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 220}
STUDY_ID = "hr-audit"


@dataclass
class Case:
    """One contribution as an auditor sees it: the record's fields, the disclosure, the cited leaves."""

    world: World
    record: dict[str, Any]
    leaf: int  # the contribution's leaf
    owner: str
    vector: list[int]
    salt: bytes
    commitment: str
    leaves: list[int]
    data_keys: dict[Epoch, bytes]
    records: dict[int, bytes]

    def cited(self) -> dict[int, CitedLeaf]:
        return cited_leaves(self.world.indexed(), OPERATORS, self.leaves)

    def judge(self, vector: list[int] | None = None, disclosure: Disclosure | None = None,
              epochs: list[Epoch] | None = None, **fields: Any) -> audit.Verdict:
        opened = disclosure or Disclosure(self.salt, dict(self.data_keys), dict(self.records))
        case = replace(self, **fields)
        return judge(self.vector if vector is None else vector, opened, owner=case.owner, contribution=case.leaf,
                     commitment=case.commitment, leaves=case.leaves, query=QUERY, from_ms=case.record["from_ms"],
                     to_ms=case.record["to_ms"], cited=case.cited(),
                     epochs=list(self.data_keys) if epochs is None else epochs)


@pytest.fixture(scope="module")
def honest() -> Case:
    world = sealed_world()
    record = study(QUERY)
    own = world.find("heart_rate")
    built = build_contribution(OWNER, STUDY_ID, record, consent=3, own=own, ts=FROM_MS,
                               aggregators=aggregator_keys(world.runtime.state, record))
    keys, cts = find_cited_data(world.indexed(), world.cts.get, OWNER.device_id, OWNER_PRE, OPERATORS, record,
                                built.leaves)
    return Case(world, record, len(world.leaves), OWNER.device_id, built.vector, built.salt, built.commitment,
                built.leaves, keys, cts)


def seal(case: Case, **overrides: Any) -> tuple[list[bytes], bytes]:
    args: dict[str, Any] = {"aggregator_pks": [a.public_key for a in AGGREGATORS], "study_id": STUDY_ID,
                            "contribution": case.leaf, "salt": case.salt, "data_keys": case.data_keys,
                            "records": case.records, "key": os.urandom(32), "nonce": os.urandom(12)}
    return audit.seal_disclosure(**{**args, **overrides})


# -- the disclosure -------------------------------------------------------------------------------------------


def test_each_aggregator_opens_the_same_disclosure(honest: Case) -> None:
    keys, blob = seal(honest)
    assert len(keys) == 3 and all(len(k) <= 256 for k in keys)
    for agg, sealed_key in zip(AGGREGATORS, keys, strict=True):
        opened = audit.open_disclosure(agg, sealed_key, blob, STUDY_ID, honest.leaf)
        assert opened == Disclosure(honest.salt, honest.data_keys, honest.records)
    assert len(honest.data_keys) == 1 and set(honest.records) == set(honest.leaves)  # one epoch of her strap


def test_a_disclosure_opens_only_with_its_aggregators_key_for_its_contribution(honest: Case) -> None:
    keys, blob = seal(honest)
    with pytest.raises(DisclosureError, match="does not open with aggregator .*sealed to another key"):
        audit.open_disclosure(AGGREGATORS[1], keys[0], blob, STUDY_ID, honest.leaf)
    with pytest.raises(DisclosureError, match="does not decrypt: altered, or made for another study"):
        audit.open_disclosure(AGGREGATORS[0], keys[0], blob, STUDY_ID, honest.leaf + 1)
    with pytest.raises(DisclosureError, match="does not decrypt"):
        audit.open_disclosure(AGGREGATORS[0], keys[0], blob, "another-study", honest.leaf)


@pytest.mark.parametrize("where", [0, 12, -1])  # the nonce, the ciphertext, the tag
def test_an_altered_blob_does_not_open(honest: Case, where: int) -> None:
    keys, blob = seal(honest)
    altered = bytearray(blob)
    altered[where] ^= 0x01
    with pytest.raises(DisclosureError, match="does not decrypt"):
        audit.open_disclosure(AGGREGATORS[2], keys[2], bytes(altered), STUDY_ID, honest.leaf)
    assert DisclosureError("x").reason == "bad_disclosure"


def test_disclosure_sizes_are_bounded(honest: Case) -> None:
    with pytest.raises(DisclosureError, match="more than the 524288"):
        seal(honest, records={i: os.urandom(200) for i in range(3000)})
    with pytest.raises(DisclosureError, match="key has 32 bytes and its nonce 12"):
        seal(honest, nonce=b"short")
    with pytest.raises(DisclosureError, match="1 to 4096 data keys"):
        seal(honest, data_keys={})
    keys, blob = seal(honest)
    with pytest.raises(DisclosureError, match="sealed disclosure key has"):
        audit.open_disclosure(AGGREGATORS[0], keys[0] + bytes(200), blob, STUDY_ID, honest.leaf)


# -- the verdict ----------------------------------------------------------------------------------------------


def test_an_honest_contribution_matches(honest: Case) -> None:
    assert honest.judge() == audit.Verdict("match", "")
    # what the MPC opens is field elements: an honest vector opened mod p still matches
    assert honest.judge(vector=[x % market.FIELD_MODULUS for x in honest.vector]).verdict == "match"


def test_shares_of_another_vector_than_committed_do_not_open_the_commitment(honest: Case) -> None:
    other = flipped(honest.vector)
    assert honest.judge(vector=other) == audit.Verdict("mismatch", "commitment_mismatch")


def flipped(vector: list[int]) -> list[int]:
    """Another valid vector: the lowest bit flipped."""
    return [1 - vector[0], *vector[1:]]


def test_a_committed_vector_that_is_not_her_measure_is_a_value_mismatch(honest: Case) -> None:
    # She committed to (and shared) another value than her readings give, consistently.
    lie = flipped(honest.vector)
    verdict = honest.judge(vector=lie, commitment=market.commitment(lie, honest.salt))
    assert verdict == audit.Verdict("mismatch", "value_mismatch")


def test_a_leaf_of_another_owners_device_is_not_hers(honest: Case) -> None:
    foreign = next(r["index"] for r in honest.world.plain
                   if r["dev"] == FOREIGN.device_id and FROM_MS <= r["ts"] < honest.record["to_ms"])
    assert honest.judge(leaves=sorted([*honest.leaves, foreign])) == audit.Verdict("mismatch", "leaf_not_hers")
    # the same leaf is the other patient's: she may cite it, we may not
    cited = cited_leaves(honest.world.indexed(), OPERATORS, [foreign])[foreign]
    assert cited.device_owner == OTHER.device_id
    # a leaf that is not an event at all (a registration) is not hers either
    assert honest.judge(leaves=[0, *honest.leaves]).reason == "leaf_not_hers"


def test_a_reading_outside_the_period_or_after_the_contribution_is_out_of_study(honest: Case) -> None:
    early = next(r["index"] for r in honest.world.plain if r["dev"] == STRAP.device_id and r["ts"] < FROM_MS)
    assert honest.judge(leaves=sorted([early, *honest.leaves])) == audit.Verdict("mismatch", "leaf_out_of_study")
    glucose = next(r["index"] for r in honest.world.plain if r["kind"] == "glucose" and r["ts"] >= FROM_MS)
    assert honest.judge(leaves=sorted([glucose, *honest.leaves])).reason == "leaf_out_of_study"
    assert honest.judge(leaf=honest.leaves[-1]).reason == "leaf_out_of_study"


def test_a_wrong_data_key_or_ciphertext_does_not_open_a_reading(honest: Case) -> None:
    wrong = {epoch: os.urandom(32) for epoch in honest.data_keys}
    assert honest.judge(disclosure=Disclosure(honest.salt, wrong, honest.records)) == audit.Verdict(
        "mismatch", "reading_does_not_open")
    swapped = {**honest.records, honest.leaves[0]: honest.records[honest.leaves[1]]}
    assert honest.judge(disclosure=Disclosure(honest.salt, honest.data_keys, swapped)).reason == \
        "reading_does_not_open"
    missing = {k: v for k, v in honest.records.items() if k != honest.leaves[0]}
    assert honest.judge(disclosure=Disclosure(honest.salt, honest.data_keys, missing)).reason == \
        "reading_does_not_open"
    # a key the study.disclose entry does not list is not used: the access record says what was read
    assert honest.judge(epochs=[]).reason == "reading_does_not_open"


def test_a_disclosure_that_does_not_open_is_the_owners_fault(honest: Case) -> None:
    verdict = judge(honest.vector, None, owner=OWNER.device_id, contribution=honest.leaf,
                    commitment=honest.commitment, leaves=honest.leaves, query=QUERY, from_ms=FROM_MS,
                    to_ms=honest.record["to_ms"], cited=honest.cited(), epochs=list(honest.data_keys))
    assert verdict == audit.Verdict("mismatch", "disclosure_does_not_open")


# -- the owner's disclose entry --------------------------------------------------------------------------------


def test_build_disclosure_lists_the_epochs_and_seals_the_opening_to_each_aggregator(honest: Case) -> None:
    sampled = {**honest.record, "audit": {"sample": [honest.leaf], "disclosed": {}}}
    opening = {"study_id": STUDY_ID, "vector": honest.vector, "salt": honest.salt.hex(),
               "commitment": honest.commitment, "leaves": honest.leaves, "contribution": honest.leaf}
    pks = aggregator_keys(honest.world.runtime.state, honest.record)
    entry = build_disclosure(OWNER, STUDY_ID, sampled, honest.leaf, opening, pks, honest.data_keys, honest.records,
                             ts=FROM_MS)
    msg = envelope.parse(entry.cose)
    assert entry.type == ce.STUDY_DISCLOSE and msg.verify(OWNER.public_key)
    d = ce.StudyDisclose.model_validate(msg.payload)
    assert [(e.dev, e.epoch) for e in d.epochs] == sorted(honest.data_keys) and len(d.keys) == 3
    opened = audit.open_disclosure(AGGREGATORS[1], d.keys[1], d.blob, STUDY_ID, honest.leaf)
    assert honest.judge(disclosure=opened).verdict == "match"
    with pytest.raises(ContributionError, match="not in study hr-audit's audit sample"):
        build_disclosure(OWNER, STUDY_ID, sampled, honest.leaf + 1, {**opening, "contribution": None}, pks,
                         honest.data_keys, honest.records, ts=FROM_MS)
    with pytest.raises(ContributionError, match="no audit sample yet"):
        build_disclosure(OWNER, STUDY_ID, honest.record, honest.leaf, opening, pks, honest.data_keys,
                         honest.records, ts=FROM_MS)
    with pytest.raises(ContributionError, match="do not open its commitment"):
        build_disclosure(OWNER, STUDY_ID, sampled, honest.leaf, {**opening, "salt": bytes(16).hex()}, pks,
                         honest.data_keys, honest.records, ts=FROM_MS)


def test_find_cited_data_refuses_a_leaf_that_is_not_her_reading(honest: Case) -> None:
    foreign = next(r["index"] for r in honest.world.plain if r["dev"] == FOREIGN.device_id)
    with pytest.raises(ContributionError, match=f"leaves \\[{foreign}\\] are not heart_rate readings"):
        find_cited_data(honest.world.indexed(), honest.world.cts.get, OWNER.device_id, OWNER_PRE, OPERATORS,
                        honest.record, [foreign])

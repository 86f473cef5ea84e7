"""The owner's agent in a study: her own sealed readings in, a signed `study.contribute` entry out.

Sans-IO. The caller hands in the ledger's leaves (index, bytes), a way to get a sealed reading's ciphertext
by leaf index (the bridge's `ciphertexts` table, or the storage miners for pruned ones), the owner's keys,
and the study. Nothing is trusted because of where it came from, as in `record_access.opening`:

- a device counts only from a registration signed by a genesis operator key that names *her* as its owner,
  and only for the leaves after that registration and before it is revoked or re-registered to someone else;
- an epoch's data key only from an `epoch_key` event signed by that device, naming her, opened with her own
  re-encryption key (`reencryption.owner_decrypt`: she reads her own data on her own machine, so no access
  record and no miners are involved — nothing leaves her agent but the sealed shares);
- a reading only through `carechain.record_check.open_record`: its ciphertext hashes to the signed envelope's
  `ct`, the device signature holds, the AEAD opens, the body validates.

Then the measure (`carechain.measures`), the contribution vector, a fresh salt and its commitment, the
vector's Shamir shares each sealed to one of the study's aggregators (`carechain.market`), and the entry,
citing the leaves of the readings used. The vector and salt are what a later audit asks her to open:
`save_opening` keeps them in a 0600 file. If the study's audit samples her contribution, `find_cited_data`
and `build_disclosure` make the `study.disclose` entry that opens it to the study's aggregators only
(`carechain.contribution_audit`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carechain import contribution_audit, market, measures, reencryption
from carechain.contribution_audit import contribution_vector
from carechain.entries import Entry
from carechain.files import write_atomic
from carechain.identity import Identity
from carechain.record_check import Epoch, OwnLeaves, Problem, open_records, own_leaves
from contract_rules import transactions as ce
from contract_rules.runtime import State
from record_access.ledger_view import party

__all__ = ["Contribution", "ContributionError", "OwnReadings", "aggregator_keys", "build_contribution",
           "build_disclosure", "contribution_vector", "find_cited_data", "find_own_readings", "save_opening"]


class ContributionError(ValueError):
    """This owner cannot contribute to this study (no usable readings, too many to cite, a bad study record)."""


@dataclass
class OwnReadings:
    """The owner's readings of one kind in one period, opened and checked; and those that would not open."""

    readings: list[dict[str, Any]] = field(default_factory=list)  # open_record dicts with their leaf "index"
    problems: list[Problem] = field(default_factory=list)

    @property
    def leaves(self) -> list[int]:
        return sorted(int(r["index"]) for r in self.readings)


def find_own_readings(leaves: Iterable[tuple[int, bytes]], ciphertext: Callable[[int], bytes | None],
                      owner_id: str, owner_pre: reencryption.PreKey, operator_keys: Mapping[str, bytes],
                      kind: str, from_ms: int, to_ms: int) -> OwnReadings:
    """Her anchored sealed readings of `kind` with from_ms ≤ ts < to_ms, decrypted and checked.

    `leaves` in ascending index order (a device's ownership is the registration in force at each leaf:
    `carechain.record_check.own_leaves`, the walk an auditor repeats); `ciphertext(index)` is None when the
    ciphertext is not available (reported as a problem, not used).
    """
    found = own_leaves(leaves, owner_id, operator_keys, kind, from_ms, to_ms)
    data_keys = _own_data_keys(owner_pre, found, set(found.epochs.values()))
    candidates: list[tuple[int, bytes, bytes]] = []
    missing: list[Problem] = []
    for index, cose in found.readings:
        ct = ciphertext(index)
        if ct is None:
            missing.append(Problem(index, "no_ciphertext: the ciphertext is not available"))
        else:
            candidates.append((index, cose, ct))
    readings, problems = open_records(candidates, found.device_keys, data_keys)
    return OwnReadings(readings, sorted(missing + problems, key=lambda p: p.index))


def _own_data_keys(owner_pre: reencryption.PreKey, found: OwnLeaves, epochs: set[Epoch]) -> dict[Epoch, bytes]:
    """The data keys of `epochs` she can open with her own re-encryption key (no miners, no access record)."""
    keys: dict[Epoch, bytes] = {}
    for epoch in epochs:
        sealed_key = found.capsules.get(epoch)
        if sealed_key is None:
            continue
        try:
            keys[epoch] = reencryption.owner_decrypt(owner_pre, *sealed_key)
        except reencryption.ReencryptionError:
            continue  # sealed to another key: its readings are reported as no_data_key
    return keys


@dataclass(frozen=True)
class Contribution:
    """One contribution: the entry to submit, and what must stay with the owner (vector, salt) for an audit."""

    study_id: str
    consent: int
    value: int
    vector: list[int]
    salt: bytes
    commitment: str
    leaves: list[int]
    entry: Entry


def aggregator_keys(state: State, study: Mapping[str, Any]) -> list[bytes]:
    """The Ed25519 keys of the study's aggregators, in the study's order (the order the shares go in)."""
    return [party(state, agg).pk for agg in study["aggregators"]]


def build_contribution(owner: Identity, study_id: str, study: Mapping[str, Any], consent: int,
                       aggregators: Sequence[bytes], own: OwnReadings, ts: int,
                       salt: bytes | None = None) -> Contribution:
    """The signed `study.contribute` entry for `study` (its record in table `studies`), from `own` readings.

    `aggregators` are the keys of `aggregator_keys`. Raises ContributionError when the readings give no
    measure, or cite more leaves than an entry may carry.
    """
    query = study["query"]
    if study.get("state", "open") != "open":
        raise ContributionError(f"study {study_id} is {study['state']}: it takes no more contributions")
    if len(aggregators) != len(study["aggregators"]):
        raise ContributionError(f"study {study_id} has {len(study['aggregators'])} aggregators, "
                                f"got {len(aggregators)} keys")
    try:
        value = measures.measure(query["type"], query["kind"], own.readings, int(study["to_ms"]))
    except measures.NoMeasure as exc:
        raise ContributionError(f"study {study_id}: nothing to contribute: {exc}") from None
    leaves = own.leaves
    if len(leaves) > ce.MAX_CONTRIBUTION_LEAVES:
        raise ContributionError(f"study {study_id}: the period holds {len(leaves)} readings, more than the "
                                f"{ce.MAX_CONTRIBUTION_LEAVES} a contribution may cite; it cannot be contributed")
    vector = contribution_vector(query, value)
    salt = os.urandom(market.SALT_BYTES) if salt is None else bytes(salt)
    digest = market.commitment(vector, salt)
    rows = market.split_contribution(vector, len(aggregators))
    shares = [market.seal_share(pk, market.encode_shares(row)) for pk, row in zip(aggregators, rows, strict=True)]
    entry = ce.study_contribute_entry(owner, ce.StudyContribute(
        study_id=study_id, consent=consent, commitment=digest, shares=shares, leaves=leaves, ts=ts))
    return Contribution(study_id, consent, value, vector, salt, digest, leaves, entry)


def save_opening(path: Path, contribution: Contribution, index: int | None = None) -> None:
    """Keep what opens the commitment (vector, salt) with what it is about, in a 0600 file (atomically);
    `index` is the contribution's leaf once it is anchored (what `build_disclosure` checks it against)."""
    doc = {"study_id": contribution.study_id, "consent": contribution.consent, "value": contribution.value,
           "vector": contribution.vector, "salt": contribution.salt.hex(), "commitment": contribution.commitment,
           "leaves": contribution.leaves, "contribution": index}
    write_atomic(Path(path), json.dumps(doc, indent=1).encode() + b"\n")


# -- disclosing a sampled contribution to the study's aggregators ----------------------------------------------


def find_cited_data(leaves: Iterable[tuple[int, bytes]], ciphertext: Callable[[int], bytes | None], owner_id: str,
                    owner_pre: reencryption.PreKey, operator_keys: Mapping[str, bytes], study: Mapping[str, Any],
                    cited: Sequence[int]) -> tuple[dict[Epoch, bytes], dict[int, bytes]]:
    """The data keys of the epochs her `cited` readings are in (opened with her own key, as `find_own_readings`
    does) and those readings' ciphertexts: what `build_disclosure` seals. ContributionError when a cited leaf
    is not a reading of hers in the study, its epoch's key does not open, or its ciphertext is unavailable."""
    found = own_leaves(leaves, owner_id, operator_keys, study["query"]["kind"], int(study["from_ms"]),
                       int(study["to_ms"]))
    not_hers = sorted(set(cited) - set(found.epochs))
    if not_hers:
        raise ContributionError(f"leaves {not_hers[:8]} are not {study['query']['kind']} readings of a device of "
                                f"hers in the study's period: this ledger cannot back the contribution")
    epochs = {found.epochs[leaf] for leaf in cited}
    keys = _own_data_keys(owner_pre, found, epochs)
    unopened = sorted(epochs - set(keys))
    if unopened:
        raise ContributionError(f"the data keys of epochs {unopened[:8]} do not open with this re-encryption key")
    cts: dict[int, bytes] = {}
    for leaf in cited:
        ct = ciphertext(leaf)
        if ct is None:
            raise ContributionError(f"the ciphertext of leaf {leaf} is not available")
        cts[leaf] = ct
    return keys, cts


def build_disclosure(owner: Identity, study_id: str, study: Mapping[str, Any], contribution_index: int,
                     opening: Mapping[str, Any], aggregators: Sequence[bytes], data_keys: Mapping[Epoch, bytes],
                     ciphertexts: Mapping[int, bytes], ts: int, *, key: bytes | None = None,
                     nonce: bytes | None = None) -> Entry:
    """The signed `study.disclose` entry opening contribution `contribution_index` to the study's aggregators.

    `opening` is what `save_opening` kept; `aggregators` the keys of `aggregator_keys`; `data_keys` and
    `ciphertexts` what `find_cited_data` found for the opening's leaves. The entry lists the disclosed
    (device, epoch) pairs in the clear: it is the logged access record of the audit. A fresh disclosure key
    and nonce are drawn here unless given. ContributionError when the study has not sampled this
    contribution, or the opening does not belong to it.
    """
    audit = study.get("audit")
    if audit is None:
        raise ContributionError(f"study {study_id} has no audit sample yet: nothing to disclose")
    if contribution_index not in audit["sample"]:
        raise ContributionError(f"contribution {contribution_index} is not in study {study_id}'s audit sample "
                                f"{audit['sample']}: it need not be disclosed")
    if str(contribution_index) in audit["disclosed"]:
        raise ContributionError(f"contribution {contribution_index} is already disclosed")
    if opening.get("study_id") != study_id or opening.get("contribution") not in (None, contribution_index):
        raise ContributionError(f"the opening is of study {opening.get('study_id')} contribution "
                                f"{opening.get('contribution')}, not of {study_id} contribution {contribution_index}")
    try:
        salt = bytes.fromhex(opening["salt"])
        committed = market.commitment(opening["vector"], salt) == opening["commitment"]
        leaves = [int(leaf) for leaf in opening["leaves"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ContributionError(f"the opening is not one `save_opening` wrote: {exc}") from None
    if not committed:
        raise ContributionError("the opening's vector and salt do not open its commitment")
    missing = sorted(set(leaves) - set(ciphertexts))
    if missing:
        raise ContributionError(f"no ciphertext for the cited leaves {missing[:8]}")
    try:
        sealed_keys, blob = contribution_audit.seal_disclosure(
            aggregators, study_id, contribution_index, salt, data_keys, {leaf: ciphertexts[leaf] for leaf in leaves},
            os.urandom(contribution_audit.DISCLOSURE_KEY_BYTES) if key is None else key,
            os.urandom(contribution_audit.DISCLOSURE_NONCE_BYTES) if nonce is None else nonce)
    except contribution_audit.DisclosureError as exc:
        raise ContributionError(str(exc)) from None
    return ce.study_disclose_entry(owner, ce.StudyDisclose(
        study_id=study_id, contribution=contribution_index,
        epochs=[ce.DisclosedEpoch(dev=dev, epoch=epoch) for dev, epoch in sorted(data_keys)],
        keys=sealed_keys, blob=blob, ts=ts))

"""The owner's agent in a study: her own sealed readings in, a signed `study.contribute` entry out.

Sans-IO. The caller hands in the ledger's leaves (index, bytes), a way to get a sealed reading's ciphertext
by leaf index (the bridge's `ciphertexts` table, or the storage miners for pruned ones), the owner's keys,
and the study. Nothing is trusted because of where it came from, as in `record_access.opening`:

- a device counts only from a registration signed by a genesis operator key that names *her* as its owner,
  and only for the leaves after that registration and before it is revoked or re-registered to someone else;
- an epoch's data key only from an `epoch_key` event signed by that device, naming her, opened with her own
  re-encryption key (`reencryption.owner_decrypt`: she reads her own data on her own machine, so no access
  record and no miners are involved — nothing leaves her agent but the sealed shares);
- a reading only through `opening.open_record`: its ciphertext hashes to the signed envelope's `ct`, the
  device signature holds, the AEAD opens, the body validates.

Then the measure (`carechain.measures`), the contribution vector, a fresh salt and its commitment, the
vector's Shamir shares each sealed to one of the study's aggregators (`carechain.market`), and the entry,
citing the leaves of the readings used. The vector and salt are what a later audit asks her to open:
`save_opening` keeps them in a 0600 file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carechain import envelope, events, market, measures, reencryption
from carechain.entries import ENTRY_EVENT, ENTRY_REGISTER, ENTRY_REVOKE, Entry, EntryError, open_operator_entry
from carechain.files import write_atomic
from carechain.identity import Identity, device_id_for
from contract_rules import transactions as ce
from contract_rules.runtime import State
from record_access.ledger_view import party
from record_access.opening import Epoch, Problem, open_records

__all__ = ["Contribution", "ContributionError", "OwnReadings", "aggregator_keys",
           "build_contribution", "contribution_vector", "find_own_readings", "save_opening"]


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

    `leaves` in ascending index order (a device's ownership is the registration in force at each leaf);
    `ciphertext(index)` is None when the ciphertext is not available (reported as a problem, not used).
    """
    operators = dict(operator_keys)
    mine: dict[str, bytes] = {}  # dev → pk of the devices registered to her, as of the current leaf
    device_keys: dict[str, bytes] = {}  # every key a device of hers ever had (a reading is checked at its leaf)
    capsules: dict[Epoch, tuple[bytes, bytes]] = {}
    candidates: list[tuple[int, bytes, bytes]] = []
    missing: list[Problem] = []
    for index, leaf in leaves:
        try:
            entry = Entry.decode(leaf)
        except EntryError:
            continue  # not hers to judge: the ledger's own verifier reports malformed leaves
        if entry.type in (ENTRY_REGISTER, ENTRY_REVOKE):
            _on_operator_entry(entry, operators, owner_id, mine, device_keys)
        elif entry.type == ENTRY_EVENT:
            try:
                msg = envelope.parse(entry.cose)
            except envelope.EnvelopeError:
                continue
            pk = mine.get(msg.kid)
            if pk is None:
                continue  # not a device of hers at this leaf: never used
            ev_kind, ts, body = msg.payload.get("kind"), msg.payload.get("ts"), msg.payload.get("body")
            if ev_kind == "epoch_key":
                _on_epoch_key(msg, pk, owner_id, capsules)
            elif ev_kind == kind and isinstance(ts, int) and from_ms <= ts < to_ms and isinstance(body, dict):
                ct = ciphertext(index)
                if ct is None:
                    missing.append(Problem(index, "no_ciphertext: the ciphertext is not available"))
                else:
                    candidates.append((index, entry.cose, ct))
    data_keys: dict[Epoch, bytes] = {}
    for epoch, (capsule, key_ct) in capsules.items():
        try:
            data_keys[epoch] = reencryption.owner_decrypt(owner_pre, capsule, key_ct)
        except reencryption.ReencryptionError:
            continue  # sealed to another key: its readings are reported as no_data_key
    readings, problems = open_records(candidates, device_keys, data_keys)
    return OwnReadings(readings, sorted(missing + problems, key=lambda p: p.index))


def _on_operator_entry(entry: Entry, operators: dict[str, bytes], owner_id: str, mine: dict[str, bytes],
                       device_keys: dict[str, bytes]) -> None:
    try:
        op = open_operator_entry(entry, operators)
    except (EntryError, envelope.EnvelopeError):
        return  # not operator-signed: it registers nothing
    if entry.type == ENTRY_REVOKE:
        mine.pop(op.dev, None)
    elif op.owner == owner_id and device_id_for(op.pk) == op.dev:
        mine[op.dev] = op.pk
        device_keys[op.dev] = op.pk
    else:
        mine.pop(op.dev, None)  # re-registered to someone else: its later readings are not hers


def _on_epoch_key(msg: envelope.Sign1, pk: bytes, owner_id: str, capsules: dict[Epoch, tuple[bytes, bytes]]) -> None:
    if not msg.verify(pk):
        return
    try:
        payload = events.validate_payload(msg.payload)
    except events.PayloadError:
        return
    body = msg.payload["body"]
    if payload.dev == msg.kid and body["owner"] == owner_id:
        capsules.setdefault((msg.kid, int(body["epoch"])), (bytes(body["capsule"]), bytes(body["key_ct"])))


def contribution_vector(query: Mapping[str, Any], value: int) -> list[int]:
    """The ints one contributor inputs (`carechain.market.contribution`), from her value clipped to the query's
    bounds (and a histogram's outer edges, so its edge bins are open-ended): an honest input is always valid,
    and no one contributor's reading moves the answer by more than the bounds allow."""
    q = market.Query.model_validate(dict(query))
    lo, hi = (q.lo, q.hi) if q.bins is None else (max(q.lo, q.bins[0]), min(q.hi, q.bins[-1]))
    return market.contribution(q, min(max(value, lo), hi))


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
    shares = [market.seal_share(pk, market.encode_shares(row)) for pk, row in zip(aggregators, rows)]
    entry = ce.study_contribute_entry(owner, ce.StudyContribute(
        study_id=study_id, consent=consent, commitment=digest, shares=shares, leaves=leaves, ts=ts))
    return Contribution(study_id, consent, value, vector, salt, digest, leaves, entry)


def save_opening(path: Path, contribution: Contribution) -> None:
    """Keep what opens the commitment (vector, salt) with what it is about, in a 0600 file (atomically)."""
    doc = {"study_id": contribution.study_id, "consent": contribution.consent, "value": contribution.value,
           "vector": contribution.vector, "salt": contribution.salt.hex(), "commitment": contribution.commitment,
           "leaves": contribution.leaves}
    write_atomic(Path(path), json.dumps(doc, indent=1).encode() + b"\n")

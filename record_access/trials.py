"""The people's side of a trial (docs/trials.md): what the sponsor, an investigator, a pharmacy, a participant
and any certifier compute before they sign a trial entry.

Sans-IO except where a secret must be drawn or kept: `draw_seed` (os.urandom), `save_seed`/`load_seed` (a 0600
file, fsynced — the sponsor's seed is written BEFORE its commitment is built, so a crash can never leave a
commitment on the log whose seed is lost) and the escrow coefficients `build_commit` draws unless given. Every
other function takes the ledger's records or leaves and returns a signed `Entry` or a value, and raises
`TrialClientError` with what to do when it cannot.

- sponsor: `load_protocol` (a TOML or JSON protocol file: design, outcome, analysis, investigators, labellers...),
  `build_register` (protocol document → `protocol_hash`), `build_commit` (escrow shares of its seed sealed to
  the other committers), `build_lock`, `build_reveal`; as a committer also `answer_unblinding` and, for a
  committer that did not reveal, `build_recover` (its escrow share sealed to the sponsor, from `commit_payload`);
- participant: `sign_consent_file` (her consent signature, in a file an investigator passes on), `find_reading`
  (her sealed `trial_measure` reading anchored before the lock, opened with her own re-encryption key, as
  `record_access.contributing` opens her readings), `build_outcome`;
- investigator: `build_enroll` (with her consent file), `build_withdraw`, `build_unblind`, `open_unblinding`
  (the committers' sealed keys of her candidate blocks → her real block → her arm);
- pharmacy: `build_dispense` (its terminal signs the kit's purchase event, the pharmacy wraps it);
- anyone: `build_certificate` (`trials.recompute` on a replay).
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from carechain import envelope, reencryption
from carechain import trial_allocation as alloc
from carechain.entries import Entry
from carechain.events import Purchase, make_payload
from carechain.files import write_atomic
from carechain.identity import Identity
from carechain.record_check import RecordRejected, open_record, own_leaves
from contract_rules import trial_entries as te
from contract_rules import trials as rules
from contract_rules.runtime import State

__all__ = ["ConsentFile", "Reading", "TrialClientError", "answer_unblinding", "build_certificate", "build_commit",
           "build_dispense", "build_enroll", "build_lock", "build_outcome", "build_recover", "build_register",
           "build_reveal", "build_unblind", "build_withdraw", "commit_payload", "committer_keys", "draw_seed",
           "find_reading", "load_protocol", "load_seed", "open_unblinding", "protocol_hash", "read_consent_file",
           "save_seed", "sign_consent_file", "trial_of", "unblind_answers"]


class TrialClientError(ValueError):
    """A trial entry cannot be built from what was given; the message says what failed and what to do."""


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())


def trial_of(state: State, trial_id: str) -> dict[str, Any]:
    """The trial's record; TrialClientError when it is not registered on this ledger."""
    trial = rules.trial_record(state, trial_id)
    if trial is None:
        raise TrialClientError(f"no trial {trial_id!r} on this ledger (see `carechain trial register`)")
    return trial


# -- the sponsor --------------------------------------------------------------------------------------

def protocol_hash(document: bytes) -> str:
    """The hex SHA-256 of the full protocol document: what the registration fixes and a reviewer re-hashes."""
    return hashlib.sha256(document).hexdigest()


def load_protocol(path: Path) -> dict[str, Any]:
    """A protocol file (TOML by its .toml suffix, else JSON): `design`, `outcome`, optional `analysis`,
    `investigators`, `labellers`, `max_participants`, `reveal_window_ms`. Checked by `build_register`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TrialClientError(f"{path}: cannot read the protocol file: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrialClientError(f"{path}: not a valid {'TOML' if path.suffix == '.toml' else 'JSON'} protocol "
                               f"file: {exc}") from None
    if not isinstance(doc, dict):
        raise TrialClientError(f"{path}: a protocol file is a table/object with design, outcome, investigators")
    return doc


def build_register(sponsor: Identity, trial_id: str, document: bytes, protocol: Mapping[str, Any],
                   seed_checkpoint: str, enrol_closes_ms: int, ts: int) -> Entry:
    """The sponsor's `trial.register`: `document` is the protocol document itself (only its hash goes on the
    log), `protocol` the machine-readable part (`load_protocol`), `seed_checkpoint` a final checkpoint note."""
    missing = [k for k in ("design", "outcome", "investigators") if k not in protocol]
    if missing:
        raise TrialClientError(f"the protocol lacks {', '.join(missing)} (see docs/trials.md, the CLI section)")
    try:
        payload = te.TrialRegister(
            trial_id=trial_id, protocol_hash=protocol_hash(document), design=protocol["design"],
            outcome=protocol["outcome"], analysis=protocol.get("analysis", {}),
            investigators=protocol["investigators"], labellers=protocol.get("labellers", 3),
            seed_checkpoint=seed_checkpoint, enrol_closes_ms=enrol_closes_ms,
            max_participants=protocol.get("max_participants", 100),
            reveal_window_ms=protocol.get("reveal_window_ms", 86_400_000), ts=ts)
    except ValidationError as exc:
        raise TrialClientError(f"not a valid trial registration: {_problems(exc)}") from None
    return te.trial_entry(sponsor, payload)


def draw_seed() -> bytes:
    """A fresh committer seed (32 bytes from the OS)."""
    return os.urandom(alloc.SEED_BYTES)


def save_seed(path: Path, trial_id: str, party: str, seed: bytes) -> None:
    """Keep a committer's seed (0600, fsynced, atomically) before its commitment is built or published: the
    reveal after the lock needs it. Refuses to overwrite another seed of the same trial."""
    if path.exists():
        kept = load_seed(path, trial_id)
        if kept != seed:
            raise TrialClientError(f"{path} already holds a different seed for trial {trial_id}: a committer "
                                   "commits once; reveal that seed, never draw a second")
        return
    doc = {"trial_id": trial_id, "party": party, "seed": seed.hex()}
    write_atomic(path, json.dumps(doc).encode() + b"\n")


def load_seed(path: Path, trial_id: str) -> bytes:
    """The seed `save_seed` kept for `trial_id` (JSON {trial_id, party, seed}, or 32 raw bytes as a labelling
    miner keeps it)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TrialClientError(f"{path}: cannot read the seed file: {exc.strerror}") from None
    if len(raw) == alloc.SEED_BYTES:
        return raw
    try:
        doc = json.loads(raw)
        seed = bytes.fromhex(doc["seed"])
        kept_trial = doc["trial_id"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise TrialClientError(f"{path}: not a seed file `carechain trial commit` wrote") from None
    if kept_trial != trial_id or len(seed) != alloc.SEED_BYTES:
        raise TrialClientError(f"{path} holds the seed of trial {kept_trial!r}, not of {trial_id!r}")
    return seed


def committer_keys(state: State, trial: Mapping[str, Any]) -> dict[str, bytes]:
    """Each committer's registered Ed25519 key (party → pk): what escrow shares are sealed to."""
    parties = state.table("parties")
    keys = {}
    for c in rules.committers(dict(trial)):
        party = parties.get(c)
        if party is None:
            raise TrialClientError(f"committer {c} of trial {trial['trial_id']} is not a registered party")
        keys[c] = bytes(party["pk"])
    return keys


def build_commit(committer: Identity, trial: Mapping[str, Any], seed: bytes, keys: Mapping[str, bytes], ts: int,
                 coefficients: list[int] | None = None) -> Entry:
    """A committer's `trial.commit`: its seed commitment and Shamir shares of the seed sealed to every other
    committer (`keys`: `committer_keys`). Keep the seed (`save_seed`) before calling this."""
    record = dict(trial)
    if committer.device_id not in rules.committers(record):
        raise TrialClientError(f"{committer.device_id} is not a committer of trial {trial['trial_id']} (the sponsor "
                               f"and the labellers {trial['labellers']})")
    holders = rules.escrow_holders(record, committer.device_id)
    t = rules.threshold(record)
    if coefficients is None:
        coefficients = [int.from_bytes(os.urandom(66), "big") % alloc.FIELD_PRIME for _ in range(t - 1)]
    shares = alloc.escrow_shares(seed, holders, t, coefficients)
    escrow = {h: te.seal_share(keys[h], y) for h, y in shares.items()}
    payload = te.TrialCommit(trial_id=trial["trial_id"], commitment=alloc.seed_commitment(
        trial["trial_id"], committer.device_id, seed), escrow=escrow, ts=ts)
    return te.trial_entry(committer, payload)


def build_lock(sponsor: Identity, trial_id: str, ts: int) -> Entry:
    return te.trial_entry(sponsor, te.TrialLock(trial_id=trial_id, ts=ts))


def build_reveal(committer: Identity, trial_id: str, seed: bytes, ts: int) -> Entry:
    return te.trial_entry(committer, te.TrialReveal(trial_id=trial_id, seed=seed, ts=ts))


def answer_unblinding(committer: Identity, trial: Mapping[str, Any], unblinding: int, seed: bytes,
                      investigator_pk: bytes, ts: int) -> Entry:
    """A committer's `trial.unblind_key` for the logged unblinding at leaf `unblinding`: its key of her stratum's
    block sizes and its keys of every block that may hold her slot (the record's `blocks`), sealed to the
    investigator who asked; nothing else of its seed."""
    u = trial["unblindings"].get(str(unblinding))
    if u is None:
        raise TrialClientError(f"no emergency unblinding at leaf {unblinding} in trial {trial['trial_id']}")
    keys = te.release_unblind_keys(seed, trial["trial_id"], alloc.Design.model_validate(trial["design"]),
                                   u["stratum"], int(u["position"]))
    payload = te.TrialUnblindKey(trial_id=trial["trial_id"], unblinding=unblinding,
                                 sealed=te.seal_unblind_keys(investigator_pk, keys), ts=ts)
    return te.trial_entry(committer, payload)


def commit_payload(leaves: Iterable[tuple[int, bytes]], trial: Mapping[str, Any], party: str) -> te.TrialCommit:
    """`party`'s accepted `trial.commit` of the trial: the entry at the leaf its commitment record names."""
    record = trial["commitments"].get(party)
    if record is None:
        raise TrialClientError(f"{party} never committed to trial {trial['trial_id']}: it has no escrow to open")
    for index, leaf in leaves:
        if index != record["at"]:
            continue
        entry = Entry.decode(leaf)
        msg = envelope.parse(entry.cose)
        if entry.type != "trial.commit" or msg.kid != party:
            break
        return te.TrialCommit.model_validate(msg.payload)
    raise TrialClientError(f"leaf {record['at']} of this ledger is not {party}'s trial.commit of trial "
                           f"{trial['trial_id']}: is the ledger complete?")


def build_recover(holder: Identity, trial: Mapping[str, Any], party: str, commit: te.TrialCommit, ts: int) -> Entry:
    """A committer's `trial.recover` of `party`'s seed (a committer that did not reveal within the window): the
    escrow share sealed to `holder` in `party`'s accepted commit (`commit_payload`), opened with its key. Once a
    majority of the committers gave theirs, the rules recover the seed and check it against the commitment."""
    record = dict(trial)
    trial_id = trial["trial_id"]
    if party not in rules.committers(record):
        raise TrialClientError(f"{party} is not a committer of trial {trial_id} (the sponsor and the labellers "
                               f"{trial['labellers']})")
    if party in trial["seeds"]:
        raise TrialClientError(f"the seed of {party} is already {trial['seeds'][party]['how']} in trial {trial_id}: "
                               "nothing to recover")
    holders = rules.escrow_holders(record, party)
    if holder.device_id not in holders:
        raise TrialClientError(f"{holder.device_id} holds no escrow share of {party}'s seed (holders: "
                               f"{', '.join(holders)})")
    sealed = commit.escrow.get(holder.device_id)
    if commit.trial_id != trial_id or sealed is None:
        raise TrialClientError(f"the commit given is not {party}'s commitment to trial {trial_id} with a share "
                               f"for {holder.device_id}")
    try:
        y = te.open_share(holder, sealed)
    except ValueError as exc:
        raise TrialClientError(str(exc)) from None
    payload = te.TrialRecover(trial_id=trial_id, party=party, x=holders.index(holder.device_id) + 1,
                              y=te.share_bytes(y), ts=ts)
    return te.trial_entry(holder, payload)


# -- the participant and the investigator -------------------------------------------------------------

@dataclass(frozen=True)
class ConsentFile:
    """What a participant hands the investigator: her consent signature over the trial's protocol hash."""

    trial_id: str
    protocol_hash: str
    participant: str
    signature: bytes

    def to_json(self) -> dict[str, str]:
        return {"trial_id": self.trial_id, "protocol_hash": self.protocol_hash, "participant": self.participant,
                "signature": self.signature.hex()}


def sign_consent_file(participant: Identity, trial: Mapping[str, Any]) -> ConsentFile:
    """Her consent to the registered protocol (and to disclosing her primary-outcome measure after the lock),
    signed with her own party key."""
    sig = te.sign_consent(participant, trial["trial_id"], trial["protocol_hash"])
    return ConsentFile(trial["trial_id"], trial["protocol_hash"], participant.device_id, sig)


def read_consent_file(doc: Mapping[str, Any], trial: Mapping[str, Any], participant_pk: bytes) -> ConsentFile:
    """A consent file's content checked against the registered trial and her registered key."""
    try:
        consent = ConsentFile(str(doc["trial_id"]), str(doc["protocol_hash"]), str(doc["participant"]),
                              bytes.fromhex(str(doc["signature"])))
    except (KeyError, ValueError):
        raise TrialClientError("not a consent file `carechain trial consent` wrote (trial_id, protocol_hash, "
                               "participant, signature)") from None
    if consent.trial_id != trial["trial_id"] or consent.protocol_hash != trial["protocol_hash"]:
        raise TrialClientError(f"the consent is to trial {consent.trial_id} protocol {consent.protocol_hash[:12]}…, "
                               f"not to trial {trial['trial_id']} protocol {trial['protocol_hash'][:12]}…")
    if not te.consent_holds(participant_pk, consent.trial_id, consent.protocol_hash, consent.participant,
                            consent.signature):
        raise TrialClientError(f"the consent signature is not {consent.participant}'s over this protocol: ask her "
                               "to sign again with `carechain trial consent`")
    return consent


def build_enroll(investigator: Identity, trial_id: str, consent: ConsentFile, attributes: Mapping[str, str],
                 ts: int) -> Entry:
    try:
        payload = te.TrialEnroll(trial_id=trial_id, participant=consent.participant, attributes=dict(attributes),
                                 consent=consent.signature, ts=ts)
    except ValidationError as exc:
        raise TrialClientError(f"not a valid enrolment: {_problems(exc)}") from None
    return te.trial_entry(investigator, payload)


def build_withdraw(signer: Identity, trial_id: str, participant: str, reason: str, ts: int) -> Entry:
    try:
        payload = te.TrialWithdraw(trial_id=trial_id, participant=participant, reason=reason, ts=ts)
    except ValidationError as exc:
        raise TrialClientError(f"not a valid withdrawal: {_problems(exc)}") from None
    return te.trial_entry(signer, payload)


def build_unblind(investigator: Identity, trial_id: str, participant: str, reason: str, ts: int) -> Entry:
    try:
        payload = te.TrialUnblind(trial_id=trial_id, participant=participant, reason=reason, ts=ts)
    except ValidationError as exc:
        raise TrialClientError(f"not a valid unblinding: {_problems(exc)}") from None
    return te.trial_entry(investigator, payload)


def unblind_answers(leaves: Iterable[tuple[int, bytes]], trial_id: str, unblinding: int) -> dict[str, bytes]:
    """Committer → its sealed `trial.unblind_key` answer to the unblinding at leaf `unblinding` (first each)."""
    answers: dict[str, bytes] = {}
    for _, leaf in leaves:
        entry = Entry.decode(leaf)
        if entry.type != "trial.unblind_key":
            continue
        msg = envelope.parse(entry.cose)
        if msg.payload.get("trial_id") == trial_id and msg.payload.get("unblinding") == unblinding:
            answers.setdefault(msg.kid, bytes(msg.payload["sealed"]))
    return answers


def open_unblinding(investigator: Identity, trial: Mapping[str, Any], unblinding: int,
                    answers: Mapping[str, bytes]) -> dict[str, Any]:
    """Her arm from every committer's answer (`unblind_answers`), opened with the investigator's key: the
    arm, and the block it opened (whose other slots it narrows). TrialClientError while answers are missing."""
    u = trial["unblindings"].get(str(unblinding))
    if u is None:
        raise TrialClientError(f"no emergency unblinding at leaf {unblinding} in trial {trial['trial_id']}")
    missing = sorted(set(rules.committers(dict(trial))) - set(answers))
    if missing:
        raise TrialClientError(f"committers {missing} have not answered unblinding {unblinding} yet: wait for them")
    try:
        opened = {p: te.open_unblind_keys(investigator, s) for p, s in answers.items()}
    except ValueError as exc:
        raise TrialClientError(str(exc)) from None
    design = alloc.Design.model_validate(trial["design"])
    stratum, position = u["stratum"], int(u["position"])
    candidates = te.candidate_blocks(design, position)
    wrong = sorted(p for p, k in opened.items() if k.stratum != stratum or k.blocks() != candidates)
    if wrong:
        raise TrialClientError(f"committers {wrong} released keys of other blocks than the candidates "
                               f"{candidates.start}–{candidates[-1]} of stratum {stratum!r}")
    trial_id, checkpoint_seed = trial["trial_id"], bytes.fromhex(trial["checkpoint_seed"])
    sizes = {p: k.sizes_key for p, k in opened.items()}

    def key_of(block: int) -> alloc.AllocationKey:
        return alloc.released_key(trial_id, checkpoint_seed, stratum, block, sizes,
                                  {p: k.block_key(block) for p, k in opened.items()})

    try:
        # Every committer's sizes key together gives the block boundaries, hence her real block ...
        found = alloc.block_of(key_of(candidates.start), design, stratum, position)
        # ... and that block's keys her arm.
        arm = alloc.arm_of(key_of(found.number), design, stratum, position)
    except ValueError as exc:
        raise TrialClientError(f"the released keys do not open her slot: {exc}") from None
    return {"participant": u["participant"], "arm": arm, "stratum": stratum, "block": found.number,
            "first": found.first, "size": found.size, "candidate_blocks": [candidates.start, candidates[-1]]}


# -- the pharmacy -------------------------------------------------------------------------------------

def build_dispense(pharmacy: Identity, terminal: Identity, trial_id: str, participant: Mapping[str, Any],
                   seq: int, ts: int) -> Entry:
    """The pharmacy's `trial.dispense` of a participant's kit (`participant`: her record, which names the kit
    label of her slot): its terminal signs the sale of item trialkit:<label> to her, the pharmacy wraps it."""
    body = Purchase(item_code=participant["label"], code_system=te.KIT_SYSTEM, rx_only=False, quantity=1,
                    price_minor=0, currency="USD", patient_token=participant["participant"], payment_method="cash")
    sale = envelope.sign(terminal, make_payload(terminal.device_id, seq, ts, "purchase", body))
    payload = te.TrialDispense(trial_id=trial_id, participant=participant["participant"], event=sale, ts=ts)
    return te.trial_entry(pharmacy, payload)


# -- the participant's outcome ------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """Her sealed `trial_measure` reading: its leaf, the signed event, its ciphertext, the epoch data key, and
    what it says (baseline, followup)."""

    leaf: int
    event: bytes
    ct: bytes
    key: bytes
    baseline: int
    followup: int


def find_reading(leaves: Iterable[tuple[int, bytes]], ciphertext: Any, owner_id: str,  # noqa: ANN401
                 owner_pre: reencryption.PreKey, operator_keys: Mapping[str, bytes], trial: Mapping[str, Any]
                 ) -> Reading:
    """Her latest `trial_measure` reading of this trial's measure anchored before the lock, opened on her own
    machine with her own re-encryption key. `ciphertext(leaf)` gives a sealed reading's ciphertext (or None).
    TrialClientError when the trial is not locked or no such reading of hers opens."""
    lock = trial.get("lock")
    if lock is None:
        raise TrialClientError(f"trial {trial['trial_id']} is not locked: outcomes are disclosed after the lock")
    found = own_leaves(((i, leaf) for i, leaf in leaves if i < lock["at"]), owner_id, operator_keys,
                       "trial_measure", 0, 2**63 - 1)
    problems: list[str] = []
    for index, cose in reversed(found.readings):
        epoch = found.epochs[index]
        capsule = found.capsules.get(epoch)
        ct = ciphertext(index)
        if capsule is None or ct is None:
            problems.append(f"leaf {index}: {'no epoch key' if capsule is None else 'no ciphertext'}")
            continue
        try:
            key = reencryption.owner_decrypt(owner_pre, *capsule)
            body = open_record(cose, ct, found.device_keys, {epoch: key})
        except (reencryption.ReencryptionError, RecordRejected) as exc:
            problems.append(f"leaf {index}: {exc}")
            continue
        if body.get("trial_id") == trial["trial_id"] and body.get("measure") == trial["outcome"]["measure"]:
            return Reading(index, cose, ct, key, int(body["baseline"]), int(body["followup"]))
    raise TrialClientError(f"no trial_measure reading of {owner_id} for trial {trial['trial_id']} anchored before "
                           f"the lock (leaf {lock['at']}) opens with this re-encryption key"
                           + (f": {'; '.join(problems[:3])}" if problems else ""))


def build_outcome(participant: Identity, trial_id: str, reading: Reading, ts: int) -> Entry:
    payload = te.TrialOutcome(trial_id=trial_id, leaf=reading.leaf, event=reading.event, ct=reading.ct,
                              key=reading.key, ts=ts)
    return te.trial_entry(participant, payload)


# -- the certificate ----------------------------------------------------------------------------------

def build_certificate(certifier: Identity, state: State, trial_id: str, ts: int) -> tuple[Entry, dict[str, Any]]:
    """The `trial.certify` entry with the result and allocation the rules recompute on this replayed `state`
    (anyone can sign it), and that result. TrialClientError when the trial cannot be certified yet."""
    trial = trial_of(state, trial_id)
    if trial["state"] == "void":
        raise TrialClientError(f"trial {trial_id} is void: {trial.get('void')}")
    if trial["lock"] is None:
        raise TrialClientError(f"trial {trial_id} is not locked yet")
    missing = sorted(set(rules.committers(trial)) - set(trial["seeds"]))
    if missing:
        raise TrialClientError(f"trial {trial_id} waits for the seeds of {missing} (revealed, or recovered from "
                               "escrow after the reveal window)")
    computed = rules.recompute(state, trial)
    if isinstance(computed, str):
        raise TrialClientError(f"trial {trial_id} cannot be analysed: {computed}")
    result, summary, _ = computed
    payload = te.TrialCertify(trial_id=trial_id, result=te.TrialResult(**result), allocation=summary, ts=ts)
    return te.trial_entry(certifier, payload), result

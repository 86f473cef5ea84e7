"""Trial rules (v1): registration, randomisation by commitment, concealed enrolment, lock, reveal and the
certificate of the pre-registered result (docs/trials.md; CONSORT items 8–10, SPIRIT item 16).

A sponsor's `trial.register` fixes the protocol hash, the design, the primary outcome and the analysis, the
investigators and the labellers: `labellers` miners drawn with `carechain.access.choose_miners` from the seed of
a final checkpoint (`miners.final_note`), keyed by `trial_hash`; that seed is also the allocation's checkpoint
seed. The committers (the sponsor, then the labellers in draw order) each `trial.commit` a seed commitment with
Shamir escrow shares of the seed sealed to every other committer; enrolment waits for all of them and no
commitment is taken once enrolment started. Nobody can compute an arm until the seeds are revealed: the sponsor
commits before seeing the allocation and cannot change its seed afterwards (`check_reveal`).

`trial.enroll` gives a consenting participant the next slot of her stratum and its public kit label;
`trial.dispense` is a bonded pharmacy's terminal-signed sale of that kit; `trial.withdraw` takes her out of the
analysis (complete case) before the lock. An emergency `trial.unblind` by an investigator is public, and each
committer answers with its keys of her candidate blocks only (`trial.unblind_key`: one block when the design has
one block size, else every block from position // max to position // min of the sizes; the record names them).
After the sponsor's `trial.lock` (on attested time after enrolment closed) every committer reveals within
`reveal_window_ms`; a committer that does not is recovered from `threshold` escrow shares (`trial.recover`) and its
fault recorded in the trial's "faults" ("trial_reveal_missing"); a recovered seed that fails its commitment voids
the trial. Each participant discloses her
sealed `trial_measure` reading anchored before the lock (`trial.outcome`); `trial.certify` is accepted only with the
result and allocation summary the rules recompute (`trial_allocation`, `trial_analysis`).
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

from pydantic import ValidationError

from carechain import access as access_core
from carechain import envelope
from carechain import trial_allocation as alloc
from carechain.events import SEALED_KINDS, PayloadError, Purchase, SealedBody, TrialMeasure, validate_payload
from carechain.sealed import SealedError, ciphertext_hash, open_body
from contract_rules import bonds
from contract_rules import miners as miner_rules
from contract_rules.clock import attested_ms
from contract_rules.penalties import slash_by
from contract_rules.runtime import Accept, Effect, Outcome, Put, Reject, State, Tx
from contract_rules.transactions import (
    TRIAL_CERTIFY,
    TRIAL_COMMIT,
    TRIAL_DISPENSE,
    TRIAL_ENROLL,
    TRIAL_LOCK,
    TRIAL_OUTCOME,
    TRIAL_RECOVER,
    TRIAL_REGISTER,
    TRIAL_REVEAL,
    TRIAL_UNBLIND,
    TRIAL_UNBLIND_KEY,
    TRIAL_WITHDRAW,
    _Payload,
    parse,
)
from contract_rules.trial_analysis import difference_in_means
from contract_rules.trial_entries import (
    KIT_SYSTEM,
    MAX_UNBLIND_BLOCKS,
    TrialCertify,
    TrialCommit,
    TrialDispense,
    TrialEnroll,
    TrialLock,
    TrialOutcome,
    TrialRecover,
    TrialRegister,
    TrialReveal,
    TrialUnblind,
    TrialUnblindKey,
    TrialWithdraw,
    candidate_blocks,
    consent_holds,
    share_value,
)

__all__ = ["PARTICIPANTS", "REVEAL_MISSING", "TRIALS", "TRIAL_DOMAIN", "apply", "certificate", "choose_labellers",
           "committers", "deadlines", "participant_record", "revealed_positions", "threshold", "trial_hash",
           "trial_record"]

NAME = "trials"
VERSION = 1

TRIALS = "trials"
PARTICIPANTS = "trial_participants"  # "<trial_id>/<participant>" → her slot, kit, dispensing, outcome
TRIAL_DOMAIN = b"carechain/trial/labellers\x00"
REVEAL_MISSING = "trial_reveal_missing"  # the fault recorded in the trial's "faults"
REVEAL_MISSING_SLASH = 10_000  # minor units from a labeller's bond (as a void sale; a bond is 20,000 at least)
P = TypeVar("P", bound=_Payload)


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`)."""
    handler = _HANDLERS.get(tx.type)
    if handler is None:
        return Reject("not_a_trial_entry")
    return handler(state, tx)


# -- public helpers: the one way clients, the rules and `verify trial` compute these --------------------

def trial_hash(trial_id: str) -> bytes:
    """What the labeller draw of a trial is keyed by: a domain-tagged SHA-256 of its id."""
    return hashlib.sha256(TRIAL_DOMAIN + trial_id.encode()).digest()


def choose_labellers(seed: bytes, miners: list[str], n: int, trial_id: str) -> list[str]:
    """`n` distinct labelling miners for a trial; ValueError when there are fewer than `n` miners."""
    return access_core.choose_miners(seed, miners, n, trial_hash(trial_id))


def committers(trial: dict[str, Any]) -> list[str]:
    """The parties whose seeds key the allocation, in escrow order: the sponsor, then the labellers."""
    return [trial["sponsor"], *trial["labellers"]]


def threshold(trial: dict[str, Any]) -> int:
    """Escrow shares that recover a seed: a majority of the committers."""
    return len(committers(trial)) // 2 + 1


def escrow_holders(trial: dict[str, Any], party: str) -> list[str]:
    """Who holds shares of `party`'s seed, holder i at x = i + 1: every other committer, in committer order."""
    return [c for c in committers(trial) if c != party]


def deadlines(state: State) -> list[int]:
    """The attested times at which some trial can move on without a new entry from its parties: an unlocked
    trial's enrolment close (the sponsor may lock) and a locked trial's reveal-window end while a seed is missing
    (its holders recover it from escrow). The bridge attests the time once the wall clock passes one, so an idle
    ledger does not stall a trial."""
    times: list[int] = []
    for trial in state.table(TRIALS).values():
        if trial["state"] in ("void", "certified"):
            continue
        if trial["lock"] is None:
            times.append(trial["enrol_closes_ms"])
        elif set(trial["seeds"]) != set(committers(trial)):
            times.append(trial["lock"]["reveal_ends_ms"])
    return sorted(times)


def trial_record(state: State, trial_id: str) -> dict[str, Any] | None:
    record: dict[str, Any] | None = state.table(TRIALS).get(trial_id)
    return record


def participant_record(state: State, trial_id: str, participant: str) -> dict[str, Any] | None:
    record: dict[str, Any] | None = state.table(PARTICIPANTS).get(f"{trial_id}/{participant}")
    return record


def certificate(state: State, trial_id: str) -> dict[str, Any] | None:
    """The trial's certificate record (result, allocation, unblinded blocks), once `trial.certify` was accepted."""
    trial = trial_record(state, trial_id)
    return None if trial is None else trial["certificate"]


def recompute(state: State, trial: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, int]],
                                                             list[dict[str, Any]]] | str:
    """(result, allocation summary, unblinded blocks) from the revealed seeds and the recorded outcomes, or why
    the analysis cannot run. The allocation summary counts every enrolled participant per stratum and arm."""
    design = alloc.Design.model_validate(trial["design"])
    seeds = {party: bytes.fromhex(r["seed"]) for party, r in trial["seeds"].items()}
    key = alloc.allocation_key(seeds, bytes.fromhex(trial["checkpoint_seed"]), trial["trial_id"])
    arms = {s: alloc.allocation(key, design, s, n) for s, n in sorted(trial["strata_counts"].items())}
    summary = {s: {arm: seq.count(arm) for arm in design.arms} for s, seq in arms.items()}
    treatment, control = design.arms[0], design.arms[1]
    values: dict[str, list[int]] = {treatment: [], control: []}
    for pid in trial["participants"]:
        p = participant_record(state, trial["trial_id"], pid)
        assert p is not None
        if p["withdrawn"] is None and p["outcome"] is not None:
            arm = arms[p["stratum"]][p["position"]]
            if arm in values:
                values[arm].append(int(p["outcome"]["value"]))
    try:
        result = difference_in_means(values[treatment], values[control], direction=trial["outcome"]["direction"],
                                     alpha_milli=trial["analysis"]["alpha_milli"])
    except ValueError:
        return "too_few_outcomes"
    unblinded = []
    for u in trial["unblindings"].values():
        block = alloc.block_of(key, design, u["stratum"], u["position"])
        unblinded.append({"participant": u["participant"], "stratum": u["stratum"], "block": block.number,
                          "first": block.first, "size": block.size, "blocks": u["blocks"],
                          "revealed": revealed_positions(key, design, u["stratum"], u["blocks"])})
    return result.as_dict(), summary, unblinded


def revealed_positions(key: alloc.AllocationKey, design: alloc.Design, stratum: str, blocks: list[int]) -> list[int]:
    """[first, last]: the stratum positions of every slot of the candidate blocks `blocks` ([first, last] block
    numbers) of an unblinding, all of which the investigator may learn (consecutive blocks: one range)."""
    position = 0
    first = last = None
    while last is None:
        block = alloc.block_of(key, design, stratum, position)
        if block.number == blocks[0]:
            first = block.first
        if block.number == blocks[1]:
            last = block.first + block.size - 1
        position = block.first + block.size
    assert first is not None
    return [first, last]


def _entry(state: State, tx: Tx, model: type[P]) -> tuple[P, dict[str, Any]] | Reject:
    """The entry's payload as `model` and the trial it names, or the refusal (bad_payload, unknown_trial)."""
    payload = parse(model, tx.payload)
    if payload is None:
        return Reject("bad_payload")
    trial = trial_record(state, payload.trial_id)  # type: ignore[attr-defined]
    if trial is None:
        return Reject("unknown_trial")
    return payload, trial


# -- registration and commitments -----------------------------------------------------------------------

def _register(state: State, tx: Tx) -> Outcome:
    r = parse(TrialRegister, tx.payload)
    if r is None:
        return Reject("bad_payload")
    if r.trial_id in state.table(TRIALS):
        return Reject("duplicate_trial")
    if len(r.design.arms) != 2:
        return Reject("analysis_needs_two_arms")  # arms[0] treatment, arms[1] control
    if len(candidate_blocks(r.design, r.max_participants - 1)) > MAX_UNBLIND_BLOCKS:
        # An emergency unblinding of the last slot would need more block keys than an answer carries.
        return Reject("unblinding_too_wide")
    o = r.outcome
    if o.kind not in SEALED_KINDS or o.kind == "trial_measure":
        return Reject("bad_outcome_kind")
    if not o.baseline_from_ms <= o.baseline_to_ms <= o.followup_from_ms <= o.followup_to_ms:
        return Reject("bad_outcome_windows")
    parties = state.table("parties")
    if len(set(r.investigators)) != len(r.investigators):
        return Reject("duplicate_investigators")
    if any(i not in parties or parties[i]["role"] != "investigator" for i in r.investigators):
        return Reject("unknown_investigator")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if r.enrol_closes_ms <= now:
        return Reject("enrolment_already_closed")
    seed = miner_rules.verify_final_note(state, r.seed_checkpoint, tx.index)
    if isinstance(seed, str):
        return Reject(seed)
    try:
        labellers = choose_labellers(seed, miner_rules.active_miners(state), r.labellers, r.trial_id)
    except ValueError:
        return Reject("not_enough_miners")
    record = {**r.model_dump(exclude={"v", "seed_checkpoint", "labellers", "ts"}), "sponsor": tx.signer,
              "labellers": labellers, "checkpoint_seed": seed.hex(), "at": tx.index, "state": "registered",
              "commitments": {}, "participants": [], "strata_counts": {}, "unblindings": {}, "lock": None,
              "seeds": {}, "recoveries": {}, "faults": [], "outcome_unit_scale": None, "certificate": None}
    return Accept((Put(TRIALS, r.trial_id, record),))


def _commit(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialCommit)
    if isinstance(found, Reject):
        return found
    c, trial = found
    if tx.signer not in committers(trial):
        return Reject("not_a_committer")
    if tx.signer in trial["commitments"]:
        return Reject("already_committed")  # binding: a committer cannot change its seed after seeing others'
    if trial["participants"]:
        return Reject("enrolment_started")
    if set(c.escrow) != set(escrow_holders(trial, tx.signer)):
        return Reject("escrow_does_not_match_committers")
    commitments = {**trial["commitments"], tx.signer: {"commitment": c.commitment, "at": tx.index}}
    return Accept((Put(TRIALS, c.trial_id, {**trial, "commitments": commitments}),))


# -- enrolment, dispensing, withdrawal ------------------------------------------------------------------

def _enroll(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialEnroll)
    if isinstance(found, Reject):
        return found
    e, trial = found
    if tx.signer not in trial["investigators"]:
        return Reject("not_an_investigator")
    if set(trial["commitments"]) != set(committers(trial)):
        return Reject("commitments_missing")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if now >= trial["enrol_closes_ms"] or trial["lock"] is not None:
        return Reject("enrolment_closed")
    party = state.table("parties").get(e.participant)
    if party is None or party["role"] != "patient":
        return Reject("unknown_participant")
    if participant_record(state, e.trial_id, e.participant) is not None:
        return Reject("already_enrolled")
    if len(trial["participants"]) >= trial["max_participants"]:
        return Reject("trial_full")
    design = alloc.Design.model_validate(trial["design"])
    try:
        stratum = alloc.stratum_key(design, e.attributes)
    except ValueError:
        return Reject("bad_attributes")
    if not consent_holds(bytes(party["pk"]), e.trial_id, trial["protocol_hash"], e.participant, e.consent):
        return Reject("bad_consent")
    position = int(trial["strata_counts"].get(stratum, 0))
    record = {"participant": e.participant, "stratum": stratum, "position": position,
              "label": alloc.kit_label(e.trial_id, design, stratum, position), "investigator": tx.signer,
              "at": tx.index, "dispensed": None, "withdrawn": None, "outcome": None}
    updated = {**trial, "state": "enrolling", "participants": [*trial["participants"], e.participant],
               "strata_counts": {**trial["strata_counts"], stratum: position + 1}}
    return Accept((Put(TRIALS, e.trial_id, updated), Put(PARTICIPANTS, f"{e.trial_id}/{e.participant}", record)))


def _terminal_sale(state: State, event: bytes) -> tuple[str, Purchase] | str:
    """(terminal owner, the sale) of a terminal's signed purchase, or why it is not one."""
    try:
        msg = envelope.parse(event)
        payload = validate_payload(msg.payload)
    except (envelope.EnvelopeError, PayloadError):
        return "sale_malformed"
    device = state.table("devices").get(msg.kid)
    if device is None or device["revoked_at"] is not None or payload.dev != msg.kid:
        return "sale_not_from_a_registered_terminal"
    if not msg.verify(bytes(device["pk"])):
        return "bad_sale_signature"
    if payload.kind != "purchase":
        return "not_a_sale"
    return str(device["owner"]), Purchase.model_validate(payload.body)


def _dispense(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialDispense)
    if isinstance(found, Reject):
        return found
    d, trial = found
    if not bonds.is_admitted(state, tx.signer):
        return Reject("pharmacy_not_admitted")
    p = participant_record(state, d.trial_id, d.participant)
    if p is None:
        return Reject("not_enrolled")
    if trial["lock"] is not None:
        return Reject("trial_locked")
    if p["withdrawn"] is not None:
        return Reject("withdrawn")
    if p["dispensed"] is not None:
        return Reject("already_dispensed")
    sale = _terminal_sale(state, d.event)
    if isinstance(sale, str):
        return Reject(sale)
    owner, purchase = sale
    if owner != tx.signer:
        return Reject("terminal_not_yours")
    if purchase.code_system != KIT_SYSTEM or purchase.item_code != p["label"]:
        return Reject("wrong_kit")
    if purchase.patient_token != d.participant:
        return Reject("wrong_patient")
    return Accept((Put(PARTICIPANTS, f"{d.trial_id}/{d.participant}", {**p, "dispensed": tx.index}),))


def _withdraw(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialWithdraw)
    if isinstance(found, Reject):
        return found
    w, trial = found
    if tx.signer != w.participant and tx.signer not in trial["investigators"]:
        return Reject("not_the_participant_or_an_investigator")
    p = participant_record(state, w.trial_id, w.participant)
    if p is None:
        return Reject("not_enrolled")
    if p["withdrawn"] is not None:
        return Reject("already_withdrawn")
    if trial["lock"] is not None:
        return Reject("trial_locked")  # after the lock (and the reveals) a withdrawal could pick the analysed set
    withdrawn = {"at": tx.index, "by": tx.signer, "reason": w.reason}
    return Accept((Put(PARTICIPANTS, f"{w.trial_id}/{w.participant}", {**p, "withdrawn": withdrawn}),))


# -- emergency unblinding -------------------------------------------------------------------------------

def _unblind(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialUnblind)
    if isinstance(found, Reject):
        return found
    u, trial = found
    if tx.signer not in trial["investigators"]:
        return Reject("not_an_investigator")
    p = participant_record(state, u.trial_id, u.participant)
    if p is None:
        return Reject("not_enrolled")
    if trial["lock"] is not None:
        return Reject("trial_locked")
    if any(x["participant"] == u.participant for x in trial["unblindings"].values()):
        return Reject("already_unblinded")
    design = alloc.Design.model_validate(trial["design"])
    blocks = candidate_blocks(design, p["position"])  # whose keys every committer releases to the investigator
    unblinding = {"participant": u.participant, "stratum": p["stratum"], "position": p["position"],
                  "blocks": [blocks.start, blocks[-1]], "investigator": tx.signer, "reason": u.reason,
                  "at": tx.index, "keys": {}}
    updated = {**trial, "unblindings": {**trial["unblindings"], str(tx.index): unblinding}}
    return Accept((Put(TRIALS, u.trial_id, updated),))


def _unblind_key(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialUnblindKey)
    if isinstance(found, Reject):
        return found
    k, trial = found
    if tx.signer not in committers(trial):
        return Reject("not_a_committer")
    unblinding = trial["unblindings"].get(str(k.unblinding))
    if unblinding is None:
        return Reject("unknown_unblinding")
    if tx.signer in unblinding["keys"]:
        return Reject("already_answered")
    unblinding = {**unblinding, "keys": {**unblinding["keys"], tx.signer: tx.index}}
    updated = {**trial, "unblindings": {**trial["unblindings"], str(k.unblinding): unblinding}}
    return Accept((Put(TRIALS, k.trial_id, updated),))


# -- lock, reveals, recovery ----------------------------------------------------------------------------

def _lock(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialLock)
    if isinstance(found, Reject):
        return found
    lk, trial = found
    if tx.signer != trial["sponsor"]:
        return Reject("not_the_sponsor")
    if trial["lock"] is not None:
        return Reject("already_locked")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if now < trial["enrol_closes_ms"]:
        return Reject("enrolment_open")
    lock = {"at": tx.index, "ms": now, "reveal_ends_ms": now + trial["reveal_window_ms"]}
    return Accept((Put(TRIALS, lk.trial_id, {**trial, "lock": lock, "state": "locked"}),))


def _revealable(state: State, trial: dict[str, Any], party: str) -> str | None:
    if party not in committers(trial):
        return "not_a_committer"
    if trial["state"] == "void":
        return "trial_void"
    if trial["lock"] is None:
        return "not_locked"
    if party in trial["seeds"]:
        return "already_revealed"
    if party not in trial["commitments"]:
        return "never_committed"
    return None if attested_ms(state) is not None else "no_attested_time"


def _reveal(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialReveal)
    if isinstance(found, Reject):
        return found
    r, trial = found
    problem = _revealable(state, trial, tx.signer)
    if problem is not None:
        return Reject(problem)
    if (attested_ms(state) or 0) >= trial["lock"]["reveal_ends_ms"]:
        return Reject("reveal_window_over")
    if not alloc.check_reveal(r.trial_id, tx.signer, r.seed, trial["commitments"][tx.signer]["commitment"]):
        return Reject("reveal_does_not_match_commitment")
    seeds = {**trial["seeds"], tx.signer: {"seed": r.seed.hex(), "at": tx.index, "how": "revealed"}}
    return Accept((Put(TRIALS, r.trial_id, {**trial, "seeds": seeds}),))


def _recover(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialRecover)
    if isinstance(found, Reject):
        return found
    r, trial = found
    if tx.signer not in committers(trial) or tx.signer == r.party:
        return Reject("not_a_holder")
    problem = _revealable(state, trial, r.party)
    if problem is not None:
        return Reject(problem)
    if (attested_ms(state) or 0) < trial["lock"]["reveal_ends_ms"]:
        return Reject("reveal_window_open")
    holders = escrow_holders(trial, r.party)
    if r.x != holders.index(tx.signer) + 1:
        return Reject("wrong_share_index")
    shares = dict(trial["recoveries"].get(r.party, {}))
    if str(r.x) in shares:
        return Reject("share_already_given")
    faults = list(trial["faults"])
    penalty: tuple[Effect, ...] = ()
    if not shares:  # the first share proves the window closed without this committer's reveal
        faults.append([tx.index, r.party, REVEAL_MISSING])
        # a labelling miner's bond pays for it (contract_rules.penalties: bonds.SLASH is pinned); an unbonded
        # sponsor's offence is recorded, and the certificate's faults show it
        penalty = slash_by(state, r.party, REVEAL_MISSING, REVEAL_MISSING_SLASH, tx.index)
    shares[str(r.x)] = {"y": r.y.hex(), "holder": tx.signer, "at": tx.index}
    updated = {**trial, "recoveries": {**trial["recoveries"], r.party: shares}, "faults": faults}
    if len(shares) >= threshold(trial):
        points = {int(x): share_value(bytes.fromhex(s["y"])) for x, s in shares.items()}
        try:
            seed: bytes | None = alloc.recover_seed(points, threshold(trial))
        except ValueError:
            seed = None
        commitment = trial["commitments"][r.party]["commitment"]
        if seed is not None and alloc.check_reveal(r.trial_id, r.party, seed, commitment):
            updated["seeds"] = {**trial["seeds"], r.party: {"seed": seed.hex(), "at": tx.index, "how": "recovered"}}
        else:
            # The escrow does not open to the committed seed: the allocation can never be recomputed.
            updated["state"] = "void"
            updated["void"] = {"at": tx.index, "party": r.party, "reason": "recovered_seed_fails_commitment"}
    return Accept((*penalty, Put(TRIALS, r.trial_id, updated)))


# -- outcomes and the certificate -----------------------------------------------------------------------

def _measure(state: State, o: TrialOutcome, participant: str) -> TrialMeasure | str:
    """The opened `trial_measure` reading of `o`, signed by a device registered to `participant`, or why not."""
    try:
        msg = envelope.parse(o.event)
        payload = validate_payload(msg.payload)
    except (envelope.EnvelopeError, PayloadError):
        return "event_malformed"
    if payload.kind != "trial_measure" or not payload.sealed or payload.dev != msg.kid:
        return "not_a_trial_measure"
    if state.table("sealed_at").get(f"{payload.dev}:{payload.seq}") != o.leaf:
        return "not_the_anchored_reading"  # the runtime records where each trial_measure was anchored
    device = state.table("devices").get(msg.kid)
    if device is None or device["owner"] != participant:
        return "not_her_device"
    if not msg.verify(bytes(device["pk"])):
        return "bad_event_signature"
    body = SealedBody.model_validate(payload.body)
    if ciphertext_hash(o.ct) != body.ct:
        return "ciphertext_mismatch"
    try:
        opened = open_body(o.key, payload.dev, payload.seq, payload.ts, payload.kind, body.epoch, o.ct)
        return TrialMeasure.model_validate(opened)
    except SealedError:
        return "ciphertext_does_not_open"
    except ValidationError:
        return "bad_measure"


def _outcome(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialOutcome)
    if isinstance(found, Reject):
        return found
    o, trial = found
    p = participant_record(state, o.trial_id, tx.signer)
    if p is None:
        return Reject("not_enrolled")
    if trial["lock"] is None:
        return Reject("not_locked")  # before the lock, a value disclosed could leak arms
    if p["withdrawn"] is not None:
        return Reject("withdrawn")
    if p["outcome"] is not None:
        return Reject("outcome_already_given")
    if o.leaf >= trial["lock"]["at"]:
        return Reject("reading_after_lock")
    measure = _measure(state, o, tx.signer)
    if isinstance(measure, str):
        return Reject(measure)
    if measure.trial_id != o.trial_id or measure.measure != trial["outcome"]["measure"]:
        return Reject("wrong_trial_or_measure")
    scale = trial["outcome_unit_scale"]
    if scale is not None and measure.unit_scale != scale:
        return Reject("unit_scale_mismatch")
    outcome = {"value": measure.followup - measure.baseline, "baseline": measure.baseline,
               "followup": measure.followup, "leaf": o.leaf, "at": tx.index}
    effects: list[Effect] = [Put(PARTICIPANTS, f"{o.trial_id}/{tx.signer}", {**p, "outcome": outcome})]
    if scale is None:
        effects.append(Put(TRIALS, o.trial_id, {**trial, "outcome_unit_scale": measure.unit_scale}))
    return Accept(tuple(effects))


def _certify(state: State, tx: Tx) -> Outcome:
    found = _entry(state, tx, TrialCertify)
    if isinstance(found, Reject):
        return found
    c, trial = found
    if trial["state"] == "void":
        return Reject("trial_void")
    if trial["certificate"] is not None:
        return Reject("already_certified")
    if trial["lock"] is None:
        return Reject("not_locked")
    if set(trial["seeds"]) != set(committers(trial)):
        return Reject("seeds_missing")
    computed = recompute(state, trial)
    if isinstance(computed, str):
        return Reject(computed)
    result, summary, unblinded = computed
    if c.result.wire() != result:
        return Reject("result_mismatch")
    if c.allocation != summary:
        return Reject("allocation_mismatch")
    record = {"result": result, "allocation": summary, "unblinded": unblinded, "at": tx.index,
              "unit_scale": trial["outcome_unit_scale"]}
    return Accept((Put(TRIALS, c.trial_id, {**trial, "certificate": record, "state": "certified"}),))


_HANDLERS = {
    TRIAL_REGISTER: _register, TRIAL_COMMIT: _commit, TRIAL_ENROLL: _enroll, TRIAL_DISPENSE: _dispense,
    TRIAL_WITHDRAW: _withdraw, TRIAL_UNBLIND: _unblind, TRIAL_UNBLIND_KEY: _unblind_key, TRIAL_LOCK: _lock,
    TRIAL_REVEAL: _reveal, TRIAL_RECOVER: _recover, TRIAL_OUTCOME: _outcome, TRIAL_CERTIFY: _certify,
}

"""What `carechain verify trial ID` checks, offline, from ledger data alone (docs/trials.md, "Verifying a trial").

Sans-IO: the caller hands in the log's leaves, its genesis and a checkpoint it has already verified against the
log's key. `verify_trial` replays the leaves through the contract rules once (so every signature is checked under
the key registered at that point, and refused entries are known as refused) and then re-derives the trial from
the trial's entries themselves, not from the rules' records:

- registration: the trial was registered before its first enrolment, and its labellers are the draw of its seed
  checkpoint (final at the registration) over the miners active then;
- commitments: each committer committed once, before the first enrolment;
- reveals: every committer's seed is revealed or recovered from escrow shares, and checks against its
  commitment (`check_reveal`, recomputed here); refused reveals (a tampered seed) are listed;
- allocation: the stratum positions and kit labels recomputed from the enrolments in log order, the arms from the
  seeds and the registration's checkpoint seed; the certificate's allocation summary equal to them;
- balance: within each stratum, arms exactly in ratio after every complete block, and never off by a block;
- outcomes: every counted reading is the event anchored at the leaf it names, before the lock; outcomes refused
  because their reading came after the lock are listed as excluded;
- concealment: no seed (revealed, or an escrow share) appeared on the log before the lock, refused entries
  included; unblinding keys answered only logged `trial.unblind` entries, whose participants are listed with every
  slot of every candidate block (`candidate_blocks`) as possibly revealed to the investigator who asked;
- analysis: `trial_analysis.difference_in_means` over the opened outcomes of the non-withdrawn participants by
  arm, equal to the certificate;
- anchored: the leaves hash to the checkpoint's root and every trial leaf lies within it.

What it cannot check: that the protocol document hashes to the registered `protocol_hash` (the reviewer holds
the document: `sha256sum`), that participants took what they were dispensed, and that a device measured honestly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from pydantic import ValidationError

from carechain import envelope
from carechain import trial_allocation as alloc
from carechain.checkpoint import Checkpoint
from carechain.entries import ENTRY_EVENT, Entry, EntryError
from carechain.events import SealedBody, TrialMeasure, validate_payload
from carechain.sealed import SealedError, open_body
from contract_rules import miners as miner_rules
from contract_rules import trials as rules
from contract_rules.replay import decode_leaf
from contract_rules.runtime import OK, CodeBook, Genesis, Runtime, State
from contract_rules.study_check import Finding, Report, anchoring_problem  # one report shape for every verifier
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
    parse,
)
from contract_rules.trial_analysis import difference_in_means
from contract_rules.trial_entries import (
    TrialCertify,
    TrialCommit,
    TrialEnroll,
    TrialOutcome,
    TrialRecover,
    TrialRegister,
    TrialReveal,
    TrialUnblind,
    TrialUnblindKey,
    TrialWithdraw,
    candidate_blocks,
    share_value,
)

__all__ = ["CHECKS", "Finding", "TrialReport", "verify_trial"]

# Every check `verify_trial` reports, in order.
CHECKS = ("replay", "registration", "commitments", "reveals", "allocation", "balance", "outcomes", "concealment",
          "analysis", "anchored")
_TRIAL_TYPES = frozenset({TRIAL_REGISTER, TRIAL_COMMIT, TRIAL_ENROLL, TRIAL_LOCK, TRIAL_REVEAL, TRIAL_RECOVER,
                          TRIAL_OUTCOME, TRIAL_CERTIFY, TRIAL_UNBLIND, TRIAL_UNBLIND_KEY, TRIAL_WITHDRAW,
                          TRIAL_DISPENSE})


@dataclass
class TrialReport(Report):
    """Every check `verify_trial` ran on one trial, and what the trial came to."""

    trial_id: str
    state: str | None = None
    certificate: dict[str, Any] | None = None
    recomputed: dict[str, Any] | None = None  # the analysis as this verifier computed it
    # participant, investigator, stratum, position, candidate blocks, her block (once the seeds are known), and the
    # positions [first, last] and participants whose arms the investigator may have learnt
    unblinded: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)  # outcomes refused as read after the lock

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "trial_id": self.trial_id, "state": self.state, "certificate": self.certificate,
                "recomputed": self.recomputed, "unblinded": self.unblinded, "excluded": self.excluded,
                "checks": self.checks()}


@dataclass(frozen=True)
class _Leaf:
    """One entry of the trial: its index, type, signer, payload, and what the rules said."""

    index: int
    type: str
    signer: str
    payload: dict[str, Any]
    result: str


@dataclass
class _Seen:
    leaves: list[_Leaf] = field(default_factory=list)
    labellers: list[str] | str | None = None  # the draw at the registration, or why none
    checkpoint_seed: bytes | None = None

    def accepted(self, entry_type: str) -> list[_Leaf]:
        return [x for x in self.leaves if x.type == entry_type and x.result == OK]

    def all(self, entry_type: str) -> list[_Leaf]:
        return [x for x in self.leaves if x.type == entry_type]


def _trial_leaf(entry: Entry, trial_id: str) -> tuple[str, dict[str, Any]] | None:
    if entry.type not in _TRIAL_TYPES:
        return None
    try:
        msg = envelope.parse(entry.cose)
    except envelope.EnvelopeError:
        return None
    payload = msg.payload
    if not isinstance(payload, dict) or payload.get("trial_id") != trial_id:
        return None
    return msg.kid, payload


def _registration_draw(seen: _Seen, state: State, index: int, payload: dict[str, Any]) -> None:
    r = parse(TrialRegister, payload)
    if r is None or seen.checkpoint_seed is not None:
        return
    seed = miner_rules.verify_final_note(state, r.seed_checkpoint, index)
    if isinstance(seed, str):
        seen.labellers = f"the seed checkpoint is not final at leaf {index}: {seed}"
        return
    try:
        seen.labellers = rules.choose_labellers(seed, miner_rules.active_miners(state), r.labellers, r.trial_id)
    except ValueError as exc:
        seen.labellers = str(exc)
    seen.checkpoint_seed = seed


def verify_trial(leaves: Sequence[bytes], genesis: Genesis, trial_id: str, checkpoint: Checkpoint | None = None,
                 code: CodeBook | None = None) -> TrialReport:
    """Check trial `trial_id` from the log's `leaves` (all of them, in order) and its `genesis`.

    `checkpoint` is a tree head the caller verified against the log's key; without one the anchoring check fails.
    `code` holds contract code beyond the builtin modules, when the genesis or an upgrade names some.
    """
    report = TrialReport(trial_id)
    runtime = Runtime(genesis, code)
    seen = _Seen()
    for index, entry in report.entries(leaves):
        found = _trial_leaf(entry, trial_id)
        if found is not None and entry.type == TRIAL_REGISTER:
            _registration_draw(seen, runtime.state, index, found[1])
        result = runtime.apply(entry)
        if found is not None:
            seen.leaves.append(_Leaf(index, entry.type, found[0], found[1], result))
            if entry.type == TRIAL_REGISTER and result != OK and rules.trial_record(runtime.state, trial_id) is None:
                seen.checkpoint_seed, seen.labellers = None, None  # refused: a later registration may be the one
    if report.findings:  # a leaf that is not a ledger entry
        return report
    state = runtime.state
    trial = rules.trial_record(state, trial_id)
    registrations = seen.accepted(TRIAL_REGISTER)
    if trial is None or not registrations:
        report.add("replay", False, f"no accepted trial.register for trial {trial_id!r} in {len(leaves)} leaves")
        return report
    report.state, report.certificate = trial["state"], trial["certificate"]
    report.add("replay", True, f"{len(leaves)} leaves replayed; trial registered at leaf {trial['at']}, "
                               f"{len(seen.accepted(TRIAL_ENROLL))} enrolments accepted, state {trial['state']}")
    register = parse(TrialRegister, registrations[0].payload)
    assert register is not None
    _registration_findings(report, seen, trial)
    commitments = _commitment_findings(report, seen, trial)
    seeds = _reveal_findings(report, seen, trial, commitments)
    slots = _allocation_findings(report, seen, trial, register, seeds)
    _outcome_findings(report, seen, trial, leaves)
    _concealment_findings(report, seen, trial, register, seeds, slots)
    _analysis_findings(report, seen, trial, register, slots)
    _anchor_findings(report, leaves, checkpoint, seen)
    return report


def _lock_index(seen: _Seen) -> int | None:
    locks = seen.accepted(TRIAL_LOCK)
    return locks[0].index if locks else None


def _registration_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any]) -> None:
    early = [x.index for x in seen.accepted(TRIAL_ENROLL) if x.index < trial["at"]]
    if early:
        report.add("registration", False, f"enrolments accepted before the registration at leaf {trial['at']}: {early}")
        return
    if seen.labellers != trial["labellers"]:
        report.add("registration", False, f"the trial names labellers {trial['labellers']}, but its seed checkpoint "
                                          f"gives {seen.labellers}")
        return
    if seen.checkpoint_seed is None or seen.checkpoint_seed.hex() != trial["checkpoint_seed"]:
        report.add("registration", False, "the recorded checkpoint seed is not the seed of the registered note")
        return
    first = min((x.index for x in seen.accepted(TRIAL_ENROLL)), default=None)
    report.add("registration", True, f"registered at leaf {trial['at']}, before the first enrolment "
                                     f"({'none' if first is None else f'leaf {first}'}); labellers "
                                     f"{', '.join(trial['labellers'])} drawn from the final seed checkpoint")


def _commitment_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any]) -> dict[str, str]:
    committers = rules.committers(trial)
    first_enrol = min((x.index for x in seen.accepted(TRIAL_ENROLL)), default=None)
    commitments: dict[str, str] = {}
    problems = []
    for x in seen.accepted(TRIAL_COMMIT):
        c = parse(TrialCommit, x.payload)
        if c is None or x.signer not in committers or x.signer in commitments:
            problems.append(f"leaf {x.index}: a commitment by {x.signer} that should not count")
            continue
        if first_enrol is not None and x.index > first_enrol:
            problems.append(f"leaf {x.index}: {x.signer} committed after enrolment started (leaf {first_enrol})")
        commitments[x.signer] = c.commitment
    missing = [c for c in committers if c not in commitments]
    if first_enrol is not None and missing:
        problems.append(f"enrolment started at leaf {first_enrol} without commitments of {missing}")
    if problems:
        report.add("commitments", False, "; ".join(problems))
    else:
        report.add("commitments", True, f"{len(commitments)} of {len(committers)} committers committed once, "
                                        "before any enrolment")
    return commitments


def _reveal_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any],
                     commitments: dict[str, str]) -> dict[str, bytes]:
    """The seeds, re-derived from the reveal and recover entries and checked against the commitments."""
    trial_id = report.trial_id
    seeds: dict[str, bytes] = {}
    how: dict[str, str] = {}
    problems: list[str] = []
    for x in seen.accepted(TRIAL_REVEAL):
        r = parse(TrialReveal, x.payload)
        if r is None or not alloc.check_reveal(trial_id, x.signer, r.seed, commitments.get(x.signer, "")):
            problems.append(f"leaf {x.index}: the reveal of {x.signer} does not match its commitment")
            continue
        seeds[x.signer], how[x.signer] = r.seed, f"revealed at leaf {x.index}"
    shares: dict[str, dict[int, int]] = {}
    for x in seen.accepted(TRIAL_RECOVER):
        share = parse(TrialRecover, x.payload)
        if share is not None:
            shares.setdefault(share.party, {})[share.x] = share_value(share.y)
    t = rules.threshold(trial)
    void = None
    for party, points in shares.items():
        if len(points) < t or party in seeds:
            continue
        try:
            seed = alloc.recover_seed(dict(sorted(points.items())[:t]), t)
        except ValueError:
            seed = b""
        if alloc.check_reveal(trial_id, party, seed, commitments.get(party, "")):
            seeds[party], how[party] = seed, f"recovered from {t} escrow shares"
        else:
            void = party
    refused = [f"leaf {x.index} ({x.signer}: {x.result})" for x in seen.all(TRIAL_REVEAL) if x.result != OK]
    refused_note = f"; refused reveals: {', '.join(refused)}" if refused else ""
    if void is not None:
        ok = trial["state"] == "void"
        report.add("reveals", ok, f"the escrow of {void} recovers a seed that fails its commitment: the trial is void"
                                  + ("" if ok else f", yet its state is {trial['state']}") + refused_note)
    elif problems:
        report.add("reveals", False, "; ".join(problems) + refused_note)
    elif trial["lock"] is None:
        report.add("reveals", True, "not locked yet: no seed is due" + refused_note)
    else:
        missing = [c for c in rules.committers(trial) if c not in seeds]
        report.add("reveals", not missing or trial["certificate"] is None,
                   ("every seed matches its commitment: " + ", ".join(f"{p} {h}" for p, h in how.items())
                    if not missing else f"seeds still missing: {missing}") + refused_note)
    return seeds


@dataclass(frozen=True)
class _Slot:
    participant: str
    stratum: str
    position: int
    index: int  # the enrolment leaf


def _allocation_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any], register: TrialRegister,
                         seeds: dict[str, bytes]) -> dict[str, _Slot]:
    design = register.design
    slots: dict[str, _Slot] = {}
    counts: Counter[str] = Counter()
    for x in seen.accepted(TRIAL_ENROLL):
        e = parse(TrialEnroll, x.payload)
        assert e is not None
        stratum = alloc.stratum_key(design, e.attributes)
        slots[e.participant] = _Slot(e.participant, stratum, counts[stratum], x.index)
        counts[stratum] += 1
    if set(seeds) != set(rules.committers(trial)) or seen.checkpoint_seed is None:
        report.add("allocation", trial["certificate"] is None,
                   f"{len(slots)} enrolments; the allocation cannot be recomputed before every seed is known")
        report.add("balance", True, "not checked: the arms are not known yet")
        return slots
    key = alloc.allocation_key(seeds, seen.checkpoint_seed, report.trial_id)
    arms = {s: alloc.allocation(key, design, s, n) for s, n in sorted(counts.items())}
    summary = {s: {arm: seq.count(arm) for arm in design.arms} for s, seq in arms.items()}
    cert = trial["certificate"]
    if cert is not None and cert["allocation"] != summary:
        report.add("allocation", False, f"the certificate states the allocation {cert['allocation']}, the seeds "
                                        f"give {summary}")
    else:
        report.add("allocation", True, f"{len(slots)} participants' arms recomputed from {len(seeds)} seeds and the "
                                       f"checkpoint seed: {summary}")
    unit, largest = sum(design.ratio), max(design.block_sizes)
    problems = []
    for stratum, seq in arms.items():
        running: Counter[str] = Counter()
        for position, arm in enumerate(seq):
            running[arm] += 1
            block = alloc.block_of(key, design, stratum, position)
            for a, r in zip(design.arms, design.ratio, strict=True):
                off = abs(running[a] - Fraction((position + 1) * r, unit))
                end_of_block = position + 1 == block.first + block.size
                if off >= largest or (end_of_block and off != 0):
                    problems.append(f"{stratum} after {position + 1}: {dict(running)}")
    report.add("balance", not problems, "every stratum is in ratio after each complete block: " +
               ", ".join(f"{s} {summary[s]}" for s in summary) if not problems else "; ".join(problems[:5]))
    report.recomputed = {"arms": {p: arms[s.stratum][s.position] for p, s in slots.items()}}
    return slots


def _opened(payload: dict[str, Any]) -> tuple[TrialOutcome, TrialMeasure] | str:
    o = parse(TrialOutcome, payload)
    if o is None:
        return "malformed"
    try:
        msg = envelope.parse(o.event)
        event = validate_payload(msg.payload)
        body = SealedBody.model_validate(event.body)
        opened = open_body(o.key, event.dev, event.seq, event.ts, event.kind, body.epoch, o.ct)
        return o, TrialMeasure.model_validate(opened)
    except (envelope.EnvelopeError, ValueError, SealedError, ValidationError) as exc:
        return f"does not open: {exc}"


def _outcome_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any], leaves: Sequence[bytes]) -> None:
    lock = _lock_index(seen)
    problems = []
    for x in seen.accepted(TRIAL_OUTCOME):
        o = parse(TrialOutcome, x.payload)
        assert o is not None
        anchored = None
        if o.leaf < len(leaves):
            try:
                anchored = decode_leaf(leaves[o.leaf])
            except EntryError:
                anchored = None
        if anchored is None or anchored.type != ENTRY_EVENT or anchored.cose != o.event:
            problems.append(f"leaf {x.index}: the reading it names at leaf {o.leaf} is not the event it discloses")
        elif lock is None or o.leaf >= lock:
            problems.append(f"leaf {x.index}: counts a reading anchored at leaf {o.leaf}, not before the lock "
                            f"(leaf {lock})")
    for x in seen.all(TRIAL_OUTCOME):
        if x.result == "reading_after_lock":
            o = parse(TrialOutcome, x.payload)
            report.excluded.append({"participant": x.signer, "leaf": None if o is None else o.leaf,
                                    "refused_at": x.index})
    excluded = f"; excluded as read after the lock: {[e['participant'] for e in report.excluded]}" \
        if report.excluded else ""
    n = len(seen.accepted(TRIAL_OUTCOME))
    report.add("outcomes", not problems, "; ".join(problems) + excluded if problems else
               f"{n} outcomes, each the event anchored at the leaf it names, before the lock at leaf {lock}{excluded}")


def _concealment_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any], register: TrialRegister,
                          seeds: dict[str, bytes], slots: dict[str, _Slot]) -> None:
    lock = _lock_index(seen)
    problems = []
    for x in [*seen.all(TRIAL_REVEAL), *seen.all(TRIAL_RECOVER)]:
        if lock is None or x.index < lock:
            problems.append(f"leaf {x.index}: a {x.type} by {x.signer} before the lock ({x.result}) put a seed or "
                            "an escrow share on the log")
    unblindings = {x.index: x for x in seen.accepted(TRIAL_UNBLIND)}
    for x in seen.accepted(TRIAL_UNBLIND_KEY):
        k = parse(TrialUnblindKey, x.payload)
        if k is None or k.unblinding not in unblindings or k.unblinding >= x.index:
            problems.append(f"leaf {x.index}: unblinding keys released without a logged trial.unblind")
    complete = set(seeds) == set(rules.committers(trial)) and seen.checkpoint_seed is not None
    key = alloc.allocation_key(seeds, seen.checkpoint_seed, report.trial_id) if complete and seen.checkpoint_seed \
        else None
    design = register.design
    for index, x in sorted(unblindings.items()):
        u = parse(TrialUnblind, x.payload)
        assert u is not None
        slot = slots[u.participant]
        blocks = candidate_blocks(design, slot.position)
        item: dict[str, Any] = {"participant": u.participant, "investigator": x.signer, "reason": u.reason,
                                "at": index, "stratum": slot.stratum, "position": slot.position,
                                "blocks": [blocks.start, blocks[-1]]}
        if key is not None:
            block = alloc.block_of(key, design, slot.stratum, slot.position)
            revealed = rules.revealed_positions(key, design, slot.stratum, item["blocks"])
            item |= {"block": block.number, "first": block.first, "size": block.size, "revealed": revealed,
                     "revealed_exact": True}
        else:  # before the reveals the boundaries are unknown: every slot the candidate blocks can cover
            revealed = [blocks.start * min(design.block_sizes), (blocks[-1] + 1) * max(design.block_sizes) - 1]
            item |= {"revealed": revealed, "revealed_exact": False}
        item["revealed_participants"] = sorted(s.participant for s in slots.values() if s.stratum == slot.stratum
                                               and revealed[0] <= s.position <= revealed[1])
        report.unblinded.append(item)
    listed = ", ".join(
        f"{u['participant']} (leaf {u['at']}"
        + (f", block {u['block']}: positions {u['first']}–{u['first'] + u['size'] - 1}" if "block" in u else "")
        + f"; {u['investigator']} may learn the arms of {u['stratum'] or 'the'} stratum's positions "
          f"{u['revealed'][0]}–{u['revealed'][1]}{'' if u['revealed_exact'] else ' at most'} (candidate blocks "
          f"{u['blocks'][0]}–{u['blocks'][1]}): {', '.join(u['revealed_participants'])})"
        for u in report.unblinded)
    report.add("concealment", not problems, "; ".join(problems) if problems else
               "no seed or escrow share on the log before the lock" +
               (f"; logged emergency unblindings: {listed}" if listed else "; no emergency unblinding"))


def _analysis_findings(report: TrialReport, seen: _Seen, trial: dict[str, Any], register: TrialRegister,
                       slots: dict[str, _Slot]) -> None:
    cert = trial["certificate"]
    arms = (report.recomputed or {}).get("arms")
    if arms is None:
        report.add("analysis", cert is None, "not certified yet" if cert is None else
                   "certified, but the allocation cannot be recomputed")
        return
    withdrawn = set()
    for x in seen.accepted(TRIAL_WITHDRAW):
        w = parse(TrialWithdraw, x.payload)
        if w is not None:
            withdrawn.add(w.participant)
    treatment, control = register.design.arms[0], register.design.arms[1]
    values: dict[str, list[int]] = {treatment: [], control: []}
    for x in seen.accepted(TRIAL_OUTCOME):
        opened = _opened(x.payload)
        if isinstance(opened, str) or x.signer in withdrawn or x.signer not in arms:
            continue
        _, m = opened
        if arms[x.signer] in values:
            values[arms[x.signer]].append(m.followup - m.baseline)
    try:
        result = difference_in_means(values[treatment], values[control], direction=register.outcome.direction,
                                     alpha_milli=register.analysis.alpha_milli).as_dict()
    except ValueError as exc:
        report.add("analysis", cert is None, f"the analysis cannot run: {exc}")
        return
    report.recomputed = {**report.recomputed, "result": result} if report.recomputed else {"result": result}
    if cert is None:
        report.add("analysis", True, f"not certified yet; the recomputed result would be {result}")
        return
    claims = seen.accepted(TRIAL_CERTIFY)
    stated = parse(TrialCertify, claims[0].payload) if claims else None
    claimed = None if stated is None else stated.result.wire()
    if claimed != result or cert["result"] != result:
        wrong = cert["result"] if claimed == result else claimed
        report.add("analysis", False, f"the certificate states {wrong}, the anchored outcomes give {result}")
        return
    report.add("analysis", True, f"the certificate at leaf {cert['at']} is the recomputed result: effect "
                                 f"{result['effect']} (95 % CI {result['ci_low']} to {result['ci_high']}), p "
                                 f"{result['p_value']}, endpoint {'met' if result['met'] else 'not met'}")


def _anchor_findings(report: TrialReport, leaves: Sequence[bytes], checkpoint: Checkpoint | None,
                     seen: _Seen) -> None:
    accepted = [x.index for x in seen.leaves if x.result == OK]
    problem = anchoring_problem(leaves, checkpoint, accepted, "the trial")
    if problem is not None or checkpoint is None:
        report.add("anchored", False, problem or "no checkpoint given")
        return
    report.add("anchored", True, f"the trial's {len(accepted)} accepted entries are "
                                 f"included in the checkpoint of size {checkpoint.tree_size}")

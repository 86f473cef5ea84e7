"""A labelling miner runs its part of a clinical trial by itself (docs/trials.md).

A miner drawn as one of a trial's labellers (`contract_rules.trials.choose_labellers`; the trial record lists
them) reads from its own replayed contract state what the trial needs from it next, and does it:

- **commit**: the trial is registered, enrolment has not started and this miner has not committed: it draws a
  32-byte seed (`os.urandom`), writes it to DATA_DIR/trials/<trial id>.seed (0600, fsynced) *before* anything
  leaves the process, then sends its signed `trial.commit` — the seed commitment and Shamir escrow shares of
  the seed sealed to every other committer. A restarted miner reuses the stored seed; it never draws a second;
- **reveal**: the trial is locked, the reveal window is open and this miner has not revealed: it sends
  `trial.reveal` with the stored seed (after checking it against its recorded commitment);
- **recover**: the reveal window is over and another committer has not revealed: it opens the escrow share
  sealed to it in that committer's accepted `trial.commit` and sends `trial.recover`;
- **unblind_key**: an investigator's `trial.unblind` names a participant and this miner has not answered: it
  sends its `party_sizes_key` of her stratum and `party_block_key` of every block that may hold her slot
  (`trial_entries.candidate_blocks`: one with one block size), sealed to that investigator.

`due` is the decision, a pure function of the contract state (sans-IO, like `study_runner.due`). `TrialRunner`
is the shell, fed by the miner service after every cosignature (`after_cosign`, on the service's thread: the
jobs are a few signatures each, no MPC and no port). Entries go over the miner's own broker session to its study
topic (`cc/v1/miner/<id>/study`), where the bridge's `chain_bridge.study_intake` decides them with the rules. Every
job runs at most once: DATA_DIR/trials/jobs.json (0600) remembers the jobs done, how often each failed (a failed
job is tried again at the next cosignature, up to MAX_ATTEMPTS times, each failure logged loudly) and the escrow
shares sealed to this miner in the accepted commitments it cosigned (what a recovery opens).

Seed file (one per trial, never overwritten): JSON `{"v": 1, "trial_id": ID, "party": MINER_ID, "seed": HEX}`,
the seed as 64 lowercase hex digits.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from carechain import envelope
from carechain import trial_allocation as alloc
from carechain.entries import TRIAL_COMMIT, Entry, EntryError
from carechain.files import PRIVATE_DIR, write_atomic
from carechain.identity import Identity
from chain_miner.jobs_file import JOBS_FILE, MAX_ATTEMPTS, JobsFile
from contract_rules import trial_entries as te
from contract_rules import trials as rules
from contract_rules.runtime import State

__all__ = ["JOBS_FILE", "MAX_ATTEMPTS", "SEED_VERSION", "SeedFileError", "TrialJob", "TrialRunner", "due",
           "read_seed", "seed_path"]

log = logging.getLogger("carechain.miner")

JobKind = Literal["commit", "reveal", "recover", "unblind_key"]
SEED_VERSION = 1


class SeedFileError(Exception):
    """A trial seed file is missing, unreadable or not this miner's seed of that trial."""


@dataclass(frozen=True)
class TrialJob:
    """One piece of a trial's work for one labelling miner. `party`: for a recovery, the committer whose seed is
    recovered; `unblinding`: for an unblinding answer, the leaf of the `trial.unblind`."""

    kind: JobKind
    trial_id: str
    party: str | None = None
    unblinding: int | None = None

    @property
    def key(self) -> str:
        """What the jobs file remembers it by."""
        if self.kind == "recover":
            return f"recover:{self.trial_id}:{self.party}"
        if self.kind == "unblind_key":
            return f"unblind_key:{self.trial_id}:{self.unblinding}"
        return f"{self.kind}:{self.trial_id}"


def due(state: State, me: str, now_ms: int | None) -> list[TrialJob]:
    """The trial jobs labelling miner `me` has now in `state`, by trial id (commit, unblinding answers, reveal,
    recoveries in committer order).

    `now_ms`: the attested time of `state` (`contract_rules.clock.attested_ms`, what the rules judge on; None
    before any attestation: no reveal or recovery is due). Only what the rules would accept is due; the jobs
    this miner already did are the caller's to skip (`TrialJob.key`)."""
    jobs: list[TrialJob] = []
    for trial_id in sorted(state.table(rules.TRIALS)):
        trial = state.table(rules.TRIALS)[trial_id]
        if me not in trial["labellers"] or trial["state"] in ("void", "certified"):
            continue
        committed = me in trial["commitments"]
        if not committed:
            if not trial["participants"] and trial["lock"] is None:
                jobs.append(TrialJob("commit", trial_id))
            continue  # a committer that never committed has nothing to reveal, and holds no escrow share
        for leaf, unblinding in sorted(trial["unblindings"].items(), key=lambda kv: int(kv[0])):
            if me not in unblinding["keys"]:
                jobs.append(TrialJob("unblind_key", trial_id, unblinding=int(leaf)))
        lock = trial["lock"]
        if lock is None or now_ms is None:
            continue
        if now_ms < lock["reveal_ends_ms"]:
            if me not in trial["seeds"]:
                jobs.append(TrialJob("reveal", trial_id))
            continue
        for party in rules.committers(trial):
            if party == me or party in trial["seeds"] or party not in trial["commitments"]:
                continue
            x = rules.escrow_holders(trial, party).index(me) + 1
            if str(x) not in trial["recoveries"].get(party, {}):
                jobs.append(TrialJob("recover", trial_id, party=party))
    return jobs


def seed_path(data_dir: Path, trial_id: str) -> Path:
    """Where a miner keeps its seed of `trial_id`: DATA_DIR/trials/<trial id>.seed."""
    return Path(data_dir) / "trials" / f"{trial_id}.seed"


def read_seed(path: Path, trial_id: str, party: str | None = None) -> bytes:
    """The seed in a trial seed file (see the module docstring); SeedFileError when it is missing, damaged, or
    of another trial or party."""
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("v") != SEED_VERSION:
            raise ValueError(f"version {raw.get('v')!r}, this miner reads {SEED_VERSION}")
        seed = bytes.fromhex(raw["seed"])
    except FileNotFoundError:
        raise SeedFileError(f"{path}: no seed file") from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise SeedFileError(f"{path}: unreadable trial seed file ({exc}); restore it from a backup — a labeller "
                            "without its seed cannot reveal, and its escrow holders must recover it") from None
    if raw.get("trial_id") != trial_id or (party is not None and raw.get("party") != party):
        raise SeedFileError(f"{path} holds the seed of trial {raw.get('trial_id')!r} for {raw.get('party')!r}, "
                            f"not of trial {trial_id!r} for {party!r}")
    if len(seed) != alloc.SEED_BYTES:
        raise SeedFileError(f"{path}: a seed has {alloc.SEED_BYTES} bytes, this one {len(seed)}")
    return seed


# -- the shell ------------------------------------------------------------------------------------------------

@dataclass
class _TrialJobs(JobsFile):
    """DATA_DIR/trials/jobs.json: the trial jobs, and the escrow shares this miner keeps."""

    KIND = "trial"

    # trial id → committer → the escrow share sealed to this miner in its accepted trial.commit (hex)
    escrow: dict[str, dict[str, str]] = field(default_factory=dict)

    def read_own(self, raw: Mapping[str, Any]) -> None:
        # A file without readable shares is forgotten whole, which is safe: a commit reuses the stored seed and
        # forgotten escrow shares are read again from the cosigned tree.
        self.escrow = {str(t): {str(p): str(s) for p, s in shares.items()} for t, shares in raw["escrow"].items()}

    def own_fields(self) -> dict[str, Any]:
        return {"escrow": self.escrow}


Publish = Callable[[bytes], bool]


class TrialRunner:
    """Runs the trial jobs of one labelling miner (see the module docstring). Built by `chain_miner.assembly`
    whenever the miner re-executes the contracts; the service calls `after_cosign`."""

    def __init__(self, data_dir: Path, identity: Identity, state: Callable[[], State],
                 leaves: Callable[[], list[bytes] | None], publish: Publish) -> None:
        """`state`: the cosigned contract state; `leaves`: the whole cosigned tree's leaves, proven against its
        root (None when the log did not serve them; read only when a recovery needs a commitment this runner did
        not see); `publish`: sends one signed entry on this miner's study topic, True once the broker took it."""
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "trials"
        self.identity = identity
        self.me = identity.device_id
        self._state = state
        self._leaves = leaves
        self._publish = publish
        self.stats: dict[str, int] = {}
        self._lock = threading.Lock()
        self._jobs = _TrialJobs.load(self.dir)

    def after_cosign(self, first: int, entries: Sequence[bytes]) -> list[TrialJob]:
        """After the contract state took `entries` (leaves `first`…, cosigned or replayed; none when only the
        checkpoint moved): keep the escrow shares sealed to this miner, then do what is due and not done. The jobs
        done now."""
        state = self._state()
        self._keep_escrow(state, first, entries)
        from contract_rules.clock import attested_ms  # noqa: PLC0415

        done = []
        for job in due(state, self.me, attested_ms(state)):
            with self._lock:
                if not self._jobs.may_run(job.key):
                    continue
            try:
                ok = self._execute(job, state)
            except Exception:  # a job must never take the miner down; the next one still runs
                log.exception("miner %s: trial job %s crashed", self.me, job.key)
                ok = False
            with self._lock:
                if ok:
                    self._jobs.succeeded(job.key)
                    done.append(job)
                else:
                    self._jobs.failed_once(job.key, self.me)
                self._jobs.save()
            self._count("jobs_done" if ok else "jobs_failed")
        return done

    def done(self) -> set[str]:
        """The keys of the jobs this miner did."""
        with self._lock:
            return set(self._jobs.done)

    # -- the jobs -------------------------------------------------------------------------------------------

    def _execute(self, job: TrialJob, state: State) -> bool:
        trial = rules.trial_record(state, job.trial_id)
        assert trial is not None  # `due` found it in this state
        payload: te.TrialCommit | te.TrialReveal | te.TrialRecover | te.TrialUnblindKey | None
        if job.kind == "commit":
            payload = self._commit(trial, state)
        elif job.kind == "reveal":
            payload = self._reveal(trial)
        elif job.kind == "recover":
            assert job.party is not None
            payload = self._recover(trial, job.party)
        else:
            assert job.unblinding is not None
            payload = self._unblind_key(trial, job.unblinding, state)
        if payload is None:
            return False
        entry = te.trial_entry(self.identity, payload)
        if not self._publish(entry.encode()):
            log.error("miner %s: the broker did not take the %s of trial %s; trying again at the next checkpoint",
                      self.me, entry.type, job.trial_id)
            return False
        log.info("miner %s: sent %s of trial %s%s", self.me, entry.type, job.trial_id,
                 f" (seed of {job.party})" if job.party else
                 f" (unblinding at leaf {job.unblinding})" if job.unblinding is not None else "")
        return True

    def _seed(self, trial_id: str) -> bytes | None:
        """This miner's stored seed of `trial_id`, or None (logged loudly)."""
        try:
            return read_seed(seed_path(self.data_dir, trial_id), trial_id, self.me)
        except SeedFileError as exc:
            self._count("seed_unreadable")
            log.error("miner %s: %s", self.me, exc)
            return None

    def _commit(self, trial: dict[str, Any], state: State) -> te.TrialCommit | None:
        trial_id = trial["trial_id"]
        path = seed_path(self.data_dir, trial_id)
        if path.exists():  # a restart between the seed file and the commit: the same seed, never a second one
            seed = self._seed(trial_id)
            if seed is None:
                return None
        else:
            seed = os.urandom(alloc.SEED_BYTES)
            self.dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            record = {"v": SEED_VERSION, "trial_id": trial_id, "party": self.me, "seed": seed.hex()}
            write_atomic(path, json.dumps(record).encode())  # 0600, fsynced, before anything leaves the process
        holders = rules.escrow_holders(trial, self.me)
        parties = state.table("parties")
        missing = [h for h in holders if h not in parties]
        if missing:
            log.error("miner %s: cannot seal escrow shares of trial %s to %s: not registered parties", self.me,
                      trial_id, ", ".join(missing))
            return None
        t = rules.threshold(trial)
        coefficients = [int.from_bytes(os.urandom(alloc.SEED_BYTES * 2), "big") % alloc.FIELD_PRIME
                        for _ in range(t - 1)]
        shares = alloc.escrow_shares(seed, holders, t, coefficients)
        escrow = {h: te.seal_share(bytes(parties[h]["pk"]), y) for h, y in shares.items()}
        return te.TrialCommit(trial_id=trial_id, commitment=alloc.seed_commitment(trial_id, self.me, seed),
                              escrow=escrow, ts=_now_ms())

    def _reveal(self, trial: dict[str, Any]) -> te.TrialReveal | None:
        trial_id = trial["trial_id"]
        seed = self._seed(trial_id)
        if seed is None:
            return None
        if not alloc.check_reveal(trial_id, self.me, seed, trial["commitments"][self.me]["commitment"]):
            self._count("seed_does_not_match")
            log.error("miner %s: the seed in %s does not match this miner's commitment to trial %s: not revealing "
                      "it (its escrow holders will recover the committed seed after the window)", self.me,
                      seed_path(self.data_dir, trial_id), trial_id)
            return None
        return te.TrialReveal(trial_id=trial_id, seed=seed, ts=_now_ms())

    def _recover(self, trial: dict[str, Any], party: str) -> te.TrialRecover | None:
        trial_id = trial["trial_id"]
        sealed = self._escrow_of(trial, party)
        if sealed is None:
            self._count("escrow_unavailable")
            log.error("miner %s: cannot recover the seed of %s in trial %s: its accepted trial.commit (leaf %s) "
                      "was not served proven against the cosigned tree", self.me, party, trial_id,
                      trial["commitments"][party]["at"])
            return None
        try:
            y = te.open_share(self.identity, sealed)
        except ValueError as exc:
            self._count("escrow_does_not_open")
            log.error("miner %s: trial %s: %s's escrow share for this miner: %s", self.me, trial_id, party, exc)
            return None
        x = rules.escrow_holders(trial, party).index(self.me) + 1
        return te.TrialRecover(trial_id=trial_id, party=party, x=x, y=te.share_bytes(y), ts=_now_ms())

    def _unblind_key(self, trial: dict[str, Any], leaf: int, state: State) -> te.TrialUnblindKey | None:
        trial_id = trial["trial_id"]
        unblinding = trial["unblindings"][str(leaf)]
        seed = self._seed(trial_id)
        if seed is None:
            return None
        # Its keys of every candidate block: the real one follows from every committer's sizes key together,
        # which only the investigator holds (docs/trials.md, "Emergency unblinding").
        keys = te.release_unblind_keys(seed, trial_id, alloc.Design.model_validate(trial["design"]),
                                       unblinding["stratum"], int(unblinding["position"]))
        investigator = state.table("parties").get(unblinding["investigator"])
        if investigator is None:
            log.error("miner %s: the investigator %s of the unblinding at leaf %d of trial %s is not a registered "
                      "party", self.me, unblinding["investigator"], leaf, trial_id)
            return None
        return te.TrialUnblindKey(trial_id=trial_id, unblinding=leaf,
                                  sealed=te.seal_unblind_keys(bytes(investigator["pk"]), keys), ts=_now_ms())

    # -- escrow shares sealed to this miner ---------------------------------------------------------------------

    def _keep_escrow(self, state: State, first: int, entries: Sequence[bytes]) -> None:
        """Remember the escrow share sealed to this miner in every accepted `trial.commit` among `entries` (the
        leaf a trial's commitment record names: refused commits are never kept)."""
        kept = False
        for offset, raw in enumerate(entries):
            share = self._share_in(state, first + offset, raw)
            if share is None:
                continue
            trial_id, party, sealed = share
            with self._lock:
                self._jobs.escrow.setdefault(trial_id, {})[party] = sealed.hex()
            kept = True
        if kept:
            with self._lock:
                self._jobs.save()

    def _share_in(self, state: State, index: int, raw: bytes) -> tuple[str, str, bytes] | None:
        """(trial id, committer, the share sealed to this miner) when leaf `index` is an accepted commitment of a
        trial this miner labels, else None."""
        try:
            entry = Entry.decode(raw)
            if entry.type != TRIAL_COMMIT:
                return None
            msg = envelope.parse(entry.cose)
            commit = te.TrialCommit.model_validate(msg.payload)
        except (EntryError, envelope.EnvelopeError, ValueError):
            return None
        trial = rules.trial_record(state, commit.trial_id)
        if trial is None or self.me not in trial["labellers"]:
            return None
        record = trial["commitments"].get(msg.kid)
        if record is None or record["at"] != index or self.me not in commit.escrow:
            return None
        return commit.trial_id, msg.kid, commit.escrow[self.me]

    def _escrow_of(self, trial: dict[str, Any], party: str) -> bytes | None:
        """The share of `party`'s seed sealed to this miner: kept from the cosigned commit, else read from the
        whole cosigned tree (a miner that joined from a snapshot after the commit)."""
        trial_id = trial["trial_id"]
        with self._lock:
            kept = self._jobs.escrow.get(trial_id, {}).get(party)
        if kept is not None:
            return bytes.fromhex(kept)
        leaves = self._leaves()
        at = trial["commitments"][party]["at"]
        if leaves is None or at >= len(leaves):
            return None
        state = self._state()
        share = self._share_in(state, at, leaves[at])
        return None if share is None else share[2]

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1


def _now_ms() -> int:
    return int(time.time() * 1000)

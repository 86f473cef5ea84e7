"""A miner runs the data-market work of the studies it aggregates by itself (docs/market.md).

Nobody starts an aggregator by hand: a miner with `miner.mpc_listen` set reads from its own replayed contract
state (the `ContractWitness` it cosigns with) what its studies need next, and does it:

- **result**: a study it aggregates is open, its contributions are closed (attested time ≥ closes_ms) and all
  final (`miners.final_size(state) > max(contributions)`: the rules refuse a result before) and it has not
  posted its result: it runs its MPyC party (`python -m chain_miner.aggregator`) with the others;
- **sample**: a study is answered and not yet sampled, and the latest `checkpoint.final` the ledger recorded
  is after the decision: it signs and sends the `study.sample` that fixes the audit sample. Every aggregator
  of the study sends one (the rules take the first and refuse the others as already sampled), so one
  aggregator that is down does not hold the audit up; which note qualifies is fixed by the rules, so the
  senders all name the same one, or a later one;
- **audit**: a sampled study's sampled contributions are all disclosed (or the audit window is about to end
  with some disclosed) and it has not posted its verdicts on them: it runs the audit MPC
  (`python -m chain_miner.aggregator --audit`) over leaves fetched from the log and proven against the tree
  it cosigned.

`due` is the decision, a pure function of the contract state (sans-IO, like `Witness`); `StudyRunner` is the
shell: fed by the miner service after each cosignature (`after_cosign`, on the service's thread, which also
fetches the audit's leaves: the proof channel is the service's), it runs each job on a thread of its own, one
at a time, in `due`'s order (the same on every aggregator: one MPyC party per miner listens on
`mpc_listen`). The inputs document goes to a 0600 file in DATA_DIR/studies/, the parties' addresses come from
the aggregators' signed hellos (their `mpc` address and `mpc_cert` certificate: the computation runs over
mutually authenticated TLS, chain_miner.mpc_tls), results and verdicts go to the bridge over the miner's
aggregator login (`--publish --credentials`), every computation is bounded by `miner.mpc_timeout_s`, and
every job runs at most once: DATA_DIR/studies/jobs.json remembers the jobs done and how often each failed
(a failed job is tried again at the next cosignature, up to MAX_ATTEMPTS times, each failure logged loudly).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from carechain.checkpoint import Checkpoint as CheckpointBody
from carechain.checkpoint import CheckpointError, NoteError, parse_note
from carechain.config import BrokerConfig
from carechain.entries import CHECKPOINT_FINAL, Entry, EntryError
from carechain.files import PRIVATE_DIR, write_atomic
from carechain.identity import Identity
from chain_miner.jobs_file import JOBS_FILE, MAX_ATTEMPTS, JobsFile
from chain_miner.mpc_tls import (
    MpcTls,
    MpcTlsError,
    check_certificate,
    remove_party_files,
    write_party_files,
)
from contract_rules import miners as miner_rules
from contract_rules.market import STUDIES
from contract_rules.runtime import State

__all__ = ["AUDIT_LATE_MS", "JOBS_FILE", "MAX_ATTEMPTS", "Job", "StudyRunner", "due", "note_size"]

log = logging.getLogger("carechain.miner")

JobKind = Literal["result", "sample", "audit"]
# With some sampled contributions still undisclosed, the aggregators audit the disclosed ones this long before
# the audit window ends (attested time): a verdict after the window is refused.
AUDIT_LATE_MS = 3_600_000


@dataclass(frozen=True)
class Job:
    """One piece of a study's work for one aggregator. `contributions`: for an audit, the disclosed sampled
    contributions it judges (part of its `key`: a later disclosure is another audit)."""

    kind: JobKind
    study_id: str
    index: int  # this miner's place among the study's aggregators
    aggregators: tuple[str, ...]
    contributions: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """What the jobs file remembers it by."""
        base = f"{self.kind}:{self.study_id}"
        return base + ":" + ",".join(map(str, self.contributions)) if self.kind == "audit" else base


def note_size(note: str) -> int | None:
    """The tree size of a checkpoint note, or None when it is not one."""
    try:
        return CheckpointBody.parse(parse_note(note)[0]).tree_size
    except (NoteError, CheckpointError):
        return None


def due(state: State, me: str, now_ms: int | None, latest_final_note: str | None) -> list[Job]:
    """The jobs miner `me` has now in `state`, in the order every aggregator runs them (study id, then result,
    sample, audit).

    `now_ms`: the attested time of `state` (`contract_rules.clock.attested_ms`: what the rules judge on; None
    before any attestation, when nothing time-bound is due). `latest_final_note`: the note of the last
    `checkpoint.final` in `state` (None: no sample is due). Only what the rules would accept is due; the
    jobs this miner already did are the caller's to skip (`Job.key`)."""
    final = miner_rules.final_size(state)
    jobs: list[Job] = []
    for study_id in sorted(state.table(STUDIES)):
        study = state.table(STUDIES)[study_id]
        aggregators = tuple(study["aggregators"])
        if me not in aggregators:
            continue
        place = aggregators.index(me)
        contributions = study["contributions"]
        if (study["state"] == "open" and now_ms is not None and now_ms >= study["closes_ms"]
                and me not in study["results"] and (not contributions or final > max(contributions))):
            jobs.append(Job("result", study_id, place, aggregators))
        if study["state"] != "answered" or study["closed_at"] is not None or "audit" not in study:
            continue  # (a ledger whose rules predate the audit keeps no "audit" in its studies)
        audit = study["audit"]
        if audit is None:
            if (latest_final_note is not None and final > study["decided"]["at"]
                    and note_size(latest_final_note) == final):
                jobs.append(Job("sample", study_id, place, aggregators))
            continue
        audit_job = _audit_due(audit, me, now_ms)
        if audit_job:
            jobs.append(Job("audit", study_id, place, aggregators, audit_job))
    return jobs


def _audit_due(audit: dict[str, Any], me: str, now_ms: int | None) -> tuple[int, ...]:
    """The disclosed sampled contributions `me` should judge now, or () when no audit is due."""
    if now_ms is None or now_ms >= audit["window_ends_ms"]:
        return ()
    disclosed = tuple(sorted(int(i) for i in audit["disclosed"]))
    if not disclosed:
        return ()
    everything = len(disclosed) == len(audit["sample"])
    if not everything and now_ms < audit["window_ends_ms"] - AUDIT_LATE_MS:
        return ()  # wait for the others: one audit MPC for the whole sample
    verdicts = audit["verdicts"]
    if all(me in verdicts.get(str(i), {}) for i in disclosed):
        return ()
    return disclosed


# -- the shell ------------------------------------------------------------------------------------------------

@dataclass
class _Ready:
    """A job with what it needs, handed from the service's thread to the runner's."""

    job: Job
    inputs: dict[str, Any] | None = None  # the aggregator's --inputs document (result, audit)
    note: str | None = None  # the seed checkpoint (sample)


@dataclass
class _StudyJobs(JobsFile):
    """DATA_DIR/studies/jobs.json: the study jobs, and the latest final checkpoint note seen."""

    KIND = "study"

    note: str | None = None  # the latest checkpoint.final note seen

    def read_own(self, raw: Mapping[str, Any]) -> None:
        note = raw.get("note")
        self.note = note if isinstance(note, str) else None

    def own_fields(self) -> dict[str, Any]:
        return {"note": self.note}


def job_port_offset(job: Job, ports: int) -> int:
    """Where above a miner's `mpc_listen` port the MPC of `job` listens: the same on every aggregator, from the
    job's kind and study id (SHA-256, so studies spread over the `ports` ports)."""
    digest = hashlib.sha256(f"{job.kind}:{job.study_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % ports


class StudyRunner:
    """Runs the studies' jobs of one miner (see the module docstring). Built by `chain_miner.assembly` when
    `miner.mpc_listen` is set; the service calls `after_cosign`, `on_hello`, `start` and `stop`."""

    def __init__(self, data_dir: Path, identity: Identity, key_file: Path, mpc_listen: str,
                 broker: BrokerConfig, state: Callable[[], State], genesis: Any,
                 leaves: Callable[[], list[bytes] | None], *, timeout_s: float = 300.0,
                 publish: Callable[[BrokerConfig, str, bytes], None] | None = None, mpc_ports: int = 64,
                 plaintext_with_older_peers: bool = False) -> None:
        """`broker`: the miner's broker settings with the aggregator login as its credentials (see
        `chain_miner.assembly`); `state`: the cosigned contract state; `leaves`: the whole cosigned tree's
        leaves, proven against its root (None when the log did not serve them)."""
        self.dir = Path(data_dir) / "studies"
        self.identity = identity
        self.me = identity.device_id
        self.key_file = Path(key_file)
        self.mpc_listen = mpc_listen
        self.mpc_ports = mpc_ports  # each job listens on mpc_listen's port + job_port_offset (below mpc_ports)
        self.broker = broker
        self._state = state
        self.genesis = genesis
        self._leaves = leaves
        self.timeout_s = timeout_s
        self._publish_entry = publish
        self._data_dir = Path(data_dir)
        self.tls = MpcTls.load_or_create(data_dir)  # this miner's MPC certificate, announced in its hello
        self.plaintext_with_older_peers = plaintext_with_older_peers  # miner.mpc_plaintext_with_older_peers
        # miner id → its signed hello's MPC address and certificate
        self.peers: dict[str, tuple[str, str | None]] = {self.me: (mpc_listen, self.tls.cert_pem)}
        self.stats: dict[str, int] = {}
        self._jobs = _StudyJobs.load(self.dir)
        self.latest_final_note: str | None = self._jobs.note
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[_Ready | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    # -- fed by the service ---------------------------------------------------------------------------------

    def on_hello(self, miner: str, mpc: str | None, mpc_cert: str | None = None) -> None:
        """A verified hello of `miner` (`mpc` None: it left, or does not aggregate)."""
        with self._lock:
            if mpc is None:
                self.peers.pop(miner, None)
            else:
                self.peers[miner] = (mpc, mpc_cert)
            if miner == self.me:
                self.peers[self.me] = (self.mpc_listen, self.tls.cert_pem)

    def renew_tls(self, now: datetime.datetime | None = None) -> bool:
        """Replace the MPC certificate when it ends within `mpc_tls.RENEW_DAYS` (a miner that runs for most of a
        year); True when it did: the service then announces the new one in a new hello."""
        if not self.tls.due_for_renewal(now):
            return False
        tls = MpcTls.load_or_create(self._data_dir, now)
        with self._lock:
            self.tls = tls
            self.peers[self.me] = (self.mpc_listen, tls.cert_pem)
        log.info("miner %s: renewed its MPC certificate (valid until %s)", self.me, f"{tls.expires:%Y-%m-%d}")
        return True

    def after_cosign(self, entries: Sequence[bytes]) -> list[Job]:
        """After the contract state took `entries` (cosigned or replayed): note the latest recorded final
        checkpoint, and queue what is due and not done. The jobs queued now."""
        from contract_rules.clock import attested_ms  # noqa: PLC0415

        state = self._state()
        self._note_final(entries, state)
        queued = []
        for job in due(state, self.me, attested_ms(state), self.latest_final_note):
            with self._lock:
                skip = job.key in self._queued or not self._jobs.may_run(job.key)
            if skip:
                continue
            ready = self._prepare(job, state)
            if ready is None:
                continue
            with self._lock:
                self._queued.add(job.key)
            self._work.put(ready)
            queued.append(job)
        return queued

    def _note_final(self, entries: Sequence[bytes], state: State) -> None:
        """Keep the note of the last `checkpoint.final` among `entries` that the rules took (its size is the
        state's final size: a record the rules voided never replaces the one before)."""
        from carechain import envelope  # noqa: PLC0415

        final = miner_rules.final_size(state)
        for raw in reversed(entries):
            try:
                entry = Entry.decode(raw)
                note = envelope.parse(entry.cose).payload["note"] if entry.type == CHECKPOINT_FINAL else None
            except (EntryError, envelope.EnvelopeError, KeyError, TypeError):
                continue
            if not isinstance(note, str) or note_size(note) != final:
                continue
            if note != self.latest_final_note:
                self.latest_final_note = note
                with self._lock:
                    self._jobs.note = note  # kept: a restart from a contract snapshot replays no older leaf
                    self._jobs.save()
            return

    def _prepare(self, job: Job, state: State) -> _Ready | None:
        """What `job` needs from the ledger, read now on the service's thread; None: not now (logged)."""
        if job.kind == "sample":
            return _Ready(job, note=self.latest_final_note)
        if job.kind == "result":
            from chain_miner.aggregator import inputs_from_state  # noqa: PLC0415

            return _Ready(job, inputs=inputs_from_state(state, job.study_id))
        leaves = self._leaves()
        if leaves is None:
            self._count("audit_leaves_unavailable")
            log.warning("miner %s: could not fetch the log's leaves proven against the cosigned tree for the "
                        "audit of study %s; trying again at the next checkpoint", self.me, job.study_id)
            return None
        from chain_miner.aggregator import audit_inputs_from_leaves  # noqa: PLC0415

        inputs: dict[str, Any] = audit_inputs_from_leaves(self.genesis, leaves, job.study_id)
        return _Ready(job, inputs=inputs)

    # -- the runner thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"studies-{self.me}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._work.put(None)
        current = self._current
        if current is not None and current.poll() is None:
            current.terminate()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stopping.is_set():
            ready = self._work.get()
            if ready is None:
                return
            key = ready.job.key
            try:
                ok = self._execute(ready)
            except Exception:  # a job must never take the runner down; the next one still runs
                log.exception("miner %s: study job %s crashed", self.me, key)
                ok = False
            with self._lock:
                self._queued.discard(key)
                if ok:
                    self._jobs.succeeded(key)
                elif not self._stopping.is_set():
                    self._jobs.failed_once(key, self.me)
                self._jobs.save()
            self._count("jobs_done" if ok else "jobs_failed")

    def _execute(self, ready: _Ready) -> bool:
        job = ready.job
        if job.kind == "sample":
            return self._sample(job, ready.note)
        found = self._peers(job)
        if found is None:
            return False
        peers, certificates = found  # certificates None: in the clear, with older peers (rolling upgrade)
        assert ready.inputs is not None
        inputs_file = self.dir / f"{job.kind}-{job.study_id}.inputs.json"
        write_atomic(inputs_file, json.dumps(ready.inputs).encode())  # 0600: sealed shares, study data
        broker_file = self._broker_file()
        out = self.dir / f"{job.kind}-{job.study_id}.out.json"
        work = self.dir / "mpc" / f"{job.kind}-{job.study_id}"
        if certificates is not None:
            write_party_files(work, job.index, self.tls, certificates)
        command = [sys.executable, "-m", "chain_miner.aggregator", "--study", job.study_id, "--index",
                   str(job.index), "--peers", ",".join(peers), "--key", str(self.key_file), "--inputs",
                   str(inputs_file), "--out", str(out), "--publish", "--config", str(broker_file),
                   *(["--mpc-tls", str(work)] if certificates is not None else ["--plaintext"])]
        if job.kind == "audit":
            command.append("--audit")
        log.info("miner %s: running the %s MPC of study %s as party %d of %d", self.me, job.kind, job.study_id,
                 job.index, len(peers))
        started = time.monotonic()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")) if p)}
        try:
            process = subprocess.Popen(command, cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
        except OSError:
            remove_party_files(work)
            raise
        self._current = process
        try:
            output, _ = process.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            log.error("miner %s: the %s MPC of study %s did not finish within miner.mpc_timeout_s=%.0f s (are the "
                      "other aggregators %s up?); stopped:\n%s", self.me, job.kind, job.study_id, self.timeout_s,
                      ", ".join(a for a in job.aggregators if a != self.me), _tail(output))
            return False
        finally:
            self._current = None
            remove_party_files(work)
        if process.returncode != 0 and self._stopping.is_set():
            log.info("miner %s: the %s MPC of study %s stopped with the miner", self.me, job.kind, job.study_id)
            return False
        if process.returncode != 0:
            log.error("miner %s: the %s MPC of study %s failed (exit %d):\n%s", self.me, job.kind, job.study_id,
                      process.returncode, _tail(output))
            return False
        log.info("miner %s: %s of study %s computed and sent in %.1f s", self.me, job.kind, job.study_id,
                 time.monotonic() - started)
        return True

    def _sample(self, job: Job, note: str | None) -> bool:
        from contract_rules import transactions as ce  # noqa: PLC0415

        assert note is not None
        payload = ce.StudySample(v=1, study_id=job.study_id, seed_checkpoint=note,
                                 ts=int(time.time() * 1000))
        entry = ce.signed(self.identity, ce.STUDY_SAMPLE, payload)
        try:
            self._publish(entry.encode())
        except (TimeoutError, OSError, ValueError) as exc:
            log.error("miner %s: could not send the audit sample of study %s: %s", self.me, job.study_id, exc)
            return False
        log.info("miner %s: sent the audit sample of study %s (seed checkpoint of %s leaves)", self.me,
                 job.study_id, note_size(note))
        return True

    def _publish(self, entry: bytes) -> None:
        if self._publish_entry is not None:
            self._publish_entry(self.broker, self.me, entry)
            return
        from chain_miner.aggregator import publish_entries  # noqa: PLC0415

        publish_entries(self.broker, self.me, entry)

    def _peers(self, job: Job) -> tuple[list[str], list[str] | None] | None:
        """Every aggregator's MPC address for `job` and its MPC certificate, in the study's order: the host of its
        signed hello and that port plus `job_port_offset`, and the certificate that hello carries; None when one
        is missing or unusable (logged). The certificates are None — the computation runs in the clear — only
        when some aggregators announce none (older miners) and `plaintext_with_older_peers` allows it.

        One port per job, not per miner: aggregators reach a job at slightly different times, so a party of
        one study may knock on a miner still computing another; on the job's own port it is refused (MPyC
        retries) instead of joining — and corrupting — the running computation."""
        with self._lock:
            peers = [self.peers.get(a) for a in job.aggregators]
        missing = [a for a, p in zip(job.aggregators, peers, strict=True) if p is None]
        if missing:
            log.error("miner %s: cannot run the %s MPC of study %s: no MPC address in the hello of aggregator(s) "
                      "%s (down, or without miner.mpc_listen)", self.me, job.kind, job.study_id, ", ".join(missing))
            return None
        offset = job_port_offset(job, self.mpc_ports)
        addresses, certificates, older = [], [], []
        for miner, (address, cert) in zip(job.aggregators, (p for p in peers if p is not None), strict=True):
            host, _, port = address.rpartition(":")
            if int(port) + offset > 65_535:
                log.error("miner %s: cannot run the %s MPC of study %s: %s + %d is beyond the last TCP port", self.me,
                          job.kind, job.study_id, address, offset)
                return None
            addresses.append(f"{host}:{int(port) + offset}")
            if cert is None:
                older.append(miner)
                continue
            try:
                check_certificate(cert)
            except MpcTlsError as exc:
                log.error("miner %s: cannot run the %s MPC of study %s: aggregator %s announces no usable MPC "
                          "certificate (%s)", self.me, job.kind, job.study_id, miner, exc)
                return None
            certificates.append(cert)
        if not older:
            return addresses, certificates
        if not self.plaintext_with_older_peers:
            log.error("miner %s: cannot run the %s MPC of study %s: the hello of aggregator(s) %s carries no MPC "
                      "certificate (miners older than MPC over TLS): upgrade them, or set "
                      "miner.mpc_plaintext_with_older_peers for the rolling upgrade", self.me, job.kind,
                      job.study_id, ", ".join(older))
            return None
        log.warning("miner %s: running the %s MPC of study %s IN THE CLEAR: aggregator(s) %s announce no MPC "
                    "certificate and miner.mpc_plaintext_with_older_peers is set", self.me, job.kind, job.study_id,
                    ", ".join(older))
        return addresses, None

    def _broker_file(self) -> Path:
        """The broker section the aggregator publishes with: the miner's broker, logged in as its aggregator.
        Only a credentials file is written, never a password."""
        b = self.broker
        section: dict[str, Any] = {"host": b.host, "port": b.port, "keepalive_s": b.keepalive_s,
                                   "max_packet_bytes": b.max_packet_bytes}
        for name in ("tls_ca", "tls_cert", "tls_key", "credentials_file"):
            value = getattr(b, name)
            if value is not None:
                section[name] = str(value)
        path = self.dir / "aggregator-broker.json"
        write_atomic(path, json.dumps({"broker": section}).encode())
        return path

    def done(self) -> set[str]:
        """The keys of the jobs this miner did."""
        with self._lock:
            return set(self._jobs.done)

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1


def _tail(output: bytes, chars: int = 3000) -> str:
    return output.decode(errors="replace")[-chars:]

"""The owner's side of storage over MQTT: put, get, update, audit and status of a dataset on miners.

A thin shell around the sans-IO core (`manifest.plan_put`/`plan_update`, `codec.check_share`/`decode_segment`,
`audit.draw_challenges`/`verify_answer`): it sends CBOR requests to `cc/v1/store/{miner}/req`, matches the
answers on `…/resp` by correlation id, and keeps a bounded number of requests in flight. The planned manifest
and the dataset key are written (0600, atomically) *before* any share is uploaded, as docs/storage.md requires
(an abandoned plan's revision is never planned again, so AES-GCM nonces never repeat).

Evidence anyone can re-check (docs/storage.md): every fetch is a `RetrievalRequest` signed with the client's
key (`identity`) for one miner, and the miner's answer carries its signed `RetrievalAnswer` (the request's
hash, the share root it served, the hash of the bytes); each pair is a `Retrieval`, appended and fsynced to
`RECORD_DIR/retrievals.jsonl` before `get` returns, so a restart loses none, and `retrieval_entries` turns
them into `storage.retrieval` ledger entries. An audit sends the epoch and seed with the challenges and
keeps each miner's signed `AuditAnswer`; `audit_entry` draws the challenges the rules draw
(`carechain.storage.attestations.challenges_for`) and builds the `storage.audit` v2 entry from the answers.
The seed comes only from a checkpoint this client found final against the ledger (`verified_seed`: signed by
a genesis operator key and cosigned by a majority of the ledger's *active* miners), never on the bridge's word.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from carechain import cbor, entries, envelope, topics
from carechain.checkpoint import parse_note
from carechain.config import BrokerConfig
from carechain.entries import Entry
from carechain.files import PRIVATE, private_dir, write_atomic
from carechain.identity import Identity, device_id_for
from carechain.seed import checkpoint_seed
from carechain.storage.attestations import (
    AUDIT_CHALLENGES,
    AttestationError,
    AuditChallenge,
    RetrievalAnswer,
    challenges_digest,
    challenges_for,
    parse_retrieval_answer,
    request_id,
    retrieval_request,
    verify_store_receipt,
    wire_challenges,
)
from carechain.storage.audit import Answer, Challenge, ShareRef, draw_challenges, verify_answer
from carechain.storage.codec import (
    CorruptShareError,
    DatasetKey,
    EncodedSegment,
    StorageError,
    StorageParams,
    check_share,
    decode_segment,
)
from carechain.storage.keyfile import new_dataset_key, save_dataset_key
from carechain.storage.manifest import Manifest, SegmentRecord, ShareRecord, plan_put, plan_update
from carechain.transport import connect_client
from contract_rules.miners import active_miners, verify_final_note
from contract_rules.miners import count as count_events
from contract_rules.runtime import State
from contract_rules.storage_v2 import epoch_final

# (phase, done, total): phase is "put", "get", "update" or "audit"; done/total in bytes (or requests).
Progress = Callable[[str, int, int], None]
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WINDOW = 16  # requests in flight: enough to fill a link, few enough to bound memory
DEFAULT_CHALLENGES = 16  # per miner per audit from the CLI; the daily schedule uses audit.AuditSchedule
MAX_AUDIT_ANSWER_BYTES = 64 << 20  # a signed audit answer: c chunks and their proofs (~700 KiB by default)
RETRIEVALS_FILE = "retrievals.jsonl"
Receipts = dict[tuple[int, int, int], bytes]  # (segment, version, share) → the holder's store receipt


class TransferError(StorageError):
    """Shares that could not be stored or fetched; the message names the miners and what they said."""


class SeedRefused(TransferError):
    """A checkpoint that is not final against the ledger: no placement or audit is seeded from it."""


@dataclass(frozen=True)
class MinerAudit:
    """One miner's audit verdict: passed only if every challenge was answered with a valid proof."""

    miner: str
    passed: bool
    challenges: int
    failed: int
    reasons: tuple[str, ...]  # the first few failures, for the owner to read
    attestation: bytes | None = None  # the miner's signed AuditAnswer (COSE), when it sent a valid one


@dataclass(frozen=True)
class Retrieval:
    """One fetch: the signed request, the miner's signed answer (None: no valid answer), and whether the
    share it served was intact (its signed root is the recorded one and the bytes match it)."""

    miner: str
    request: bytes
    answer: bytes | None
    ok: bool


@dataclass(frozen=True)
class SegmentStatus:
    index: int
    version: int
    live: tuple[int, ...]  # share indexes whose miner proved it holds the share just now
    k: int
    n: int

    @property
    def readable(self) -> bool:
        return len(self.live) >= self.k


@dataclass(frozen=True)
class UpdateResult:
    manifest: Manifest
    segments: tuple[int, ...]  # indexes re-encoded and uploaded
    bytes_sent: int  # share bytes uploaded


@dataclass
class _Job:
    miner: str
    fields: dict[str, Any]
    size: int = 0  # bytes this job moves, for progress
    future: Future[dict[str, Any] | None] = field(default_factory=Future)
    sent_at: float = 0.0


def key_path(manifest_path: Path) -> Path:
    """Where the dataset key of a manifest file lives: next to it, `NAME.key` (mode 0600)."""
    return Path(manifest_path).with_suffix(".key")


def save_manifest(manifest: Manifest, path: Path) -> None:
    write_atomic(Path(path), manifest.model_dump_json(indent=1).encode(), PRIVATE)


def load_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(Path(path).read_bytes())
    except ValueError as e:
        raise StorageError(f"{path}: not a carechain storage manifest ({e})") from None


def receipts_path(manifest_path: Path) -> Path:
    """Where the store receipts of a manifest's uploads live: next to it, `NAME.receipts.json` (mode 0600)."""
    path = Path(manifest_path)
    return path.with_name(path.name + ".receipts.json")


def save_receipts(receipts: Mapping[tuple[int, int, int], bytes], path: Path) -> None:
    """Store receipts as JSON [[segment, version, share, receipt hex], …] (what `store commit --receipts` reads)."""
    rows = [[seg, ver, share, receipts[(seg, ver, share)].hex()] for seg, ver, share in sorted(receipts)]
    write_atomic(Path(path), json.dumps(rows).encode(), PRIVATE)


def load_receipts(path: Path) -> Receipts:
    """The receipts `save_receipts` wrote ({} if there is no such file)."""
    try:
        rows = json.loads(Path(path).read_bytes())
        return {(int(seg), int(ver), int(share)): bytes.fromhex(sig) for seg, ver, share, sig in rows}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError) as e:
        raise StorageError(f"{path}: not a list of [segment, version, share, receipt hex] ({e})") from None


def seed_from_final_checkpoint(note: bytes | str) -> bytes:
    """The storage seed of a checkpoint note, *unchecked*: for the bridge, which counted the note's
    cosignatures itself. A party that takes the note from the broker uses `verified_seed`."""
    body, sigs = parse_note(note)
    return checkpoint_seed(body, [s.signature for s in sigs])


def verified_seed(note: bytes | str, state: State) -> bytes:
    """The storage seed of `note` if it is final against `state`: signed by a genesis operator key and cosigned
    by a majority of the ledger's active miners (`contract_rules.miners.verify_final_note`); else SeedRefused."""
    text = note.decode("utf-8", errors="replace") if isinstance(note, bytes) else note
    seed = verify_final_note(state, text)
    if isinstance(seed, str):
        raise SeedRefused(f"checkpoint refused as a seed ({seed}): it needs the log's signature and cosignatures "
                          "of a majority of the ledger's active miners; wait for a final one, or pass --seed HEX")
    return seed


class StorageClient:
    """An owner's connection to the storage miners. Use as a context manager."""

    def __init__(self, broker: BrokerConfig, client_id: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 window: int = DEFAULT_WINDOW, progress: Progress | None = None, identity: Identity | None = None,
                 record_dir: Path | None = None, ledger: Callable[[], State] | None = None) -> None:
        """`identity` signs retrieval requests and the entries this client files (default: a fresh key, whose
        requests no one can hold against a miner); `record_dir` keeps the retrieval records across restarts;
        `ledger` gives the ledger state that the seed's checkpoint is checked against."""
        self.timeout = timeout
        self.window = window
        self.progress = progress
        self.identity = identity or Identity.generate()
        self.ledger = ledger
        self.bytes_sent = 0  # share bytes uploaded by this client
        self._records = _RetrievalFile(Path(record_dir) / RETRIEVALS_FILE) if record_dir is not None else None
        self.retrieval_log: list[Retrieval] = self._records.load() if self._records else []
        self.hellos: dict[str, dict[str, Any]] = {}  # miner id -> its verified, signed hello
        self.final_note: bytes | None = None
        self._pending: dict[bytes, _Job] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._client = connect_client(
            broker, client_id or f"store-owner-{os.urandom(4).hex()}", on_message=self._on_message,
            connected=self._connected,
            subscriptions=[(topics.STORE_RESPONSE_WILDCARD, 1), (topics.STORE_HELLO_WILDCARD, 1),
                           (topics.FINAL_CHECKPOINT, 1)])
        if not self._connected.wait(30):
            self.close()
            raise TransferError(f"broker {broker.address} not reachable in 30 s; is it running?")

    def __enter__(self) -> StorageClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # -- discovery -------------------------------------------------------------------------------------

    def discover(self, settle_s: float = 1.0) -> list[str]:
        """Miners that announced themselves (retained hello), after waiting `settle_s` for announcements."""
        time.sleep(settle_s)
        with self._lock:
            return sorted(self.hellos)

    def seed(self, settle_s: float = 1.0) -> bytes:
        """The storage seed of the latest final checkpoint on the broker, checked against the ledger."""
        if self.ledger is None:
            raise SeedRefused("cannot check the final checkpoint's cosignatures without the ledger (the client has "
                              "no ledger replica); pass --seed HEX")
        deadline = time.monotonic() + settle_s
        while self.final_note is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.final_note is None:
            raise TransferError("no final checkpoint on the broker (cc/v1/log/final); start the bridge and miners "
                                "or pass --seed HEX")
        return verified_seed(self.final_note, self.ledger())

    # -- evidence --------------------------------------------------------------------------------------

    @property
    def retrievals(self) -> list[tuple[str, bool]]:
        """Every fetch as (miner, answered with an intact share), oldest first."""
        return [(r.miner, r.ok) for r in self.retrieval_log]

    def retrieval_entries(self, start: int = 0) -> list[Entry]:
        """`storage.retrieval` entries for the recorded fetches from `start` on (an index into
        `retrieval_log`; the caller keeps where it filed up to) that this client's key requested, signed
        with it: an answered one is the miner's proof of service, an unanswered one the charge against it."""
        out = []
        for r in self.retrieval_log[start:]:
            if envelope.parse(r.request).kid == self.identity.device_id:
                out.append(Entry(entries.STORAGE_RETRIEVAL, envelope.sign(
                    self.identity, {"v": 1, "request": r.request, "answer": r.answer})))
        return out

    def audit_entry(self, state: State, note: str, epoch: int, challenges: int | None = None
                    ) -> tuple[Entry | None, dict[str, MinerAudit]]:
        """Audit every active miner not yet audited in `epoch` with the challenges the rules draw from `note`'s
        seed (final against `state`, else SeedRefused), and the `storage.audit` v2 entry, signed with this
        client's key, recording each miner's signed answer; with the verdicts as judged here.

        The rules refuse a whole entry that names a miner already audited this epoch, or a null answer (no
        answer: a failed audit) from anyone but the operator; so those miners are left out, and a miner that
        sent no valid answer is recorded as null only when this client's key is a genesis operator's. The
        entry is None when no answer is left to file."""
        final = epoch_final(state, note)
        if isinstance(final, str):
            raise SeedRefused(f"audit seed checkpoint refused ({final}): it needs the log's signature and "
                              "cosignatures of a majority of the ledger's active miners, in the current epoch")
        count = AUDIT_CHALLENGES if challenges is None else challenges
        due = [m for m in active_miners(state) if not any(count_events(state, epoch, kind, m)
                                                          for kind in ("audit_passed", "audit_failed"))]
        drawn = {m: challenges_for(state, final.seed, m, count, as_of=final.size) for m in due}
        verdicts = self._challenge({m: c for m, c in drawn.items() if c}, epoch, final.seed)
        operator = self.identity.device_id in state.operators
        answers = {m: verdicts[m].attestation for m in sorted(verdicts)
                   if verdicts[m].attestation is not None or operator}
        if not answers:
            return None, verdicts
        payload = {"v": 2, "epoch": epoch, "seed_checkpoint": note, "answers": answers}
        return Entry(entries.STORAGE_AUDIT, envelope.sign(self.identity, payload)), verdicts

    # -- operations ------------------------------------------------------------------------------------

    def put(self, data: bytes | Path, miners: Iterable[str], seed: bytes, manifest_path: Path, *,
            owner: str = "owner", dataset_id: str | None = None, params: StorageParams | None = None) -> Manifest:
        """Store `data` (bytes or a file) on `miners`: persist key and manifest, then upload every share.

        Every share must come back with its miner's store receipt; the receipts are saved (0600) in
        `receipts_path(manifest_path)` for the `storage.commit` (`storage_v2.commit_for`, `store commit`)."""
        if isinstance(data, Path):
            dataset_id = dataset_id or f"{data.name}-{os.urandom(4).hex()}"
            data = data.read_bytes()
        key = new_dataset_key(dataset_id or f"dataset-{os.urandom(8).hex()}")
        plan = plan_put(key, owner, data, miners, seed, params)
        save_dataset_key(key, key_path(manifest_path))
        save_manifest(plan.manifest, manifest_path)
        receipts = self._upload(plan.manifest, plan.manifest.segments, plan.upload, "put")
        save_receipts(receipts, receipts_path(manifest_path))
        return plan.manifest

    def update(self, manifest: Manifest, key: DatasetKey, new: bytes, miners: Iterable[str], seed: bytes,
               manifest_path: Path) -> UpdateResult:
        """Upload only the segments of `new` that changed, then delete the versions they replace."""
        plan = plan_update(manifest, key, new, miners, seed)
        save_manifest(plan.manifest, manifest_path)  # before any upload: the revision is now spent
        before = self.bytes_sent
        changed = {e.index for e in plan.upload}
        receipts = self._upload(plan.manifest, [s for s in plan.manifest.segments if s.index in changed], plan.upload,
                                "update")
        save_receipts(load_receipts(receipts_path(manifest_path)) | receipts, receipts_path(manifest_path))
        sent = self.bytes_sent - before
        self._run([_Job(sh.miner, {"op": "delete", **_ref_fields(manifest.dataset_id, rec, sh.index)})
                   for rec in plan.manifest.reclaimable for sh in rec.shares], "reclaim")
        done = plan.manifest.reclaimed()
        save_manifest(done, manifest_path)
        return UpdateResult(done, tuple(sorted(changed)), sent)

    def get(self, manifest: Manifest, key: DatasetKey, prefer: Sequence[str] = ()) -> bytes:
        """Fetch k intact shares per segment (in parallel, asking other miners when one fails) and decode.

        Miners in `prefer` are asked first. Every fetch is recorded in `retrievals`.
        """
        params = manifest.params
        first = set(prefer)
        # Shares not yet asked for, per segment; a miner that failed once is asked last in later rounds.
        order = {s.index: sorted(s.shares, key=lambda sh: (sh.miner not in first, sh.index)) for s in manifest.segments}
        silent: set[str] = set()
        intact: dict[int, dict[int, bytes]] = {i: {} for i in order}
        failures: dict[int, list[str]] = {i: [] for i in order}
        total = sum(s.ciphertext_length for s in manifest.segments)
        got = 0
        while True:
            jobs: list[_Job] = []
            for rec in manifest.segments:
                i = rec.index
                want = params.k - len(intact[i]) - sum(1 for j in jobs if j.fields["segment"] == i)
                order[i].sort(key=lambda sh: sh.miner in silent)  # stable: keeps the preference otherwise
                while want > 0 and order[i]:
                    jobs.append(self._fetch_job(manifest, rec, order[i].pop(0)))
                    want -= 1
            if not jobs:
                break
            for job, answer in zip(jobs, self._run(jobs, None), strict=True):
                i, share = job.fields["segment"], job.fields["share"]
                data, why = self._fetched(manifest, job, answer)
                if data is not None:
                    intact[i][share] = data
                    got += job.size
                    if self.progress:
                        self.progress("get", got, total)
                else:
                    failures[i].append(f"{job.miner}: {why}")
                    silent.add(job.miner)
        short = [i for i in order if len(intact[i]) < params.k]
        if short:
            detail = "; ".join(f"segment {i}: {', '.join(failures[i])}" for i in short[:3])
            raise TransferError(f"{len(short)} segment(s) have fewer than k={params.k} intact shares on reachable "
                                f"miners ({detail}); run a repair once the miners are back")
        return b"".join(decode_segment(key, s.layout(), intact[s.index], params) for s in manifest.segments)

    def audit(self, manifest: Manifest, seed: bytes, challenges: int = DEFAULT_CHALLENGES, epoch: int = 0
              ) -> dict[str, MinerAudit]:
        """Challenge every miner holding a share of `manifest` with `challenges` seeded chunks; verdicts, each
        with the miner's signed answer for `epoch`."""
        holdings: dict[str, list[ShareRef]] = {}
        for rec in manifest.segments:
            for sh in rec.shares:
                holdings.setdefault(sh.miner, []).append(ShareRef(
                    manifest.dataset_id, rec.index, rec.version, sh.index, bytes.fromhex(sh.root), sh.length))
        size = manifest.chunk_size
        drawn = {m: [AuditChallenge(c, size) for c in draw_challenges(seed, m, refs, challenges, size)]
                 for m, refs in holdings.items()}
        return self._challenge(drawn, epoch, seed)

    def status(self, manifest: Manifest) -> list[SegmentStatus]:
        """Which shares are live now: each miner proves it holds chunk 0 of each of its shares."""
        drawn: dict[str, list[AuditChallenge]] = {}
        for rec in manifest.segments:
            for sh in rec.shares:
                ref = ShareRef(manifest.dataset_id, rec.index, rec.version, sh.index, bytes.fromhex(sh.root), sh.length)
                drawn.setdefault(sh.miner, []).append(AuditChallenge(Challenge(ref, 0), manifest.chunk_size))
        passed = self._verify(drawn)
        live = {(c.challenge.ref.segment, c.challenge.ref.share) for m in passed for c, ok, _ in passed[m] if ok}
        return [SegmentStatus(r.index, r.version, tuple(sh.index for sh in r.shares if (r.index, sh.index) in live),
                              manifest.k, manifest.n) for r in manifest.segments]

    def ping(self, miners: Iterable[str]) -> set[str]:
        """The miners that answer an empty audit within the timeout (a liveness probe, a few bytes each)."""
        ask = sorted(set(miners))
        answers = self._run([_Job(m, {"op": "audit", "chunk_size": 1, "challenges": []}) for m in ask], None)
        return {m for m, a in zip(ask, answers, strict=True) if a is not None and a.get("ok") is True}

    def repair(self, manifest: Manifest, manifest_path: Path | None, seed: bytes, miners: Iterable[str],
               policy: Any = None, *, last_seen: dict[str, int] | None = None, now: int | None = None,
               active: Sequence[str] | None = None) -> tuple[Manifest, list[Any]]:
        """Regenerate and re-place the shares `repair.plan_repairs` finds lost; (new manifest, tasks done).

        Liveness is measured now: `status` (each holder proves chunk 0 of its shares) and a ping of every
        holder and of `miners` (the candidate targets). A miner that answers is seen at `now`; a share whose
        miner answers but cannot prove it is *failed* (lost at once). A miner that does not answer keeps the
        time in `last_seen` (miner -> unix seconds, updated in place; the CLI keeps it in `NAME.seen.json`),
        and one never recorded is taken as having just gone away, so its grace period starts now: a miner
        briefly offline is *suspect*, not lost, and triggers no repair. Lost shares are rebuilt from k intact
        ones (`codec.regenerate_shares`, no dataset key: byte-identical, same root) and uploaded to the
        targets plan_repairs draws from `seed`: from `active` (default: the active miners of the client's
        `ledger`, if it has one), as a `storage.commit` v2 of the repair requires, else from the online
        miners; never a miner that held a share of the segment. The
        manifest is saved (0600, atomically) once the uploads are confirmed; if some fail, those that
        succeeded are saved and TransferError names the rest.
        """
        from carechain.storage.codec import regenerate_shares
        from carechain.storage.repair import RepairPolicy, apply_repairs, plan_repairs

        policy = policy or RepairPolicy()
        now = int(time.time()) if now is None else now
        seen = last_seen if last_seen is not None else {}
        holders = {sh.miner for rec in manifest.segments for sh in rec.shares}
        pool = holders | set(miners)
        live = {(r.index, i) for r in self.status(manifest) for i in r.live}
        answered = self.ping(pool)
        for m in pool:
            if m in answered:
                seen[m] = now
            else:  # silent now: at best suspect, and its grace period runs from its last answer (or from now)
                seen[m] = min(seen.get(m, now), now - policy.offline_after - 1)
        failed = {(rec.index, sh.index) for rec in manifest.segments for sh in rec.shares
                  if sh.miner in answered and (rec.index, sh.index) not in live}
        if active is None and self.ledger is not None:
            active = active_miners(self.ledger())
        tasks = plan_repairs(manifest, {m: seen[m] for m in pool}, now, seed, policy, failed, active)
        if not tasks:
            return manifest, []
        by_segment: dict[int, list[Any]] = {}
        for t in tasks:
            by_segment.setdefault(t.segment, []).append(t)
        # Fetch k intact shares of each segment to repair: the planned sources first, then any other live one.
        params = manifest.params
        intact: dict[int, dict[int, bytes]] = {i: {} for i in by_segment}
        order = {i: sorted((sh for sh in manifest.segments[i].shares if (i, sh.index) in live),
                           key=partial(_planned_first, by_segment[i][0].sources))
                 for i in by_segment}
        while True:
            jobs = []
            for i in by_segment:
                rec = manifest.segments[i]
                for sh in [order[i].pop(0) for _ in range(min(params.k - len(intact[i]), len(order[i])))]:
                    jobs.append(self._fetch_job(manifest, rec, sh))
            if not jobs:
                break
            for job, answer in zip(jobs, self._run(jobs, "fetch"), strict=True):
                data, _ = self._fetched(manifest, job, answer)
                if data is not None:
                    intact[job.fields["segment"]][job.fields["share"]] = data
        uploads: list[tuple[Any, _Job]] = []
        short = []
        for i, seg_tasks in by_segment.items():
            rec = manifest.segments[i]
            if len(intact[i]) < params.k:
                short.append(i)
                continue
            rebuilt = regenerate_shares(rec.layout(), intact[i], params, [t.share for t in seg_tasks])
            for t in seg_tasks:
                uploads.append((t, _Job(t.target, {"op": "put", **_ref_fields(manifest.dataset_id, rec, t.share),
                                                   "data": rebuilt[t.share], "chunk_size": manifest.chunk_size},
                                        len(rebuilt[t.share]))))
        answers = self._run([j for _, j in uploads], "repair")
        self.bytes_sent += sum(j.size for _, j in uploads)
        receipts: Receipts = {}
        for (t, job), a in zip(uploads, answers, strict=True):
            receipt = _store_receipt(manifest, job, a)
            if receipt is not None:  # the new holder acknowledged the share: the commit must carry this
                receipts[(t.segment, t.version, t.share)] = receipt
        done = [t for t in tasks if (t.segment, t.version, t.share) in receipts]
        repaired = apply_repairs(manifest, done)
        if manifest_path is not None and done:
            save_receipts(load_receipts(receipts_path(manifest_path)) | receipts, receipts_path(manifest_path))
            save_manifest(repaired, manifest_path)
        bad = [f"segment {t.segment} share {t.share} -> {t.target}" for t, _ in uploads if t not in done]
        if bad or short:
            raise TransferError(f"repair incomplete: {len(done)} of {len(tasks)} shares re-placed; not stored: "
                                f"{', '.join(bad[:5]) or 'none'}; segments without k intact live shares: "
                                f"{short or 'none'}; the manifest records what succeeded, run repair again")
        return repaired, done

    # -- plumbing --------------------------------------------------------------------------------------

    def _challenge(self, drawn: Mapping[str, Sequence[AuditChallenge]], epoch: int = 0, seed: bytes = b""
                   ) -> dict[str, MinerAudit]:
        out = {}
        signed: dict[str, bytes | None] = {}
        for m, results in self._verify(drawn, epoch, seed, signed).items():
            bad = [reason for _, ok, reason in results if not ok]
            out[m] = MinerAudit(m, not bad, len(results), len(bad), tuple(bad[:3]), signed.get(m))
        return out

    def _verify(self, drawn: Mapping[str, Sequence[AuditChallenge]], epoch: int = 0, seed: bytes = b"",
                signed: dict[str, bytes | None] | None = None) -> dict[str, list[tuple[AuditChallenge, bool, str]]]:
        """Each challenge with its verdict, judged on the miner's *signed* answers only (an answer whose
        signature does not verify counts as none); `signed` receives each miner's AuditAnswer bytes."""
        miners = sorted(drawn)
        asked = {m: wire_challenges(drawn[m]) for m in miners}
        jobs = [_Job(m, {"op": "audit", "chunk_size": 1, "epoch": epoch, "seed": seed,
                         "challenges": [list(c) for c in asked[m]]}) for m in miners]
        out: dict[str, list[tuple[AuditChallenge, bool, str]]] = {}
        for m, answer in zip(miners, self._run(jobs, "audit"), strict=True):
            attestation, answers, why = _audit_answers(m, answer, epoch, seed, challenges_digest(asked[m]),
                                                       len(drawn[m]))
            if signed is not None:
                signed[m] = attestation
            if why:
                why = f"miner did not answer in {self.timeout:g} s" if answer is None else why
            results = []
            for c, a in zip(drawn[m], answers, strict=True):
                verdict = verify_answer(c.challenge, _answer(a), c.chunk_size)
                results.append((c, verdict.passed, f"{verdict.reason} ({why})" if why else verdict.reason))
            out[m] = results
        return out

    def _fetch_job(self, manifest: Manifest, rec: SegmentRecord, share: ShareRecord) -> _Job:
        """A `get` of one share, with a retrieval request signed by this client for that share's miner."""
        request = retrieval_request(self.identity, manifest.dataset_id, rec.index, rec.version, share.index,
                                    share.miner, int.from_bytes(os.urandom(8)) >> 1, int(time.time() * 1000))
        return _Job(share.miner, {"op": "get", "request": request, "chunk_size": manifest.chunk_size,
                                  "segment": rec.index, "share": share.index}, share.length)

    def _fetched(self, manifest: Manifest, job: _Job, answer: dict[str, Any] | None) -> tuple[bytes | None, str]:
        """The intact share a `get` answer carries (else None and why), after recording the fetch durably.

        Intact means: the miner's signed RetrievalAnswer binds this request, the recorded share root and the
        hash of the bytes, and the bytes check against that root (`codec.check_share`)."""
        rec = manifest.segments[job.fields["segment"]]
        share = job.fields["share"]
        request = job.fields["request"]
        data = _share_data(answer)
        signed = _retrieval_answer(job.miner, answer, request)
        why = ""
        if answer is None:
            why = f"no answer in {self.timeout:g} s"
        elif data is None:
            why = str(answer.get("error", "malformed answer"))
        elif signed is None:
            why = "answer not signed with the miner's key"
        else:
            fields = signed[1]
            if fields.data_hash != hashlib.sha256(data).hexdigest():
                why = "signed answer is for other bytes than those sent"
            elif fields.root != rec.shares[share].root:
                why = f"served a share whose root {fields.root[:16]}… is not the recorded one"
            else:
                try:
                    check_share(rec.layout(), share, data, manifest.chunk_size)
                except CorruptShareError as e:
                    why = str(e)
        retrieval = Retrieval(job.miner, request, None if signed is None else signed[0], not why)
        if self._records is not None:
            self._records.append(retrieval)  # durable before the data is used
        self.retrieval_log.append(retrieval)
        return (None, why) if why else (data, "")

    def _upload(self, manifest: Manifest, records: Sequence[SegmentRecord], upload: Sequence[EncodedSegment],
                phase: str) -> Receipts:
        """Upload the shares of `records`; each miner's store receipt, checked, by (segment, version, share)."""
        by_index = {r.index: r for r in records}
        jobs = []
        for enc in upload:
            rec = by_index[enc.index]
            for sh in rec.shares:
                jobs.append(_Job(sh.miner, {"op": "put", **_ref_fields(manifest.dataset_id, rec, sh.index),
                                            "data": enc.shares[sh.index], "chunk_size": manifest.chunk_size},
                                 len(enc.shares[sh.index])))
        answers = self._run(jobs, phase)
        self.bytes_sent += sum(j.size for j in jobs)
        receipts: Receipts = {}
        bad = []
        for j, a in zip(jobs, answers, strict=True):
            receipt = _store_receipt(manifest, j, a)
            if receipt is not None:
                receipts[(j.fields["segment"], j.fields["version"], j.fields["share"])] = receipt
                continue
            why = ("no answer" if a is None else str(a.get("error", "refused")) if a.get("ok") is not True
                   else "no valid store receipt")
            bad.append(f"{j.miner} (segment {j.fields['segment']} share {j.fields['share']}: {why})")
        if bad:
            raise TransferError(f"{len(bad)} of {len(jobs)} shares not stored: {', '.join(bad[:5])}; the manifest "
                                "is saved, so re-running the upload after the miners are back is safe")
        return receipts

    def _run(self, jobs: list[_Job], phase: str | None) -> list[dict[str, Any] | None]:
        """Send `jobs` with at most `window` in flight; an answer per job, None for no answer in time."""
        total = sum(j.size for j in jobs) or len(jobs)
        done = 0
        queue_ = list(reversed(jobs))
        flight: dict[Future[dict[str, Any] | None], _Job] = {}
        while queue_ or flight:
            while queue_ and len(flight) < self.window:
                job = queue_.pop()
                self._send(job)
                flight[job.future] = job
            oldest = min(j.sent_at for j in flight.values())
            finished, _ = wait(list(flight), timeout=max(0.0, oldest + self.timeout - time.monotonic()),
                               return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for fut, job in list(flight.items()):
                if fut in finished or now - job.sent_at >= self.timeout:
                    del flight[fut]
                    if fut not in finished:
                        with self._lock:
                            self._pending.pop(job.fields["id"], None)
                        fut.set_result(None)
                    done += job.size or 1
                    if phase and self.progress:
                        self.progress(phase, done, total)
        return [j.future.result() for j in jobs]

    def _send(self, job: _Job) -> None:
        job.fields["id"] = os.urandom(12)
        job.sent_at = time.monotonic()
        with self._lock:
            self._pending[job.fields["id"]] = job
        self._client.publish(topics.store_request(job.miner), cbor.encode(job.fields), qos=1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.FINAL_CHECKPOINT:
            self.final_note = bytes(msg.payload) or None
            return
        where = topics.store_miner_of_topic(msg.topic)
        if where is None:
            return
        miner, kind = where
        if kind == "hello":
            hello = _hello(miner, bytes(msg.payload)) if msg.payload else None
            with self._lock:
                if hello is not None:
                    self.hellos[miner] = hello
                elif not msg.payload:  # emptied: the miner stopped, or its last will fired
                    self.hellos.pop(miner, None)
            return
        try:
            answer = cbor.decode(bytes(msg.payload))
        except cbor.CBORError:
            return
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), bytes):
            return
        with self._lock:
            job = self._pending.get(answer["id"])
            if job is None or job.miner != miner:  # a late answer, or one from a miner we did not ask
                return
            del self._pending[answer["id"]]
        if not job.future.done():
            job.future.set_result(answer)


def _store_receipt(manifest: Manifest, job: _Job, answer: dict[str, Any] | None) -> bytes | None:
    """The miner's store receipt in a `put` answer, if it signs exactly the share the manifest records."""
    pk = None if answer is None else _miner_pk(job.miner, answer)
    receipt = None if answer is None else answer.get("receipt")
    if answer is None or answer.get("ok") is not True or pk is None or not isinstance(receipt, bytes):
        return None
    f = job.fields
    share = manifest.segments[f["segment"]].shares[f["share"]]
    ok = verify_store_receipt(pk, receipt, manifest.dataset_id, f["segment"], f["version"], f["share"], share.root,
                              share.length, manifest.chunk_size)
    return receipt if ok else None


def _ref_fields(dataset_id: str, rec: SegmentRecord, share: int) -> dict[str, Any]:
    return {"dataset": dataset_id, "segment": rec.index, "version": rec.version, "share": share}


def _hello(miner: str, payload: bytes) -> dict[str, Any] | None:
    """A storage miner's hello if it is signed by the key whose id is `miner`, else None."""
    with contextlib.suppress(envelope.EnvelopeError):
        hello = envelope.parse(payload)
        fields = hello.payload
        if (isinstance(fields, dict) and hello.kid == miner and fields.get("miner") == miner
                and isinstance(fields.get("pk"), bytes) and device_id_for(fields["pk"]) == miner
                and hello.verify(fields["pk"])):
            return dict(fields)
    return None


def _miner_pk(miner: str, answer: dict[str, Any]) -> bytes | None:
    """The public key an answer says it is from, if its id is `miner` (ids are key hashes: self-certifying)."""
    pk = answer.get("pk")
    return pk if isinstance(pk, bytes) and device_id_for(pk) == miner else None


def _signed_by(miner: str, answer: dict[str, Any], field: str) -> envelope.Sign1 | None:
    """The COSE message in `answer[field]` if `miner`'s key signed it, else None."""
    raw, pk = answer.get(field), _miner_pk(miner, answer)
    if not isinstance(raw, bytes) or pk is None:
        return None
    try:
        msg = envelope.parse(raw, max_bytes=MAX_AUDIT_ANSWER_BYTES)
    except envelope.EnvelopeError:
        return None
    return msg if msg.kid == miner and isinstance(msg.payload, dict) and msg.verify(pk) else None


def _retrieval_answer(miner: str, answer: dict[str, Any] | None, request: bytes
                      ) -> tuple[bytes, RetrievalAnswer] | None:
    """The miner's signed RetrievalAnswer to `request` in a `get` answer (bytes and parsed), or None."""
    pk = None if answer is None else _miner_pk(miner, answer)
    if answer is None or pk is None or answer.get("ok") is not True or not isinstance(answer.get("answer"), bytes):
        return None
    try:
        parsed = parse_retrieval_answer(answer["answer"], pk)
    except AttestationError:
        return None
    return (bytes(answer["answer"]), parsed) if parsed.request == request_id(request) else None


def _audit_answers(miner: str, answer: dict[str, Any] | None, epoch: int, seed: bytes, digest: str, count: int
                   ) -> tuple[bytes | None, list[Any], str]:
    """(the signed AuditAnswer, its `count` answers, "") from a miner's audit answer; (None, all None, why)
    when it did not answer, refused, or sent answers not signed with its key for this epoch, seed and the
    challenges asked (`digest`)."""
    if answer is None:
        return None, [None] * count, "no answer"
    if answer.get("ok") is not True:
        return None, [None] * count, str(answer.get("error", "malformed answer"))
    msg = _signed_by(miner, answer, "attestation")
    fields = msg.payload if msg is not None else {}
    answers = fields.get("answers")
    if (msg is None or fields.get("v") != 1 or fields.get("miner") != miner or fields.get("epoch") != epoch
            or fields.get("seed") != seed.hex() or fields.get("challenges") != digest or not isinstance(answers, list)
            or len(answers) != count):
        return None, [None] * count, "answer not signed with the miner's key for this epoch, seed and challenges"
    return bytes(answer["attestation"]), answers, ""


def _answer(a: Any) -> Answer | None:
    if (isinstance(a, list) and len(a) == 2 and isinstance(a[0], bytes) and isinstance(a[1], list)
            and all(isinstance(h, bytes) for h in a[1])):
        return Answer(a[0], tuple(a[1]))
    return None


class _RetrievalFile:
    """The durable retrieval records: one JSON line per fetch, appended and fsynced (mode 0600). A line torn
    by a crash is the last one, and is skipped on load."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_dir(path.parent)

    def load(self) -> list[Retrieval]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                r = json.loads(line)
                out.append(Retrieval(r["miner"], bytes.fromhex(r["request"]),
                                     None if r["answer"] is None else bytes.fromhex(r["answer"]), bool(r["ok"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        return out

    def append(self, r: Retrieval) -> None:
        line = json.dumps({"miner": r.miner, "request": r.request.hex(),
                           "answer": None if r.answer is None else r.answer.hex(), "ok": r.ok})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
        try:
            os.write(fd, line.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)


def _share_data(answer: dict[str, Any] | None) -> bytes | None:
    """The share bytes of a miner's `get` answer, or None when it did not answer with one."""
    if answer is None or answer.get("ok") is not True:
        return None
    data = answer.get("data")
    return data if isinstance(data, bytes) else None


def _planned_first(sources: Container[int], share: ShareRecord) -> tuple[bool, int]:
    """Sort key for repair fetches: the planned source shares first, then any other live one."""
    return share.index not in sources, share.index

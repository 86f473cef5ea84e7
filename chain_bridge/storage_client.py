"""The owner's side of storage over MQTT: put, get, update, audit and status of a dataset on miners.

A thin shell around the sans-IO core (`manifest.plan_put`/`plan_update`, `codec.check_share`/`decode_segment`,
`audit.draw_challenges`/`verify_answer`): it sends CBOR requests to `cc/v1/store/{miner}/req`, matches the
answers on `…/resp` by correlation id, and keeps a bounded number of requests in flight. The planned manifest
and the dataset key are written (0600, atomically) *before* any share is uploaded, as docs/storage.md requires
(an abandoned plan's revision is never planned again, so AES-GCM nonces never repeat).

`retrievals` records every share fetch as (miner, answered with an intact share); it and the audit verdicts
are the `EpochEvents` that `rewards.settle_epoch` pays out on.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from carechain import cbor, topics
from carechain.checkpoint import parse_note
from carechain.config import BrokerConfig
from carechain.files import PRIVATE, write_atomic
from carechain.seed import checkpoint_seed
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

# (phase, done, total): phase is "put", "get", "update" or "audit"; done/total in bytes (or requests).
Progress = Callable[[str, int, int], None]
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WINDOW = 16  # requests in flight: enough to fill a link, few enough to bound memory
DEFAULT_CHALLENGES = 16  # per miner per audit from the CLI; the daily schedule uses audit.AuditSchedule


class TransferError(StorageError):
    """Shares that could not be stored or fetched; the message names the miners and what they said."""


@dataclass(frozen=True)
class MinerAudit:
    """One miner's audit verdict: passed only if every challenge was answered with a valid proof."""

    miner: str
    passed: bool
    challenges: int
    failed: int
    reasons: tuple[str, ...]  # the first few failures, for the owner to read


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


def seed_from_final_checkpoint(note: bytes | str) -> bytes:
    """The storage seed of a final checkpoint note (the retained `cc/v1/log/final`): its body and signatures."""
    body, sigs = parse_note(note)
    return checkpoint_seed(body, [s.signature for s in sigs])


class StorageClient:
    """An owner's connection to the storage miners. Use as a context manager."""

    def __init__(self, broker: BrokerConfig, client_id: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 window: int = DEFAULT_WINDOW, progress: Progress | None = None) -> None:
        self.timeout = timeout
        self.window = window
        self.progress = progress
        self.bytes_sent = 0  # share bytes uploaded by this client
        self.retrievals: list[tuple[str, bool]] = []  # (miner, answered with an intact share)
        self.hellos: dict[str, dict[str, Any]] = {}
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
        """The storage seed of the latest final checkpoint on the broker."""
        deadline = time.monotonic() + settle_s
        while self.final_note is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.final_note is None:
            raise TransferError("no final checkpoint on the broker (cc/v1/log/final); start the bridge and miners "
                                "or pass --seed HEX")
        return seed_from_final_checkpoint(self.final_note)

    # -- operations ------------------------------------------------------------------------------------

    def put(self, data: bytes | Path, miners: Iterable[str], seed: bytes, manifest_path: Path, *,
            owner: str = "owner", dataset_id: str | None = None, params: StorageParams | None = None) -> Manifest:
        """Store `data` (bytes or a file) on `miners`: persist key and manifest, then upload every share."""
        if isinstance(data, Path):
            dataset_id = dataset_id or f"{data.name}-{os.urandom(4).hex()}"
            data = data.read_bytes()
        key = new_dataset_key(dataset_id or f"dataset-{os.urandom(8).hex()}")
        plan = plan_put(key, owner, data, miners, seed, params)
        save_dataset_key(key, key_path(manifest_path))
        save_manifest(plan.manifest, manifest_path)
        self._upload(key.dataset_id, plan.manifest.segments, plan.upload, "put")
        return plan.manifest

    def update(self, manifest: Manifest, key: DatasetKey, new: bytes, miners: Iterable[str], seed: bytes,
               manifest_path: Path) -> UpdateResult:
        """Upload only the segments of `new` that changed, then delete the versions they replace."""
        plan = plan_update(manifest, key, new, miners, seed)
        save_manifest(plan.manifest, manifest_path)  # before any upload: the revision is now spent
        before = self.bytes_sent
        changed = {e.index for e in plan.upload}
        self._upload(key.dataset_id, [s for s in plan.manifest.segments if s.index in changed], plan.upload, "update")
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
                    sh = order[i].pop(0)
                    jobs.append(_Job(sh.miner, {"op": "get", **_ref_fields(manifest.dataset_id, rec, sh.index)},
                                     sh.length))
                    want -= 1
            if not jobs:
                break
            for job, answer in zip(jobs, self._run(jobs, None), strict=True):
                i, share = job.fields["segment"], job.fields["share"]
                rec = manifest.segments[i]
                data = _share_data(answer)
                ok = data is not None
                if data is not None:
                    try:
                        check_share(rec.layout(), share, data, params.chunk_size)
                    except CorruptShareError as e:
                        ok = False
                        failures[i].append(f"{job.miner}: {e}")
                    else:
                        intact[i][share] = data
                        got += job.size
                        if self.progress:
                            self.progress("get", got, total)
                elif answer is None:
                    failures[i].append(f"{job.miner}: no answer in {self.timeout:g} s")
                else:
                    failures[i].append(f"{job.miner}: {answer.get('error', 'malformed answer')}")
                self.retrievals.append((job.miner, ok))
                if not ok:
                    silent.add(job.miner)
        short = [i for i in order if len(intact[i]) < params.k]
        if short:
            detail = "; ".join(f"segment {i}: {', '.join(failures[i])}" for i in short[:3])
            raise TransferError(f"{len(short)} segment(s) have fewer than k={params.k} intact shares on reachable "
                                f"miners ({detail}); run a repair once the miners are back")
        return b"".join(decode_segment(key, s.layout(), intact[s.index], params) for s in manifest.segments)

    def audit(self, manifest: Manifest, seed: bytes, challenges: int = DEFAULT_CHALLENGES) -> dict[str, MinerAudit]:
        """Challenge every miner holding a share of `manifest` with `challenges` seeded chunks; verdicts."""
        holdings: dict[str, list[ShareRef]] = {}
        for rec in manifest.segments:
            for sh in rec.shares:
                holdings.setdefault(sh.miner, []).append(ShareRef(
                    manifest.dataset_id, rec.index, rec.version, sh.index, bytes.fromhex(sh.root), sh.length))
        drawn = {m: draw_challenges(seed, m, refs, challenges, manifest.chunk_size) for m, refs in holdings.items()}
        return self._challenge(drawn, manifest.chunk_size)

    def status(self, manifest: Manifest) -> list[SegmentStatus]:
        """Which shares are live now: each miner proves it holds chunk 0 of each of its shares."""
        drawn: dict[str, list[Challenge]] = {}
        for rec in manifest.segments:
            for sh in rec.shares:
                ref = ShareRef(manifest.dataset_id, rec.index, rec.version, sh.index, bytes.fromhex(sh.root), sh.length)
                drawn.setdefault(sh.miner, []).append(Challenge(ref, 0))
        passed = self._verify(drawn, manifest.chunk_size)
        live = {(c.ref.segment, c.ref.share) for m in passed for c, ok, _ in passed[m] if ok}
        return [SegmentStatus(r.index, r.version, tuple(sh.index for sh in r.shares if (r.index, sh.index) in live),
                              manifest.k, manifest.n) for r in manifest.segments]

    def ping(self, miners: Iterable[str]) -> set[str]:
        """The miners that answer an empty audit within the timeout (a liveness probe, a few bytes each)."""
        ask = sorted(set(miners))
        answers = self._run([_Job(m, {"op": "audit", "chunk_size": 1, "challenges": []}) for m in ask], None)
        return {m for m, a in zip(ask, answers, strict=True) if a is not None and a.get("ok") is True}

    def repair(self, manifest: Manifest, manifest_path: Path | None, seed: bytes, miners: Iterable[str],
               policy: Any = None, *, last_seen: dict[str, int] | None = None, now: int | None = None
               ) -> tuple[Manifest, list[Any]]:
        """Regenerate and re-place the shares `repair.plan_repairs` finds lost; (new manifest, tasks done).

        Liveness is measured now: `status` (each holder proves chunk 0 of its shares) and a ping of every
        holder and of `miners` (the candidate targets). A miner that answers is seen at `now`; a share whose
        miner answers but cannot prove it is *failed* (lost at once). A miner that does not answer keeps the
        time in `last_seen` (miner -> unix seconds, updated in place; the CLI keeps it in `NAME.seen.json`),
        and one never recorded is taken as having just gone away, so its grace period starts now: a miner
        briefly offline is *suspect*, not lost, and triggers no repair. Lost shares are rebuilt from k intact
        ones (`codec.regenerate_shares`, no dataset key: byte-identical, same root) and uploaded to the
        targets plan_repairs draws from `seed` (online miners holding no share of the segment). The
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
        tasks = plan_repairs(manifest, {m: seen[m] for m in pool}, now, seed, policy, failed)
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
                    jobs.append(_Job(sh.miner, {"op": "get", **_ref_fields(manifest.dataset_id, rec, sh.index)},
                                     sh.length))
            if not jobs:
                break
            for job, answer in zip(jobs, self._run(jobs, "fetch"), strict=True):
                i, share = job.fields["segment"], job.fields["share"]
                data = _share_data(answer)
                ok = data is not None
                if data is not None:
                    try:
                        check_share(manifest.segments[i].layout(), share, data, params.chunk_size)
                    except CorruptShareError:
                        ok = False
                    else:
                        intact[i][share] = data
                self.retrievals.append((job.miner, ok))
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
                                                   "data": rebuilt[t.share]}, len(rebuilt[t.share]))))
        answers = self._run([j for _, j in uploads], "repair")
        self.bytes_sent += sum(j.size for _, j in uploads)
        done = [t for (t, _), a in zip(uploads, answers, strict=True) if a is not None and a.get("ok") is True]
        repaired = apply_repairs(manifest, done)
        if manifest_path is not None and done:
            save_manifest(repaired, manifest_path)
        bad = [f"segment {t.segment} share {t.share} -> {t.target}" for (t, _), a in zip(uploads, answers, strict=True)
               if a is None or a.get("ok") is not True]
        if bad or short:
            raise TransferError(f"repair incomplete: {len(done)} of {len(tasks)} shares re-placed; not stored: "
                                f"{', '.join(bad[:5]) or 'none'}; segments without k intact live shares: "
                                f"{short or 'none'}; the manifest records what succeeded, run repair again")
        return repaired, done

    # -- plumbing --------------------------------------------------------------------------------------

    def _challenge(self, drawn: dict[str, list[Challenge]], chunk_size: int) -> dict[str, MinerAudit]:
        out = {}
        for m, results in self._verify(drawn, chunk_size).items():
            bad = [reason for _, ok, reason in results if not ok]
            out[m] = MinerAudit(m, not bad, len(results), len(bad), tuple(bad[:3]))
        return out

    def _verify(self, drawn: dict[str, list[Challenge]], chunk_size: int
                ) -> dict[str, list[tuple[Challenge, bool, str]]]:
        miners = sorted(drawn)
        jobs = [_Job(m, {"op": "audit", "chunk_size": chunk_size, "challenges": [
            [c.ref.dataset_id, c.ref.segment, c.ref.version, c.ref.share, c.chunk] for c in drawn[m]]})
            for m in miners]
        out: dict[str, list[tuple[Challenge, bool, str]]] = {}
        for m, answer in zip(miners, self._run(jobs, "audit"), strict=True):
            answers = answer.get("answers") if answer and answer.get("ok") is True else None
            if not isinstance(answers, list) or len(answers) != len(drawn[m]):
                why = (f"miner did not answer in {self.timeout:g} s" if answer is None
                       else str(answer.get("error", "malformed answer")))
                answers = [None] * len(drawn[m])
            else:
                why = ""
            results = []
            for c, a in zip(drawn[m], answers, strict=True):
                verdict = verify_answer(c, _answer(a), chunk_size)
                results.append((c, verdict.passed, f"{verdict.reason} ({why})" if why else verdict.reason))
            out[m] = results
        return out

    def _upload(self, dataset_id: str, records: Sequence[SegmentRecord], upload: Sequence[EncodedSegment],
                phase: str) -> None:
        by_index = {r.index: r for r in records}
        jobs = []
        for enc in upload:
            rec = by_index[enc.index]
            for sh in rec.shares:
                jobs.append(_Job(sh.miner, {"op": "put", **_ref_fields(dataset_id, rec, sh.index),
                                            "data": enc.shares[sh.index]}, len(enc.shares[sh.index])))
        answers = self._run(jobs, phase)
        self.bytes_sent += sum(j.size for j in jobs)
        bad = [f"{j.miner} (segment {j.fields['segment']} share {j.fields['share']}: "
               f"{'no answer' if a is None else a.get('error', 'refused')})"
               for j, a in zip(jobs, answers, strict=True) if a is None or a.get("ok") is not True]
        if bad:
            raise TransferError(f"{len(bad)} of {len(jobs)} shares not stored: {', '.join(bad[:5])}; the manifest "
                                "is saved, so re-running the upload after the miners are back is safe")

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
            with self._lock:
                if msg.payload:
                    with contextlib.suppress(ValueError):
                        self.hellos[miner] = json.loads(msg.payload)
                else:
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


def _ref_fields(dataset_id: str, rec: SegmentRecord, share: int) -> dict[str, Any]:
    return {"dataset": dataset_id, "segment": rec.index, "version": rec.version, "share": share}


def _answer(a: Any) -> Answer | None:
    if (isinstance(a, list) and len(a) == 2 and isinstance(a[0], bytes) and isinstance(a[1], list)
            and all(isinstance(h, bytes) for h in a[1])):
        return Answer(a[0], tuple(a[1]))
    return None


def _share_data(answer: dict[str, Any] | None) -> bytes | None:
    """The share bytes of a miner's `get` answer, or None when it did not answer with one."""
    if answer is None or answer.get("ok") is not True:
        return None
    data = answer.get("data")
    return data if isinstance(data, bytes) else None


def _planned_first(sources: Container[int], share: ShareRecord) -> tuple[bool, int]:
    """Sort key for repair fetches: the planned source shares first, then any other live one."""
    return share.index not in sources, share.index

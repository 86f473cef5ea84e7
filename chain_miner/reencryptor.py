"""Re-encryption for access: a chosen miner's half of an owner's grant (docs/access.md, docs/miners.md).

An `access.grant` names n miners and carries one key fragment sealed to each. A miner releases its capsule
fragments only when all of this holds, and checks each itself:

1. the grant leaf was accepted by the contract rules this miner re-executes (its replica holds the access
   record, and this miner is one of the record's miners);
2. a checkpoint covering the grant leaf is *final*: signed by the log and cosigned by a majority of the
   miners registered on the ledger. The miner counts the cosignature lines itself — from the bridge's
   final checkpoints and from the other miners' cosignature messages — so the bridge's word is never
   taken; and it has itself replayed at least that far, so a revocation anchored before that checkpoint
   is seen;
3. the record is neither revoked nor expired (`contract_rules.access.is_usable`); otherwise the grant is
   refused for good, logged and counted (`access_refused`);
4. its key fragment opens (sealed to its Ed25519 key) and verifies against the owner's registered
   re-encryption keys and the requester's.

It then re-encrypts the capsule of every granted epoch and signs `CapsuleFragments` messages carrying the
inclusion proof of the grant leaf under that final checkpoint. The proof is computed, not trusted: from
the frontier of the tree just before the grant (kept while replaying) and the leaves after it up to the
final size (fetched from the bridge's proof responder), checked against the final root.

`Reencryptor` is the sans-IO core (values in, decisions out; the caller persists `done` and publishes);
`AccessReleaser` is the thin shell the witness miner drives from its worker thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from carechain import access, reencryption, topics
from carechain.checkpoint import Checkpoint, NoteError, NoteSignature, key_hash, parse_note
from carechain.cosignature import CosignatureError, Cosigner, cosignature_timestamp
from carechain.entries import ACCESS_GRANT, Entry, EntryError
from carechain.files import write_atomic
from carechain.identity import Identity
from carechain.merkle import ProofError, extend_frontier, leaf_hash, node_hash, verify_inclusion
from carechain.proofs import VerificationError, verify_checkpoint
from contract_rules.access import access_record, granted_epochs, is_usable, registered_miners
from contract_rules.runtime import State

log = logging.getLogger("carechain.miner.access")

DONE_FILE = "access.json"
DONE_VERSION = 1
MAX_TRACKED_BODIES = 64  # checkpoint bodies whose cosignatures are being counted; the oldest is dropped
MAX_PENDING = 4096  # grants waiting for finality; more means finality stopped: the oldest wait is dropped

# What `done` says of a grant, once decided for good (persisted; a restart never re-decides these).
RELEASED = "released"
REVOKED = "revoked"
EXPIRED = "expired"
BAD_KFRAG = "bad_kfrag"  # the owner sealed this miner a key fragment that does not open or verify
UNUSABLE = "unusable"  # the record lacks what re-encryption needs (keys of owner or requester)

# Reencrypts one capsule with one verified key fragment (simulators swap in a misbehaving one).
Reencrypt = Callable[[bytes, reencryption.VerifiedKfrag], bytes]


@dataclass(frozen=True)
class PendingGrant:
    """A grant this miner must serve once a checkpoint covering it is final."""

    index: int
    leaf_hash: bytes  # of the grant leaf as this miner replayed it
    frontier: tuple[bytes, ...]  # of the tree of the `index` leaves before it


@dataclass(frozen=True)
class FinalCheckpoint:
    checkpoint: Checkpoint
    note: str  # the log's note with the registered miners' cosignature lines that make it final


@dataclass(frozen=True)
class FetchLeaves:
    """The leaves `old_size`..`new_size - 1` are needed to prove grant `grant` under the final checkpoint."""

    grant: int
    old_size: int
    new_size: int


@dataclass(frozen=True)
class Release:
    """Signed capsule-fragment messages for `requester`'s inbox (several when one would exceed a packet)."""

    grant: int
    requester: str
    messages: tuple[bytes, ...]
    epochs: int


@dataclass(frozen=True)
class Refusal:
    """This miner does not release for `grant`; `final` says whether that is for good (persist it)."""

    grant: int
    reason: str
    detail: str
    final: bool = True


def miner_keys(state: State) -> set[bytes]:
    """The Ed25519 keys of the miners registered on the ledger."""
    parties = state.table("parties")
    return {parties[pid]["pk"] for pid in registered_miners(state)}


def finality_threshold(miner_count: int) -> int:
    """A majority of the registered miners: the access rule's definition of a final (seed) checkpoint."""
    return miner_count // 2 + 1


def cosigning_lines(body: str, lines: Sequence[NoteSignature], keys: set[bytes]) -> dict[bytes, NoteSignature]:
    """Miner key → its valid cosignature/v1 line on `body`, among `lines`, for the keys in `keys` (any name:
    the key ID binds name and key, the signature the key)."""
    found: dict[bytes, NoteSignature] = {}
    for line in lines:
        for pk in keys - found.keys():
            try:
                cosigner = Cosigner(line.name, pk)
            except CosignatureError:
                break
            if cosigner.key_id == line.key_hash and cosignature_timestamp(body, line, cosigner) is not None:
                found[pk] = line
                break
    return found


def inclusion_path(index: int, tree_size: int, frontier: Sequence[bytes], hashes: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 inclusion path of leaf `index` in the tree of `tree_size` leaves, from the frontier of the
    tree of `index` leaves and the leaf hashes `index`..`tree_size - 1`.

    The left siblings on a leaf's path are exactly the perfect subtrees of the frontier before it; the
    right siblings are hashed from the leaves after it.
    """
    if not 0 <= index < tree_size or len(hashes) != tree_size - index:
        raise ValueError(f"need the {tree_size - index} leaf hashes from {index} to {tree_size - 1}, "
                         f"got {len(hashes)}")
    if len(frontier) != index.bit_count():
        raise ValueError(f"a frontier of a {index}-leaf tree has {index.bit_count()} hashes, got {len(frontier)}")
    left: dict[tuple[int, int], bytes] = {}
    lo = 0
    for bit, h in zip(sorted((1 << b for b in range(index.bit_length()) if index >> b & 1), reverse=True),
                      frontier, strict=True):
        left[(lo, lo + bit)] = h
        lo += bit

    def subtree(lo: int, hi: int) -> bytes:
        if (lo, hi) in left:
            return left[(lo, hi)]
        if lo < index:
            raise ValueError(f"subtree {lo}..{hi} is not a frontier node")  # cannot happen for a path
        if hi - lo == 1:
            return hashes[lo - index]
        k = _split(hi - lo)
        return node_hash(subtree(lo, lo + k), subtree(lo + k, hi))

    path: list[bytes] = []
    lo, hi = 0, tree_size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
    return path[::-1]


def _split(n: int) -> int:
    """The largest power of two smaller than n (RFC 9162 §2.1.1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Reencryptor:
    """One miner's release decisions for the grants that name it. Pure apart from umbral's randomness."""

    def __init__(self, miner: Identity, log_public_key: bytes, done: dict[int, str] | None = None, *,
                 max_message_bytes: int = 100_000, reencrypt: Reencrypt = reencryption.reencrypt,
                 stats: Counter[str] | None = None) -> None:
        self.miner = miner
        self.id = miner.device_id
        self.log_public_key = log_public_key
        self.done: dict[int, str] = dict(done or {})
        self.pending: OrderedDict[int, PendingGrant] = OrderedDict()
        self.final: FinalCheckpoint | None = None
        self.max_message_bytes = max_message_bytes
        self.reencrypt = reencrypt  # one capsule, one verified key fragment → a capsule fragment
        self._cosigned: OrderedDict[str, dict[bytes, NoteSignature]] = OrderedDict()  # body -> key -> line
        self._notes: dict[str, str] = {}  # body -> the log-signed note (verified)
        self._unjudged: OrderedDict[str, None] = OrderedDict()  # notes seen before any miner was registered
        self.stats: Counter[str] = Counter() if stats is None else stats  # the miner's counters

    # -- following the log -------------------------------------------------------------------------------

    def observe(self, old_size: int, frontier: Sequence[bytes], leaves: Sequence[bytes], state: State) -> list[int]:
        """Leaves `old_size`.. were applied to `state` (a cosigned range): remember the grants naming this
        miner that the rules accepted. Returns their indexes."""
        found = []
        hashes = [leaf_hash(leaf) for leaf in leaves]
        for offset, leaf in enumerate(leaves):
            index = old_size + offset
            if index in self.done or index in self.pending or not _is_grant(leaf):
                continue
            record = access_record(state, index)
            if record is None or self.id not in record.get("miners", ()):
                continue
            before = extend_frontier(old_size, tuple(frontier), hashes[:offset])
            self.pending[index] = PendingGrant(index, hashes[offset], before)
            found.append(index)
            while len(self.pending) > MAX_PENDING:
                dropped, _ = self.pending.popitem(last=False)
                self.stats["access_dropped"] += 1
                log.error("miner %s: more than %d grants wait for finality; stopped waiting for grant %d",
                          self.id, MAX_PENDING, dropped)
        return found

    def add_cosignatures(self, note: str, state: State) -> bool:
        """Count the cosignature lines of registered miners on `note` (a final checkpoint, or one miner's
        checkpoint with its line). True when this makes a larger tree final than the last one."""
        try:
            checkpoint = verify_checkpoint(note, self.log_public_key)
            body, lines = parse_note(note)
        except (VerificationError, NoteError):
            self.stats["access_bad_note"] += 1
            return False
        miners = miner_keys(state)
        if not miners:  # a replica not replayed yet (a restart): judge the note once it is
            self._unjudged[note] = None
            while len(self._unjudged) > MAX_TRACKED_BODIES:
                self._unjudged.popitem(last=False)
            return False
        seen = self._cosigned.setdefault(body, {})
        self._cosigned.move_to_end(body)
        self._notes.setdefault(body, _log_note(note, body, self.log_public_key))
        seen.update(cosigning_lines(body, [s for s in lines if s not in seen.values()], miners))
        while len(self._cosigned) > MAX_TRACKED_BODIES:
            old, _ = self._cosigned.popitem(last=False)
            self._notes.pop(old, None)
        counted = {pk: line for pk, line in seen.items() if pk in miners}
        if len(counted) < finality_threshold(len(miners)):
            return False
        if self.final is not None and checkpoint.tree_size <= self.final.checkpoint.tree_size:
            return False
        final_note = self._notes[body] + "".join(line.line() for line in counted.values())
        self.final = FinalCheckpoint(checkpoint, final_note)
        return True

    def judge_waiting(self, state: State) -> bool:
        """`add_cosignatures` for the notes that arrived before the replica knew any miner (e.g. the retained
        final checkpoint, delivered before a restarted miner replayed its log). True if one made a tree final."""
        if not self._unjudged or not miner_keys(state):
            return False
        notes, self._unjudged = list(self._unjudged), OrderedDict()
        return any([self.add_cosignatures(note, state) for note in notes])

    def due(self, state: State) -> list[PendingGrant]:
        """Pending grants covered by the final checkpoint, which this miner's replica has reached."""
        if self.final is None:
            return []
        size = self.final.checkpoint.tree_size
        if size > state.size:
            return []  # wait: revocations between this miner's tree and the final one are not replayed yet
        return [g for g in self.pending.values() if g.index < size]

    # -- deciding one grant ------------------------------------------------------------------------------

    def check(self, grant: PendingGrant, state: State, now_ms: int) -> FetchLeaves | Refusal:
        """Refuse a revoked or expired grant; otherwise say which leaves prove it under the final checkpoint."""
        assert self.final is not None
        record = access_record(state, grant.index)
        if record is None:
            return self._decided(Refusal(grant.index, UNUSABLE, "no access record at this leaf"))
        if not is_usable(record, now_ms):
            if record.get("revoked_at") is not None:
                return self._decided(Refusal(grant.index, REVOKED, f"revoked at leaf {record['revoked_at']}"))
            return self._decided(Refusal(grant.index, EXPIRED, f"expired at {record.get('expires_ms')} ms"))
        return FetchLeaves(grant.index, grant.index + 1, self.final.checkpoint.tree_size)

    def release(self, grant: PendingGrant, state: State, later_leaves: Sequence[bytes]) -> Release | Refusal:
        """Open and verify this miner's key fragment, re-encrypt every granted epoch, sign the messages.

        `later_leaves` are the leaves after the grant up to the final size (the `FetchLeaves` range).
        """
        final = self.final
        assert final is not None
        size = final.checkpoint.tree_size
        try:
            path = inclusion_path(grant.index, size, grant.frontier,
                                  [grant.leaf_hash, *(leaf_hash(leaf) for leaf in later_leaves)])
            verify_inclusion(grant.index, size, grant.leaf_hash, path, final.checkpoint.root_hash)
        except (ValueError, ProofError) as exc:  # the leaves served are not the final tree's: ask again later
            return Refusal(grant.index, "no_proof", f"grant leaf not proven under the final checkpoint: {exc}",
                           final=False)
        record = access_record(state, grant.index)
        assert record is not None  # `check` came first
        parties = state.table("parties")
        owner, requester = parties.get(record["owner"], {}), parties.get(record["requester"], {})
        owner_pk, owner_vk, requester_pk = owner.get("pre_pk"), owner.get("pre_vk"), requester.get("pre_pk")
        if not (isinstance(owner_pk, bytes) and isinstance(owner_vk, bytes) and isinstance(requester_pk, bytes)):
            return self._decided(Refusal(grant.index, UNUSABLE, "owner or requester has no re-encryption key"))
        try:
            sealed = record["kfrags"][list(record["miners"]).index(self.id)]
            kfrag = reencryption.verify_kfrag(access.open_sealed_kfrag(self.miner, sealed), owner_pk, owner_vk,
                                              requester_pk)
        except (reencryption.ReencryptionError, access.AccessMessageError, ValueError, IndexError) as exc:
            return self._decided(Refusal(grant.index, BAD_KFRAG, str(exc)))
        frags = [(dev, epoch, self.reencrypt(capsule, kfrag))
                 for dev, epoch, capsule, _key_ct in granted_epochs(state, record)]
        proof = access.GrantProof(size=size, path=path, checkpoint=final.note)
        signed: list[bytes] = []
        for start in range(0, len(frags), access.MAX_FRAGS_PER_MESSAGE):
            signed += self._sign(grant.index, frags[start:start + access.MAX_FRAGS_PER_MESSAGE], proof)
        self.done[grant.index] = RELEASED
        self.pending.pop(grant.index, None)
        return Release(grant.index, record["requester"], tuple(signed), len(frags))

    def _sign(self, grant: int, frags: Sequence[tuple[str, int, bytes]], proof: access.GrantProof) -> list[bytes]:
        """One message, or several splitting `frags` when one would not fit `max_message_bytes`."""
        if len(frags) > 1 and _estimate(frags, proof) > self.max_message_bytes:
            half = len(frags) // 2
            return self._sign(grant, frags[:half], proof) + self._sign(grant, frags[half:], proof)
        message = access.sign_capsule_fragments(self.miner, grant, frags, proof)
        if len(message) <= self.max_message_bytes or len(frags) == 1:
            return [message]
        half = len(frags) // 2
        return self._sign(grant, frags[:half], proof) + self._sign(grant, frags[half:], proof)

    def _decided(self, refusal: Refusal) -> Refusal:
        self.done[refusal.grant] = refusal.reason
        self.pending.pop(refusal.grant, None)
        return refusal


def _estimate(frags: Sequence[tuple[str, int, bytes]], proof: access.GrantProof) -> int:
    """An upper bound of a signed message's size, so a large grant is split before signing, not after."""
    return 512 + len(proof.checkpoint.encode()) + 34 * len(proof.path) + sum(len(d) + len(c) + 16 for d, _, c in frags)


def _is_grant(leaf: bytes) -> bool:
    try:
        return Entry.decode(leaf).type == ACCESS_GRANT
    except EntryError:
        return False


def _log_note(note: str, body: str, log_public_key: bytes) -> str:
    """`note` (already verified) with only the log's own signature line; cosignature lines are added back
    as they are counted."""
    origin = body.split("\n", 1)[0]
    own = key_hash(origin, log_public_key)
    _, lines = parse_note(note)
    return body + "\n" + "".join(s.line() for s in lines if s.name == origin and s.key_hash == own)


# -- the shell ---------------------------------------------------------------------------------------------


def load_done(path: Path) -> dict[int, str]:
    """The grants already decided (released or refused for good); empty when the file does not exist."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        if raw.get("v") != DONE_VERSION:
            raise ValueError(f"version {raw.get('v')!r}, this miner reads {DONE_VERSION}")
        return {int(k): str(v) for k, v in raw["done"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: the record of released grants is damaged ({exc}); restore it or move it "
                         "away (the miner then re-sends its capsule fragments once)") from None


def save_done(path: Path, done: dict[int, str]) -> None:
    write_atomic(path, json.dumps({"v": DONE_VERSION, "done": {str(k): v for k, v in sorted(done.items())}},
                                  indent=1).encode())  # 0600: which grants this miner served


class AccessReleaser:
    """Drives a `Reencryptor` from the witness miner's worker thread: persists decisions, fetches the
    leaves a proof needs through the miner's proof requests, publishes to the requester's inbox."""

    def __init__(self, core: Reencryptor, data_dir: Path, state: Callable[[], State],
                 fetch: Callable[[int, int], Sequence[bytes] | None], publish: Callable[[str, bytes], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.path = Path(data_dir) / DONE_FILE
        self._state = state
        self._fetch = fetch
        self._publish = publish
        self.stats = core.stats
        self._clock = clock

    def after_cosign(self, old_size: int, frontier: Sequence[bytes], leaves: Sequence[bytes]) -> None:
        """A range of leaves was replayed and cosigned (or replayed at start): note grants, release what is due."""
        state = self._state()
        for index in self.core.observe(old_size, frontier, leaves, state):
            log.info("miner %s: chosen for grant %d; waiting for a final checkpoint covering it", self.core.id, index)
        self.core.judge_waiting(state)
        self.release_due()

    def on_note(self, note: str) -> None:
        """A final checkpoint, or a miner's checkpoint with its cosignature line."""
        if self.core.add_cosignatures(note, self._state()):
            self.release_due()

    def release_due(self) -> None:
        state = self._state()
        now_ms = int(self._clock() * 1000)
        for grant in self.core.due(state):
            step = self.core.check(grant, state, now_ms)
            if isinstance(step, Refusal):
                self._refused(step)
                continue
            later: Sequence[bytes] = []
            if step.new_size > step.old_size:
                fetched = self._fetch(step.old_size, step.new_size)
                if fetched is None:
                    self.stats["access_no_proof"] += 1
                    continue  # tried again at the next checkpoint
                later = fetched
            decision = self.core.release(grant, state, later)
            if isinstance(decision, Refusal):
                self._refused(decision)
                continue
            topic = topics.party_inbox(decision.requester)
            for message in decision.messages:
                self._publish(topic, message)
            save_done(self.path, self.core.done)  # after publishing: a crash in between re-sends, never loses
            self.stats["access_released"] += 1
            self.stats["access_fragments"] += decision.epochs
            log.info("miner %s: released %d capsule fragment(s) of grant %d to %s", self.core.id, decision.epochs,
                     decision.grant, decision.requester)

    def _refused(self, refusal: Refusal) -> None:
        if refusal.final:
            save_done(self.path, self.core.done)
            self.stats["access_refused"] += 1
            self.stats[f"access_refused_{refusal.reason}"] += 1
            log.warning("miner %s: refused grant %d: %s: %s", self.core.id, refusal.grant, refusal.reason,
                        refusal.detail)
        else:
            self.stats[f"access_{refusal.reason}"] += 1
            log.info("miner %s: grant %d not released yet: %s", self.core.id, refusal.grant, refusal.detail)

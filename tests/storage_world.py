"""A ledger with bonded miners, final checkpoints and a stored dataset, for the storage v2 and miner-set tests.

Not a test module itself: tests/test_contracts_storage_v2.py and tests/test_miner_set.py import `StorageWorld`.
Everything is real: Ed25519 keys, log-signed and miner-cosigned checkpoint notes, erasure-coded shares whose
chunks and inclusion proofs the miners answer audits with.
"""

from __future__ import annotations

import hashlib
import os

from carechain.checkpoint import Checkpoint, parse_note, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.entries import Entry
from carechain.identity import Identity
from carechain.storage.attestations import audit_answer, challenges_for, store_receipt, wire_challenges
from carechain.storage.audit import Answer, answer_challenge
from carechain.storage.codec import DatasetKey, StorageParams
from carechain.storage.manifest import Manifest, plan_put
from contract_rules import Genesis, Runtime, builtin_hashes, miners, storage_v2
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from contract_rules.runtime import State

PARAMS = StorageParams(segment_size=1000, k=2, n=4, chunk_size=100)
POOL = 10_000_000
SPARE = 100_000
T0 = 1_763_000_000_000
LOG_NAME = "carechain.log/test"


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


class StorageWorld:
    def __init__(self, n_miners: int = 6) -> None:
        self.operator = ident(1)
        self.owner = ident(30)
        self.stranger = ident(31)
        self.requester = ident(32)
        self.miners = [ident(40 + i) for i in range(n_miners)]
        allocations = {"pool:miners": POOL, **{f"miner:{m.device_id}": MIN_BOND["miner"] + SPARE for m in self.miners}}
        self.genesis = Genesis(operators={self.operator.device_id: self.operator.public_key},
                               allocations=allocations, contracts=builtin_hashes())
        self.runtime = Runtime(self.genesis)
        self.log: list[Entry] = []
        self.shares: dict[tuple[str, int, int, int], bytes] = {}  # (dataset, segment, version, share) → bytes
        self._nonce = 0

    @property
    def state(self) -> State:
        return self.runtime.state

    def add(self, entry: Entry) -> str:
        result = self.runtime.apply(entry)
        self.log.append(entry)
        return result

    def ids(self, who: list[Identity] | None = None) -> list[str]:
        return [m.device_id for m in (self.miners if who is None else who)]

    def by_id(self, miner: str) -> Identity:
        return next(m for m in self.miners if m.device_id == miner)

    # -- parties and bonds ----------------------------------------------------------------------------
    def register(self, role: str, who: Identity) -> str:
        reg = ce.PartyRegistration(role=role, pk=who.public_key, name=role, ts=0)  # type: ignore[arg-type]
        return self.add(ce.party_registration_entry(self.operator, reg))

    def bond(self, who: Identity, amount: int = MIN_BOND["miner"]) -> str:
        self._nonce += 1
        return self.add(ce.signed(who, ce.BOND_POST, ce.BondPost(amount=amount, nonce=self._nonce, ts=T0)))

    def bonded_miners(self) -> None:
        results = [self.register("miner", m) for m in self.miners] + [self.bond(m) for m in self.miners]
        results.append(self.register("patient", self.requester))
        assert results == ["ok"] * len(results), results

    def attest(self, ms: int) -> str:
        return self.add(ce.clock_attest_entry(self.operator, ms))

    # -- checkpoints ----------------------------------------------------------------------------------
    def note(self, cosigners: list[Identity] | None = None, size: int | None = None, log_key: Identity | None = None,
             ) -> str:
        """A checkpoint of the log so far, signed by the log key and cosigned by `cosigners` (default: all)."""
        size = self.state.size if size is None else size
        body = Checkpoint(LOG_NAME, size, hashlib.sha256(b"root %d" % size).digest()).body()
        signer = log_key or self.operator
        note = sign_note(body, LOG_NAME, signer.public_key, signer.sign)
        for m in self.miners if cosigners is None else cosigners:
            note = add_cosignature(note, cosign(body, Cosigner(f"carechain.miner/{m.device_id}", m.public_key),
                                                m.sign, 1))
        return note

    def seed(self, note: str) -> bytes:
        seed = miners.verify_final_note(self.state, note)
        assert isinstance(seed, bytes), seed
        return seed

    def record_final(self, cosigners: list[Identity] | None = None) -> str:
        return self.add(ce.checkpoint_final_entry(self.operator, self.note(cosigners)))

    # -- datasets -------------------------------------------------------------------------------------
    def put(self, dataset: str = "ds-1", length: int = 2500, note: str | None = None,
            place_on: list[str] | None = None) -> tuple[Manifest, Entry]:
        """Plan a dataset on the active miners by the seed of `note`; keep its shares; return the commit."""
        note = note or self.note()
        seed = self.seed(note)
        key = DatasetKey(dataset, bytes(32))
        plan = plan_put(key, self.owner.device_id, os.urandom(length),
                        place_on or miners.active_miners(self.state), seed, PARAMS)
        receipts = {}
        for enc, rec in zip(plan.upload, plan.manifest.segments, strict=True):
            for i, share in enumerate(enc.shares):
                self.shares[(dataset, rec.index, rec.version, i)] = share
                sh = rec.shares[i]
                if sh.miner in self.ids():  # what the storage miner signs when it stores the share
                    receipts[(rec.index, rec.version, i)] = self.receipt(sh.miner, dataset, rec.index, rec.version, i,
                                                                         sh.root, sh.length)
        payload = storage_v2.commit_for(plan.manifest, self.owner.public_key, note, receipts, ts=T0)
        return plan.manifest, ce.signed(self.owner, ce.STORAGE_COMMIT, payload)

    def receipt(self, miner: str, dataset: str, segment: int, version: int, share: int, root: str,
                length: int) -> bytes:
        return store_receipt(self.by_id(miner), dataset, segment, version, share, root, length, PARAMS.chunk_size)

    # -- audits ---------------------------------------------------------------------------------------
    def answers(self, miner: Identity, note: str, *, lose: bool = False, epoch: int | None = None) -> bytes:
        """The miner's signed answers to its ledger-derived challenges (`lose`: its disk lost every share)."""
        seed = self.seed(note)
        size = Checkpoint.parse(parse_note(note)[0]).tree_size
        out: list[Answer | None] = []
        challenges = challenges_for(self.state, seed, miner.device_id, as_of=size)
        for c in challenges:
            ref = c.challenge.ref
            share = self.shares[(ref.dataset_id, ref.segment, ref.version, ref.share)]
            out.append(None if lose else answer_challenge(share, c.challenge.chunk, c.chunk_size))
        epoch = miners.current_epoch(self.state) if epoch is None else epoch
        return audit_answer(miner, epoch, seed, wire_challenges(challenges), out)

    def audit_entry(self, note: str, answers: dict[str, bytes | None], signer: Identity | None = None,
                    epoch: int | None = None) -> Entry:
        audit = ce.StorageAuditV2(epoch=miners.current_epoch(self.state) if epoch is None else epoch,
                                  seed_checkpoint=note, answers=answers)
        return ce.storage_audit_entry(signer or self.operator, audit)

    def settle(self, pool: int, signer: Identity | None = None, epoch: int | None = None) -> str:
        settle = ce.StorageSettle(epoch=miners.current_epoch(self.state) if epoch is None else epoch, pool=pool)
        return self.add(ce.storage_settle_entry(signer or self.operator, settle))

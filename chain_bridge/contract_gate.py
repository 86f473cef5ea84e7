"""The bridge's contract gate: a `Runtime` kept in step with the ledger, consulted before a sale is appended.

It implements the ledger's `EventGate`: under the write lock it replays the committed leaves it has not
seen, then decides each new event in log order. A purchase the contracts refuse is appended as a
`sale.refused` entry (signed by the operator key, wrapping the terminal's signed bytes) so it counts
against the pharmacy; a sale the contracts would not even accept as refused (e.g. from a device the
contracts do not know) is not appended at all. An epoch_key or weekly_activity the contracts reject is refused
without a leaf. Other event kinds (readings) go in unchecked.

Time-based rules judge on the time the bridge attests (`contract_rules.clock`), so before each gated event
the gate appends an operator-signed `clock.attest` in the same batch whenever the attested time is missing
or more than `CLOCK_STALE_MS` old by the bridge's clock: a sale is judged on a time at most about a second
before it reached the bridge, and a terminal cannot backdate it.

Replaying the whole log at every start (and after every rolled-back batch) would make both grow with the
ledger, so the gate keeps snapshots of its state in the ledger database (`save_snapshot`, called at
checkpoints) and starts from the newest one, replaying only the leaves after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from carechain.entries import ENTRY_EVENT, Entry
from carechain.identity import Identity
from chain_bridge.ledger.store import Admission, EventCandidate, Ledger
from contract_rules import CodeBook, Genesis, Replica, Runtime, State
from contract_rules import transactions as ce
from contract_rules.clock import attested_ms
from contract_rules.replay import SnapshotError, genesis_hash
from contract_rules.runtime import OK

PURCHASE = "purchase"
# The event kinds the contracts decide: a purchase they refuse is recorded as sale.refused; an epoch_key or a
# weekly_activity they would reject (a second key for one epoch, an owner who is not the device's) is refused
# without a leaf, since a leaf the miners' rules reject would stop them cosigning.
GATED_KINDS = frozenset({PURCHASE, "epoch_key", "weekly_activity"})
# Snapshot at a checkpoint once this many leaves were applied since the last one: a restart then replays at
# most about this many leaves (~150 µs each), and a snapshot costs one write of the contract tables.
SNAPSHOT_EVERY = 10_000
# Attest the time again before a gated event once the attested time is this old (by the bridge's clock).
CLOCK_STALE_MS = 1_000
log = logging.getLogger("carechain.bridge")


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def clock_attestation(operator: Identity, state: State, now_ms: int) -> Entry | None:
    """The `clock.attest` to append next, or None while the attested time is less than `CLOCK_STALE_MS` old.

    Attested time never moves back: while the bridge's clock is behind the last attestation (it was stepped
    back), sales are judged on that attestation, and attesting resumes once the clock has passed it.
    """
    last = attested_ms(state)
    if last is not None and now_ms - last < CLOCK_STALE_MS:
        return None
    return ce.clock_attest_entry(operator, now_ms)


class ContractGate:
    def __init__(self, genesis: Genesis, operator: Identity, code: CodeBook | None = None,
                 snapshot_every: int = SNAPSHOT_EVERY, clock: Callable[[], int] = wall_clock_ms) -> None:
        if operator.device_id not in genesis.operators:
            raise ValueError(f"the bridge's operator key {operator.device_id} is not a genesis operator: the "
                             "contracts would reject every sale.refused it signs")
        self.genesis = genesis
        self.operator = operator
        self.replica = Replica(genesis, code)
        self._genesis_hash = genesis_hash(genesis)
        self._stale = True  # nothing loaded yet: the first catch_up starts from the newest snapshot
        self._snapshot_size = 0
        self.snapshot_every = snapshot_every
        self.clock = clock  # ms since the epoch: what the gate attests (tests pass a fixed clock)
        self.replayed = 0  # leaves applied after the last snapshot load: the restart and abort cost (tests, bench)

    @property
    def runtime(self) -> Runtime:
        return self.replica.runtime

    @property
    def state(self) -> State:
        return self.replica.state

    def catch_up(self, ledger: Ledger) -> None:
        """Apply the committed leaves beyond what the runtime has seen (after an abort or at start: beyond
        the newest snapshot)."""
        reloaded = self._stale
        if reloaded:
            self._load_snapshot(ledger)
            self._stale = False
        start = self.replica.size
        # Every event in our ledger passed ingest's signature check against its device's registered key (this
        # host's or another bridge host's, on a shared PostgreSQL log) before it was appended: verifying it again
        # here cost 37-76 % of the bridge's CPU (bench/ingest.py --profile). Contract entries are still verified.
        self.replica.apply_leaves(ledger.leaves(start, ledger.size), events_verified=True)
        if reloaded:
            self.replayed = ledger.size - start

    def follow(self, ledger: Ledger, appended: Sequence[tuple[int, EventCandidate]]) -> None:
        """Take in a batch the sequencer has just committed: its new event leaves `(index, candidate)`, from
        the fields ingest checked, when they are exactly the leaves past the gate's state; else `catch_up`."""
        size = self.replica.size
        if not self._stale and ledger.size == size:
            return  # nothing new (a batch of duplicates): no leaves query
        if (self._stale or not appended or ledger.size != size + len(appended)
                or any(index != size + k or not c.kind for k, (index, c) in enumerate(appended))):
            self.catch_up(ledger)
            return
        for _, c in appended:
            self.replica.apply_ingested(c.leaf, c.device_id, c.seq, c.kind, c.version)

    def _load_snapshot(self, ledger: Ledger) -> None:
        self.replica.reset()
        found = ledger.contract_snapshot(self._genesis_hash)
        if found is None:
            return
        size, data = found
        try:
            self.replica.restore(data)
        except SnapshotError as exc:
            log.warning("contract snapshot at %d leaves of %s not used (%s): replaying from the genesis",
                        size, ledger.describe(), exc)
            self.replica.reset()
            return
        if self.replica.size != size:
            log.warning("contract snapshot row %d holds a state of %d leaves: replaying from the genesis",
                        size, self.replica.size)
            self.replica.reset()
            return
        self._snapshot_size = size

    def save_snapshot(self, ledger: Ledger) -> bool:
        """Snapshot the state once the gate has applied `snapshot_every` leaves since the last snapshot.

        Call with the ledger lock held and no batch in flight (the bridge does it after a checkpoint), so
        the state covers exactly committed leaves. It never replays to get there: it snapshots wherever the gate
        is (the bridge brings it up to each committed batch; an ingest host's gate moves only with batches holding
        a sale). Storage errors propagate: the caller logs and retries.
        """
        if self._stale or self.replica.size - self._snapshot_size < self.snapshot_every:
            return False
        size = self.replica.size
        ledger.save_contract_snapshot(size, self._genesis_hash, self.replica.snapshot())
        self._snapshot_size = size
        return True

    def admit(self, index: int, candidate: EventCandidate) -> Admission | str | None:
        if index != self.runtime.state.size:  # cannot happen after catch_up; never decide on a stale state
            raise RuntimeError(f"contract gate at size {self.runtime.state.size} asked about leaf {index}")
        # A candidate is an event ingest has just verified with its device's registered key (EventCandidate).
        if candidate.kind not in GATED_KINDS:
            self.runtime.apply(Entry(ENTRY_EVENT, Entry.decode(candidate.leaf).cose), event_signature_checked=True)
            return None
        now = self.clock()
        attest = clock_attestation(self.operator, self.state, now)
        before: tuple[Entry, ...] = ()
        if attest is not None:
            result = self.runtime.apply(attest)
            if result != OK:  # the operator key is a genesis operator and the time moves forward: cannot happen
                raise RuntimeError(f"the contracts refused the bridge's clock.attest: {result}")
            before = (attest,)
        decision = self._decide(Entry(ENTRY_EVENT, Entry.decode(candidate.leaf).cose), candidate.kind, now)
        if isinstance(decision, str):
            return Admission(before, refused=decision) if before else decision
        return Admission(before, decision) if before or decision is not None else None

    def _decide(self, entry: Entry, kind: str, now: int) -> Entry | str | None:
        """Apply a gated event (None), its `sale.refused` (returned), or refuse it without a leaf (a reason)."""
        reason = self.runtime.check(entry, event_signature_checked=True)
        if reason == OK:
            self.runtime.apply(entry, event_signature_checked=True)
            return None
        if kind != PURCHASE:  # e.g. a second epoch_key for one epoch: a leaf the miners' rules would reject
            return reason
        refusal = ce.signed(self.operator, ce.SALE_REFUSED, ce.SaleRefusal(event=entry.cose, reason=reason, ts=now))
        if self.runtime.check(refusal) != OK:
            return reason  # not a sale the contracts can count: refuse it without a leaf
        self.runtime.apply(refusal)
        return refusal

    def abort(self) -> None:
        self._stale = True  # leaves applied in the rolled-back transaction: rebuild from the ledger


def append_if_accepted(ledger: Ledger, gate: ContractGate, lock: threading.Lock, entry: Entry) -> int | str:
    """Decide one contract entry that arrived over the broker (evidence, a study result) and append it if the
    rules accept it: its leaf index, or the rules' reason (nothing appended). Under the sequencer's lock, so
    no event is appended between the decision and the append."""
    with lock:
        ledger.refresh()
        gate.catch_up(ledger)
        reason = gate.runtime.check(entry)
        if reason != OK:
            return reason
        [index] = ledger.append_entries([entry])
        return index

"""The sequencer's stages: guards (seq, rate) → sequence (dedup) → append (group commit) → receipt.

One `Sequencer` runs in the bridge, whichever process checked the events. For a batch of verdicts it
applies the guards, appends the candidates in one durable transaction (`Ledger.append_events`, which asks
`Dedup` whether each (device, seq) is new, a resend, or a conflict), and only then builds the receipts:
a receipt never names an event that is not committed. Publishing them is the caller's (the MQTT shell's).

An `ok` entry carries the digest of the bytes anchored under its seq (`okd`), and a receipt refusing a
`seq_reused` event carries the device's highest anchored seq (`hi`): see carechain.receipts. Receipts to
devices that are not registered are rate-limited as a whole (`UnregisteredReceipts`): a flood of junk from
made-up ids must not make the bridge sign a receipt for every message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from carechain.config import Limits
from carechain.errors import Reason, contract_reason
from carechain.receipts import Receipt, Rejected
from chain_bridge.contract_gate import GATED_KINDS
from chain_bridge.ingest.guards import RateGuard, SeqGuard, UnregisteredReceipts
from chain_bridge.ingest.receive import RegistryView
from chain_bridge.ingest.verdicts import Rejection, Verdict
from chain_bridge.ledger.store import (
    Appended,
    AppendResult,
    DeviceRevoked,
    EventCandidate,
    EventGate,
    Ledger,
    SaleRefused,
    SeqReused,
    VersionRetired,
)


@dataclass
class SequencedBatch:
    """What one batch came to: receipts to publish (all committed), the rejections, the counts."""

    receipts: dict[str, Receipt] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    anchored: int = 0
    duplicates: int = 0
    unreceipted: int = 0  # rejections of unregistered devices not receipted (over `UnregisteredReceipts`)
    anchored_ts: list[int] = field(default_factory=list)  # device times of the new leaves (the latency metric)
    appended: list[tuple[int, EventCandidate]] = field(default_factory=list)  # the new event leaves, by index


@dataclass
class _Admitted:
    """Candidates past the guards, and whether each took a rate token (given back if it is a duplicate)."""

    candidates: list[EventCandidate] = field(default_factory=list)
    charged: list[bool] = field(default_factory=list)


class Sequencer:
    def __init__(self, ledger: Ledger, limits: Limits, gate: EventGate | None = None,
                 lock: contextlib.AbstractContextManager[object] | None = None,
                 registry: RegistryView | None = None) -> None:
        self.ledger = ledger
        self.gate = gate
        self.seq_guard = SeqGuard(limits.max_seq_gap, ledger.last_seq)
        self.rate_guard = RateGuard(limits.max_events_per_s, limits.burst)
        self.unregistered_receipts = UnregisteredReceipts()
        # The receive stage's view when it runs on this thread (the bridge passes it): one copy, one refresh.
        self._registry = registry if registry is not None else RegistryView(ledger)
        # Held while the ledger is extended: other threads (the proof responder) must not read it mid-append.
        self._lock = lock if lock is not None else contextlib.nullcontext()

    def sequence(self, verdicts: Sequence[Verdict], now_ms: int) -> SequencedBatch:
        out = SequencedBatch()
        admitted = self.guard(verdicts, out)
        with self._lock:
            # Only a batch holding an event the contracts decide pays for them; the gate catches up on the rest then.
            gate = self.gate if self.gate and any(c.kind in GATED_KINDS for c in admitted.candidates) else None
            results = self.ledger.append_events(admitted.candidates, gate) if admitted.candidates else []
        for cand, result, took in zip(admitted.candidates, results, admitted.charged, strict=True):
            self._settle(out, cand, result, took, now_ms)
        self._refusals(out, now_ms)
        return out

    def _refusals(self, out: SequencedBatch, now_ms: int) -> None:
        """The receipt stage for rejections: to registered devices always, to others within a budget."""
        refreshed = False
        for r in out.rejections:
            if not r.receipted:
                continue
            assert r.device_id is not None
            if r.reason == Reason.UNREGISTERED:
                known = False
            else:  # a parse-stage refusal names only the topic's device: is that one registered?
                if not refreshed:
                    self._registry.refresh()
                    refreshed = True
                known = self._registry.lookup(r.device_id) is not None
            if not known and not self.unregistered_receipts.allow():
                out.unreceipted += 1  # still counted and logged by reason; just not signed and sent
                continue
            receipt = out.receipts.setdefault(r.device_id, Receipt(r.device_id, now_ms))
            receipt.rejected.append(Rejected(r.seq, r.reason, r.detail, r.retryable, r.digest))
            if r.reason == Reason.SEQ_REUSED and receipt.highest_seq is None:
                receipt.highest_seq = self.ledger.last_seq(r.device_id)

    def guard(self, verdicts: Sequence[Verdict], out: SequencedBatch) -> _Admitted:
        """The guards stage: seq limit, then rate limit (a resend of an anchored event passes uncharged)."""
        admitted = _Admitted()
        for v in verdicts:
            if isinstance(v, Rejection):
                out.rejections.append(v)
            elif (gap := self.seq_guard.check(v)) is not None:
                out.rejections.append(gap)
            elif (limited := self.rate_guard.check(v)) is None:
                admitted.candidates.append(v)
                admitted.charged.append(True)
            elif self.ledger.event_index(v.device_id, v.seq) is not None:  # a resend: re-ack it, no token
                admitted.candidates.append(v)
                admitted.charged.append(False)
            else:
                out.rejections.append(limited)
        return admitted

    def _settle(self, out: SequencedBatch, cand: EventCandidate, result: AppendResult, took: bool,
                now_ms: int) -> None:
        """The receipt stage for one appended candidate: acknowledge it, or say why it is not in the log."""
        if isinstance(result, Appended):
            receipt = out.receipts.get(cand.device_id)
            if receipt is None:  # not setdefault: that would build a Receipt per event to throw away
                receipt = out.receipts[cand.device_id] = Receipt(cand.device_id, now_ms)
            receipt.acknowledge(cand.seq, result.index, cand.digest)
            if result.duplicate:
                out.duplicates += 1
                if took:
                    self.rate_guard.refund(cand.device_id)
            else:
                out.anchored += 1
                out.appended.append((result.index, cand))
                self.seq_guard.anchored(cand)
                if cand.ts is not None:
                    out.anchored_ts.append(cand.ts)
        elif isinstance(result, SaleRefused):
            where = "nothing appended" if result.index is None else f"recorded at leaf {result.index}"
            out.rejections.append(Rejection(
                cand.device_id, cand.seq, contract_reason(result.reason),
                f"the contracts refuse this {cand.kind} ({result.reason}); {where}", cand.digest))
            if result.index is not None:
                self.seq_guard.anchored(cand)
        elif isinstance(result, VersionRetired):
            out.rejections.append(Rejection(
                cand.device_id, cand.seq, Reason.VERSION_RETIRED,
                f"v1 {cand.kind} readings are refused from tree size {result.retire_v1_after} on "
                "(protocol.cutover): send protocol v2", cand.digest))
        elif isinstance(result, DeviceRevoked):
            out.rejections.append(Rejection(
                cand.device_id, cand.seq, Reason.REVOKED, f"device revoked at leaf {result.index}", cand.digest))
        else:
            assert isinstance(result, SeqReused)
            out.rejections.append(Rejection(
                cand.device_id, cand.seq, Reason.SEQ_REUSED,
                f"seq {cand.seq} is already anchored at leaf {result.index} with different content", cand.digest))

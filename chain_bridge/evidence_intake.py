"""Evidence from requesters: `access.fault` entries published on `cc/v1/access/evidence`, decided and appended.

A requester whose capsule fragments do not verify signs an `access.fault` naming the miner (record_access) and
publishes it here, wherever it is: it needs no access to the bridge host. The bridge decides it with the contract
rules — which re-verify the miner's signature on its fragments and that one of them really fails against the
anchored capsule — and appends it, so the fault counts against that miner on every replica. Nothing is trusted
from the broker: a message that is not a well-formed `access.fault` entry, or that the rules refuse, is counted
and logged and never reaches the ledger. The queue is bounded; a flood is dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from typing import TYPE_CHECKING

from carechain.access import MAX_CAPSULE_FRAGMENTS_BYTES
from carechain.entries import ACCESS_FAULT, Entry, EntryError
from chain_bridge.contract_gate import append_if_accepted
from chain_bridge.ledger.store import Ledger

if TYPE_CHECKING:
    from chain_bridge.contract_gate import ContractGate

MAX_PENDING = 64  # faults waiting to be decided; each holds up to one miner message (≤ 1 MiB)
MAX_FAULT_BYTES = MAX_CAPSULE_FRAGMENTS_BYTES + 4096  # the miner's message plus the requester's envelope
FAULT_TYPES = frozenset({ACCESS_FAULT})
log = logging.getLogger("carechain.bridge")


class EvidenceIntake:
    """Takes fault entries from the broker's thread, decides and appends them on the sequencer's."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes] = queue.Queue(MAX_PENDING)
        self.stats: Counter[str] = Counter()  # "appended", "dropped", "too_large", "bad_entry", and rule reasons

    def submit(self, payload: bytes) -> None:
        """From the MQTT thread: queue one message, or count why not."""
        if len(payload) > MAX_FAULT_BYTES:
            self.stats["too_large"] += 1
            log.warning("access evidence of %d bytes refused: the limit is %d", len(payload), MAX_FAULT_BYTES)
            return
        try:
            self._queue.put_nowait(bytes(payload))
        except queue.Full:
            self.stats["dropped"] += 1
            log.warning("access evidence dropped: %d faults already wait to be decided", MAX_PENDING)

    def drain(self, ledger: Ledger, gate: ContractGate, lock: threading.Lock) -> list[int]:
        """Decide every queued fault against the contracts and append the accepted ones; their leaf indexes."""
        appended: list[int] = []
        while True:
            try:
                raw = self._queue.get_nowait()
            except queue.Empty:
                return appended
            try:
                entry = Entry.decode(raw, FAULT_TYPES)
            except EntryError as exc:
                self.stats["bad_entry"] += 1
                log.warning("access evidence refused: %s", exc)
                continue
            index = append_if_accepted(ledger, gate, lock, entry)
            if isinstance(index, str):
                self.stats[index] += 1
                log.warning("access evidence refused by the contracts: %s", index)
                continue
            self.stats["appended"] += 1
            appended.append(index)
            log.warning("access.fault appended at leaf %d: a miner's capsule fragments did not verify", index)

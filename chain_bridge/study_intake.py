"""Study entries from aggregators: `study.result`, `study.sample` and `study.audit` entries published on
`cc/v1/miner/<id>/study`, decided and appended (docs/market.md, "The computation" and "Audits").

Each of a study's aggregators signs its `study.result` with its miner key and publishes it on its own miner
topic (the broker lets only that miner write there). The bridge decides it with the contract rules — which
check that the signer is one of the study's aggregators, has not posted yet, and that the result fits the
study's contributions, cohort rule and query — and appends it; a majority of equal results decides the study
on every replica. The same miner topic carries the `study.sample` an aggregator sends once its study is answered
and the `study.audit` verdicts of its audit MPC; the rules decide those too (which checkpoint seeds the
sample, whether the signer aggregates the study). A labelling miner of a clinical trial sends its
`trial.commit`, `trial.reveal`, `trial.recover` and `trial.unblind_key` entries on the same topic (docs/trials.md);
the trial rules decide whether the signer is one of the trial's committers and the entry is due. Nothing is
trusted from the broker: a message that is not a well-formed entry of those seven types, is signed by another key
than the topic's miner, or that the rules refuse, is counted and logged and never reaches the ledger. The queue
is bounded; a flood is dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from typing import TYPE_CHECKING

from carechain import envelope
from carechain.entries import (
    STUDY_AUDIT,
    STUDY_RESULT,
    STUDY_SAMPLE,
    TRIAL_COMMIT,
    TRIAL_RECOVER,
    TRIAL_REVEAL,
    TRIAL_UNBLIND_KEY,
    Entry,
    EntryError,
)
from chain_bridge.contract_gate import append_if_accepted
from chain_bridge.ledger.store import Ledger

if TYPE_CHECKING:
    from chain_bridge.contract_gate import ContractGate

__all__ = ["MAX_PENDING", "MAX_RESULT_BYTES", "StudyIntake"]

MAX_PENDING = 64  # results waiting to be decided
# valid/included list at most 100,000 leaf indexes of ≤ 9 CBOR bytes each, plus the answer and the envelope
MAX_RESULT_BYTES = 2 * 100_000 * 9 + 16_384
# What a miner's study topic carries: its aggregator's study entries, and a labelling miner's trial entries
# (`chain_miner.trial_runner`: its seed commitment, reveal, escrow share of a missing seed, unblinding keys).
RESULT_TYPES = frozenset({STUDY_RESULT, STUDY_SAMPLE, STUDY_AUDIT, TRIAL_COMMIT, TRIAL_REVEAL, TRIAL_RECOVER,
                          TRIAL_UNBLIND_KEY})
# Refusals that come with honest miners racing each other (counted, logged at INFO, not WARNING).
EXPECTED_REFUSALS = frozenset({"already_sampled", "study_already_decided"})
log = logging.getLogger("carechain.bridge")


class StudyIntake:
    """Takes result entries from the broker's thread, decides and appends them on the sequencer's."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(MAX_PENDING)
        self.stats: Counter[str] = Counter()  # "appended", "dropped", "too_large", "bad_entry",
        # "not_the_topics_miner", and rule reasons

    def submit(self, miner_id: str, payload: bytes) -> None:
        """From the MQTT thread: queue one message that arrived on `miner_id`'s study topic, or count why not."""
        if len(payload) > MAX_RESULT_BYTES:
            self.stats["too_large"] += 1
            log.warning("study result of %d bytes from miner %s refused: the limit is %d", len(payload), miner_id,
                        MAX_RESULT_BYTES)
            return
        try:
            self._queue.put_nowait((miner_id, bytes(payload)))
        except queue.Full:
            self.stats["dropped"] += 1
            log.warning("study result from miner %s dropped: %d results already wait to be decided", miner_id,
                        MAX_PENDING)

    def drain(self, ledger: Ledger, gate: ContractGate, lock: threading.Lock) -> list[int]:
        """Decide every queued result against the contracts and append the accepted ones; their leaf indexes."""
        appended: list[int] = []
        while True:
            try:
                miner_id, raw = self._queue.get_nowait()
            except queue.Empty:
                return appended
            try:
                entry = Entry.decode(raw, RESULT_TYPES)
                signer = envelope.parse(entry.cose).kid
            except (EntryError, envelope.EnvelopeError) as exc:
                self.stats["bad_entry"] += 1
                log.warning("study result from miner %s refused: %s", miner_id, exc)
                continue
            if signer != miner_id:  # the ACL lets only that miner publish here; a relayed entry is not its own
                self.stats["not_the_topics_miner"] += 1
                log.warning("study result on miner %s's topic refused: it is signed by %s", miner_id, signer)
                continue
            index = append_if_accepted(ledger, gate, lock, entry)
            if isinstance(index, str):
                self.stats[index] += 1
                # Every aggregator sends the sample and its result; all but the first are refused by design.
                level = logging.INFO if index in EXPECTED_REFUSALS else logging.WARNING
                log.log(level, "%s from miner %s refused by the contracts: %s", entry.type, miner_id, index)
                continue
            self.stats["appended"] += 1
            appended.append(index)
            log.info("%s from miner %s appended at leaf %d", entry.type, miner_id, index)

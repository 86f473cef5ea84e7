"""The bridge's ingest spine, one named stage per module:

receive (`receive`: MQTT in, batches, one loop for in-process and worker modes) → check (`check`: parse,
verify, validate) → guards (`guards`: seq, rate) → sequence (`chain_bridge.ledger.dedup`: new, resend or
conflict) → append (`Ledger.append_events`: group commit) → receipt (`sequence`: only after commit).
Every stage hands on typed values (`verdicts`); every refusal is a `Rejection` with a
`carechain.errors.Reason`.
"""

from chain_bridge.ingest.check import Ingest
from chain_bridge.ingest.guards import RateGuard, SeqGuard
from chain_bridge.ingest.receive import Inbox, Receiver, RegistryView, VerdictSource, check_batch
from chain_bridge.ingest.sequence import SequencedBatch, Sequencer
from chain_bridge.ingest.verdicts import EventCandidate, RawMessage, Rejection, Verdict
from chain_bridge.ledger.dedup import Dedup

__all__ = ["Dedup", "EventCandidate", "Inbox", "Ingest", "RateGuard", "RawMessage", "Receiver",
           "RegistryView", "Rejection", "SeqGuard", "SequencedBatch", "Sequencer", "Verdict", "VerdictSource",
           "check_batch"]

"""The values that flow between the ingest stages: a raw message in, then per event a verdict.

A verdict is either an `EventCandidate` (checked, ready for the sequencer) or a `Rejection` (why not,
and to whom the receipt goes). Both are small immutable values that cross the process boundary between
ingest workers and the sequencer as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from carechain.errors import Reason, is_retryable
from chain_bridge.ledger.store import EventCandidate

__all__ = ["EventCandidate", "RawMessage", "Rejection", "Verdict"]


class RawMessage(NamedTuple):
    """One MQTT message as received: its topic and payload bytes."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Rejection:
    """An event refused, with its `Reason` (or "contract:<rule>") and what exactly was wrong."""

    device_id: str | None  # the device the receipt goes to (from the topic), if any
    seq: int | None
    reason: str  # a `Reason`, or `carechain.errors.contract_reason(rule)`
    detail: str
    digest: bytes = b""  # SHA-256 of the refused bytes (see carechain.receipts)

    @property
    def retryable(self) -> bool:
        return is_retryable(self.reason)

    @property
    def receipted(self) -> bool:
        """Whether the device hears of it: it must be named by the topic, and the reason must be one it is told."""
        return self.device_id is not None and self.reason != Reason.BAD_TOPIC


Verdict = EventCandidate | Rejection

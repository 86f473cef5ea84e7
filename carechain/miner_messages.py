"""Miner messages (JSON over MQTT); docs/miners.md. Topic names live in carechain.topics (re-exported here)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from carechain.topics import (
    MINER_COSIG_WILDCARD,
    MINER_EVIDENCE_WILDCARD,
    MINER_REQUEST_WILDCARD,
    miner_of_topic,
)
from carechain.topics import miner_cosignature as cosignature
from carechain.topics import miner_evidence as evidence
from carechain.topics import miner_request as request
from carechain.topics import miner_response as response

__all__ = ["MAX_ENTRIES_PER_RESPONSE", "MINER_COSIG_WILDCARD", "MINER_EVIDENCE_WILDCARD", "MINER_REQUEST_WILDCARD",
           "RATE_LIMITED", "CosignatureMessage", "ProofRequestMessage", "ProofResponseMessage", "cosignature",
           "evidence", "payload_budget",
           "miner_of_topic", "request", "response"]
# The most entries one answer carries; the bytes usually bound a page first (the broker's packet limit).
MAX_ENTRIES_PER_RESPONSE = 10_000
# What an MQTT 3.1.1 PUBLISH adds to its payload besides the topic: fixed header (≤ 5), topic length (2),
# packet id (2); rounded up.
PACKET_OVERHEAD = 16


def payload_budget(max_packet_bytes: int, topic: str) -> int:
    """The largest payload a PUBLISH on `topic` may carry under a broker's `max_packet_bytes`."""
    return max_packet_bytes - PACKET_OVERHEAD - len(topic.encode())


# The start of a response's `error` when the requester asked too often: "rate_limited: retry in 0.050 s".
RATE_LIMITED = "rate_limited"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProofRequestMessage(_Message):
    """Miner → bridge: prove min(old, new) → max(old, new); send entries old..new-1 when the log grew."""

    id: str = Field(max_length=64)
    old_size: int = Field(ge=0)
    new_size: int = Field(ge=0)


class ProofResponseMessage(_Message):
    """Bridge → miner: the proof, and a page of the asked entries — a prefix of them, as many as fit one packet
    under the broker's limit. Fewer entries than asked (and no error): ask again from `old_size + len(entries)`.
    A page is not a new field, so miners that predate paging still parse every answer (docs/miners.md)."""

    id: str = Field(max_length=64)
    old_size: int = Field(ge=0)
    new_size: int = Field(ge=0)
    consistency_path: list[str] = Field(default_factory=list, max_length=64)  # hex
    entries: list[str] = Field(default_factory=list, max_length=MAX_ENTRIES_PER_RESPONSE)  # hex leaves
    error: str | None = None


class CosignatureMessage(_Message):
    """Miner → everyone (retained): the log's checkpoint note and this miner's cosignature line."""

    v: int = 1
    miner: str  # cosigner (key) name
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    tree_size: int = Field(ge=0)
    checkpoint: str  # the log-signed note, as received
    cosignature: str  # one signature line, "— <name> <base64>\n"

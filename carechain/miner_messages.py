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
           "CosignatureMessage", "ProofRequestMessage", "ProofResponseMessage", "cosignature", "evidence",
           "miner_of_topic", "request", "response"]
# Far more than a checkpoint interval's worth of entries; a miner far behind catches up in several steps.
MAX_ENTRIES_PER_RESPONSE = 10_000


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProofRequestMessage(_Message):
    """Miner → bridge: prove min(old, new) → max(old, new); send entries old..new-1 when the log grew."""

    id: str = Field(max_length=64)
    old_size: int = Field(ge=0)
    new_size: int = Field(ge=0)


class ProofResponseMessage(_Message):
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

"""Miner topics and messages (JSON over MQTT); docs/miners.md. To move into carechain.topics once merged."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from carechain.topics import PREFIX

MINER_REQUEST_WILDCARD = f"{PREFIX}/miner/+/req"
MINER_COSIG_WILDCARD = f"{PREFIX}/miner/+/cosig"
MINER_EVIDENCE_WILDCARD = f"{PREFIX}/miner/+/evidence"
# Far more than a checkpoint interval's worth of entries; a miner far behind catches up in several steps.
MAX_ENTRIES_PER_RESPONSE = 10_000
_MINER_ID = re.compile(r"[a-z2-7]{1,64}")
_MINER_TOPIC = re.compile(rf"{PREFIX}/miner/([^/]+)/(req|resp|cosig|evidence)")


def request(miner_id: str) -> str:
    return f"{PREFIX}/miner/{_checked(miner_id)}/req"


def response(miner_id: str) -> str:
    return f"{PREFIX}/miner/{_checked(miner_id)}/resp"


def cosignature(miner_id: str) -> str:
    return f"{PREFIX}/miner/{_checked(miner_id)}/cosig"


def evidence(miner_id: str) -> str:
    return f"{PREFIX}/miner/{_checked(miner_id)}/evidence"


def miner_of_topic(topic: str) -> tuple[str, str] | None:
    """(miner id, kind) of a miner topic, or None when the topic is not one."""
    m = _MINER_TOPIC.fullmatch(topic)
    return (m.group(1), m.group(2)) if m and _MINER_ID.fullmatch(m.group(1)) else None


def _checked(miner_id: str) -> str:
    if not _MINER_ID.fullmatch(miner_id):
        raise ValueError(f"{miner_id!r} is not a miner id (lowercase base32, as Identity.device_id)")
    return miner_id


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

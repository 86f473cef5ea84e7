"""Miner messages (JSON over MQTT); docs/miners.md "Signed messages". Topic names live in carechain.topics
(re-exported here).

Every message that carries authority is signed, so that who may *publish* on a topic (the broker's ACL) is
never what a reader relies on:

- the log key signs each proof response (`ProofAttestation`: request id, sizes, consistency path, digest of
  the entries, error), so a miner acts only on what the log itself said, and a failing proof it signed is
  evidence against it that nobody else can make;
- a miner's key signs its hello, its cosignature messages and its evidence (`SignedMessage`).

Signatures are Ed25519 over `canonical CBOR [domain, body]`, the domain naming the message kind so that no
signature of one kind is ever valid as another.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field

from carechain import cbor
from carechain.identity import Identity, device_id_for, verify_signature
from carechain.merkle import leaf_hash
from carechain.topics import (
    MINER_COSIG_WILDCARD,
    MINER_EVIDENCE_WILDCARD,
    MINER_HELLO_WILDCARD,
    MINER_REQUEST_WILDCARD,
    miner_of_topic,
)
from carechain.topics import miner_cosignature as cosignature
from carechain.topics import miner_evidence as evidence
from carechain.topics import miner_hello as hello
from carechain.topics import miner_request as request
from carechain.topics import miner_response as response

__all__ = ["MAX_ENTRIES_PER_RESPONSE", "MAX_MPC_CERT_CHARS", "MINER_COSIG_WILDCARD", "MINER_EVIDENCE_WILDCARD",
           "MINER_HELLO_WILDCARD", "MINER_REQUEST_WILDCARD", "RATE_LIMITED", "CosignatureMessage", "MinerHello",
           "ProofAttestation", "ProofRequestMessage", "ProofResponseMessage", "SignedMessage", "cosignature",
           "entries_digest",
           "evidence", "from_miner", "hello", "miner_of_topic", "payload_budget", "request", "response",
           "signing_bytes"]
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


_SIG = Field(default=None, pattern=r"^[0-9a-f]{128}$")  # hex Ed25519 signature


def signing_bytes(domain: str, body: Any) -> bytes:
    """What a signature of kind `domain` covers: canonical CBOR `[domain, body]`."""
    return cbor.encode([domain, body])


def entries_digest(entries: Sequence[bytes]) -> bytes:
    """SHA-256 over the RFC 9162 leaf hashes of `entries`, in order: what a signed proof response commits to."""
    h = hashlib.sha256()
    for e in entries:
        h.update(leaf_hash(e))
    return h.digest()


# A hello's PEM certificate for its MPC channels (chain_miner.mpc_tls writes about 900 characters).
MAX_MPC_CERT_CHARS = 2048


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignedMessage(_Message):
    """A message its author signs with its Ed25519 key over every field but `sig` (see the module doc)."""

    DOMAIN: ClassVar[str]
    sig: str | None = _SIG

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.DOMAIN, self.model_dump(mode="json", exclude={"sig"}))

    def signed(self, key: Identity) -> Self:
        """This message with `key`'s signature."""
        return self.model_copy(update={"sig": key.sign(self.signing_bytes()).hex()})

    def signed_by(self, public_key: bytes) -> bool:
        """True when `sig` is `public_key`'s signature of this message."""
        return self.sig is not None and verify_signature(public_key, self.signing_bytes(), bytes.fromhex(self.sig))


class ProofRequestMessage(_Message):
    """Miner → bridge: prove min(old, new) → max(old, new); send entries old..new-1 when the log grew."""

    id: str = Field(max_length=64)
    old_size: int = Field(ge=0)
    new_size: int = Field(ge=0)


class ProofAttestation(SignedMessage):
    """What the log signs of one proof response: the request it answers, the consistency path, the digest of
    the entries it carries (`entries_digest`) and its error. Small (no entries), so fork evidence carries it
    whole: a failing path under the log's signature is something only the log could have produced."""

    DOMAIN: ClassVar[str] = "carechain/v1/proof-response"
    id: str = Field(max_length=64)
    old_size: int = Field(ge=0)
    new_size: int = Field(ge=0)
    consistency_path: list[str] = Field(default_factory=list, max_length=64)  # hex
    entries_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    error: str | None = None


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
    sig: str | None = _SIG  # the log key's signature of `attestation()`; miners drop answers without a valid one

    def attestation(self) -> ProofAttestation:
        """The signed part of this response (raises ValueError when an entry is not hex)."""
        return ProofAttestation(id=self.id, old_size=self.old_size, new_size=self.new_size,
                                consistency_path=self.consistency_path, error=self.error, sig=self.sig,
                                entries_digest=entries_digest([bytes.fromhex(e) for e in self.entries]).hex())

    def signed(self, sign: Callable[[bytes], bytes]) -> ProofResponseMessage:
        """This response signed by the log (`sign`: the log key's `Identity.sign`)."""
        return self.model_copy(update={"sig": sign(self.attestation().signing_bytes()).hex()})

    def signed_by(self, log_public_key: bytes) -> bool:
        """True when the log key signed exactly this response (entries included)."""
        try:
            return self.attestation().signed_by(log_public_key)
        except ValueError:
            return False


class CosignatureMessage(SignedMessage):
    """Miner → everyone (retained): the log's checkpoint note and this miner's cosignature line, signed by the
    miner key `public_key` (`from_miner` checks it against the topic's miner id)."""

    DOMAIN: ClassVar[str] = "carechain/v1/miner-cosignature"

    v: int = 1
    miner: str  # cosigner (key) name
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    tree_size: int = Field(ge=0)
    checkpoint: str  # the log-signed note, as received
    cosignature: str  # one signature line, "— <name> <base64>\n"


class MinerHello(SignedMessage):
    """Miner → all (retained on `cc/v1/miner/{id}/hello`): this miner is up, with its key and cosigner name.
    The miner's last will empties the topic, so a crashed miner drops out of discovery at once."""

    DOMAIN: ClassVar[str] = "carechain/v1/miner-hello"
    v: int = 1
    miner: str  # the miner's id: device_id_for(public_key)
    name: str  # its cosigner name
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    ts: int = Field(ge=0)  # POSIX milliseconds when it came up
    # host:port of its data-market aggregator (MPyC), for the other aggregators of its studies; None: it does
    # not aggregate. Optional and left out of what is signed when None, so hellos of miners that predate it
    # still verify.
    mpc: str | None = Field(default=None, max_length=262, pattern=r"^[^\s:/]+:[0-9]{1,5}$")
    # The PEM certificate its MPC party presents (chain_miner.mpc_tls): the other aggregators trust exactly the
    # certificates their peers' signed hellos carry. Optional and left out of what is signed when None, like `mpc`.
    mpc_cert: str | None = Field(default=None, max_length=MAX_MPC_CERT_CHARS)

    def signing_bytes(self) -> bytes:
        exclude = {"sig"} | {name for name in ("mpc", "mpc_cert") if getattr(self, name) is None}
        return signing_bytes(self.DOMAIN, self.model_dump(mode="json", exclude=exclude))


def from_miner(msg: CosignatureMessage | MinerHello, miner_id: str) -> bool:
    """True when `msg` carries the key of miner `miner_id` (the id in its topic) and that key signed it."""
    key = bytes.fromhex(msg.public_key)
    if not hmac.compare_digest(device_id_for(key), miner_id):
        return False
    if isinstance(msg, MinerHello) and msg.miner != miner_id:
        return False
    return msg.signed_by(key)

"""What the owner's and the requester's tools read from a replica of the contract state.

Pure functions over `contract_rules.runtime.State`: the registered miners, a party's keys, and one access
record with everything a requester needs to open it (threshold, miners' keys, the owner's re-encryption
keys, the operator keys that sign device registrations).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract_rules import access as access_rules
from contract_rules.runtime import State


class LedgerViewError(LookupError):
    """The ledger does not hold what the command needs (a party, a key, an access record)."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class PartyKeys:
    party_id: str
    role: str
    name: str
    pk: bytes
    pre_pk: bytes | None
    pre_vk: bytes | None


@dataclass(frozen=True)
class AccessContext:
    """One access record and the keys needed to check and open what it grants."""

    index: int  # the grant's leaf index: the access record's key
    record: Mapping[str, Any]
    owner: PartyKeys
    requester: PartyKeys
    miners: Mapping[str, bytes]  # the grant's miners → Ed25519 public keys
    operator_keys: Mapping[str, bytes]  # genesis operators: they sign device registrations

    @property
    def threshold(self) -> int:
        return int(self.record["threshold"])


def party(state: State, party_id: str) -> PartyKeys:
    raw = state.table("parties").get(party_id)
    if raw is None:
        raise LedgerViewError(f"party {party_id} is not registered on this ledger (`carechain party register`)")
    return PartyKeys(party_id, raw["role"], raw["name"], raw["pk"], raw.get("pre_pk"), raw.get("pre_vk"))


def party_with_pre_keys(state: State, party_id: str) -> PartyKeys:
    p = party(state, party_id)
    if p.pre_pk is None or p.pre_vk is None:
        raise LedgerViewError(f"party {party_id} has no re-encryption key on the ledger (register it with "
                              f"`carechain party register ROLE KEY --pre-key FILE`)")
    return p


def registered_miners(state: State) -> dict[str, bytes]:
    """Registered miner party id → Ed25519 public key, the set grants draw their miners from."""
    parties = state.table("parties")
    return {m: parties[m]["pk"] for m in access_rules.registered_miners(state)}


def access_context(state: State, index: int) -> AccessContext:
    record = access_rules.access_record(state, index)
    if record is None:
        raise LedgerViewError(f"no access record at leaf {index} (the grant's leaf, from `carechain access grant`)")
    parties = state.table("parties")
    missing = [m for m in record["miners"] if m not in parties]
    if missing:
        raise LedgerViewError(f"access {index} names unregistered miners {', '.join(missing)}")
    return AccessContext(index, record, party_with_pre_keys(state, record["owner"]),
                         party_with_pre_keys(state, record["requester"]),
                         {m: parties[m]["pk"] for m in record["miners"]}, dict(state.operators))


def find_request(state: State, request_hash_hex: str) -> Mapping[str, Any] | None:
    """The anchored request with this hash (table `access_requests`), or None."""
    found: Mapping[str, Any] | None = state.table("access_requests").get(request_hash_hex)
    return found

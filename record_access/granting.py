"""The owner's side: turn a requester's signed request into a signed grant carrying sealed key fragments.

The owner splits a re-encryption key to the requester into n fragments (any m re-encrypt), and seals each
to one miner. The miners are not the owner's pick: `choose_miners` draws them from the seed of a final
checkpoint (its cosignatures are unpredictable to the bridge and to any one miner) and the request's
hash, and the contract rules recompute the draw. Pure apart from the randomness inside umbral's
fragment generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from carechain import access, reencryption
from carechain.checkpoint import NoteError, parse_note
from carechain.entries import Entry
from carechain.identity import Identity
from carechain.seed import checkpoint_seed
from contract_rules import transactions as ce
from record_access.requesting import SignedRequest

DEFAULT_THRESHOLD = 3
DEFAULT_SHARES = 5
MAX_SHARES = 16


class GrantError(ValueError):
    """A grant that cannot be built from these inputs; the message says which and why."""


@dataclass(frozen=True)
class SignedGrant:
    entry: Entry
    grant: ce.AccessGrant
    request_hash: bytes


def seed_of_final_checkpoint(note: str) -> bytes:
    """The seed of a final checkpoint note: its body and every signature line on it (the log's and the
    miners' cosignatures), as for storage placement (`carechain.seed.checkpoint_seed`)."""
    try:
        body, signatures = parse_note(note)
    except NoteError as exc:
        raise GrantError(f"the seed checkpoint is not a signed note: {exc}") from None
    if len(signatures) < 2:
        raise GrantError("the seed checkpoint carries no miner cosignature: it is not final")
    return checkpoint_seed(body, [s.signature for s in signatures])


def build_grant(owner: Identity, owner_pre: reencryption.PreKey, request: SignedRequest, *, requester_pre_pk: bytes,
                miners: Mapping[str, bytes], final_note: str, threshold: int = DEFAULT_THRESHOLD,
                shares: int = DEFAULT_SHARES, expires_ms: int, ts: int) -> SignedGrant:
    """Sign a grant for `request`: `shares` key fragments, any `threshold` of which re-encrypt, each sealed
    to one miner drawn from `miners` (registered miner id → Ed25519 public key) by the final checkpoint."""
    if request.request.owner != owner.device_id:
        raise GrantError(f"the request is addressed to owner {request.request.owner}, not to this key "
                         f"({owner.device_id})")
    if not 1 <= threshold <= shares <= MAX_SHARES:
        raise GrantError(f"need 1 <= threshold ({threshold}) <= shares ({shares}) <= {MAX_SHARES}")
    if len(miners) < shares:
        raise GrantError(f"{shares} key fragments need {shares} registered miners; the ledger has {len(miners)}")
    if expires_ms <= ts:
        raise GrantError("the grant would already be expired: its expiry must lie in the future")
    expires_ms = min(expires_ms, request.request.expires_ms)  # never beyond what the requester asked for
    hash_ = access.request_hash(request.leaf())
    chosen = access.choose_miners(seed_of_final_checkpoint(final_note), sorted(miners), shares, hash_)
    kfrags = reencryption.make_kfrags(owner_pre, requester_pre_pk, threshold, shares)
    sealed = [access.seal_to_miner(miners[m], kfrag) for m, kfrag in zip(chosen, kfrags, strict=True)]
    grant = ce.AccessGrant(request=hash_.hex(), requester=request.requester, threshold=threshold, miners=chosen,
                           kfrags=sealed, seed_checkpoint=final_note, expires_ms=expires_ms, ts=ts)
    return SignedGrant(ce.access_grant_entry(owner, grant), grant, hash_)


def build_revoke(owner: Identity, grant_index: int, reason: str, ts: int) -> Entry:
    """The owner's `access.revoke` of the grant at leaf `grant_index`: miners and the bridge refuse it after."""
    return ce.access_revoke_entry(owner, ce.AccessRevoke(grant_index=grant_index, reason=reason, ts=ts))

"""Access rules (v1): owner-authorized, always-logged access to sealed records (docs/access.md, docs/contracts.md).

A requester's signed `access.request` is kept in table `access_requests` under the hex `request_hash` of its
leaf (never its index: the bridge appends events concurrently, so an owner cannot know it in advance). The
owner's `access.grant` names that hash and carries m-of-n key fragments, each sealed to one miner; the
miners must be exactly the ones `carechain.access.choose_miners` draws from the seed of a final checkpoint
(bridge-signed, cosigned by a majority of the registered miners), so neither the owner's client nor the
bridge nor one miner picks who holds them. The grant becomes the access record `access[<grant index>]`:
the log entry every access is read from, the owner's own included. Miners release capsule fragments only
for a record under a final checkpoint that `is_usable`, and only for its `granted_epochs`.

`access.revoke` (by the owner) ends a record; `access.fault` files a miner's signed capsule fragments of
which at least one fails verification against the anchored capsule, and counts it against that miner.

The read helpers at the end (`access_record`, `is_usable`, `granted_epochs`) are what miners, the bridge
and clients use, so all of them read the state the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

from carechain import access as access_core
from carechain.checkpoint import Checkpoint as CheckpointBody
from carechain.checkpoint import CheckpointError, NoteError, key_hash, parse_note
from carechain.cosignature import CosignatureError, Cosigner, cosignature_timestamp
from carechain.entries import Entry
from carechain.events import SEALED_KINDS
from carechain.identity import SIGNATURE_SIZE, verify_signature
from carechain.reencryption import ReencryptionError, verify_cfrag
from carechain.seed import checkpoint_seed
from contract_rules.runtime import Accept, Add, Outcome, Put, Reject, State, Tx
from contract_rules.transactions import (
    ACCESS_FAULT,
    ACCESS_GRANT,
    ACCESS_REQUEST,
    ACCESS_REVOKE,
    MAX_ACCESS_MINERS,
    AccessFault,
    AccessGrant,
    AccessRequest,
    AccessRevoke,
    parse,
)

NAME = "access"
VERSION = 1


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == ACCESS_REQUEST:
        return _request(state, tx)
    if tx.type == ACCESS_GRANT:
        return _grant(state, tx)
    if tx.type == ACCESS_REVOKE:
        return _revoke(state, tx)
    if tx.type == ACCESS_FAULT:
        return _fault(state, tx)
    return Reject("not_an_access_entry")


def request_key(leaf: bytes) -> str:
    """The `access_requests` key of an `access.request` leaf: its RFC 9162 leaf hash, hex."""
    return access_core.request_hash(leaf).hex()


def request_key_of(entry: Entry) -> str:
    """`request_key` of an `access.request` entry (what the owner's grant names in `request`)."""
    return request_key(entry.encode())


def _request(state: State, tx: Tx) -> Outcome:
    r = parse(AccessRequest, tx.payload)
    if r is None:
        return Reject("bad_payload")
    parties = state.table("parties")
    if parties[tx.signer].get("pre_pk") is None:
        return Reject("requester_has_no_pre_key")
    owner = parties.get(r.owner)
    if owner is None or owner["role"] != "patient" or owner.get("pre_pk") is None:
        return Reject("unknown_owner")
    if r.from_ms > r.to_ms:
        return Reject("bad_time_range")
    if r.expires_ms <= r.ts:
        return Reject("request_expired")
    if len(set(r.kinds)) != len(r.kinds) or not set(r.kinds) <= SEALED_KINDS:
        return Reject("bad_kinds")
    devices = state.table("devices")
    if len(set(r.devices)) != len(r.devices):
        return Reject("duplicate_devices")
    if any(d not in devices or devices[d]["owner"] != r.owner for d in r.devices):
        return Reject("device_not_owned")
    key = request_key(tx.leaf)
    if key in state.table("access_requests"):
        return Reject("duplicate_request")
    record = {**r.model_dump(exclude={"v", "nonce"}), "requester": tx.signer, "index": tx.index, "granted": None}
    return Accept((Put("access_requests", key, record),))


def _grant(state: State, tx: Tx) -> Outcome:
    g = parse(AccessGrant, tx.payload)
    if g is None:
        return Reject("bad_payload")
    request = state.table("access_requests").get(g.request)
    if request is None:
        return Reject("unknown_request")
    if request["owner"] != tx.signer:
        return Reject("not_the_owner")
    if request["requester"] != g.requester:
        return Reject("requester_mismatch")
    if request["granted"] is not None:
        return Reject("request_already_granted")
    if request["expires_ms"] <= g.ts:
        return Reject("request_expired")
    if g.expires_ms <= g.ts:
        return Reject("grant_expired")
    n = len(g.miners)
    if not 1 <= g.threshold <= n <= MAX_ACCESS_MINERS:
        return Reject("bad_threshold")
    if len(g.kfrags) != n:
        return Reject("kfrags_do_not_match_miners")
    if len(set(g.miners)) != n:
        return Reject("duplicate_miners")
    registered = registered_miners(state)
    if any(m not in registered for m in g.miners):
        return Reject("unknown_miner")
    seed = _seed_of(state, g.seed_checkpoint, registered, tx.index)
    if isinstance(seed, str):
        return Reject(seed)
    try:
        chosen = access_core.choose_miners(seed, registered, n, bytes.fromhex(g.request))
    except ValueError:
        return Reject("not_enough_miners")
    if chosen != g.miners:
        return Reject("miners_not_chosen_by_seed")
    record = {"owner": request["owner"], "requester": g.requester, "devices": request["devices"],
              "kinds": request["kinds"], "from_ms": request["from_ms"], "to_ms": request["to_ms"],
              "purpose": request["purpose"], "expires_ms": g.expires_ms, "threshold": g.threshold,
              "miners": list(g.miners), "kfrags": list(g.kfrags), "request": g.request, "at": tx.index,
              "ts": g.ts, "revoked_at": None}
    return Accept((Put("access", str(tx.index), record),
                   Put("access_requests", g.request, {**request, "granted": tx.index})))


def _seed_of(state: State, note: str, registered: list[str], index: int) -> bytes | str:
    """The seed of a final checkpoint note, or the reason it is not one.

    Final here means: signed by a genesis operator key (the bridge's log key is listed there) and cosigned
    by a majority of the miners registered now. Lines by other keys are ignored, as the signed-note spec
    asks; the seed is taken over all lines, exactly as `carechain.seed.checkpoint_seed` of the note the bridge
    publishes on `cc/v1/log/final`, so the owner's client uses that note unchanged.
    """
    try:
        body, signatures = parse_note(note)
        checkpoint = CheckpointBody.parse(body)
    except (NoteError, CheckpointError):
        return "bad_seed_checkpoint"
    if checkpoint.tree_size > index:
        return "seed_checkpoint_from_the_future"
    message = body.encode()
    parties = state.table("parties")
    bridge_signed = False
    cosigned: set[str] = set()
    for sig in signatures:
        for public_key in state.operators.values():
            if (sig.key_hash == key_hash(sig.name, public_key) and len(sig.signature) == SIGNATURE_SIZE
                    and verify_signature(public_key, message, sig.signature)):
                bridge_signed = True
        for miner in registered:
            try:
                cosigner = Cosigner(sig.name, parties[miner]["pk"])
            except CosignatureError:
                break  # the name is not a cosigner name: no miner signed this line
            if cosignature_timestamp(body, sig, cosigner) is not None:
                cosigned.add(miner)
    if not bridge_signed:
        return "seed_checkpoint_not_signed_by_the_bridge"
    if 2 * len(cosigned) <= len(registered):
        return "seed_checkpoint_not_final"
    return checkpoint_seed(body, [sig.signature for sig in signatures])


def _revoke(state: State, tx: Tx) -> Outcome:
    r = parse(AccessRevoke, tx.payload)
    if r is None:
        return Reject("bad_payload")
    record = access_record(state, r.grant_index)
    if record is None:
        return Reject("unknown_grant")
    if record["owner"] != tx.signer:
        return Reject("not_the_owner")
    if record["revoked_at"] is not None:
        return Reject("grant_already_revoked")
    return Accept((Put("access", str(r.grant_index), {**record, "revoked_at": tx.index}),))


def _fault(state: State, tx: Tx) -> Outcome:
    f = parse(AccessFault, tx.payload)
    if f is None:
        return Reject("bad_payload")
    record = access_record(state, f.grant_index)
    if record is None:
        return Reject("unknown_grant")
    evidence = hashlib.sha256(f.message).hexdigest()
    if evidence in state.table("access_fault_evidence"):
        return Reject("fault_already_recorded")
    try:
        miner = access_core.signer_of(f.message)
    except ValueError:
        return Reject("bad_fragments_message")
    if miner not in record["miners"]:
        return Reject("miner_not_in_grant")
    parties = state.table("parties")
    try:
        message = access_core.parse_capsule_fragments(f.message, parties[miner]["pk"])
    except ValueError:
        return Reject("bad_fragments_message")  # unsigned or malformed: it proves nothing against the miner
    if message.access != f.grant_index or message.miner != miner:
        return Reject("fragments_not_for_this_grant")
    owner, requester = parties[record["owner"]], parties[record["requester"]]
    epochs = state.table("epochs")
    bad = 0
    for frag in message.frags:
        anchored = epochs.get(f"{frag.dev}:{frag.epoch}")
        if anchored is None:
            bad += 1  # a fragment for an epoch that has no anchored capsule
            continue
        try:
            verify_cfrag(frag.cfrag, anchored["capsule"], owner["pre_pk"], owner["pre_vk"], requester["pre_pk"])
        except ReencryptionError:
            bad += 1
    if not bad:
        return Reject("no_fault_found")
    return Accept((Add("access_faults", miner, 1), Put("access_fault_evidence", evidence, tx.index)))


# -- read helpers: the one way miners, the bridge and clients read access records ---------------------

def registered_miners(state: State) -> list[str]:
    """The party ids of the registered miners, sorted (what `choose_miners` draws from)."""
    return sorted(pid for pid, party in state.table("parties").items() if party["role"] == "miner")


def access_record(state: State, grant_index: int) -> dict[str, Any] | None:
    """The access record created by the grant at leaf `grant_index`, or None if there is none."""
    record: dict[str, Any] | None = state.table("access").get(str(grant_index))
    return record


def is_usable(record: dict[str, Any], now_ms: int) -> bool:
    """Whether a record may still be served: not revoked and not expired at `now_ms`."""
    return record["revoked_at"] is None and now_ms < record["expires_ms"]


def granted_epochs(state: State, record: dict[str, Any]) -> list[tuple[str, int, bytes, bytes]]:
    """(device, epoch, capsule, key ciphertext) of every epoch the record grants, sorted by device and epoch.

    Granted: an epoch of one of the owner's devices in scope (all of them when `devices` is empty), still
    registered to the owner, whose capsule was anchored by the owner's key before the grant, and whose time
    span [epoch·epoch_ms, (epoch+1)·epoch_ms) overlaps [from_ms, to_ms].
    """
    owner, grant_at = record["owner"], record["at"]
    devices = state.table("devices")
    in_scope = {d for d in (record["devices"] or devices) if d in devices and devices[d]["owner"] == owner}
    out: list[tuple[str, int, bytes, bytes]] = []
    for key, e in state.table("epochs").items():
        dev, _, epoch_text = key.rpartition(":")
        if dev not in in_scope or e["owner"] != owner or e["index"] >= grant_at:
            continue
        epoch = int(epoch_text)
        start = epoch * e["epoch_ms"]
        if start <= record["to_ms"] and start + e["epoch_ms"] > record["from_ms"]:
            out.append((dev, epoch, e["capsule"], e["key_ct"]))
    out.sort(key=lambda item: (item[0], item[1]))
    return out

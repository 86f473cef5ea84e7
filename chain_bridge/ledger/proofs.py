"""Build the offline-verifiable proof bundles of carechain.proofs from the ledger store."""

from __future__ import annotations

import base64

from carechain.proofs import ConsistencyBundle, InclusionBundle
from chain_bridge.ledger.store import Ledger, LedgerError


def inclusion_bundle(ledger: Ledger, device_id: str, seq: int, log_public_key: bytes) -> InclusionBundle:
    """Prove event (device_id, seq) against the latest checkpoint that covers it."""
    index = ledger.event_index(device_id, seq)
    if index is None:
        raise LedgerError(f"no event from device {device_id} with seq {seq} is in the log")
    latest = ledger.latest_checkpoint()
    if latest is None or latest[0] <= index:
        raise LedgerError(f"event is at leaf {index} but no checkpoint covers it yet; retry in a moment")
    size, note = latest
    return InclusionBundle(
        leaf_index=index,
        tree_size=size,
        root_hash=ledger.tree.root(size).hex(),
        inclusion_path=[h.hex() for h in ledger.tree.inclusion_proof(index, size)],
        entry=base64.b64encode(ledger.entry(index)).decode(),
        checkpoint=note,
        log_public_key=log_public_key.hex(),
    )


def consistency_bundle(ledger: Ledger, old_size: int, new_size: int | None, log_public_key: bytes
                       ) -> ConsistencyBundle:
    """Prove that the checkpoint at `new_size` (default: latest) extends the one at `old_size`."""
    if new_size is None:
        latest = ledger.latest_checkpoint()
        if latest is None:
            raise LedgerError("the log has no checkpoint yet")
        new_size = latest[0]
    old_note, new_note = ledger.checkpoint_at(old_size), ledger.checkpoint_at(new_size)
    if old_note is None or new_note is None:
        raise LedgerError(f"no checkpoint was issued at tree size {old_size if old_note is None else new_size}")
    if old_size > new_size:
        raise LedgerError(f"old size {old_size} is larger than new size {new_size}")
    return ConsistencyBundle(
        old_checkpoint=old_note,
        new_checkpoint=new_note,
        consistency_path=[h.hex() for h in ledger.tree.consistency_proof(old_size, new_size)],
        log_public_key=log_public_key.hex(),
    )

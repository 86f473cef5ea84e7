"""Opening granted records: collect capsule fragments, check every page, decrypt and verify every reading.

A sans-IO state machine (`Opening`) fed with the bytes that arrive on the requester's inbox — the
miners' capsule-fragments messages and the bridge's record pages — plus a pure per-record check
(`open_records`) that may run in worker processes. Nothing is trusted because of where it came from:

- a device key counts only from a device registration signed by a genesis operator key;
- an epoch's capsule only from an `epoch_key` event signed by that device and naming the grant's owner;
- a capsule fragment only if it is in a message signed by one of the grant's miners and verifies against
  the capsule, the owner's keys and ours (one that does not is kept as evidence against its miner);
- a reading only if its ciphertext hashes to the `ct` in the device-signed envelope (compared in
  constant time), the device signature holds, the AEAD opens, and the body validates
  (`carechain.record_check.open_record`, the one check every party runs; re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from carechain import access, envelope, events, reencryption
from carechain.entries import Entry, open_operator_entry
from carechain.identity import device_id_for
from carechain.record_check import Epoch, Problem, RecordRejected, open_record, open_records
from record_access.ledger_view import AccessContext

__all__ = ["Epoch", "EpochKey", "Fault", "Opening", "OpeningError", "Problem", "RecordRejected", "chunks",
           "open_record", "open_records"]


class OpeningError(Exception):
    """A page or a message that breaks the protocol (not one bad reading): the open cannot go on."""


@dataclass(frozen=True)
class Fault:
    """A miner's signed capsule-fragments message with at least one fragment that does not verify."""

    miner: str
    message: bytes
    detail: str


@dataclass(frozen=True)
class EpochKey:
    dev: str
    epoch: int
    epoch_ms: int
    capsule: bytes
    key_ct: bytes


@dataclass
class Opening:
    """The requester's view of one open: pages in, fragments in, data keys and records out."""

    ctx: AccessContext
    requester_pre_pk: bytes
    device_keys: dict[str, bytes] = field(default_factory=dict)  # dev → pk, from verified registrations
    epochs: dict[Epoch, EpochKey] = field(default_factory=dict)
    records: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    pages_seen: set[int] = field(default_factory=set)
    last_page: int | None = None
    faults: list[Fault] = field(default_factory=list)
    _messages: dict[str, access.CapsuleFragments] = field(default_factory=dict)  # miner → its message
    _raw: dict[str, bytes] = field(default_factory=dict)
    _checked: set[str] = field(default_factory=set)  # miners whose message was checked against the capsules
    _cfrags: dict[Epoch, dict[str, Any]] = field(default_factory=dict)  # epoch → miner → VerifiedCfrag

    # -- input ----------------------------------------------------------------------------------

    def on_fragments(self, raw: bytes) -> str | None:
        """A capsule-fragments message; the miner it came from, or None if it is not one of ours."""
        try:
            kid = envelope.parse(raw, max_bytes=access.MAX_CAPSULE_FRAGMENTS_BYTES).kid
        except envelope.EnvelopeError:
            return None
        miner_pk = self.ctx.miners.get(kid)
        if miner_pk is None:
            return None  # not one of the grant's miners: nothing it says counts
        try:
            msg = access.parse_capsule_fragments(raw, miner_pk)
        except ValueError:
            return None  # unsigned or malformed: not attributable to the miner, so not evidence either
        if msg.access != self.ctx.index or msg.miner != kid or kid in self._messages:
            return None
        self._messages[kid] = msg
        self._raw[kid] = raw
        self._check_fragments()
        return kid

    def on_page(self, raw: bytes) -> int | None:
        """A records page signed by the bridge (a genesis operator key: its log key); the next page to ask for,
        or None once the last one is in."""
        try:
            page = access.parse_signed_records_page(raw, self.ctx.operator_keys)
        except ValueError as exc:
            raise OpeningError(f"a records page that is not the bridge's: {exc}") from None
        if page.access != self.ctx.index:
            return None
        if page.page in self.pages_seen:
            return None
        for leaf in page.registrations:
            self._add_registration(leaf)
        for cose in page.epochs:
            self._add_epoch_key(cose)
        self.records.extend((r.index, r.cose, r.ct) for r in page.records)
        self.pages_seen.add(page.page)
        self.last_page = page.pages - 1  # every page says how many there are
        self._check_fragments()
        return None if self.complete_pages() else max(self.pages_seen) + 1

    def complete_pages(self) -> bool:
        return self.last_page is not None and self.pages_seen >= set(range(self.last_page + 1))

    def _add_registration(self, leaf: bytes) -> None:
        try:
            reg = open_operator_entry(Entry.decode(bytes(leaf)), dict(self.ctx.operator_keys))
        except ValueError as exc:
            raise OpeningError(f"a device registration in a records page is not operator-signed: {exc}") from None
        if device_id_for(reg.pk) != reg.dev:
            raise OpeningError(f"registration of {reg.dev} carries another device's key")
        self.device_keys[reg.dev] = reg.pk

    def _add_epoch_key(self, cose: bytes) -> None:
        try:
            msg = envelope.parse(bytes(cose))
        except envelope.EnvelopeError as exc:
            raise OpeningError(f"an epoch_key event in a records page does not parse: {exc}") from None
        pk = self.device_keys.get(msg.kid)
        if pk is None or not msg.verify(pk):
            raise OpeningError(f"epoch_key event of {msg.kid}: not signed by a registered device key")
        try:
            payload = events.validate_payload(msg.payload)
        except events.PayloadError as exc:
            raise OpeningError(f"epoch_key event of {msg.kid}: {exc}") from None
        body = msg.payload["body"]
        if payload.kind != "epoch_key" or payload.dev != msg.kid:
            raise OpeningError(f"a records page's epoch list holds a {payload.kind!r} event of {payload.dev}")
        if body["owner"] != self.ctx.owner.party_id:
            raise OpeningError(f"epoch {body['epoch']} of {msg.kid} is sealed to {body['owner']}, not to the grant's "
                               f"owner {self.ctx.owner.party_id}")
        self.epochs[(msg.kid, body["epoch"])] = EpochKey(msg.kid, body["epoch"], body["epoch_ms"], body["capsule"],
                                                         body["key_ct"])

    def _check_fragments(self) -> None:
        """Verify each miner's fragments once every epoch it names has its capsule (from the pages)."""
        owner = self.ctx.owner
        assert owner.pre_pk is not None and owner.pre_vk is not None  # access_context checked
        for miner, msg in self._messages.items():
            if miner in self._checked:
                continue
            named = [(f.dev, f.epoch, f.cfrag) for f in msg.frags]
            if any((dev, epoch) not in self.epochs for dev, epoch, _ in named) and not self.complete_pages():
                continue  # wait for the page with that capsule
            self._checked.add(miner)
            bad: list[str] = []
            for dev, epoch, cfrag in named:
                key = self.epochs.get((dev, epoch))
                if key is None:
                    bad.append(f"{dev}:{epoch} (no such epoch in the grant's records)")
                    continue
                try:
                    verified = reencryption.verify_cfrag(cfrag, key.capsule, owner.pre_pk, owner.pre_vk,
                                                         self.requester_pre_pk)
                except reencryption.ReencryptionError:
                    bad.append(f"{dev}:{epoch}")
                    continue
                self._cfrags.setdefault((dev, epoch), {})[miner] = verified
            if bad:
                self.faults.append(Fault(miner, self._raw[miner], f"capsule fragments that do not verify: "
                                                                  f"{', '.join(bad[:8])}"))

    # -- output ---------------------------------------------------------------------------------

    def missing_fragments(self) -> dict[Epoch, int]:
        """Epochs (with records) that still lack verified fragments, and how many more each needs."""
        need = self.ctx.threshold
        wanted = {(e.dev, e.epoch) for e in self.epochs.values()}
        return {e: need - len(self._cfrags.get(e, {})) for e in sorted(wanted)
                if len(self._cfrags.get(e, {})) < need}

    def ready(self) -> bool:
        return self.complete_pages() and not self.missing_fragments()

    def answered_by(self) -> list[str]:
        return sorted(self._messages)

    def data_keys(self, requester: reencryption.PreKey) -> dict[Epoch, bytes]:
        """Each epoch's data key, from any `threshold` verified fragments of distinct miners."""
        owner_pk = self.ctx.owner.pre_pk
        assert owner_pk is not None
        keys: dict[Epoch, bytes] = {}
        for epoch, frags in self._cfrags.items():
            key = self.epochs.get(epoch)
            if key is None or len(frags) < self.ctx.threshold:
                continue
            chosen = [frags[m] for m in sorted(frags)[: self.ctx.threshold]]
            try:
                keys[epoch] = reencryption.open_data_key(requester, owner_pk, key.capsule, chosen, key.key_ct)
            except reencryption.ReencryptionError as exc:
                raise OpeningError(f"epoch {epoch[1]} of {epoch[0]}: the data key does not open: {exc}") from None
        return keys


# -- one record: `open_record` in `carechain.record_check` (shared with the owner's agent and the auditors) --


def chunks(records: Sequence[tuple[int, bytes, bytes]], size: int) -> Iterable[Sequence[tuple[int, bytes, bytes]]]:
    for start in range(0, len(records), size):
        yield records[start:start + size]

"""Provenance of an exported reading: the device's COSE_Sign1 signature and the ledger inclusion proof.

Each Observation group (the Observations of one reading) gets one Provenance whose
- `signature` is the device's COSE_Sign1 event, byte for byte (`sigFormat` application/cose, `who` the Device);
- extension `ledger-inclusion-proof` (PROOF_URL) is the inclusion bundle of docs/proofs.md field by field: the
  exact leaf bytes, its index, the tree size and root, the audit path, and the checkpoint note the log key
  signed. (docs/fhir.md specifies it.)

`verify_bundle` re-checks every Provenance of a bundle offline — signature over the event, leaf hash,
inclusion proof against the checkpoint signed by the trusted log key — and that the Observations it covers
are that event's (device, time, identifier). The values themselves are not in the signed envelope (the
reading is sealed; the envelope carries the ciphertext's hash): the exporter checked them when it opened
the reading (hash, signature, AEAD), and the verifier sees which signed, anchored event each value claims.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from carechain import envelope
from carechain.entries import ENTRY_EVENT, Entry, EntryError
from carechain.identity import device_id_for
from carechain.proofs import InclusionBundle, VerificationError, verify_inclusion_bundle
from record_access.fhir.common import DEVICE_KEY_SYSTEM, DEVICE_SYSTEM, EVENT_SYSTEM, LEDGER_LEAF_SYSTEM, iso

PROOF_URL = "https://carechain.dev/fhir/StructureDefinition/ledger-inclusion-proof"
_SIGNATURE_TYPE = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                   "display": "Verification Signature"}
_AGENT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
COSE = "application/cose"
MAX_PATH = 64  # an RFC 9162 audit path for a log below 2**64 leaves


class ProvenanceError(ValueError):
    """A Provenance that does not verify; the message names the check that failed."""


@dataclass(frozen=True)
class InclusionProof:
    """What `chain_bridge` proves about one leaf (as `carechain.proofs.InclusionBundle`)."""

    leaf_index: int
    tree_size: int
    root_hash: bytes
    path: Sequence[bytes]
    entry: bytes  # the exact leaf bytes
    checkpoint: str  # the signed note
    log_public_key: bytes

    def bundle(self) -> InclusionBundle:
        return InclusionBundle(leaf_index=self.leaf_index, tree_size=self.tree_size, root_hash=self.root_hash.hex(),
                               inclusion_path=[h.hex() for h in self.path],
                               entry=base64.b64encode(self.entry).decode(), checkpoint=self.checkpoint,
                               log_public_key=self.log_public_key.hex())


def provenance(resource_id: str, targets: Sequence[str], device_url: str, cose: bytes, ts_ms: int,
               proof: InclusionProof) -> dict[str, Any]:
    """The Provenance of the Observations at `targets` (full URLs): signed by the Device at `device_url`."""
    who = {"reference": device_url}
    return {
        "resourceType": "Provenance", "id": resource_id,
        "extension": [proof_extension(proof)],
        "target": [{"reference": t} for t in targets],
        "recorded": iso(ts_ms),
        "agent": [{"type": {"coding": [{"system": _AGENT_TYPE, "code": "author", "display": "Author"}]},
                   "who": who}],
        "entity": [{"role": "source", "what": {"identifier": {"system": LEDGER_LEAF_SYSTEM,
                                                              "value": str(proof.leaf_index)}}}],
        "signature": [{"type": [_SIGNATURE_TYPE], "when": iso(ts_ms), "who": who, "sigFormat": COSE,
                       "data": base64.b64encode(cose).decode()}],
    }


def proof_extension(proof: InclusionProof) -> dict[str, Any]:
    """The `ledger-inclusion-proof` extension (docs/fhir.md): indexes as decimal strings (FHIR's integer is
    32-bit; a log outgrows it), hashes and leaf bytes base64, the path in order."""
    return {"url": PROOF_URL, "extension": [
        {"url": "leafIndex", "valueString": str(proof.leaf_index)},
        {"url": "treeSize", "valueString": str(proof.tree_size)},
        {"url": "rootHash", "valueBase64Binary": base64.b64encode(proof.root_hash).decode()},
        *({"url": "inclusionPath", "valueBase64Binary": base64.b64encode(h).decode()} for h in proof.path),
        {"url": "entry", "valueBase64Binary": base64.b64encode(proof.entry).decode()},
        {"url": "checkpoint", "valueString": proof.checkpoint},
        {"url": "logPublicKey", "valueBase64Binary": base64.b64encode(proof.log_public_key).decode()},
    ]}


# -- verification ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """One Provenance that holds: which event, at which leaf, under which checkpoint size."""

    provenance: str
    device_id: str
    seq: int
    leaf_index: int
    tree_size: int
    targets: int


def verify_bundle(bundle: Mapping[str, Any], trusted_log_key: bytes | None) -> tuple[list[Verified],
                                                                                   list[tuple[str, str]]]:
    """Check every Provenance of a bundle (a dict as read from JSON); (those that hold, (id, why) of those
    that do not). Without `trusted_log_key`, only self-consistency: the key the bundle names signed the note."""
    by_url = {e.get("fullUrl"): e.get("resource") for e in bundle.get("entry") or [] if isinstance(e, Mapping)}
    good: list[Verified] = []
    bad: list[tuple[str, str]] = []
    for resource in by_url.values():
        if not isinstance(resource, Mapping) or resource.get("resourceType") != "Provenance":
            continue
        name = str(resource.get("id", "?"))
        try:
            good.append(verify_provenance(resource, by_url, trusted_log_key))
        except ProvenanceError as exc:
            bad.append((name, str(exc)))
    return good, bad


def verify_provenance(prov: Mapping[str, Any], by_url: Mapping[Any, Any], trusted_log_key: bytes | None) -> Verified:
    """One Provenance: its inclusion proof, the device signature over the included event, and its targets."""
    proof = _proof_of(prov)
    try:
        event = verify_inclusion_bundle(proof, trusted_log_key)
    except VerificationError as exc:
        raise ProvenanceError(str(exc)) from None
    if event.entry_type != ENTRY_EVENT or event.seq is None:
        raise ProvenanceError(f"the included leaf is a {event.entry_type!r} entry, not a device event")
    signatures = [s for s in prov.get("signature") or [] if isinstance(s, Mapping) and s.get("sigFormat") == COSE]
    if len(signatures) != 1:
        raise ProvenanceError(f"needs exactly one signature with sigFormat {COSE}, has {len(signatures)}")
    sig = signatures[0]
    cose = _b64(sig.get("data"), "signature.data")
    try:
        entry = Entry.decode(base64.b64decode(proof.entry))
    except EntryError as exc:
        raise ProvenanceError(f"the included leaf is not an entry: {exc}") from None
    if not hmac.compare_digest(entry.cose, cose):
        raise ProvenanceError("signature.data is not the COSE_Sign1 event of the included leaf")
    device = by_url.get(_ref(sig.get("who"), "signature.who"))
    if not isinstance(device, Mapping) or device.get("resourceType") != "Device":
        raise ProvenanceError("signature.who does not resolve to a Device in this bundle")
    dev_id, pk = _identifier(device, DEVICE_SYSTEM), _identifier(device, DEVICE_KEY_SYSTEM)
    try:
        key = bytes.fromhex(pk or "")
        msg = envelope.parse(cose)
    except (ValueError, envelope.EnvelopeError) as exc:
        raise ProvenanceError(f"device key or event does not parse: {exc}") from None
    if len(key) != 32 or device_id_for(key) != dev_id or msg.kid != dev_id:
        raise ProvenanceError(f"the event's signer {msg.kid} is not the Device {dev_id} with its public key")
    if not msg.verify(key):
        raise ProvenanceError(f"the COSE_Sign1 signature does not verify with device {dev_id}'s key")
    targets = [by_url.get(_ref(t, "target")) for t in prov.get("target") or []]
    if not targets:
        raise ProvenanceError("no target")
    for target in targets:
        _check_target(target, event.payload, dev_id, sig.get("who"))
    return Verified(str(prov.get("id")), dev_id, int(event.seq), event.leaf_index, event.checkpoint.tree_size,
                    len(targets))


def _check_target(target: Any, payload: Mapping[str, Any], dev_id: str, who: Any) -> None:
    if not isinstance(target, Mapping) or target.get("resourceType") != "Observation":
        raise ProvenanceError("a target does not resolve to an Observation in this bundle")
    key = f"{payload.get('dev')}/{payload.get('seq')}"
    if _identifier(target, EVENT_SYSTEM) != key:
        raise ProvenanceError(f"Observation {target.get('id')} is not event {key}")
    if (target.get("device") or {}).get("reference") != _ref(who, "signature.who"):
        raise ProvenanceError(f"Observation {target.get('id')} names another device than the signer {dev_id}")
    if not _same_instant(target.get("effectiveDateTime"), payload.get("ts")):
        raise ProvenanceError(f"Observation {target.get('id')}'s time is not the signed event's ts")


def _same_instant(text: Any, ts: Any) -> bool:
    import datetime

    if not isinstance(text, str) or not isinstance(ts, int):
        return False
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return when.tzinfo is not None and round(when.timestamp() * 1000) == ts


def _proof_of(prov: Mapping[str, Any]) -> InclusionBundle:
    found = [e for e in prov.get("extension") or [] if isinstance(e, Mapping) and e.get("url") == PROOF_URL]
    if len(found) != 1:
        raise ProvenanceError(f"needs exactly one {PROOF_URL} extension, has {len(found)}")
    parts: dict[str, list[Any]] = {}
    for sub in found[0].get("extension") or []:
        if isinstance(sub, Mapping):
            value = sub.get("valueString", sub.get("valueBase64Binary"))
            parts.setdefault(str(sub.get("url")), []).append(value)

    def one(name: str) -> Any:
        values = parts.get(name, [])
        if len(values) != 1:
            raise ProvenanceError(f"the inclusion proof needs one {name}, has {len(values)}")
        return values[0]

    path = parts.get("inclusionPath", [])
    if len(path) > MAX_PATH:
        raise ProvenanceError(f"an inclusion path of {len(path)} hashes (at most {MAX_PATH})")
    try:
        return InclusionBundle(
            leaf_index=int(one("leafIndex")), tree_size=int(one("treeSize")),
            root_hash=_b64(one("rootHash"), "rootHash").hex(),
            inclusion_path=[_b64(h, "inclusionPath").hex() for h in path],
            entry=base64.b64encode(_b64(one("entry"), "entry")).decode(), checkpoint=str(one("checkpoint")),
            log_public_key=_b64(one("logPublicKey"), "logPublicKey").hex())
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ProvenanceError):
            raise
        raise ProvenanceError(f"the inclusion proof does not parse: {exc}") from None


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProvenanceError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProvenanceError(f"{what} is not base64") from None


def _ref(value: Any, what: str) -> str:
    ref = value.get("reference") if isinstance(value, Mapping) else None
    if not isinstance(ref, str):
        raise ProvenanceError(f"{what} has no reference")
    return ref


def _identifier(resource: Mapping[str, Any], system: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("system") == system:
            value = ident.get("value")
            return str(value) if value is not None else None
    return None

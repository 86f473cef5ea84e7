"""The access log: every access record on the ledger, and its export as FHIR R4 AuditEvent resources.

Every access — the owner's own included — is an access record written by the contract rules before any
data can be opened, so the log is read from the ledger, not kept beside it: nobody can drop a line.

The export follows the IHE Basic Audit Log Patterns (BALP) for a disclosure: one AuditEvent per access
record, type DICOM 110106 "Export" (the records leave the system to the requester), action R, the
requester as the requesting agent with the purpose of use, the system as the source agent, and the
record owner as the patient entity (object role 1). Plain dicts, validated with `fhir.resources` by
the CLI and the tests.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from contract_rules.runtime import State

DCM = "http://dicom.nema.org/resources/ontology/DCM"
PARTY_SYSTEM = "urn:carechain:party"
ACCESS_SYSTEM = "urn:carechain:access"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_PROVENANCE_ROLE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


@dataclass(frozen=True)
class AccessLogEntry:
    """One access record as the log shows it: who, whose records, what, why, when, and its state."""

    index: int  # the grant's leaf index
    requester: str
    requester_role: str
    requester_name: str
    owner: str
    owner_name: str
    devices: tuple[str, ...]  # empty: all the owner's devices
    kinds: tuple[str, ...]  # empty: every sealed kind
    from_ms: int
    to_ms: int
    purpose: str
    ts: int  # when the owner signed the grant
    expires_ms: int
    threshold: int
    miners: tuple[str, ...]
    revoked_at: int | None

    @property
    def own_access(self) -> bool:
        return self.requester == self.owner

    def status(self, now_ms: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_ms <= now_ms else "active"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(devices=list(self.devices), kinds=list(self.kinds), miners=list(self.miners))
        return data


def access_log(state: State, *, owner: str | None = None, requester: str | None = None) -> list[AccessLogEntry]:
    """The access records of a replica, oldest first; optionally one owner's or one requester's."""
    parties = state.table("parties")

    def who(party_id: str) -> tuple[str, str]:
        p = parties.get(party_id) or {}
        return str(p.get("role", "unknown")), str(p.get("name", ""))

    entries = []
    for key, r in state.table("access").items():
        if (owner and r["owner"] != owner) or (requester and r["requester"] != requester):
            continue
        role, name = who(r["requester"])
        entries.append(AccessLogEntry(
            index=int(key), requester=r["requester"], requester_role=role, requester_name=name, owner=r["owner"],
            owner_name=who(r["owner"])[1], devices=tuple(r["devices"]), kinds=tuple(r["kinds"]),
            from_ms=r["from_ms"], to_ms=r["to_ms"], purpose=r["purpose"], ts=r["ts"], expires_ms=r["expires_ms"],
            threshold=r["threshold"], miners=tuple(r["miners"]), revoked_at=r["revoked_at"]))
    return sorted(entries, key=lambda e: e.index)


def iso(ms: int) -> str:
    """A FHIR instant (UTC, millisecond precision)."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="milliseconds")


def audit_event(entry: AccessLogEntry, ledger_name: str = "carechain ledger") -> dict[str, Any]:
    """One FHIR R4 AuditEvent (BALP disclosure pattern) for an access record."""
    purpose = [{"text": entry.purpose}]
    scope = [{"type": "devices", "valueString": ",".join(entry.devices) or "all"},
             {"type": "kinds", "valueString": ",".join(entry.kinds) or "all"},
             {"type": "period", "valueString": f"{iso(entry.from_ms)}/{iso(entry.to_ms)}"},
             {"type": "expires", "valueString": iso(entry.expires_ms)},
             {"type": "miners", "valueString": f"{entry.threshold}-of-{len(entry.miners)}: {','.join(entry.miners)}"}]
    if entry.revoked_at is not None:
        scope.append({"type": "revoked_at_leaf", "valueString": str(entry.revoked_at)})
    return {
        "resourceType": "AuditEvent",
        "id": f"carechain-access-{entry.index}",
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "action": "R",
        "recorded": iso(entry.ts),
        "period": {"start": iso(entry.from_ms), "end": iso(entry.to_ms)},
        "outcome": "0",
        "purposeOfEvent": purpose,
        "agent": [
            {"type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
             "role": [{"text": entry.requester_role}],
             "who": {"identifier": {"system": PARTY_SYSTEM, "value": entry.requester},
                     **({"display": entry.requester_name} if entry.requester_name else {})},
             "requestor": True, "purposeOfUse": purpose},
            {"type": {"coding": [{"system": _PROVENANCE_ROLE, "code": "AUT", "display": "author (originator)"}]},
             "who": {"identifier": {"system": PARTY_SYSTEM, "value": entry.owner}},
             "requestor": False},
            {"type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
             "who": {"display": ledger_name}, "requestor": False},
        ],
        "source": {"observer": {"display": ledger_name},
                   "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}]},
        "entity": [
            {"what": {"identifier": {"system": PARTY_SYSTEM, "value": entry.owner},
                      **({"display": entry.owner_name} if entry.owner_name else {})},
             "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
             "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"}},
            {"what": {"identifier": {"system": ACCESS_SYSTEM, "value": str(entry.index)}},
             "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
             "role": {"system": _OBJECT_ROLE, "code": "13", "display": "Security Resource"},
             "description": "the access record (the owner's signed grant) on the ledger", "detail": scope},
        ],
    }


def audit_bundle(entries: Iterable[AccessLogEntry], ledger_name: str = "carechain ledger") -> dict[str, Any]:
    """The access log as a FHIR R4 Bundle (type collection) of AuditEvents."""
    events: Sequence[dict[str, Any]] = [audit_event(e, ledger_name) for e in entries]
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{_uuid_of(e['id'])}", "resource": e} for e in events]}


def _uuid_of(text: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ACCESS_SYSTEM}:{text}"))

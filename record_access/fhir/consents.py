"""The owner's study consents (`consent.give`, table `consents`) as FHIR R4 Consent resources.

A consent lets her sealed readings of some kinds feed studies of some query types, for a price, to named
researchers (or any), until it expires or she revokes it. FHIR's research-scope Consent says the same: an
opt-in policy, a permit provision over the period, the data kinds, the purpose and the actors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from record_access.fhir.common import LEDGER_LEAF_SYSTEM, iso, party_reference, patient_reference, resource_id

_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_ROLE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
KIND_SYSTEM = "urn:carechain:kind"


def consent(index: int, record: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """The consent given at leaf `index`: active until it expires or is revoked."""
    live = record["revoked_at"] is None and record["expires_ms"] > now_ms
    provision: dict[str, Any] = {
        "type": "permit",
        "period": {"start": iso(int(record["ts"])), "end": iso(int(record["expires_ms"]))},
        "purpose": [{"system": _ACT_REASON, "code": "HRESCH", "display": "healthcare research"}],
        "code": [{"coding": [{"system": KIND_SYSTEM, "code": k}]} for k in record["kinds"]],
        "action": [{"text": f"studies: {', '.join(record['queries'])}; cohorts of at least {record['min_cohort']}; "
                            f"price {record['price_minor']} minor units"}],
    }
    if record["buyers"]:
        recipient = {"coding": [{"system": _ROLE, "code": "IRCP", "display": "information recipient"}]}
        provision["actor"] = [{"role": recipient, "reference": party_reference(b, resource_type="Practitioner")}
                              for b in record["buyers"]]
    resource: dict[str, Any] = {
        "resourceType": "Consent", "id": resource_id(f"consent-{index}"),
        "identifier": [{"system": LEDGER_LEAF_SYSTEM, "value": str(index)}],
        "status": "active" if live else "inactive",
        "scope": {"coding": [{"system": _SCOPE, "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8",
                                  "display": "Privacy policy acknowledgment Document"}]}],
        "patient": patient_reference(str(record["owner"])),
        "dateTime": iso(int(record["ts"])),
        "policyRule": {"coding": [{"system": _ACT_CODE, "code": "OPTIN"}]},
        "provision": provision,
    }
    if record["revoked_at"] is not None:
        resource["extension"] = [{"url": "https://carechain.dev/fhir/StructureDefinition/revoked-at-leaf",
                                  "valueString": str(record["revoked_at"])}]
    return resource

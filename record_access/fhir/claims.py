"""Insurer charges as FHIR R4 Claims: one per sale the owner's policy paid a share of (table `claims`).

The contract records, for each such sale, the policy, the item, the price and the insurer's share; the
Claim's `total` is what was billed to the insurer, its item's `net` the sale price. Money is kept in integer
minor units on the ledger; FHIR's Money is a decimal in the currency's major unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from record_access.fhir.common import LEDGER_LEAF_SYSTEM, iso, party_reference, patient_reference, resource_id
from record_access.fhir.medications import Sale, medication

POLICY_SYSTEM = "urn:carechain:policy"
_ZERO_DECIMAL = frozenset({"JPY", "KRW", "ISK", "CLP", "VND", "XAF", "XOF", "UGX", "PYG"})  # ISO 4217 exponent 0


def money(minor: int, currency: str) -> dict[str, Any]:
    """Integer minor units as a FHIR Money (a decimal in the major unit, exactly)."""
    exponent = 0 if currency in _ZERO_DECIMAL else 2
    value = Decimal(minor).scaleb(-exponent)
    return {"value": int(value) if exponent == 0 else float(value), "currency": currency}


def claim(index: int, record: Mapping[str, Any], sale: Sale, insurer: str, pharmacy: str | None) -> dict[str, Any]:
    """The Claim of the sale at leaf `index` billed to `insurer` under the policy in `record`."""
    system, _, code = str(record["item"]).partition(":")
    resource: dict[str, Any] = {
        "resourceType": "Claim", "id": resource_id(f"claim-{index}"),
        "identifier": [{"system": LEDGER_LEAF_SYSTEM, "value": str(index)}],
        "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "pharmacy"}]},
        "use": "claim",
        "patient": patient_reference(str(record["patient"])),
        "created": iso(sale.ts),
        "insurer": party_reference(insurer, resource_type="Organization"),
        "provider": party_reference(pharmacy or sale.terminal, resource_type="Organization"),
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority",
                                 "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True,
                       "coverage": {"identifier": {"system": POLICY_SYSTEM, "value": str(record["policy_id"])},
                                    "display": f"policy {record['policy_id']} ({record['category']})"}}],
        "item": [{"sequence": 1, "productOrService": medication(system, code),
                  "servicedDate": iso(sale.ts)[:10], "quantity": {"value": sale.quantity},
                  "net": money(int(record["price"]), sale.currency)}],
        "total": money(int(record["insurer_share"]), sale.currency),
    }
    return resource

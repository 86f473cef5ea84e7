"""Prescriptions and fills as FHIR R4 MedicationRequest and MedicationDispense.

The ledger holds an Rx's public terms (quantity per fill, refills, expiry, controlled, prescriber) and only
commitments to its patient and drug (`rx_ref`-salted hashes); the Rx body stays with patient and pharmacy.
So an Rx is the owner's when its patient commitment opens to one of her patient tokens (her party id, and
any pseudonymous token she names), and its drug is known from the pharmacy sales that filled it (a sale
names its item code in the clear). A sale is a fill (MedicationDispense) when it names one of her Rxs or
pays from her account.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from carechain import envelope
from carechain.entries import ENTRY_EVENT, Entry, EntryError
from contract_rules.transactions import patient_commitment
from record_access.fhir.common import (
    LEDGER_LEAF_SYSTEM,
    iso,
    party_reference,
    patient_reference,
    reference,
    resource_id,
)

RX_SYSTEM = "urn:carechain:rx"  # an Rx's rx_ref (hex), its identity on the ledger
CODE_SYSTEMS = {"ndc": "http://hl7.org/fhir/sid/ndc", "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "gtin": "https://www.gs1.org/gtin", "trialkit": "urn:carechain:trialkit"}


@dataclass(frozen=True)
class Sale:
    """A pharmacy terminal's accepted sale (a `purchase` event on the ledger), as the export needs it."""

    leaf_index: int
    ts: int
    terminal: str  # the terminal's device id
    item_code: str
    code_system: str
    quantity: int
    price_minor: int
    currency: str
    patient_token: str
    rx_ref: str | None
    paid_by: str | None  # the patient party id of an on-ledger payment


def sale_of_leaf(index: int, leaf: bytes) -> Sale | None:
    """The sale in a ledger leaf, or None if the leaf is not a pharmacy terminal's purchase event."""
    try:
        entry = Entry.decode(leaf)
        if entry.type != ENTRY_EVENT:
            return None
        payload = envelope.parse(entry.cose).payload
    except (EntryError, envelope.EnvelopeError):
        return None
    if not isinstance(payload, dict) or payload.get("kind") != "purchase" or not isinstance(payload.get("body"), dict):
        return None
    body = payload["body"]
    payment = body.get("payment")
    try:
        return Sale(index, int(payload["ts"]), str(payload["dev"]), str(body["item_code"]), str(body["code_system"]),
                    int(body["quantity"]), int(body["price_minor"]), str(body["currency"]),
                    str(body["patient_token"]), body.get("rx_ref"),
                    str(payment["patient"]) if isinstance(payment, dict) else None)
    except (KeyError, TypeError, ValueError):
        return None  # not a well-formed purchase: the contracts would not have accepted it


def owner_prescriptions(rx_table: Mapping[str, Mapping[str, Any]], tokens: Iterable[str]
                        ) -> dict[str, Mapping[str, Any]]:
    """The anchored Rxs whose patient commitment opens to one of `tokens`, by rx_ref."""
    wanted = list(tokens)
    return {ref: rx for ref, rx in rx_table.items()
            if any(patient_commitment(ref, t) == rx["patient_c"] for t in wanted)}


def medication(code_system: str, item_code: str) -> dict[str, Any]:
    return {"coding": [{"system": CODE_SYSTEMS.get(code_system, f"urn:carechain:{code_system}"), "code": item_code}]}


def medication_request(rx_ref: str, rx: Mapping[str, Any], owner: str, fills: Sequence[Sale],
                       now_ms: int) -> dict[str, Any]:
    """One anchored Rx. Its drug is the item its fills sold; an Rx never filled shows only its commitment."""
    if rx["revoked_at"] is not None:
        status = "stopped"
    elif rx["expires_ms"] <= now_ms or (fills and rx.get("open", 0) == 0 and rx["fills"] > rx["refills"]):
        status = "completed"
    else:
        status = "active"
    drug = (medication(fills[0].code_system, fills[0].item_code) if fills
            else {"text": f"not disclosed on the ledger (drug commitment {rx['drug_c']})"})
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest", "id": resource_id(f"rx-{rx_ref[:56]}"),
        "identifier": [{"system": RX_SYSTEM, "value": rx_ref}],
        "status": status, "intent": "order",
        "medicationCodeableConcept": drug,
        "subject": patient_reference(owner),
        "requester": party_reference(rx["prescriber"], resource_type="Practitioner"),
        "dispenseRequest": {"validityPeriod": {"end": iso(int(rx["expires_ms"]))},
                            "numberOfRepeatsAllowed": int(rx["refills"]),
                            "quantity": {"value": int(rx["quantity"]), "unit": "package"}},
    }
    if rx.get("controlled"):
        resource["category"] = [{"text": "controlled substance"}]
    if rx["revoked_at"] is not None:
        resource["statusReason"] = {"text": f"revoked on the ledger at leaf {rx['revoked_at']}"}
    return resource


def medication_dispense(sale: Sale, owner: str, pharmacy: str | None, rx_ref: str | None) -> dict[str, Any]:
    """One fill: the sale's item, quantity and time, the pharmacy, and the Rx it filled."""
    resource: dict[str, Any] = {
        "resourceType": "MedicationDispense", "id": resource_id(f"sale-{sale.leaf_index}"),
        "identifier": [{"system": LEDGER_LEAF_SYSTEM, "value": str(sale.leaf_index)}],
        "status": "completed",
        "medicationCodeableConcept": medication(sale.code_system, sale.item_code),
        "subject": patient_reference(owner),
        "quantity": {"value": sale.quantity, "unit": "package"},
        "whenHandedOver": iso(sale.ts),
    }
    if pharmacy:
        resource["performer"] = [{"actor": party_reference(pharmacy, resource_type="Organization")}]
    if rx_ref:
        resource["authorizingPrescription"] = [reference("MedicationRequest", rx_ref)]
    return resource

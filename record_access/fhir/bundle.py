"""One owner's records as a FHIR R4 Bundle (type collection), validated with `fhir.resources.R4B`.

`build_bundle` assembles the resources the mapping modules make from typed inputs — the Patient, each
Device, Observations with their Provenance, MedicationRequest/MedicationDispense, Claims, AuditEvents,
Consents — gives each a stable `urn:uuid:` full URL, validates the whole bundle against the R4B models
(the FHIR R4 series; fhir.resources' default models are R5) and returns the validator's own JSON form,
so that the file a FHIR server or `Bundle.model_validate` reads back serializes to the same JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carechain.profiles import DeviceProfile
from record_access.audit_log import AccessLogEntry, audit_event
from record_access.fhir import claims, consents, medications, observations, provenance
from record_access.fhir.common import full_url, iso, patient

SECTIONS = ("observations", "medications", "claims", "audit", "consents")


class BundleError(ValueError):
    """The assembled bundle does not validate as FHIR R4 (a bug in a mapping: the message says where)."""


@dataclass(frozen=True)
class OwnerRecords:
    """Everything one export holds about one owner, read and checked by the caller."""

    owner: str
    owner_name: str = ""
    devices: Mapping[str, observations.RegisteredDevice] = field(default_factory=dict)
    profiles: Mapping[str, DeviceProfile] = field(default_factory=dict)  # by profile name
    readings: Sequence[observations.OpenedReading] = ()
    proofs: Mapping[int, provenance.InclusionProof] = field(default_factory=dict)  # by leaf index
    prescriptions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # rx_ref → `rx` record
    sales: Mapping[int, medications.Sale] = field(default_factory=dict)  # by leaf index
    claims: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # sale leaf → `claims` record
    insurer: str | None = None  # the owner's policy's insurer
    terminal_owners: Mapping[str, str] = field(default_factory=dict)  # terminal device id → pharmacy party id
    consents: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # leaf → `consents` record
    accesses: Sequence[AccessLogEntry] = ()


@dataclass
class BundleSummary:
    """What went into a bundle, by resource type, and readings left out because no profile maps them."""

    counts: dict[str, int] = field(default_factory=dict)
    unmapped_readings: int = 0


def build_bundle(records: OwnerRecords, sections: Sequence[str], now_ms: int) -> tuple[dict[str, Any], BundleSummary]:
    """The validated bundle (as the JSON it serializes to) and a summary of what it holds."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    entries: list[tuple[str, dict[str, Any]]] = [(full_url("Patient", records.owner),
                                                  patient(records.owner, records.owner_name))]
    summary = BundleSummary()
    if "observations" in sections:
        summary.unmapped_readings = _observations(records, entries)
    if "medications" in sections:
        _medications(records, entries, now_ms)
    if "claims" in sections:
        for index, record in sorted(records.claims.items()):
            sale = records.sales.get(index)
            if sale is not None and records.insurer:
                entries.append((full_url("Claim", str(index)), claims.claim(
                    index, record, sale, records.insurer, records.terminal_owners.get(sale.terminal))))
    if "audit" in sections:
        for access in records.accesses:
            entries.append((full_url("AuditEvent", str(access.index)), audit_event(access)))
    if "consents" in sections:
        for index, record in sorted(records.consents.items()):
            entries.append((full_url("Consent", str(index)), consents.consent(index, record, now_ms)))
    for _, resource in entries:
        summary.counts[resource["resourceType"]] = summary.counts.get(resource["resourceType"], 0) + 1
    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": iso(now_ms),
              "entry": [{"fullUrl": url, "resource": resource} for url, resource in entries]}
    return validated(bundle), summary


def validated(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle as `fhir.resources.R4B` serializes it, after validating it; BundleError if it is not R4."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        model = Bundle.model_validate(bundle)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"the bundle is not valid FHIR R4 at {where}: {first['msg']}") from None
    canonical: dict[str, Any] = json.loads(model.model_dump_json())
    return canonical


def _observations(records: OwnerRecords, entries: list[tuple[str, dict[str, Any]]]) -> int:
    unmapped = 0
    devices_done: set[str] = set()
    for item in sorted(records.readings, key=lambda r: r.leaf_index):
        dev = records.devices.get(item.reading["dev"])
        profile = records.profiles.get(dev.profile) if dev else None
        found = observations.observations(item, profile, records.owner)
        proof = records.proofs.get(item.leaf_index)
        if dev is None or not found or proof is None:
            unmapped += 1
            continue
        if dev.device_id not in devices_done:
            devices_done.add(dev.device_id)
            entries.append((full_url("Device", dev.device_id), observations.device(dev, profile)))
        targets = [observations.observation_url(item, n) for n in range(len(found))]
        entries += zip(targets, found, strict=True)
        entries.append((full_url("Provenance", item.event_key), provenance.provenance(
            f"{found[0]['id']}-provenance"[:64], targets, full_url("Device", dev.device_id), item.cose,
            int(item.reading["ts"]), proof)))
    return unmapped


def _medications(records: OwnerRecords, entries: list[tuple[str, dict[str, Any]]], now_ms: int) -> None:
    fills: dict[str, list[medications.Sale]] = {}
    for sale in records.sales.values():
        if sale.rx_ref is not None and sale.rx_ref in records.prescriptions:
            fills.setdefault(sale.rx_ref, []).append(sale)
    for rx_ref, rx in sorted(records.prescriptions.items()):
        entries.append((full_url("MedicationRequest", rx_ref), medications.medication_request(
            rx_ref, rx, records.owner, sorted(fills.get(rx_ref, []), key=lambda s: s.leaf_index), now_ms)))
    for index, sale in sorted(records.sales.items()):
        filled = sale.rx_ref if sale.rx_ref is not None and sale.rx_ref in records.prescriptions else None
        entries.append((full_url("MedicationDispense", str(index)), medications.medication_dispense(
            sale, records.owner, records.terminal_owners.get(sale.terminal), filled)))

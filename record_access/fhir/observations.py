"""Opened readings as FHIR R4 Observations (vital-signs profile, LOINC codes, UCUM units) and their Devices.

The codes and units come from the device's profile (`device_profiles/*.yaml`, `carechain.profiles`): the
profile named in the device's operator-signed registration says which LOINC code a kind of reading has
and which UCUM unit each body field is in. A reading whose profile has no FHIR mapping for its kind is not
exported as an Observation (the caller counts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carechain.profiles import DeviceProfile, FhirObservation
from record_access.fhir.common import (
    DEVICE_KEY_SYSTEM,
    DEVICE_SYSTEM,
    EVENT_SYSTEM,
    LOINC,
    UCUM,
    full_url,
    iso,
    patient_reference,
    reference,
    resource_id,
)

_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
VITAL_SIGNS_PROFILE = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
# FHIR R4's vital-signs profiles per LOINC code (the base `vitalsigns` profile applies to every one).
_VITAL_PROFILES = {"8867-4": "heartrate", "8310-5": "bodytemp", "85354-9": "bp", "59408-5": "oxygensat",
                   "2708-6": "oxygensat", "29463-7": "bodyweight", "39156-5": "bmi", "8302-2": "bodyheight"}


@dataclass(frozen=True)
class RegisteredDevice:
    """A device as its registration on the ledger says: id, key, profile name, owner."""

    device_id: str
    public_key: bytes
    profile: str
    owner: str


@dataclass(frozen=True)
class OpenedReading:
    """One reading opened through an access record: its leaf, its device-signed COSE_Sign1, its values."""

    leaf_index: int
    cose: bytes
    reading: dict[str, Any]  # as `carechain access open` gives it: dev, seq, ts, kind and the body's fields

    @property
    def event_key(self) -> str:
        return f"{self.reading['dev']}/{self.reading['seq']}"


def device(dev: RegisteredDevice, profile: DeviceProfile | None) -> dict[str, Any]:
    """The Device: its id and registered public key (so a signature can be checked offline), its profile."""
    resource: dict[str, Any] = {
        "resourceType": "Device", "id": resource_id(dev.device_id),
        "identifier": [{"system": DEVICE_SYSTEM, "value": dev.device_id},
                       {"system": DEVICE_KEY_SYSTEM, "value": dev.public_key.hex()}],
        "status": "active",
        "deviceName": [{"name": dev.profile, "type": "model-name"}],
        "patient": patient_reference(dev.owner),
    }
    if profile is not None:
        resource["type"] = {"text": profile.description}
    return resource


def observations(item: OpenedReading, profile: DeviceProfile | None, owner: str) -> list[dict[str, Any]]:
    """Every Observation the profile maps the reading's kind to (e.g. a cuff's panel and its pulse)."""
    if profile is None:
        return []
    kind = item.reading["kind"]
    found = []
    for n, mapping in enumerate(m for m in profile.fhir if m.event == kind):
        obs = _observation(item, profile, mapping, owner, n)
        if obs is not None:
            found.append(obs)
    return found


def observation_key(item: OpenedReading, n: int) -> str:
    """The key of the n-th Observation of a reading (one reading can give several)."""
    return f"{item.event_key}/{n}"


def _observation(item: OpenedReading, profile: DeviceProfile, mapping: FhirObservation, owner: str,
                 n: int) -> dict[str, Any] | None:
    r, kind = item.reading, item.reading["kind"]
    codings = [{"system": LOINC, "code": code, "display": mapping.display} if code == mapping.code
               else {"system": LOINC, "code": code} for code in (mapping.code, *mapping.also_codes)]
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": resource_id(f"{r['dev']}-{r['seq']}-{n}"),
        "identifier": [{"system": EVENT_SYSTEM, "value": item.event_key}],
        "status": "final",
        "category": [{"coding": [{"system": _CATEGORY, "code": mapping.category}]}],
        "code": {"coding": codings, "text": mapping.display},
        "subject": patient_reference(owner),
        "effectiveDateTime": iso(int(r["ts"])),
        "device": reference("Device", r["dev"]),
    }
    if mapping.category == "vital-signs":
        specific = _VITAL_PROFILES.get(mapping.code)
        obs["meta"] = {"profile": [VITAL_SIGNS_PROFILE] + ([f"http://hl7.org/fhir/StructureDefinition/{specific}"]
                                                           if specific else [])}
    if mapping.value is not None:
        value = _quantity(r.get(mapping.value), profile.unit(kind, mapping.value))
        if value is None:
            return None  # the field is absent from this reading (optional in the body)
        obs["valueQuantity"] = value
    components = []
    for c in mapping.components:
        value = _quantity(r.get(c.value), profile.unit(kind, c.value))
        if value is not None:
            components.append({"code": {"coding": [{"system": LOINC, "code": c.code, "display": c.display}],
                                        "text": c.display}, "valueQuantity": value})
    if mapping.components and not components:
        return None
    if components:
        obs["component"] = components
    return obs


def _quantity(value: Any, unit: str | None) -> dict[str, Any] | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    quantity: dict[str, Any] = {"value": value}
    if unit:
        quantity.update(unit=unit, system=UCUM, code=unit)
    return quantity


def observation_url(item: OpenedReading, n: int) -> str:
    return full_url("Observation", observation_key(item, n))

"""The access log read from the ledger, and its FHIR R4 AuditEvent export (IHE BALP), validated by fhir.resources."""

from __future__ import annotations

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from record_access import access_log, audit_bundle, audit_event, build_grant, build_request, build_revoke
from record_access.audit_log import DCM, PARTY_SYSTEM
from record_access.ledger_view import registered_miners
from tests.test_record_opening import DOCTOR, EPOCH_MS, OWNER, OWNER_PRE, T0, granted_world


def test_every_access_is_in_the_log_the_owners_own_too_and_a_revocation_shows() -> None:
    world, doctor_access = granted_world(epochs=1, readings=1)
    # The owner reads her own records: the same request and grant, so the same log line.
    own = build_request(OWNER, owner=OWNER.device_id, devices=[], kinds=[], from_ms=T0, to_ms=T0 + EPOCH_MS,
                        purpose="my own copy", expires_ms=T0 + 86_400_000, nonce=1, ts=T0 + 5)
    world.append(own.entry)
    grant = build_grant(OWNER, OWNER_PRE, own, requester_pre_pk=OWNER_PRE.public_key,
                        miners=registered_miners(world.runtime.state), final_note=world.final_note(), threshold=2,
                        shares=3, expires_ms=T0 + 3_600_000, ts=T0 + 6)
    own_access = world.append(grant.entry)
    world.append(build_revoke(OWNER, doctor_access, "care episode over", T0 + 7))

    log = access_log(world.runtime.state)
    assert [e.index for e in log] == [doctor_access, own_access]
    doctor, mine = log
    assert (doctor.requester, doctor.requester_role, doctor.owner, doctor.purpose) == (
        DOCTOR.device_id, "doctor", OWNER.device_id, "follow-up")
    assert doctor.kinds == ("heart_rate",) and doctor.threshold == 3 and len(doctor.miners) == 5
    assert doctor.status(T0 + 8) == "revoked" and doctor.revoked_at == own_access + 1
    assert mine.own_access and mine.status(T0 + 8) == "active" and mine.status(T0 + 3_600_000) == "expired"
    assert [e.index for e in access_log(world.runtime.state, requester=DOCTOR.device_id)] == [doctor_access]
    assert access_log(world.runtime.state, owner=DOCTOR.device_id) == []


def test_the_fhir_export_is_a_valid_r4_bundle_of_balp_audit_events() -> None:
    world, index = granted_world(epochs=1, readings=1)
    entry = access_log(world.runtime.state)[0]
    event = AuditEvent.model_validate(audit_event(entry))
    assert (event.type.system, event.type.code, event.action, event.outcome) == (DCM, "110106", "R", "0")
    requester, owner, source = event.agent
    assert requester.requestor and requester.who.identifier.system == PARTY_SYSTEM
    assert requester.who.identifier.value == DOCTOR.device_id and requester.purposeOfUse[0].text == "follow-up"
    assert owner.who.identifier.value == OWNER.device_id and not owner.requestor
    assert source.type.coding[0].code == "110153"
    patient = event.entity[0]
    assert patient.what.identifier.value == OWNER.device_id and patient.role.code == "1"
    details = {d.type: d.valueString for d in event.entity[1].detail}
    assert details["kinds"] == "heart_rate" and details["devices"] == "all"
    assert event.recorded.isoformat().startswith("2025-12-06") and event.purposeOfEvent[0].text == "follow-up"

    bundle = Bundle.model_validate(audit_bundle(access_log(world.runtime.state)))
    assert bundle.type == "collection" and [e.resource.id for e in bundle.entry] == [f"carechain-access-{index}"]
    assert len({e.fullUrl for e in bundle.entry}) == 1

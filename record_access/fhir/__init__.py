"""FHIR R4 export of one owner's records (docs/fhir.md): pure mappings from checked inputs to resources.

Readings come in already opened through an access record (`carechain export fhir` opens them with the
same functions as `carechain access open`, so the export is an access on the log); prescriptions, fills,
claims, consents and the access log come from a replay of the ledger. `build_bundle` validates the whole
bundle with `fhir.resources.R4B`; `verify_bundle` re-checks every Provenance offline.
"""

from record_access.fhir.bundle import SECTIONS, BundleError, BundleSummary, OwnerRecords, build_bundle, validated
from record_access.fhir.medications import Sale, owner_prescriptions, sale_of_leaf
from record_access.fhir.observations import OpenedReading, RegisteredDevice
from record_access.fhir.provenance import PROOF_URL, InclusionProof, ProvenanceError, Verified, verify_bundle

__all__ = ["PROOF_URL", "SECTIONS", "BundleError", "BundleSummary", "InclusionProof", "OpenedReading",
           "OwnerRecords", "ProvenanceError", "RegisteredDevice", "Sale", "Verified", "build_bundle",
           "owner_prescriptions", "sale_of_leaf", "validated", "verify_bundle"]

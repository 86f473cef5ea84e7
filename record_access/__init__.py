"""The record owner's and the requester's tools for owner-authorized, always-logged access (docs/access.md).

A party package like `edge_agent` or `chain_miner`, run through `carechain access`: sans-IO cores for
building and checking requests (`requesting`), grants and revocations (`granting`), opening what a grant
releases (`opening`), the access log and its FHIR export (`audit_log`), reading a ledger replica
(`ledger_view`); and one thin MQTT shell (`client`).
"""

from record_access.audit_log import AccessLogEntry, access_log, audit_bundle, audit_event
from record_access.granting import GrantError, SignedGrant, build_grant, build_revoke, seed_of_final_checkpoint
from record_access.ledger_view import AccessContext, LedgerViewError, access_context, registered_miners
from record_access.opening import Fault, Opening, OpeningError, Problem, open_record, open_records
from record_access.requesting import RequestError, SignedRequest, build_request, parse_request_file, parse_request_leaf

__all__ = ["AccessContext", "AccessLogEntry", "Fault", "GrantError", "LedgerViewError", "Opening", "OpeningError",
           "Problem", "RequestError", "SignedGrant", "SignedRequest", "access_context", "access_log", "audit_bundle",
           "audit_event", "build_grant", "build_request", "build_revoke", "open_record", "open_records",
           "parse_request_file", "parse_request_leaf", "registered_miners", "seed_of_final_checkpoint"]

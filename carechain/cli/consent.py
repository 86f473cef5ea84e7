"""`carechain consent give|show|revoke`: a patient's consent to let studies use her sealed readings.

A consent names the sealed kinds, the query types, the smallest cohort she will be counted in, the price per
use, the researchers allowed (none named: any registered one), the expiry and the coarse attributes she
discloses (age band, sex, region) for study filters. It lives on the ledger (contract "market",
docs/market.md); `show --fhir` exports it as a FHIR R4 Consent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import load_key, now_ms, print_result, replay, submit
from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, example, fail, out

consent_app = typer.Typer(
    help="Consents to the data market: which of your sealed readings studies may use, how, for whom, at what price.",
    no_args_is_help=True,
    epilog=example("carechain consent give --key keys/alice.key --kinds heart_rate --queries count,mean "
                   "--min-cohort 20 --price 150 --expires 180d --age-band 30-44",
                   "carechain consent show --owner 7xq3kd2m4n5p6r7s --fhir consents.json",
                   "carechain consent revoke 42 --key keys/alice.key"))

KeyOpt = Annotated[Path, typer.Option("--key", help="Your (the patient's) Ed25519 key file: it signs.")]
CONSENT_SYSTEM = "urn:carechain:consent"
_EXT = "urn:carechain:fhir:consent"  # extension URLs for the terms FHIR has no element for


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@consent_app.command("give", epilog=example(
    "carechain consent give --key keys/alice.key --kinds heart_rate,glucose --queries count,mean,histogram "
    "--min-cohort 20 --price 150 --buyer 4k2m5n6p7q3r2s7t --expires 180d --sex f --region north"))
def give(
    key: KeyOpt,
    kinds: Annotated[str, typer.Option(help="Sealed kinds studies may use, comma-separated (heart_rate,glucose).")],
    queries: Annotated[str, typer.Option(help="Query types allowed, comma-separated: count, sum, mean, histogram, "
                                              "resting_heart_rate, time_in_range.")],
    min_cohort: Annotated[int, typer.Option(help="Answer only if at least this many valid contributors "
                                                 "(2..100000).", min=2, max=100_000)],
    price: Annotated[int, typer.Option(help="Price per use, in minor units.", min=0)] = 0,
    buyer: Annotated[list[str] | None, typer.Option(help="A researcher allowed to use it (party id; repeat). "
                                                         "None: any registered researcher.")] = None,
    expires: Annotated[str, typer.Option(help="Expiry: a duration from now (180d) or a time (ISO 8601, epoch "
                                              "ms).")] = "365d",
    age_band: Annotated[str | None, typer.Option(help="Disclose your age band: 18-29, 30-44, 45-64 or 65+.")] = None,
    sex: Annotated[str | None, typer.Option(help="Disclose your sex: f, m or x.")] = None,
    region: Annotated[str | None, typer.Option(help="Disclose your region (at most 16 characters).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Give a consent (signed by you, appended to the ledger); its leaf index names it from then on."""
    from pydantic import ValidationError

    from carechain.cli._options import parse_when_ms
    from contract_rules import transactions as ce

    now = now_ms()
    expires_ms = parse_when_ms(expires, "--expires", now)
    identity = load_key(key)
    try:
        consent = ce.ConsentGive(kinds=_csv(kinds), queries=_csv(queries), min_cohort=min_cohort, price_minor=price,
                                 buyers=list(buyer or []), expires_ms=expires_ms,
                                 attributes=ce.CohortAttributes(age_band=age_band, sex=sex, region=region),
                                 nonce=now, ts=now)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'consent'}: {e['msg']}" for e in exc.errors())
        raise fail(f"not a valid consent: {problems}") from None
    index = submit(config, data_dir, ce.consent_give_entry(identity, consent))
    print_result({"consent": index, "owner": identity.device_id, "kinds": ",".join(consent.kinds),
                  "queries": ",".join(consent.queries), "min_cohort": min_cohort, "price_minor": price,
                  "buyers": ",".join(consent.buyers) or "any registered researcher",
                  "expires_ms": expires_ms}, as_json)


@consent_app.command("revoke", epilog=example("carechain consent revoke 42 --key keys/alice.key"))
def revoke(
    consent: Annotated[int, typer.Argument(help="The consent: the leaf index `consent give` printed.", min=0)],
    key: KeyOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Revoke a consent (only its owner can): no contribution may use it from then on."""
    from contract_rules import transactions as ce

    index = submit(config, data_dir, ce.consent_revoke_entry(load_key(key), ce.ConsentRevoke(consent=consent,
                                                                                              ts=now_ms())))
    print_result({"consent": consent, "revoked_at_leaf": index}, as_json)


@consent_app.command("show", epilog=example("carechain consent show 42 --fhir consent.json",
                                            "carechain consent show --owner 7xq3kd2m4n5p6r7s --json"))
def show(
    consent: Annotated[int | None, typer.Argument(help="One consent (its leaf index); all when omitted.",
                                                  min=0)] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's consents (party id).")] = None,
    fhir: Annotated[Path | None, typer.Option(help="Also write them as FHIR R4: a Consent for one, else a Bundle "
                                                   "of Consents.")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Consents on the ledger with their terms and status (active, expired, revoked)."""
    from contract_rules.clock import attested_ms
    from contract_rules.market import CONSENTS

    state = replay(config, data_dir).state
    table = state.table(CONSENTS)
    if consent is not None and str(consent) not in table:
        raise fail(f"no consent at leaf {consent} (see `carechain consent show` for the list)", 1)
    keys = [str(consent)] if consent is not None else sorted(table, key=int)
    records = [{"consent": int(k), **table[k]} for k in keys if owner is None or table[k]["owner"] == owner]
    now = attested_ms(state) or now_ms()
    for record in records:
        record["status"] = consent_status(record, now)
    if fhir is not None:
        _write_fhir(fhir, records, single=consent is not None)
    if as_json:
        out.print_json(data={"consents": records, "count": len(records), "fhir": str(fhir) if fhir else None})
        return
    if not records:
        out.print("(no consents)", highlight=False)
        return
    for r in records:
        attrs = ", ".join(f"{k} {v}" for k, v in r["attributes"].items() if v is not None) or "none disclosed"
        out.print(f"consent {r['consent']}  owner {r['owner']}  {r['status']}\n    {','.join(r['kinds'])} for "
                  f"{','.join(r['queries'])}; cohort ≥ {r['min_cohort']}; price {r['price_minor']}; buyers "
                  f"{','.join(r['buyers']) or 'any researcher'}; attributes: {attrs}", soft_wrap=True,
                  markup=False, highlight=False)


def consent_status(record: dict[str, Any], now_ms: int) -> str:
    if record["revoked_at"] is not None:
        return "revoked"
    return "expired" if record["expires_ms"] <= now_ms else "active"


def _write_fhir(path: Path, records: list[dict[str, Any]], single: bool) -> None:
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.consent import Consent

    from carechain.files import write_atomic

    resources = [fhir_consent(r) for r in records]
    for resource in resources:
        Consent.model_validate(resource)  # never write a resource a FHIR server would refuse
    if single:
        document = resources[0]
    else:
        document = {"resourceType": "Bundle", "type": "collection",
                    "entry": [{"fullUrl": f"{CONSENT_SYSTEM}:{r['consent']}", "resource": res}
                              for r, res in zip(records, resources, strict=True)]}
        Bundle.model_validate(document)
    write_atomic(path, (json.dumps(document, indent=1) + "\n").encode())


def fhir_consent(record: dict[str, Any]) -> dict[str, Any]:
    """A consent record (with its "consent" leaf index and "status") as a FHIR R4 Consent resource.

    A research-scope permit for the owner as patient: the buyers as information recipients, the kinds as
    data classes, the expiry as the provision's period end; minimum cohort, price and query types, which FHIR
    has no element for, as extensions. Revoked and expired consents are "inactive".
    """
    from record_access.audit_log import PARTY_SYSTEM, iso

    extension: list[dict[str, Any]] = [
        {"url": f"{_EXT}:min-cohort", "valueInteger": record["min_cohort"]},
        {"url": f"{_EXT}:price-minor", "valueInteger": record["price_minor"]},
        *({"url": f"{_EXT}:query-type", "valueCode": q} for q in record["queries"]),
        *({"url": f"{_EXT}:attribute-{k.replace('_', '-')}", "valueString": v}
          for k, v in record["attributes"].items() if v is not None),
    ]
    if record["revoked_at"] is not None:
        extension.append({"url": f"{_EXT}:revoked-at-leaf", "valueInteger": record["revoked_at"]})
    provision: dict[str, Any] = {
        "type": "permit",
        "period": {"end": iso(record["expires_ms"])},
        "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "use",
                                "display": "Use"}]}],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH",
                     "display": "healthcare research"}],
        "class": [{"system": "urn:carechain:kind", "code": kind} for kind in record["kinds"]],
    }
    if record["buyers"]:
        provision["actor"] = [
            {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                  "code": "IRCP", "display": "information recipient"}]},
             "reference": {"identifier": {"system": PARTY_SYSTEM, "value": buyer}}} for buyer in record["buyers"]]
    return {
        "resourceType": "Consent",
        "id": f"carechain-consent-{record['consent']}",
        "extension": extension,
        "identifier": [{"system": CONSENT_SYSTEM, "value": str(record["consent"])}],
        "status": "active" if record["status"] == "active" else "inactive",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research",
                              "display": "Research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8",
                                  "display": "Privacy policy acknowledgement Document"}]}],
        "patient": {"identifier": {"system": PARTY_SYSTEM, "value": record["owner"]}},
        "dateTime": iso(record["ts"]),
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN",
                                   "display": "opt-in"}]},
        "provision": provision,
    }

"""`carechain party|rx|policy`: contract entries appended to the ledger in the bridge data dir.

They run on the bridge host for now (like `carechain register`): each replays the ledger from the
deployment's genesis (DATA_DIR/contracts/genesis.json), dry-runs the new entry against the contracts so a
refused one never reaches the log, and appends it (chain_bridge.contract_admin decides; this module only
parses arguments and prints).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from carechain.cli._ledger import load_key, now_ms, print_result, read_json, replay, submit
from carechain.cli._options import ConfigOpt, DataDirOpt, JsonOpt, bridge_dir, example, fail, load

party_app = typer.Typer(help="Register parties (prescribers, pharmacies, insurers, miners, patients, doctors, "
                             "researchers, formulary authorities) on the ledger.",
                        no_args_is_help=True, epilog=example("carechain party register insurer keys/insurer.key "
                                                             "--name 'Demo Health'"))
rx_app = typer.Typer(help="Prescriptions: issue (sign + anchor), show, verify against the ledger, revoke.",
                     no_args_is_help=True, epilog=example("carechain rx issue rx-draft.json --key keys/prescriber.key"))
policy_app = typer.Typer(help="Insurance policies: a patient's consent, register her coverage, settle a wellness "
                              "week.",
                         no_args_is_help=True, epilog=example("carechain policy register policy.json "
                                                              "--key keys/insurer.key"))
KeyOpt = Annotated[Path, typer.Option("--key", help="The acting party's key file (it signs the entry).")]


# -- party --------------------------------------------------------------------------------------------

@party_app.command("register", epilog=example(
    "carechain party register pharmacy keys/pharmacy.key --name 'Main St Pharmacy'",
    "carechain party register patient keys/alice.key --name Alice --pre-key keys/alice.pre"))
def party_register(
    role: Annotated[str, typer.Argument(help="prescriber, pharmacy, insurer, miner, patient, doctor, researcher or "
                                             "authority (signs the formulary).")],
    public_key: Annotated[str, typer.Argument(help="The party's public key: 64 hex digits, or its key file.")],
    name: Annotated[str, typer.Option(help="A display name (e.g. the pharmacy's name).")],
    pre_key: Annotated[str | None, typer.Option("--pre-key", help="The party's re-encryption key file (`carechain "
                                                                   "keys new --pre`), or PUBLIC:VERIFYING as 66+66 hex "
                                                                   "digits. Needed to own or request sealed records.")]
    = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a party's public key in a role, signed by the operator key; its account is ROLE:<party id>.

    A pharmacy's terminals are then registered with `carechain register`, owner = the pharmacy's party id.
    A patient (a record owner) and a requester (doctor, researcher, insurer) also register a re-encryption
    key with --pre-key: only its public halves go on the ledger.
    """
    from carechain.identity import PublicKeyError, device_id_for, parse_public_key_hex
    from chain_bridge.registry import operator_key
    from contract_rules import transactions as ce

    if role not in ce.PARTY_ROLES:
        raise fail(f"role {role!r} must be one of {', '.join(ce.PARTY_ROLES)}")
    if Path(public_key).is_file():
        pk = load_key(Path(public_key)).public_key
    else:
        try:
            pk = parse_public_key_hex(public_key, "PUBLIC_KEY (not a key file either)")
        except PublicKeyError as exc:
            raise fail(str(exc)) from None
    cfg = load(config)
    bdir = bridge_dir(cfg, data_dir)
    pre_pk, pre_vk = _pre_public_keys(pre_key) if pre_key is not None else (None, None)
    reg = ce.PartyRegistration(role=role, pk=pk, name=name, ts=now_ms(), pre_pk=pre_pk, pre_vk=pre_vk)
    index = submit(config, data_dir, ce.party_registration_entry(operator_key(bdir), reg))
    party = device_id_for(pk)
    result = {"party_id": party, "role": role, "account": f"{role}:{party}", "leaf": index}
    if pre_pk is not None:
        result["pre_public_key"] = pre_pk.hex()
    print_result(result, as_json)


def _pre_public_keys(text: str) -> tuple[bytes, bytes]:
    """(public key, verifying key) of a re-encryption key file, or of `PUBLIC:VERIFYING` in hex."""
    import re

    from carechain.identity import KeyFileError
    from carechain.reencryption import PRE_PUBLIC_SIZE, PreKey

    if Path(text).is_file():
        try:
            key = PreKey.load(Path(text))
        except KeyFileError as exc:
            raise fail(str(exc)) from None
        return key.public_key, key.verifying_key
    hex_size = 2 * PRE_PUBLIC_SIZE
    m = re.fullmatch(rf"([0-9a-fA-F]{{{hex_size}}}):([0-9a-fA-F]{{{hex_size}}})", text.strip())
    if m is None:
        raise fail(f"--pre-key {text!r:.80} is neither a re-encryption key file nor PUBLIC:VERIFYING "
                   f"({hex_size}+{hex_size} hex digits)")
    return bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2))


# -- rx -----------------------------------------------------------------------------------------------

@rx_app.command("issue", epilog=example("carechain rx issue rx-draft.json --key keys/prescriber.key"))
def rx_issue(
    draft: Annotated[Path, typer.Argument(help="Rx JSON: patient_token, drug_code, code_system (ndc|rxnorm|gtin), "
                                               "quantity, refills, expires (YYYY-MM-DD) or expires_ms, "
                                               "controlled, sig_text.")],
    key: KeyOpt,
    out_file: Annotated[Path | None, typer.Option("--out", help="Where to write the signed Rx file "
                                                  "(default: DRAFT with the suffix .rx.json).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Sign an Rx with the prescriber's key, write the signed Rx file (off-ledger) and anchor its hash.

    Give the signed file to the patient and the pharmacy; the pharmacy's terminal puts its rx_ref on the sale.
    """
    from pydantic import ValidationError

    from chain_bridge.contract_admin import RxFile
    from contract_rules import transactions as ce

    prescriber = load_key(key)
    raw = read_json(draft, "the Rx draft")
    now = now_ms()
    if "expires" in raw:
        try:
            day = datetime.date.fromisoformat(str(raw.pop("expires")))
        except ValueError:
            raise fail(f"{draft}: expires must be a date YYYY-MM-DD") from None
        raw["expires_ms"] = int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()
                                * 1000)
    try:
        rx = ce.Prescription.model_validate({**raw, "prescriber": prescriber.device_id, "issued_ms": now,
                                             "nonce": os.urandom(16)})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"{draft}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    signed = RxFile(rx, ce.sign_prescription(prescriber, rx), prescriber.public_key)
    index = submit(config, data_dir, ce.signed(prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, now)))
    target = out_file or draft.with_name(draft.name.removesuffix(".json") + ".rx.json")
    signed.write(target)
    print_result({"rx_ref": rx.rx_ref(), "anchor_leaf": index, "rx_file": str(target)}, as_json)


def _rx_file(path: Path) -> Any:
    from chain_bridge.contract_admin import RxFileError, read_rx_file

    try:
        return read_rx_file(path)
    except RxFileError as exc:
        raise fail(str(exc)) from None


@rx_app.command("show", epilog=example("carechain rx show rx-draft.rx.json"))
def rx_show(rx_file: Annotated[Path, typer.Argument(help="A signed Rx file (from `carechain rx issue`).")],
            as_json: JsonOpt = False) -> None:
    """Print a signed Rx file: its terms, rx_ref and whether the prescriber's signature holds (offline)."""
    from contract_rules.transactions import verify_prescription

    signed = _rx_file(rx_file)
    good = verify_prescription(signed.prescriber_pk, signed.rx, signed.signature)
    body = signed.to_json()["rx"]
    print_result({**{k: v for k, v in body.items() if k not in ("v", "nonce")}, "rx_ref": signed.rx.rx_ref(),
            "signature": "valid" if good else "INVALID"}, as_json)
    if not good:
        raise typer.Exit(1)


@rx_app.command("verify", epilog=example("carechain rx verify rx-draft.rx.json --json"))
def rx_verify(rx_file: Annotated[Path, typer.Argument(help="A signed Rx file (from `carechain rx issue`).")],
              config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Check an Rx file against the ledger: prescriber signature, anchored terms, revocation, fills left.

    `final` says whether every leaf the answer rests on (the anchor, the sales, a revocation) is covered by
    a final checkpoint recorded on the ledger (cosigned by a majority of the active miners); until then a
    dishonest bridge could still show another history. Exit 1 if the Rx would not allow a sale (unknown,
    altered, revoked, or signed by another key)."""
    from chain_bridge.contract_admin import rx_status
    from contract_rules.miners import final_size as final_size_of

    signed = _rx_file(rx_file)
    runtime = replay(config, data_dir)
    final_size = final_size_of(runtime.state)
    status = rx_status(runtime, signed, now_ms())
    leaves = [status.get("anchor_leaf"), status.get("revoked_at"), *status.get("sale_leaves", [])]
    status.update(final_tree_size=final_size,
                  final=status["anchored"] and all(leaf < final_size for leaf in leaves if leaf is not None))
    print_result(status, as_json)
    if not status["ok"]:
        raise typer.Exit(1)


@rx_app.command("revoke", epilog=example(
    "carechain rx revoke rx-draft.rx.json --key keys/prescriber.key --reason allergy"))
def rx_revoke(rx: Annotated[str, typer.Argument(help="A signed Rx file, or its rx_ref (64 hex digits).")],
              key: KeyOpt, reason: Annotated[str, typer.Option(help="Why (kept on the ledger).")],
              config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke an anchored Rx (only its prescriber can): later sales against it are refused."""
    import re

    from contract_rules import transactions as ce

    ref = rx if re.fullmatch(r"[0-9a-f]{64}", rx) else _rx_file(Path(rx)).rx.rx_ref()
    index = submit(config, data_dir, ce.signed(load_key(key), ce.RX_REVOKE,
                                                ce.RxRevoke(rx_ref=ref, reason=reason, ts=now_ms())))
    print_result({"rx_ref": ref, "revoked_at_leaf": index}, as_json)


# -- policy -------------------------------------------------------------------------------------------

def _policy_offer(path: Path, raw: dict[str, Any]) -> Any:
    """The insurer's offer in a policy JSON file (`patient_token` is accepted for `patient`, her party id)."""
    from pydantic import ValidationError

    from contract_rules import transactions as ce

    terms = {k: v for k, v in raw.items() if k not in ("consent", "insurer", "patient_token")}
    terms.setdefault("patient", raw.get("patient_token"))
    terms.setdefault("ts", now_ms())
    try:
        return ce.PolicyOffer.model_validate(terms, strict=False)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _insurer_id(text: str) -> str:
    import re

    if Path(text).is_file():
        return str(load_key(Path(text)).device_id)
    if not re.fullmatch(r"[a-z2-7]{16}", text):
        raise fail(f"--insurer {text!r:.80} is neither a key file nor a party id (16 characters a-z, 2-7)")
    return text


@policy_app.command("consent", epilog=example(
    "carechain policy consent policy.json --key keys/alice.key --insurer 7xq3kd2m4n5p6r7s"))
def policy_consent(
    policy: Annotated[Path, typer.Argument(help="The insurer's policy JSON (see `carechain policy register`).")],
    key: Annotated[Path, typer.Option("--key", help="The patient's key file (her wallet): it signs her consent.")],
    insurer: Annotated[str, typer.Option(help="The insurer's party id (or its key file): the consent is to it only.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Where to write the consented policy (default: "
                                                  "POLICY with the suffix .consented.json).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a patient's consent to a policy offer, offline; the insurer then registers the file it writes.

    The consent covers every term (coverage, caps, wellness, the time stamp) and the insurer's id: changed
    terms or another insurer make the ledger refuse it.
    """
    import json

    from contract_rules import transactions as ce

    patient = load_key(key)
    offer = _policy_offer(policy, read_json(policy, "the policy"))
    if offer.patient != patient.device_id:
        raise fail(f"{policy}: the policy is for patient {offer.patient}, but {key} is {patient.device_id}")
    insurer_id = _insurer_id(insurer)
    consent = ce.sign_policy_consent(patient, insurer_id, offer)
    target = out_file or policy.with_name(policy.name.removesuffix(".json") + ".consented.json")
    doc = {**offer.model_dump(mode="json"), "insurer": insurer_id, "consent": consent.hex()}
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print_result({"policy_id": offer.policy_id, "patient": offer.patient, "insurer": insurer_id,
                  "consented_policy": str(target)}, as_json)


@policy_app.command("register", epilog=example(
    "carechain policy register policy.consented.json --key keys/insurer.key",
    "carechain policy register policy.json --key keys/insurer.key --patient-key keys/alice.key"))
def policy_register(
    policy: Annotated[Path, typer.Argument(help="Policy JSON: policy_id, patient (her party id), coverage "
                                                "[{category, bp, caps: {\"ndc:CODE\": cap per package}}], optional "
                                                "wellness {min_active_minutes, rebate_minor}; bp: basis points of "
                                                "min(price, cap x quantity) billed to the insurer. With her consent "
                                                "from `carechain policy consent`, or give --patient-key.")],
    key: KeyOpt,
    patient_key: Annotated[Path | None, typer.Option("--patient-key", help="The patient's key file, to sign her "
                                                     "consent here (when she is present).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a coverage policy for a patient, signed by the insurer and consented to by the patient."""
    from contract_rules import transactions as ce

    insurer = load_key(key)
    raw = read_json(policy, "the policy")
    offer = _policy_offer(policy, raw)
    if "consent" in raw:
        if raw.get("insurer") != insurer.device_id:
            raise fail(f"{policy}: the patient consented to insurer {raw.get('insurer')}, not {insurer.device_id}")
        try:
            consent = bytes.fromhex(str(raw["consent"]))
        except ValueError:
            raise fail(f"{policy}: consent must be hex (from `carechain policy consent`)") from None
    elif patient_key is not None:
        consent = ce.sign_policy_consent(load_key(patient_key), insurer.device_id, offer)
    else:
        raise fail(f"{policy}: a policy binds a patient only with her consent: run `carechain policy consent` "
                   "with her key, or give --patient-key")
    if len(consent) != 64:
        raise fail(f"{policy}: consent must be a 64-byte signature")
    index = submit(config, data_dir, ce.signed(insurer, ce.POLICY_REGISTER, ce.consented_policy(offer, consent)))
    print_result({"policy_id": offer.policy_id, "patient": offer.patient, "insurer": f"insurer:{insurer.device_id}",
                  "leaf": index}, as_json)


@policy_app.command("settle", epilog=example(
    "carechain policy settle 7xq3kd2m4n5p6r7s 2026-W47 --key keys/alice.key"))
def policy_settle(
    patient_token: Annotated[str, typer.Argument(help="The patient's party id.")],
    week: Annotated[str, typer.Argument(help="The ISO week to settle, e.g. 2026-W47 (must be over).")],
    key: KeyOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Evaluate a patient's wellness week from anchored telemetry; pays the rebate if it was earned.

    The patient herself (--key: her wallet key) or her policy's insurer may settle; the week must be over by
    the ledger's attested time."""
    from contract_rules import transactions as ce

    try:
        settle = ce.WellnessSettle(patient_token=patient_token, week=week, ts=now_ms())
    except ValueError:
        raise fail(f"week {week!r} must look like 2026-W47") from None
    index = submit(config, data_dir, ce.signed(load_key(key), ce.WELLNESS_SETTLE, settle))
    result = replay(config, data_dir).state.table("wellness").get(f"{patient_token}:{week}", {})
    print_result({"leaf": index, **result}, as_json)
